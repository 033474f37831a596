"""--report-to: the tracker gets metrics.jsonl's records as scalars and validation pictures, and a resume does not
log a step twice."""

import sys
from types import SimpleNamespace

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import plots
import tracking


def logged(directory):
    """({scalar name: [(step, value)]}, {image name: [step]}) as TensorBoard itself reads the event files (purges
    applied)."""
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return (
        {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]},
        {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]},
    )


def train_record(step, loss):
    return {"step": step, "epoch": 0, "loss": loss, "lr": 0.1, "images_per_second": 5.0, "peak_memory_mb": 0.0}


def test_validation_records_become_one_scalar_per_metric_class_count_and_video():
    record = {
        "step": 3,
        "val": {
            "mIoU": 0.5,
            "mNSD": 0.6,
            "score": 0.55,
            "seed_mIoU": 0.7,
            "frames": 6,
            "classes": {"thread": {"IoU": 0.1, "NSD": 0.2, "ground_truth_frames": 4, "absent_rule_frames": 2}},
            "videos": {"video_41": {"mIoU": 0.4, "mNSD": 0.3, "frames": 6}},
        },
    }
    assert tracking.scalars(record) == {
        "val/mIoU": 0.5,
        "val/mNSD": 0.6,
        "val/score": 0.55,
        "val/seed_mIoU": 0.7,
        "val/IoU/thread": 0.1,
        "val/NSD/thread": 0.2,
        "val/ground_truth_frames/thread": 4,
        "val/absent_rule_frames/thread": 2,
        "val/video_41/mIoU": 0.4,
        "val/video_41/mNSD": 0.3,
    }
    assert tracking.scalars(train_record(3, 1.5))["train/loss"] == 1.5


def test_a_resumed_tensorboard_run_replaces_what_was_logged_after_its_checkpoint(tmp_path):
    first = tracking.open_tracker("tensorboard", tmp_path, {"lr": 0.1}, None)
    for step in range(1, 9):  # killed after step 8, its checkpoint at step 5
        first.log(train_record(step, 100.0 + step), {"video_41/000000060": np.zeros((8, 24, 3), np.uint8)})
    first.close()
    resumed = tracking.open_tracker("tensorboard", tmp_path, {"lr": 0.1}, 5)
    for step in range(6, 11):
        resumed.log(train_record(step, float(step)), {})
    resumed.close()
    scalars, images = logged(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(s, 100.0 + s) for s in range(1, 6)] + [(s, float(s)) for s in range(6, 11)]
    assert images == {"validation/video_41/000000060": list(range(1, 6))}


def test_wandb_offline_keeps_one_run_id_across_a_resume(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = tracking.open_tracker("wandb", tmp_path, {"lr": 0.1}, None)
    tracker.log(train_record(1, 1.0), {"video_41/000000060": np.zeros((8, 24, 3), np.uint8)})
    tracker.close()
    run_id = (tmp_path / "wandb_run_id").read_text()
    tracking.open_tracker("wandb", tmp_path, {"lr": 0.1}, 1).close()
    assert (tmp_path / "wandb_run_id").read_text() == run_id
    runs = sorted(tmp_path.glob("wandb/offline-run-*"))
    assert len(runs) == 2 and all(run.name.split("-")[3] == run_id for run in runs)  # `wandb sync` joins them


def test_a_missing_tracker_package_is_named_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python marks a module that cannot be imported
    with pytest.raises(tracking.TrackingError, match=r"^--report-to wandb needs the wandb package: pip install wandb$"):
        tracking.check_available("wandb")
    tracking.check_available("none")


def test_a_wandb_run_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")

    def no_network(**settings):
        raise wandb.errors.CommError("Network error (ConnectionError), entering retry loop.\nmore detail")

    monkeypatch.setattr(wandb, "init", no_network)
    with pytest.raises(
        tracking.TrackingError,
        match=r"^W&B could not start a run \(Network error \(ConnectionError\), "
        r"entering retry loop.\): run `wandb login`, or set "
        r"WANDB_MODE=offline to log without a network$",
    ):
        tracking.open_tracker("wandb", tmp_path, {"lr": 0.1}, None)


# ----------------------------------------------------------------------------- the absent-class mark (issue 27)


def validation_record(step):
    """A validation in which thread is in no ground-truth frame: its 1.0 comes from the absent-class rule only."""
    classes = {
        "tool shaft": {"IoU": 0.5, "NSD": 0.6, "ground_truth_frames": 6, "absent_rule_frames": 0},
        "thread": {"IoU": 1.0, "NSD": 1.0, "ground_truth_frames": 0, "absent_rule_frames": 6},
    }
    return {"step": step, "val": {"mIoU": 0.7, "mNSD": 0.8, "score": 0.75, "classes": classes, "videos": {}}}


def test_tensorboard_marks_a_class_in_no_ground_truth_frame_and_counts_every_classs_frames(tmp_path):
    tracker = tracking.open_tracker("tensorboard", tmp_path, {"lr": 0.1}, None)
    tracker.log(validation_record(3), {})
    tracker.close()
    scalars, _ = logged(tmp_path / "tensorboard")
    assert scalars["val/ground_truth_frames/thread"] == [(3, 0)] and scalars["val/absent_rule_frames/thread"] == [
        (3, 6)
    ]
    assert scalars["val/ground_truth_frames/tool shaft"] == [(3, 6)]
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    [text] = events.Tensors("validation/classes/text_summary")  # TensorBoard's text tab, as Markdown
    table = text.tensor_proto.string_val[0].decode()
    assert text.step == 3 and "| thread \\* † | 1.0000 | 1.0000 | 0 | 6 |" in table and plots.ABSENT_NOTE in table
    assert "| tool shaft | 0.5000 | 0.6000 | 6 | 0 |" in table


def test_wandb_gets_the_per_class_table_with_the_mark_and_the_counts(monkeypatch):
    wandb = pytest.importorskip("wandb")
    logged_now = []
    tracker = tracking.WandB.__new__(tracking.WandB)  # no run started: what it would log is caught
    tracker.wandb, tracker.run = wandb, SimpleNamespace(log=lambda values, step: logged_now.append(values))
    tracker.log(validation_record(3), {})
    table = logged_now[0]["validation/classes"]
    assert table.columns[3:] == ["ground-truth frames", "scored 1 by the absent-class rule"]
    assert ["thread * †", 1.0, 1.0, 0, 6] in table.data and logged_now[0]["val/ground_truth_frames/thread"] == 0
