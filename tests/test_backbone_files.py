"""DINOv3 weights in Meta's and timm's naming load into exactly the model they were written from.

The files are written here straight from the published mapping (transformers' convert_dinov3_vit_to_hf.py, timm's
eva.checkpoint_filter_fn), never through the loader's own renaming, so a wrong rename cannot agree with itself."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel, DINOv3ViTConfig, DINOv3ViTModel

import convert_backbone
import run_inference
import run_training
from backbone_files import is_weight_file, load_weight_file
from conftest import ROOT, run_script, training_folders

HEADS_OF_32 = 2  # hidden 64 / head dim 32: not the default head dim 64, so the heads must come from rope_embed.periods


def random_hf_model(registers=4, gated=False, key_bias=False, heads=HEADS_OF_32, seed=0) -> DINOv3ViTModel:
    config = DINOv3ViTConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=heads,
        num_register_tokens=registers,
        hidden_act="silu" if gated else "gelu",
        use_gated_mlp=gated,
        key_bias=key_bias,
        pos_embed_shift=None,
        pos_embed_jitter=None,
        pos_embed_rescale=None,
    )
    torch.manual_seed(seed)
    model = DINOv3ViTModel(config)
    with torch.no_grad():  # every weight different from its initial value, layer scale and biases included
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def meta_layout(model: DINOv3ViTModel) -> dict:
    """The state dict Meta's DinoVisionTransformer would have for this model."""
    hf, config = model.state_dict(), model.config
    head_dim = config.hidden_size // config.num_attention_heads
    out = {
        "cls_token": hf["embeddings.cls_token"],
        "mask_token": hf["embeddings.mask_token"].reshape(1, -1),
        "patch_embed.proj.weight": hf["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embeddings.bias"],
        "norm.weight": hf["norm.weight"],
        "norm.bias": hf["norm.bias"],
        "rope_embed.periods": 100.0 ** (2 * torch.arange(head_dim // 4) / (head_dim // 2)),
        "local_cls_norm.weight": torch.randn(config.hidden_size),
        "local_cls_norm.bias": torch.randn(config.hidden_size),
    }
    if config.num_register_tokens:
        out["storage_tokens"] = hf["embeddings.register_tokens"]
    for i in range(config.num_hidden_layers):
        b, layer = f"blocks.{i}.", f"model.layer.{i}."
        a = layer + "attention."
        out[b + "attn.qkv.weight"] = torch.cat([hf[a + f"{n}_proj.weight"] for n in "qkv"])
        if config.key_bias:  # continued pre-training with a real key bias (SurgeNetDINO): no bias mask
            out[b + "attn.qkv.bias"] = torch.cat([hf[a + f"{n}_proj.bias"] for n in "qkv"])
        else:  # Meta's released models: a key bias that the bias mask zeroes
            junk = torch.randn(config.hidden_size)
            out[b + "attn.qkv.bias"] = torch.cat([hf[a + "q_proj.bias"], junk, hf[a + "v_proj.bias"]])
            out[b + "attn.qkv.bias_mask"] = torch.cat(
                [torch.ones_like(junk), torch.zeros_like(junk), torch.ones_like(junk)]
            )
        out[b + "attn.proj.weight"], out[b + "attn.proj.bias"] = hf[a + "o_proj.weight"], hf[a + "o_proj.bias"]
        out[b + "ls1.gamma"], out[b + "ls2.gamma"] = (
            hf[layer + "layer_scale1.lambda1"],
            hf[layer + "layer_scale2.lambda1"],
        )
        for norm in ("norm1", "norm2"):
            out[b + f"{norm}.weight"], out[b + f"{norm}.bias"] = (
                hf[layer + f"{norm}.weight"],
                hf[layer + f"{norm}.bias"],
            )
        mlp = (
            {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"}
            if config.use_gated_mlp
            else {"fc1": "up_proj", "fc2": "down_proj"}
        )
        for theirs, ours in mlp.items():
            for kind in ("weight", "bias"):
                out[b + f"mlp.{theirs}.{kind}"] = hf[layer + f"mlp.{ours}.{kind}"]
    return {k: v.clone() for k, v in out.items()}


def timm_layout(model: DINOv3ViTModel) -> dict:
    """timm's names for the same weights (vit_*_patch16_dinov3_qkvb): reg_token, gamma_N, q_bias/v_bias, fc1_g/fc1_x."""
    renames = {
        "storage_tokens": "reg_token",
        ".ls1.gamma": ".gamma_1",
        ".ls2.gamma": ".gamma_2",
        ".mlp.w1.": ".mlp.fc1_g.",
        ".mlp.w2.": ".mlp.fc1_x.",
        ".mlp.w3.": ".mlp.fc2.",
    }
    out = {}
    for key, tensor in meta_layout(model).items():
        if key.endswith((".periods", ".bias_mask", "mask_token")) or key.startswith("local_cls_norm"):
            continue
        if key.endswith("qkv.bias"):
            q, _, v = tensor.chunk(3)
            out[key.replace("qkv.bias", "q_bias")], out[key.replace("qkv.bias", "v_bias")] = q, v
            continue
        for theirs, timm in renames.items():
            key = key.replace(theirs, timm)
        out[key] = tensor
    return out


def patch_features(model, seed=1) -> torch.Tensor:
    image = torch.randn(1, 3, 48, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        hidden = model(pixel_values=image).last_hidden_state
    return hidden[:, 1 + model.config.num_register_tokens :]


@pytest.mark.parametrize(
    "variant",
    [dict(), dict(gated=True), dict(registers=0, key_bias=True)],
    ids=["released", "swiglu", "no-registers-key-bias"],
)
def test_a_meta_file_gives_the_patch_features_of_the_model_it_was_written_from(tmp_path, variant):
    original = random_hf_model(**variant)
    torch.save(meta_layout(original), tmp_path / "dinov3.pth")
    loaded = load_weight_file(tmp_path / "dinov3.pth", any_architecture=True)
    torch.testing.assert_close(patch_features(loaded), patch_features(original), atol=1e-5, rtol=0)
    config = loaded.config
    assert (config.num_attention_heads, config.num_hidden_layers, config.num_register_tokens) == (
        HEADS_OF_32,
        3,
        variant.get("registers", 4),
    )
    assert (config.use_gated_mlp, config.key_bias, config.rope_theta) == (
        variant.get("gated", False),
        variant.get("key_bias", False),
        100.0,
    )


def test_a_timm_file_loads_the_same_model(tmp_path):
    original = random_hf_model(gated=True, heads=1)  # timm's files have no RoPE periods: head dim 64, as every DINOv3
    save_file(timm_layout(original), tmp_path / "timm.safetensors")
    loaded = load_weight_file(tmp_path / "timm.safetensors", any_architecture=True)
    torch.testing.assert_close(patch_features(loaded), patch_features(original), atol=1e-5, rtol=0)
    assert loaded.config.weights_format == "timm"


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: {"model": s},
        lambda s: {"teacher": {f"backbone.{k}": v for k, v in s.items()}},
        lambda s: {
            "iteration": 5,
            **{f"module.backbone.{k}": v for k, v in s.items()},
            "dino_head.weight": torch.zeros(3),
        },
    ],
    ids=["model", "teacher-backbone", "module-prefix"],
)
def test_a_wrapped_training_checkpoint_loads(tmp_path, wrap):
    original = random_hf_model()
    torch.save(wrap(meta_layout(original)), tmp_path / "checkpoint.pth")
    loaded = load_weight_file(tmp_path / "checkpoint.pth", any_architecture=True)
    torch.testing.assert_close(patch_features(loaded), patch_features(original), atol=1e-5, rtol=0)


def train(release, backbone, output, *extra):
    return run_training.main(
        [
            str(a)
            for a in (
                *training_folders(release, backbone, output),
                *"--resolution quarter --batch-size 2 --num-workers 0".split(),
                *"--warmup-steps 1 --max-steps 2 --val-every 2".split(),
                *["--any-backbone-architecture"] * is_weight_file(backbone),  # the tiny files are no released ViT
                *extra,
            )
        ]
    )


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda s: {**s, "blocks.0.attn.qkv_extra.weight": torch.zeros(3)}, "blocks.0.attn.qkv_extra.weight"),
        (lambda s: {k: v for k, v in s.items() if not k.startswith("blocks.1.")}, "block 1"),
        (
            lambda s: {k: v for k, v in s.items() if k != "blocks.2.mlp.fc2.weight"},
            "model.layer.2.mlp.down_proj.weight",
        ),
    ],
    ids=["unknown-key", "missing-block", "missing-tensor"],
)
def test_a_file_that_cannot_be_loaded_whole_stops_training_with_one_line_naming_the_key(
    demo_release, tmp_path, capsys, damage, named
):
    torch.save(damage(meta_layout(random_hf_model())), tmp_path / "damaged.pth")
    assert train(demo_release, tmp_path / "damaged.pth", tmp_path / "run") == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and named in error
    assert not (tmp_path / "run").exists()


