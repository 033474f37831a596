"""--fsdp: full fine-tuning sharded across torchrun processes trains what DDP trains, resumes exactly after a kill,
and leaves a model that one process loads."""

import json

import pytest
import torch
from safetensors.torch import load_file

import distributed
from conftest import ROOT, run_script
from test_training import TORCHRUN, kill_and_resume, records, training_args
from test_trust import refused

FULL = ("--backbone-training", "full", "--precision", "fp32")


def test_fsdp_trains_as_ddp_does_resumes_after_a_kill_and_its_model_runs_on_one_process(
    demo_release, backbone, tmp_path
):
    arguments, sharded_run = kill_and_resume(demo_release, backbone, tmp_path, *FULL, "--fsdp", launcher=TORCHRUN)
    assert [p.name for p in (sharded_run / "sharded").iterdir()] == ["step-10"]  # only the checkpoint's own shards

    ddp_run = tmp_path / "ddp"
    ddp_arguments = [a for a in arguments if a != "--fsdp"]
    run_script(*TORCHRUN, *training_args(demo_release, backbone, ddp_run, *ddp_arguments), env={"OMP_NUM_THREADS": "1"})
    losses = {run: [r["loss"] for r in records(run) if "loss" in r] for run in (sharded_run, ddp_run)}
    assert losses[sharded_run] == pytest.approx(losses[ddp_run], rel=1e-5)  # sums in another order
    sharded_weights, ddp_weights = (load_file(run / "last" / "weights.safetensors") for run in (sharded_run, ddp_run))
    assert sharded_weights.keys() == ddp_weights.keys()  # whole: every backbone weight and the head
    for name in ddp_weights:  # Adam makes a last-bit difference of a gradient near 0 a part of a step (lr 2e-4)
        torch.testing.assert_close(sharded_weights[name], ddp_weights[name], rtol=1e-3, atol=1e-4)

    run_script(
        ROOT / "run_inference.py",
        *("--model-directory", sharded_run, "--data-directory", demo_release, "--output", tmp_path / "predicted"),
        *"--batch-size 2 --num-workers 0".split(),
    )
    assert json.loads((tmp_path / "predicted" / "metrics.json").read_text())["frames"] > 0


@pytest.mark.parametrize(
    "rank, arguments, message",
    [
        (None, [*FULL, "--fsdp"], "--fsdp shards across processes: launch with torchrun"),
        ("0", ["--fsdp"], "--fsdp shards --backbone-training full; lora trains few weights"),
        ("0", ["--fsdp", "--backbone-training", "full", "--precision", "fp16"], "--fsdp trains in bf16 or fp32"),
    ],
)
def test_fsdp_where_it_cannot_shard_is_refused_in_one_line(rank, arguments, message, monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    if rank is not None:
        monkeypatch.setenv("RANK", rank)
    assert message in refused(capsys, *arguments)


def test_every_rank_validates_as_many_frames_and_together_they_score_each_once():
    shares = [distributed.share(5, rank, 2) for rank in range(2)]
    assert shares == [[0, 2, 4], [1, 3, 1]]  # a sharded model's forward needs every rank: the short share repeats
    assert set(shares[0]) | set(shares[1]) == set(range(5))
    assert distributed.share(1, 1, 2) == [0]
