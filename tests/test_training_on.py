"""Going on from a run: a larger budget on --resume, --init-from another run's weights; and logs that read well in a
file, ending with the command to type next. Runs train in this process (run_training.main), as the script would."""

import hashlib
import io
import json
import math
import subprocess
import sys

import torch
from safetensors.torch import load_file

import progress_bars
import run_directory
import run_training
from conftest import ROOT
from test_training import records, training_args


def train(release, backbone, output, *extra) -> int:
    return run_training.main([str(a) for a in training_args(release, backbone, output, *extra)[1:]])


def weights(output, name="last"):
    return load_file(output / name / "weights.safetensors")


def test_a_finished_run_given_a_larger_max_steps_trains_on_to_the_weights_of_one_run_that_long(
    demo_release, backbone, tmp_path, capsys
):
    settings = "--schedule constant --val-every 5 --checkpoint-every 5".split()
    assert train(demo_release, backbone, tmp_path / "straight", "--max-steps", "10", *settings) == 0
    extended = tmp_path / "extended"
    assert train(demo_release, backbone, extended, "--max-steps", "5", *settings) == 0
    capsys.readouterr()
    assert train(demo_release, backbone, extended, "--max-steps", "10", *settings, "--resume") == 0
    assert "budget 5 -> 10 steps at step 5: the constant schedule now spans 10 steps" in capsys.readouterr().out
    straight, resumed = weights(tmp_path / "straight"), weights(extended)
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6)
    assert [r["step"] for r in records(extended) if "loss" in r] == list(range(1, 11))
    config = json.loads((extended / "config.json").read_text())
    assert config["arguments"]["max_steps"] == 10
    assert config["budget_changes"] == [
        {"step": 5, "from": {"max_steps": 5, "epochs": 1}, "to": {"max_steps": 10, "epochs": 1}}
    ]

    assert train(demo_release, backbone, extended, "--max-steps", "3", *settings, "--resume") == 1
    assert capsys.readouterr().err.startswith("error: the run is at step 10, past the 3 steps of the new budget")


def test_a_cosine_schedule_extended_on_resume_is_recomputed_over_the_new_total_and_says_so(
    demo_release, backbone, tmp_path, capsys
):
    output, rates = tmp_path / "run", ["--lr", "1e-3", "--head-lr", "1e-3"]
    assert train(demo_release, backbone, output, "--max-steps", "4", *rates) == 0
    capsys.readouterr()
    assert train(demo_release, backbone, output, "--max-steps", "8", *rates, "--resume") == 0
    # warm-up 1 step, then a cosine over the 7 others: step 5's rate is the 8-step curve's at 4 steps done
    expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 7))
    printed = capsys.readouterr().out
    assert (
        f"the cosine schedule now spans 8 steps; the next step's learning rate is {expected:.3g} (it was 0)" in printed
    )
    logged = {r["step"]: r["lr"] for r in records(output) if "lr" in r}
    assert logged[4] == 0 and math.isclose(logged[5], 1e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 7)))


def test_init_from_starts_a_new_run_from_the_weights_of_another_and_records_which(
    demo_release, backbone, tmp_path, capsys
):
    source = tmp_path / "source"
    assert train(demo_release, backbone, source, "--max-steps", "3", "--lr", "1e-3", "--head-lr", "1e-2") == 0
    output = tmp_path / "fine-tuned"
    capsys.readouterr()
    assert (
        train(demo_release, backbone, output, *"--max-steps 1 --lr 0 --head-lr 0 --init-from".split(), source / "last")
        == 0
    )
    assert f"initial weights: {source}/last/ (--init-from)" in capsys.readouterr().out
    trained, started = weights(source), weights(output)
    for name in trained:  # a learning rate of 0: the run ends with the weights it started from
        torch.testing.assert_close(started[name], trained[name], rtol=0, atol=0)
    config = json.loads((output / "config.json").read_text())
    digest = hashlib.sha256((source / "last" / "weights.safetensors").read_bytes()).hexdigest()
    assert config["init_from"] == {"directory": str(source.resolve()), "weights": "last", "sha256": digest}

    assert train(demo_release, backbone, tmp_path / "other", "--head", "multilayer", "--init-from", source) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: --init-from {source}: ") and "does not match this model" in error
    assert not (tmp_path / "other").exists()


# ----------------------------------------------------------------------------- logs


def test_a_run_whose_output_goes_to_files_writes_plain_progress_lines_and_ends_with_the_next_command(
    demo_release, backbone, tmp_path
):
    output, log, errors = tmp_path / "run", tmp_path / "train.log", tmp_path / "train.err"
    command = [sys.executable, *map(str, training_args(demo_release, backbone, output, "--max-steps", "4"))]
    with open(log, "w") as stdout, open(errors, "w") as stderr:
        subprocess.run(command, cwd=ROOT, stdout=stdout, stderr=stderr, check=True)
    written = log.read_text() + errors.read_text()
    assert "\r" not in written and "\x1b[" not in written  # no redraws, no cursor codes
    bar = [line for line in errors.read_text().splitlines() if line.startswith("training:")]
    assert len(bar) == 2 and bar[-1].startswith("training: 100%")  # a short run: its first line and its last
    assert log.read_text().splitlines()[-1] == (
        f"next: python run_inference.py --model-directory {output} --data-directory {demo_release}"
        "   (predict and score the test videos)"
    )


def test_a_bar_redraws_in_place_on_a_terminal_and_writes_plain_lines_to_a_file(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal, file = Terminal(), io.StringIO()
    monkeypatch.setattr(progress_bars, "PLAIN_EVERY", 0)  # a line at every update
    for stream in (terminal, file):
        for _ in progress_bars.bar(range(3), file=stream, desc="work"):
            pass
    assert "\r" in terminal.getvalue()
    lines = file.getvalue().splitlines()
    assert "\r" not in file.getvalue() and lines[0].startswith("work:   0%") and lines[-1].startswith("work: 100%")


def test_a_tracked_run_ends_with_the_tensorboard_command_too():
    arguments = ["--output-directory", "runs/a", "--data-directory", "my data", "--report-to", "tensorboard"]
    assert run_directory.next_commands(run_training.parse_args(arguments)).splitlines() == [
        "next: python run_inference.py --model-directory runs/a --data-directory 'my data'   (predict and score the "
        "test videos)",
        "      tensorboard --logdir runs/a/tensorboard   (the curves and pictures, live)",
    ]