def test_a_pickle_that_would_run_code_is_refused_without_running_it(demo_release, tmp_path, capsys):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"model": Exploit()}, tmp_path / "exploit.pth")
    assert train(demo_release, tmp_path / "exploit.pth", tmp_path / "run") == 1
    error = capsys.readouterr().err
    assert "needs arbitrary code to unpickle" in error and error.count("\n") == 1
    assert not marker.exists()


def test_convert_once_then_the_directory_trains_and_predicts_like_the_file(demo_release, tmp_path):
    original = random_hf_model()
    torch.save(meta_layout(original), tmp_path / "dinov3_vitx16_pretrain.pth")
    normalization = ["--image-mean", "0.5", "0.4", "0.3", "--image-std", "0.2", "0.25", "0.3"]
    result = run_script(
        ROOT / "scripts" / "convert_backbone.py",
        tmp_path / "dinov3_vitx16_pretrain.pth",
        tmp_path / "converted",
        *normalization,
        "--any-architecture",
    )
    assert "meta naming" in result.stdout and "num_attention_heads 2" in result.stdout
    torch.testing.assert_close(
        patch_features(AutoModel.from_pretrained(tmp_path / "converted")), patch_features(original), atol=1e-5, rtol=0
    )

    assert train(demo_release, tmp_path / "dinov3_vitx16_pretrain.pth", tmp_path / "from_file", *normalization) == 0
    assert train(demo_release, tmp_path / "converted", tmp_path / "from_directory") == 0
    from_file, from_directory = (
        json.loads((tmp_path / run / "config.json").read_text()) for run in ("from_file", "from_directory")
    )
    assert from_file["backbone"] == str(tmp_path / "dinov3_vitx16_pretrain.pth")  # absolute: found from anywhere
    assert (
        from_file["backbone_architecture"]
        == from_directory["backbone_architecture"]
        == {
            "hidden_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "intermediate_size": 128,
            "patch_size": 16,
            "num_register_tokens": 4,
            "use_gated_mlp": False,
            "query_bias": True,
            "key_bias": False,
            "value_bias": True,
            "rope_theta": 100.0,
            "weights_format": "meta",
        }
    )
    assert (
        from_file["normalization"]
        == from_directory["normalization"]
        == {"mean": pytest.approx([0.5, 0.4, 0.3]), "std": pytest.approx([0.2, 0.25, 0.3])}
    )
    for run in ("from_file", "from_directory"):
        assert (
            run_inference.main(
                ["--data-directory", str(demo_release), "--model-directory", str(tmp_path / run), "--num-workers", "0"]
            )
            == 0
        )
    masks = sorted((tmp_path / "from_file" / "inference").glob("video_*/segmentation/*.png"))
    assert masks
    for mask in masks:
        twin = tmp_path / "from_directory" / mask.relative_to(tmp_path / "from_file")
        assert mask.read_bytes() == twin.read_bytes()


def test_convert_refuses_a_directory_in_use_and_leaves_nothing_on_a_bad_file(tmp_path, capsys):
    (tmp_path / "in-use").mkdir()
    (tmp_path / "in-use" / "notes.txt").write_text("mine")
    torch.save(meta_layout(random_hf_model()), tmp_path / "good.pth")
    with pytest.raises(SystemExit) as refused:
        convert_backbone.main([str(tmp_path / "good.pth"), str(tmp_path / "in-use"), "--any-architecture"])
    assert refused.value.code == 2 and "exists and is not empty" in capsys.readouterr().err
    torch.save({"cls_token": torch.zeros(1, 1, 8)}, tmp_path / "bad.pth")
    with pytest.raises(SystemExit) as failed:
        convert_backbone.main([str(tmp_path / "bad.pth"), str(tmp_path / "out"), "--any-architecture"])
    assert "\n" not in str(failed.value.code) and "patch_embed.proj.weight" in str(failed.value.code)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth", "good.pth", "in-use"]
