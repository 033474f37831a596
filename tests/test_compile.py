"""--compile (torch.compile of each backbone layer and of the head) gives what the eager model gives, on the CPU's
inductor: training losses to 1e-4 (relative), inference logits to 1e-4; checkpoints resume compiled or not."""

import json
import shutil

import pytest
import torch

import inference
import run_inference
import run_training
from conftest import training_folders
from model import compile_blocks
from trained_model import load_trained_model

pytestmark = pytest.mark.skipif(
    not shutil.which("g++") and not shutil.which("c++"), reason="inductor needs a C++ compiler"
)


def losses(output) -> list[float]:
    return [
        json.loads(line)["loss"] for line in (output / "metrics.jsonl").read_text().splitlines() if '"loss"' in line
    ]


@pytest.fixture(scope="module")
def runs(demo_release, backbone, tmp_path_factory):
    """The same 3 steps eager and compiled (no dropout: compiled random numbers come from another generator)."""
    root = tmp_path_factory.mktemp("compile")
    common = ["--max-steps", "3", "--log-every", "1", "--checkpoint-every", "1", "--num-workers", "0"]
    common += ["--resolution", "quarter", "--lora-dropout", "0", "--batch-size", "2"]
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        arguments = [*training_folders(demo_release, backbone, root / name), *common, *extra]
        assert run_training.main([str(a) for a in arguments]) == 0
    return root


def test_compiled_training_gives_the_eager_losses(runs):
    eager, compiled = losses(runs / "eager"), losses(runs / "compiled")
    assert len(eager) == len(compiled) == 3
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert json.loads((runs / "compiled" / "config.json").read_text())["arguments"]["compile"] is True


def test_an_eager_run_resumes_compiled(runs, demo_release, backbone, capsys):
    arguments = [*training_folders(demo_release, backbone, runs / "eager"), "--resume", "--compile"]
    arguments += ["--max-steps", "4", "--log-every", "1", "--num-workers", "0", "--resolution", "quarter"]
    arguments += ["--lora-dropout", "0", "--batch-size", "2", "--checkpoint-every", "1"]
    assert run_training.main([str(a) for a in arguments]) == 0, capsys.readouterr().err
    assert "resuming at step 3 of 4" in capsys.readouterr().out
    assert len(losses(runs / "eager")) == 4


def test_compiled_inference_gives_the_eager_logits(runs):
    model, _ = load_trained_model(runs / "compiled")
    compiled = compile_blocks(load_trained_model(runs / "compiled")[0])
    images = torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8)
    with torch.no_grad():
        eager_logits, compiled_logits = model(images, (64, 96), (24, 48)), compiled(images, (64, 96), (24, 48))
    assert (compiled_logits - eager_logits).abs().max().item() <= 1e-4
    assert torch.equal(compiled_logits.argmax(1), eager_logits.argmax(1))


def test_run_inference_compiles_every_member_with_the_flag(runs, demo_release, tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(inference, "compile_blocks", lambda model: compiled.append(model) or model)
    arguments = ["--model-directory", runs / "eager", "--data-directory", demo_release, "--num-workers", "0"]
    assert run_inference.main([str(a) for a in [*arguments, "--output", tmp_path / "out", "--compile"]]) == 0
    assert len(compiled) == 1
