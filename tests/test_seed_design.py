"""The design we start from, reproducible: its pixel MLP head, backbone training modes, the DINOv3 family by short
name, its optimiser and loss settings, recipes in files, and model directories of earlier versions."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import backbone_files
import hub
import losses
import model as model_module
import run_training
import trained_model
from conftest import ROOT, run_script
from make_tiny_backbone import save_tiny_backbone
from test_training import TRAIN, records, training_args

FIXTURES = Path(__file__).parent / "fixtures"


def tiny_model(backbone, seed=0, **settings):
    torch.manual_seed(seed)
    return model_module.build_model(str(backbone), **settings)


# ----------------------------------------------------------------------------- the seed's head


def test_the_seed_head_gives_every_pixel_of_a_patch_its_own_logits(backbone):
    model = tiny_model(backbone).eval()  # the default head is the seed's
    assert model.head_config == {"type": "mlp", "hidden": 10 * 16 * 16}
    images = torch.randint(0, 256, (1, 3, 32, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(images, output_size=(32, 48))
        tokens = model.backbone(pixel_values=(images / 255.0 - model.mean) / model.std).last_hidden_state[:, 5:]
        token_outputs = model.head.mlp(tokens)  # (1, 6 tokens, 2560)
    patch = logits[0, :, 16:32, 16:32]  # the token at row 1, column 1 of the 2x3 grid
    assert patch.reshape(10, -1).std(dim=1).min() > 0  # not one value per patch, and no smooth bilinear field:
    torch.testing.assert_close(patch, token_outputs[0, 4].reshape(10, 16, 16))  # exactly that token's outputs


@pytest.mark.parametrize("hidden", [64, 2560])
def test_the_seed_head_has_the_seed_parameter_count(backbone, hidden):
    model = tiny_model(backbone, head={"type": "mlp", "hidden": hidden})
    width, outputs = 64, 10 * 16 * 16  # tiny backbone width; C x P x P
    expected = (width * hidden + hidden) + (hidden * hidden + hidden) + (hidden * outputs + outputs)
    assert sum(p.numel() for p in model.head.parameters()) == expected


def test_the_per_patch_head_keeps_its_own_name(backbone):
    model = tiny_model(backbone, head={"type": "patch-mlp"})
    assert model.head_config == {"type": "patch-mlp", "hidden": 256}
    assert model.head[-1].out_features == 10


def test_an_earlier_versions_model_directory_loads_and_predicts_unchanged(backbone):
    """tests/fixtures/model-v1: written by the version whose "mlp" was the per-patch head, with its predictions."""
    model, config = trained_model.load_trained_model(FIXTURES / "model-v1", backbone=str(backbone))
    assert "config_version" not in config and model.head_config["type"] == "patch-mlp"
    expected = load_file(FIXTURES / "model-v1" / "expected_logits.safetensors")
    with torch.no_grad():
        logits = model(expected["images"], (24, 36), (18, 27))
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- backbone family and dtype


def test_short_names_expand_to_the_released_hub_ids_and_unknown_ones_list_the_known():
    assert backbone_files.resolve_backbone("vitl16") == "facebook/dinov3-vitl16-pretrain-lvd1689m"
    assert backbone_files.resolve_backbone("vit7b16-sat493m") == "facebook/dinov3-vit7b16-pretrain-sat493m"
    assert backbone_files.resolve_backbone("someone/their-dinov3") == "someone/their-dinov3"
    with pytest.raises(hub.BackboneError, match="unknown backbone 'vitl14'.*vits16, vits16plus, vitb16, vitl16"):
        backbone_files.resolve_backbone("vitl14")


def test_a_gated_mlp_backbone_trains_with_lora_on_all_linear_layers(tmp_path):
    """The ViT-S+/H+/7B variants use a SwiGLU MLP (gate/up/down projections)."""
    save_tiny_backbone(tmp_path / "swiglu", use_gated_mlp=True)
    model = tiny_model(tmp_path / "swiglu", lora=model_module.LoRA(target_modules=["all-linear"]))
    adapted = {name.split(".")[-4] for name, p in model.named_parameters() if "lora_A" in name}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    logits = model(torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8), output_size=(32, 32))
    logits.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_bfloat16_backbone_keeps_trainable_weights_in_float32_and_predicts_close_to_float32(backbone):
    full = tiny_model(backbone, lora=model_module.LoRA(dropout=0.0)).eval()
    half = tiny_model(backbone, lora=model_module.LoRA(dropout=0.0), backbone_dtype="bfloat16").eval()
    assert half.vit().embeddings.patch_embeddings.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in half.parameters() if p.requires_grad)
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(half(images, (32, 32)), full(images, (32, 32)), rtol=0.1, atol=0.1)
    with pytest.raises(model_module.HeadConfigError, match="needs --backbone-dtype float32"):
        tiny_model(backbone, backbone_training="full", backbone_dtype="bfloat16")


# ----------------------------------------------------------------------------- training modes, end to end


def backbone_weights(run):
    return {k: v for k, v in load_file(run / "last" / "weights.safetensors").items() if not k.startswith("head.")}


def test_frozen_trains_only_the_head(demo_release, backbone, tmp_path):
    run = tmp_path / "frozen"
    run_script(*training_args(demo_release, backbone, run, "--max-steps", "3", "--backbone-training", "frozen"))
    assert backbone_weights(run) == {}  # no LoRA, no backbone copy
    model, _ = trained_model.load_trained_model(run, "last")
    original = backbone_files.load_backbone(str(backbone)).state_dict()
    for name, tensor in model.vit().state_dict().items():
        assert torch.equal(tensor, original[name]), name  # bit-identical


def test_full_changes_the_backbone_and_reloads_for_inference_without_flags(demo_release, backbone, tmp_path):
    run = tmp_path / "full"
    run_script(
        *training_args(
            demo_release,
            backbone,
            run,
            *"--max-steps 3 --backbone-training full --backbone-lr 1e-3 --layer-decay 0.5".split(),
        )
    )
    saved = backbone_weights(run)
    original = backbone_files.load_backbone(str(backbone)).state_dict()
    assert "backbone.embeddings.patch_embeddings.weight" in saved
    changed = [k for k, v in saved.items() if not torch.equal(v, original[k.removeprefix("backbone.")])]
    assert len(changed) > len(saved) // 2
    model, config = trained_model.load_trained_model(run, "last")
    assert config["backbone_training"] == "full" and model.backbone_training == "full"
    for name, tensor in saved.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    predicted = run_script(
        ROOT / "run_inference.py",
        "--data-directory",
        demo_release,
        "--model-directory",
        run,
        *"--checkpoint last --split val --num-workers 0".split(),
    )
    assert "official score" in predicted.stdout


def test_layer_wise_decay_gives_earlier_layers_smaller_learning_rates(backbone):
    args = run_training.parse_args(
        "--backbone-training full --lr 1e-3 --backbone-lr 1e-2 --layer-decay 0.5 --head-lr 3e-3".split()
    )
    groups = run_training.parameter_groups(tiny_model(backbone, backbone_training="full"), args)
    assert groups[0]["lr"] == 3e-3  # the head
    # 4 layers: embeddings (depth 0) 1e-2 * 0.5^4, layer i at 0.5^(4-i-1), final norm at 1e-2
    assert [g["lr"] for g in groups[1:]] == [1e-2 * 0.5**k for k in (4, 3, 2, 1, 0, 0)]


@pytest.mark.parametrize("mode", ["frozen", "full"])  # lora: test_training.py's resume test
def test_every_mode_resumes_after_a_kill_to_the_same_weights(demo_release, backbone, tmp_path, mode):
    from test_training import kill_and_resume

    kill_and_resume(demo_release, backbone, tmp_path, "--backbone-training", mode)


# ----------------------------------------------------------------------------- optimisation and early stopping


def test_early_stopping_stops_at_the_validation_that_exhausts_the_patience(demo_release, backbone, tmp_path):
    run = tmp_path / "early"
    # Learning rates of 0: the first validation is the best and no later one improves on it.
    early_stopping = "--max-steps 20 --val-every 2 --lr 0 --head-lr 0 --early-stop-patience 3".split()
    result = run_script(*training_args(demo_release, backbone, run, *early_stopping))
    assert [r["step"] for r in records(run) if "val" in r] == [2, 4, 6, 8]
    stop = [r for r in records(run) if "early_stop" in r]
    assert [r["step"] for r in stop] == [8] and "has not improved for 3 validations" in stop[0]["early_stop"]
    assert "early stop at step 8" in result.stdout
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 8
    resumed = run_script(*training_args(demo_release, backbone, run, *early_stopping, "--resume"))
    assert "holds a finished run (step 8)" in resumed.stdout


@pytest.mark.parametrize(
    "kind, weights", [("enet", None), ("one-minus-frequency", lambda f: 1 - f), ("none", lambda f: 1.0)]
)
def test_class_weight_formulas(kind, weights):
    frequencies = torch.tensor([0.9, 0.09, 0.01, 0.0]).numpy()
    computed = losses.class_weights_from_frequencies(frequencies, kind)
    if kind == "enet":
        assert computed[-1] == pytest.approx(50.5, abs=0.01) and computed[0] < computed[1] < computed[2]
    else:
        assert computed.tolist() == pytest.approx([weights(f) for f in frequencies])


def test_the_constant_schedule_keeps_the_rate_after_warm_up():
    args = run_training.parse_args(["--schedule", "constant", "--warmup-steps", "4"])
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = run_training.make_scheduler(optimizer, args, total_steps=20)
    rates = []
    for _ in range(20):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and set(rates[4:]) == {1.0}


# ----------------------------------------------------------------------------- recipes in files


def test_a_config_file_sets_arguments_and_the_command_line_overrides_it(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "lora_rank: 8\nlr: 1.0e-4\nlora-targets: all-linear\ngradient_checkpointing: true\n"
        "feature_layers: [2, 4]\nhead: multilayer\n"
    )
    args = run_training.parse_args(["--config", str(recipe), "--lr", "3e-4"])
    assert (args.lora_rank, args.lr, args.lora_targets) == (8, 3e-4, ["all-linear"])
    assert args.gradient_checkpointing and args.feature_layers == [2, 4]
    json_recipe = tmp_path / "recipe.json"
    json_recipe.write_text(json.dumps({"optimizer": "adam", "schedule": "constant"}))
    args = run_training.parse_args(["--config", str(json_recipe)])
    assert (args.optimizer, args.schedule) == ("adam", "constant")


@pytest.mark.parametrize(
    "content, message",
    [
        ("lora_rnk: 8\n", "unknown setting 'lora_rnk'"),
        ("resolution: eighth\n", "recipe.yaml: resolution: invalid choice: 'eighth'"),
        ("- just\n- a list\n", "must hold settings as 'name: value' lines"),
    ],
)
def test_a_bad_config_file_is_one_line(tmp_path, content, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(content)
    result = run_script(TRAIN, "--config", recipe, check=False)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_the_seed_recipe_holds_every_reference_setting():
    args = run_training.parse_args(["--config", str(ROOT / "recipes" / "seed.yaml")])
    assert backbone_files.resolve_backbone(args.backbone) == "facebook/dinov3-vitl16-pretrain-lvd1689m"
    assert (args.backbone_training, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets) == (
        "lora",
        8,
        8,
        0.1,
        ["all-linear"],
    )
    assert (args.head, args.head_hidden, args.resolution, args.augmentation) == ("mlp", 2560, "half", "seed")
    assert (args.optimizer, args.lr, args.head_lr, args.weight_decay, args.schedule, args.warmup_steps) == (
        "adam",
        1e-4,
        1e-4,
        0,
        "constant",
        0,
    )
    assert (args.grad_clip, args.precision, args.batch_size, args.epochs, args.val_every) == (0, "fp32", 6, 20, 500)
    assert (args.early_stop_patience, args.selection_metric, args.class_weights, args.seed) == (
        5,
        "seed_mIoU",
        "one-minus-frequency",
        645486,
    )
    strong = run_training.parse_args(["--config", str(ROOT / "recipes" / "strong.yaml")])
    assert strong.head == "multilayer" and strong.resolution == "full"


def test_a_recipe_run_saves_its_resolved_settings(demo_release, backbone, tmp_path):
    run = tmp_path / "recipe-run"
    recipe = tmp_path / "recipe.yaml"
    shutil.copy(ROOT / "recipes" / "seed.yaml", recipe)
    run_script(
        TRAIN,
        "--config",
        recipe,
        "--data-directory",
        demo_release,
        "--backbone",
        backbone,
        "--output-directory",
        run,
        *"--resolution quarter --batch-size 2 --max-steps 2 --num-workers 0 --head-hidden 64 --val-every 2".split(),
    )
    config = json.loads((run / "config.json").read_text())
    assert config["arguments"]["config"] == str(recipe) and config["arguments"]["optimizer"] == "adam"
    assert config["lora"]["target_modules"] == ["all-linear"] and config["head"] == {"type": "mlp", "hidden": 64}
    assert json.loads((run / "class_weights.json").read_text())["formula"].startswith("w = 1 - f")
