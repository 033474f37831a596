"""Training entry point: outputs, resume, many processes, token hygiene, clear errors."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import losses
import run_training
from conftest import ROOT, background_scores, run_script, training_folders

TRAIN = ROOT / "run_training.py"
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")  # a free port
SECRET = "hf_doNotLeakThisTokenAnywhere0123456789"


def training_args(release, backbone, output, *extra):
    return [
        TRAIN,
        *training_folders(release, backbone, output),
        *"--resolution quarter --batch-size 2 --num-workers 0 --warmup-steps 1 --log-every 1".split(),
        *extra,
    ]


def records(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_a_short_run_writes_every_output_and_the_loss_goes_down(demo_release, backbone, tmp_path):
    output = tmp_path / "run"
    result = run_script(
        *training_args(
            demo_release, backbone, output, *"--max-steps 24 --val-every 12 --lr 1e-3 --head-lr 3e-4".split()
        )
    )
    assert "trainable of" in result.stdout and "done: best validation score" in result.stdout
    for name in (
        "config.json",
        "split.json",
        "class_weights.json",
        "metrics.jsonl",
        "training_curves.png",
        "checkpoint.pt",
        "best/weights.safetensors",
        "last/weights.safetensors",
    ):
        assert (output / name).is_file(), name
    config = json.loads((output / "config.json").read_text())
    assert config["backbone"] == str(backbone) and len(config["class_names"]) == 10
    assert config["resolution"]["content_size"] == [24, 32] and config["resolution"]["padded_size"] == [32, 32]
    assert len(config["normalization"]["mean"]) == 3
    split = json.loads((output / "split.json").read_text())
    assert split["val"] == ["video_04_1", "video_04_2"] or not set(split["train"]) & set(split["val"])
    weights = load_file(output / "last" / "weights.safetensors")
    assert weights and all("lora_" in k or k.startswith("head.") for k in weights)  # no frozen backbone copy
    losses = [r["loss"] for r in records(output) if "loss" in r]
    assert len(losses) == 24 and sum(losses[-6:]) < sum(losses[:6])
    validations = [r for r in records(output) if "val" in r]
    assert [r["step"] for r in validations] == [12, 24]
    assert validations[-1]["val"]["frames"] == 3 * len(split["val"])


def process_states() -> dict[int, tuple[str, int]]:
    """Every process's (state, parent pid), from /proc."""
    states = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            state, parent = stat.read_text().rsplit(")", 1)[1].split()[:2]
            states[int(stat.parent.name)] = state, int(parent)
    return states


def kill_with_descendants(process: subprocess.Popen) -> None:
    """SIGKILL a process and every process it started (torchrun starts each rank in a session of its own), as when
    the machine dies, and wait until they are gone."""
    family, states = {process.pid}, process_states()
    while grown := {pid for pid, (_, parent) in states.items() if parent in family} - family:
        family |= grown
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()
    while any(process_states().get(pid, ("Z",))[0] != "Z" for pid in family):
        time.sleep(0.02)


