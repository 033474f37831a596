"""Right on the first GPU run: the precision each device gets by default, TF32, and inference in the precision the
model was trained in. The CUDA queries are patched: these run on the CPU."""

import argparse
import json
import types

import numpy as np
import pytest
import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel

import cli
import inference
import losses
import memory
import options
import run_directory
import run_training
import tracking
import video
from conftest import ROOT, training_folders
from model import LoRA, SegmentationModel

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize(
    "capability, expected", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((8, 6), "bf16"), ((9, 0), "bf16")]
)
def test_a_gpu_before_ampere_gets_fp16_and_ampere_or_newer_bf16(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what it says on a T4 or V100 too
    assert cli.precision_for(None, CUDA) == expected
    assert cli.precision_for("fp32", CUDA) == "fp32"  # asked for, always
    assert cli.precision_for(None, torch.device("cpu")) == "fp32"


def test_inference_follows_the_precision_the_model_was_trained_in(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    member = lambda precision: (None, {"precision": precision})  # noqa: E731
    assert cli.precision_for(None, CUDA, inference.trained_precision([member("fp32")])) == "fp32"
    assert cli.precision_for(None, CUDA, inference.trained_precision([member("bf16")])) == "bf16"
    assert inference.trained_precision([member("bf16"), member("fp32")]) == "fp32"  # an ensemble: the most precise
    assert inference.trained_precision([(None, {})]) is None  # runs of earlier versions: the device's default
    assert cli.precision_for("bf16", CUDA, "fp32") == "bf16"  # --precision overrides the record


def test_tf32_is_on_by_default_off_with_the_flag_and_recorded(demo_release, backbone, tmp_path):
    def train(output, *extra):
        arguments = [*training_folders(demo_release, backbone, output), *"--max-steps 1 --num-workers 0".split()]
        assert run_training.main([str(a) for a in [*arguments, "--resolution", "quarter", *extra]]) == 0
        return json.loads((output / "config.json").read_text())

    try:
        assert train(tmp_path / "default")["tf32"] is True and torch.get_float32_matmul_precision() == "high"
        assert train(tmp_path / "off", "--no-tf32")["tf32"] is False
        assert torch.get_float32_matmul_precision() == "highest"
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text("tf32: false\n")  # a switch that is on by default, in a settings file
        assert train(tmp_path / "recipe", "--config", recipe)["tf32"] is False
    finally:
        torch.set_float32_matmul_precision("highest")


def test_a_run_of_an_earlier_version_without_a_tf32_record_resumes(demo_release, backbone, tmp_path, capsys):
    output = tmp_path / "run"
    arguments = [*training_folders(demo_release, backbone, output), *"--max-steps 2 --num-workers 0".split()]
    arguments = [str(a) for a in [*arguments, "--resolution", "quarter"]]
    assert run_training.main(arguments) == 0
    config = json.loads((output / "config.json").read_text())
    del config["arguments"]["tf32"]  # as written before the setting existed
    (output / "config.json").write_text(json.dumps(config))
    assert run_training.main([*arguments, "--resume"]) == 0, capsys.readouterr().err  # not "--tf32 None -> True"
    assert "holds a finished run (step 2); nothing to do" in capsys.readouterr().out
    torch.set_float32_matmul_precision("highest")


def test_temporal_smoothing_keeps_its_own_state_not_a_view_of_the_batch(monkeypatch):
    batches = [torch.rand(2, 10, 4, 6).softmax(1) for _ in range(2)]
    monkeypatch.setattr(inference, "mean_probabilities", lambda *args: batches.pop(0))
    args = argparse.Namespace(temporal_smoothing=0.5, min_component_size=0)
    plan = inference.Plan(torch.device("cpu"), "fp32", cli.autocast_for("fp32", torch.device("cpu")), [(4, 6)], [])
    predict_batch = video.frame_predictor(args, plan, (4, 6))
    first = batches[0]
    original = first.clone()
    expected = [first[0].argmax(0), (0.5 * first[0] + 0.5 * first[1]).argmax(0)]
    labels = predict_batch([[np.zeros((4, 6, 3), np.uint8)]] * 2)
    for frame_labels, frame_expected in zip(labels, expected):
        np.testing.assert_array_equal(frame_labels, frame_expected.numpy())
    state = next(
        cell.cell_contents for cell in predict_batch.__closure__ if isinstance(cell.cell_contents, torch.Tensor)
    )
    assert state.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()  # the batch can be freed
    assert torch.equal(first, original)  # and was not changed in place


def test_each_record_gives_its_own_phases_peak_memory_allocated_and_reserved(monkeypatch):
    peaks = {"allocated": 3 * 2**20, "reserved": 5 * 2**20}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peaks["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: peaks["reserved"])
    monkeypatch.setattr(
        torch.cuda, "reset_peak_memory_stats", lambda device=None: peaks.update(allocated=0, reserved=0)
    )
    assert run_directory.peak_memory(CUDA) == {"peak_memory_mb": 3.0, "peak_reserved_mb": 5.0}
    assert run_directory.peak_memory(CUDA) == {"peak_memory_mb": 0.0, "peak_reserved_mb": 0.0}  # reset: the next phase
    assert run_directory.peak_memory(torch.device("cpu"))["peak_memory_mb"] > 0


def test_a_validation_records_its_own_peak_memory(demo_release, backbone, tmp_path):
    output = tmp_path / "run"
    arguments = [*training_folders(demo_release, backbone, output), *"--max-steps 2 --num-workers 0".split()]
    assert run_training.main([str(a) for a in [*arguments, "--resolution", "quarter"]]) == 0
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    validation = next(r for r in records if "val" in r)
    assert validation["val"]["memory"]["peak_memory_mb"] > 0
    assert tracking.scalars(validation)["val/peak_memory_mb"] == validation["val"]["memory"]["peak_memory_mb"]


def test_a_training_run_out_of_gpu_memory_is_one_line_suggesting_checkpointing_and_resumes(
    demo_release, backbone, tmp_path, monkeypatch, capsys
):
    output, real_step = tmp_path / "run", run_training.train_step
    arguments = [*training_folders(demo_release, backbone, output), *"--max-steps 3 --num-workers 0".split()]
    arguments = [str(a) for a in [*arguments, "--resolution", "quarter", "--checkpoint-every", "1"]]

    def out_of_memory_at_step_2(training, batches, step):
        if step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")
        return real_step(training, batches, step)

    monkeypatch.setattr(run_training, "train_step", out_of_memory_at_step_2)
    assert run_training.main(arguments) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(
        "error: out of GPU memory (CUDA out of memory. Tried to allocate 12.00 GiB): add --gradient"
    )
    assert error.endswith("then continue with --resume")
    monkeypatch.setattr(run_training, "train_step", real_step)
    assert run_training.main([*arguments, "--resume"]) == 0
    assert "resuming at step 1 of 3" in capsys.readouterr().out


def seed_recipe_training(*extra) -> types.SimpleNamespace:
    """What run_training.report_step_memory reads of a run of recipes/seed.yaml: a ViT-L/16 of uninitialised weights
    (allocated, never written: the count needs shapes only), LoRA r8 on every linear layer, the pixel MLP head."""
    args = options.training_arguments(
        ["--config", str(ROOT / "recipes/seed.yaml"), "--data-directory", "-", "--output-directory", "-", *extra]
    )
    config = DINOv3ViTConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, num_register_tokens=4
    )
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        vit = DINOv3ViTModel(config)
    lora = LoRA(args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
    model = SegmentationModel(
        vit.to_empty(device="cpu"), (0.5,) * 3, (0.2,) * 3, args.backbone_training, lora,
        run_training.head_settings(args), args.gradient_checkpointing,
    ).train()  # fmt: skip
    cpu = torch.device("cpu")
    return types.SimpleNamespace(
        args=args,
        model=model,
        device=cpu,
        optimizer=run_training.make_optimizer(model, args),
        autocast=cli.autocast_for(args.precision, cpu),
        loss=losses.make_loss(args, torch.ones(10)),
        data=types.SimpleNamespace(train=types.SimpleNamespace(source_size=(1080, 1920), content_size=(540, 960))),
    )


def test_the_seed_recipe_on_a_24_gb_device_is_told_before_its_first_step_to_add_checkpointing(monkeypatch):
    training, lines = seed_recipe_training(), []
    monkeypatch.setattr(memory, "free_bytes", lambda device: 22 * memory.GIB)  # a 24 GB card, less the weights
    run_training.report_step_memory(training, lines.append)
    (line,) = lines
    assert line.startswith("memory: a training step needs an estimated ")
    needed = float(line.split("an estimated ")[1].split(" GiB")[0])
    assert 25 < needed < 40  # about 30 GB of activations at batch 6, fp32
    assert "more than the 22.0 GiB free: it will likely run out; would fit: --gradient-checkpointing (~" in line
    with_checkpointing = float(line.split("--gradient-checkpointing (~")[1].split(" GiB")[0])
    assert with_checkpointing < needed / 5
    assert "--batch-size 3 --grad-accum-steps 2 (the same 6 images a step)" in line
    assert not training.model.vit().is_activation_checkpointing  # the recipe's model is left as it was
    assert all(p.grad is None for p in training.model.parameters())  # the count's gradients were fake, and dropped

    lines.clear()
    run_training.report_step_memory(seed_recipe_training("--gradient-checkpointing"), lines.append)
    (line,) = lines  # the recipe with the advice taken: it fits, and the estimate was the advice's
    assert line.startswith("memory: a training step needs an estimated ") and line.endswith(" 22.0 GiB is free")
    assert float(line.split("an estimated ")[1].split(" GiB")[0]) == pytest.approx(with_checkpointing, rel=0.1)


def test_the_advice_names_the_settings_that_fit_and_only_those():
    gib = memory.GIB
    scale = {"full": 4, "half": 1, "quarter": 0.25}

    def need(batch_size, resolution, checkpointing):  # 1 GiB fixed, 2 GiB an image at half resolution, ckpt: 1/4
        return int(gib + batch_size * 2 * gib * scale[resolution] * (0.25 if checkpointing else 1))

    args = argparse.Namespace(
        batch_size=8, grad_accum_steps=1, resolution="half", gradient_checkpointing=False, backbone_training="lora"
    )
    monkeypatch = pytest.MonkeyPatch()
    with monkeypatch.context() as patched:
        patched.setattr(memory, "free_bytes", lambda device: 12 * gib)
        line = memory.training_advice(need, args, CUDA)
        assert line.startswith("memory: a training step needs an estimated 17.0 GiB of GPU memory beyond the weights")
        assert "more than the 12.0 GiB free" in line
        assert "--gradient-checkpointing (~5.0 GiB, the same gradients)" in line
        assert "--batch-size 4 --grad-accum-steps 2 (the same 8 images a step)" in line  # 5 fits, 8 = 2 x 4
        assert "--resolution quarter" in line
        args.backbone_training = "frozen"  # nothing to checkpoint
        assert "--gradient-checkpointing" not in memory.training_advice(need, args, CUDA)
        patched.setattr(memory, "free_bytes", lambda device: gib // 2)
        assert memory.training_advice(need, args, CUDA).endswith(
            "none of checkpointing, batch size or resolution fits (the estimate is a lower bound)"
        )


def test_a_run_short_of_memory_is_warned_before_its_first_step_and_still_trains(
    demo_release, backbone, tmp_path, monkeypatch, capsys
):
    output = tmp_path / "run"
    arguments = [*training_folders(demo_release, backbone, output), *"--max-steps 1 --num-workers 0".split()]
    arguments = [str(a) for a in [*arguments, "--resolution", "quarter", "--batch-size", "2"]]
    monkeypatch.setattr(run_training, "STEP_MEMORY_DEVICES", ("cuda", "cpu"))  # as a GPU run does
    monkeypatch.setattr(memory, "free_bytes", lambda device: 2**20)
    assert run_training.main(arguments) == 0  # a warning, not a refusal: the estimate leaves things out
    printed = capsys.readouterr().out
    warning = next(line for line in printed.splitlines() if line.startswith("memory: "))
    assert "more than the 1 MiB free: it will likely run out" in warning
    assert printed.index(warning) < printed.index("done: ")
    assert (output / "best" / "config.json").exists() or (output / "config.json").exists()