def kill_and_resume(demo_release, backbone, tmp_path, *extra, launcher=(sys.executable,)):
    """Train 10 steps straight, and again killed mid-run (every process of it) then resumed: the same weights and
    log, and the same command again finds the run finished. launcher: what runs run_training.py (e.g. TORCHRUN).
    Returns (arguments, the resumed run's folder)."""
    arguments = ["--max-steps", "10", "--checkpoint-every", "1", "--val-every", "5", *extra]
    env = {"OMP_NUM_THREADS": "1"}  # every part of both runs alike: sums in the same order
    run_script(*launcher, *training_args(demo_release, backbone, tmp_path / "straight", *arguments), env=env)

    interrupted = tmp_path / "interrupted"
    command = [*launcher, *map(str, training_args(demo_release, backbone, interrupted, *arguments))]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env}
    )
    while not ((interrupted / "metrics.jsonl").exists() and len(records(interrupted)) >= 4):
        assert process.poll() is None, "the run finished before it could be killed"
        time.sleep(0.02)
    kill_with_descendants(process)
    stopped_at = torch.load(interrupted / "checkpoint.pt", weights_only=True)["step"]
    assert 1 <= stopped_at < 10

    result = run_script(*launcher, *training_args(demo_release, backbone, interrupted, *arguments, "--resume"), env=env)
    assert f"resuming at step {stopped_at} of 10" in result.stdout
    straight = load_file(tmp_path / "straight" / "last" / "weights.safetensors")
    resumed = load_file(interrupted / "last" / "weights.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6)
    assert [r["step"] for r in records(interrupted) if "loss" in r] == list(range(1, 11))

    finished = run_script(
        *launcher, *training_args(demo_release, backbone, interrupted, *arguments, "--resume"), env=env
    )
    assert "holds a finished run (step 10); nothing to do" in finished.stdout
    return arguments, interrupted


def test_a_killed_run_resumes_where_it_stopped_and_ends_with_the_same_weights(demo_release, backbone, tmp_path):
    arguments, interrupted = kill_and_resume(demo_release, backbone, tmp_path)
    changed = run_script(
        *training_args(
            demo_release, backbone, interrupted, *arguments, "--resume", "--batch-size", "4", "--lr", "1e-6"
        ),
        check=False,
    )
    assert changed.returncode == 1, changed.stderr
    assert changed.stderr.strip() == (
        "error: --resume continues a run with its own settings, but these changed: "
        "--batch-size 2 -> 4; --lr 0.0002 -> 1e-06"
    )


def test_two_processes_with_torchrun_train_together_and_only_rank_0_writes(demo_release, backbone, tmp_path):
    output = tmp_path / "ddp"
    result = run_script(
        *TORCHRUN, *training_args(demo_release, backbone, output, "--max-steps", "4"), env={"OMP_NUM_THREADS": "1"}
    )
    assert result.stdout.count("done: best validation score") == 1
    assert result.stdout.count("trainable of") == 1
    config = json.loads((output / "config.json").read_text())
    assert config["world_size"] == 2
    validation = [r for r in records(output) if "val" in r][-1]["val"]
    split = json.loads((output / "split.json").read_text())
    assert validation["frames"] == 3 * len(split["val"])  # every validation frame scored exactly once
    assert sorted(validation["videos"]) == sorted(split["val"])
    assert sorted(p.name for p in output.iterdir()) == sorted(
        "best last checkpoint.pt config.json split.json class_weights.json metrics.jsonl training_curves.png .lock "
        "README.md evaluations.json .written.json".split()
    )  # .lock: the run's hold on its folder; README.md: the model card, evaluations.json its results


def test_the_token_never_appears_in_output_or_in_any_file_written(demo_release, backbone, tmp_path):
    output = tmp_path / "run"
    token_file = tmp_path / "token.txt"
    token_file.write_text(SECRET)
    result = run_script(
        *training_args(demo_release, backbone, output, "--max-steps", "2", "--hf-token-file", token_file),
        env={"HF_TOKEN": SECRET},
    )
    assert SECRET not in result.stdout + result.stderr
    for path in output.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_a_hub_backbone_without_network_fails_fast_with_one_sentence(demo_release, tmp_path):
    result = run_script(
        *training_args(demo_release, "facebook/dinov3-vitb16-pretrain-lvd1689m", tmp_path / "run", "--max-steps", "1"),
        check=False,
        env={"HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot reach the Hugging Face hub")
    assert "local --backbone directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_tensorboard_follows_a_killed_and_resumed_run_without_a_step_twice(demo_release, backbone, tmp_path):
    from test_tracking import logged

    _, interrupted = kill_and_resume(demo_release, backbone, tmp_path, "--report-to", "tensorboard")
    scalars, images = logged(interrupted / "tensorboard")
    losses = [r["loss"] for r in records(interrupted) if "loss" in r]
    assert scalars["train/loss"] == [(step, pytest.approx(loss)) for step, loss in enumerate(losses, 1)]
    assert [step for step, _ in scalars["val/score"]] == [5, 10]
    assert {
        "val/mIoU",
        "val/mNSD",
        "val/IoU/thread",
        "val/NSD/suturing needle",
        "train/lr",
        "train/images_per_second",
    } <= set(scalars)
    assert any(name.startswith("val/video_") for name in scalars)
    assert len(images) == run_training.VALIDATION_PICTURES  # the same frames pictured at every validation
    assert all(name.startswith("validation/video_") and steps == [5, 10] for name, steps in images.items())


def test_a_missing_tracker_package_stops_the_run_before_it_writes_anything(
    demo_release, backbone, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # how Python marks a module that cannot be imported
    output = tmp_path / "run"
    arguments = training_args(demo_release, backbone, output, "--max-steps", "1", "--report-to", "tensorboard")[1:]
    assert run_training.main(list(map(str, arguments))) == 1
    assert (
        capsys.readouterr().err
        == "error: --report-to tensorboard needs the tensorboard package: pip install tensorboard\n"
    )
    assert not output.exists()


def test_without_data_a_newcomer_is_pointed_to_the_data_preparation_and_the_demo(tmp_path):
    result = run_script(TRAIN, check=False, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: no training videos in sarrarp/train: see 'Data preparation' in "
        "README.md, or try the built-in demo first: bash scripts/demo.sh"
    )


def test_an_existing_run_is_not_overwritten_without_resume(demo_release, backbone, tmp_path):
    output = tmp_path / "run"
    run_script(*training_args(demo_release, backbone, output, "--max-steps", "1"))
    result = run_script(*training_args(demo_release, backbone, output, "--max-steps", "1"), check=False)
    assert result.returncode == 1 and "pass --resume to continue it" in result.stderr


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    demo_release, backbone, tmp_path, monkeypatch, capsys
):
    real_loss, calls = losses.weighted_cross_entropy, []

    def loss_that_explodes_at_step_3(logits, target, weights):
        calls.append(1)
        loss = real_loss(logits, target, weights)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(losses, "weighted_cross_entropy", loss_that_explodes_at_step_3)
    output = tmp_path / "run"
    arguments = training_args(demo_release, backbone, output, "--max-steps", "5", "--checkpoint-every", "1")[1:]
    assert run_training.main(list(map(str, arguments))) == 1
    error = capsys.readouterr().err
    assert "error: the loss became nan at step 3; the last good checkpoint (step 2)" in error
    assert torch.load(output / "checkpoint.pt", weights_only=True)["step"] == 2


def test_the_tiny_model_learns_the_demo_data_well_above_predicting_background(learnable_release, backbone, tmp_path):
    output = tmp_path / "run"
    run_script(
        TRAIN,
        *training_folders(learnable_release, backbone, output),
        *"--resolution full --max-steps 60 --val-every 60 --batch-size 8 --num-workers 0".split(),
        *"--warmup-steps 5 --lr 1e-3 --head-lr 3e-4".split(),
    )
    validation = [r["val"] for r in records(output) if "val" in r][-1]
    background = background_scores(learnable_release, json.loads((output / "split.json").read_text())["val"])
    assert validation["mIoU"] > background["mIoU"] + 0.05
    assert validation["score"] > background["score"] + 0.1


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--val-videos", "video_99"], "error: validation videos not found in the data: video_99"),
        (["--hf-token-file", "no-such-token.txt"], "error: token file no-such-token.txt does not exist"),
    ],
)
def test_a_run_that_cannot_start_writes_nothing(demo_release, backbone, tmp_path, bad, message):
    output = tmp_path / "run"
    result = run_script(*training_args(demo_release, backbone, output, "--max-steps", "1", *bad), check=False)
    assert result.returncode == 1 and result.stderr.startswith(message)
    assert not output.exists()


def test_loader_workers_that_live_across_epochs_augment_each_epoch_as_one_process_does(
    demo_release, backbone, tmp_path
):
    steps = "--max-steps 8 --val-every 4".split()  # two epochs (6 steps each), two validations
    for workers in ("0", "2"):
        run_script(*training_args(demo_release, backbone, tmp_path / workers, *steps, "--num-workers", workers))
    in_process, in_workers = ([r["loss"] for r in records(tmp_path / w) if "loss" in r] for w in ("0", "2"))
    assert json.loads((tmp_path / "2" / "config.json").read_text())["arguments"]["persistent_workers"] is True
    assert in_workers == in_process
