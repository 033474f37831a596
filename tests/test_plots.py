"""Charts drawn with matplotlib: the sizes they promise, never blank, and drawable before any validation."""

import cv2
import numpy as np
import pytest

import dataset
import plots


def validation(step, score):
    classes = {name: {"IoU": score, "NSD": score} for name in dataset.CLASS_NAMES[1:]}
    return {
        "step": step,
        "val": {
            "mIoU": score,
            "mNSD": score,
            "score": score,
            "seed_mIoU": score,
            "classes": classes,
            "videos": {"video_41": {"mIoU": score, "mNSD": score, "frames": 3}},
        },
    }


def training(step):
    return {"step": step, "epoch": 0, "loss": 2.0 / step, "lr": 1e-3, "images_per_second": 10.0, "peak_memory_mb": 1.0}


def read_picture(path):
    picture = cv2.imread(str(path))
    assert picture is not None, path
    assert picture.std() > 10, f"{path} is blank"  # axes, text and lines, not one flat colour
    return picture


def size_of(inches):
    return round(inches[1] * plots.DPI), round(inches[0] * plots.DPI)


@pytest.mark.parametrize(
    "records",
    [
        [training(s) for s in range(1, 101)] + [validation(50, 0.3), validation(100, 0.5)],
        [],  # nothing logged yet
        [training(1)],  # one step, no validation yet
        [training(1), validation(1, 0.2)],  # a single point of each
    ],
    ids=["a run", "empty", "one step", "one point"],
)
def test_training_curves_draw_at_their_size_whatever_has_been_logged(records, tmp_path):
    plots.training_curves(records, tmp_path / "training_curves.png")
    assert read_picture(tmp_path / "training_curves.png").shape[:2] == size_of(plots.CURVES_SIZE)


def test_the_confusion_matrix_and_score_bars_draw_at_their_size(tmp_path):
    confusion = np.random.default_rng(0).integers(0, 10_000, (dataset.NUM_CLASSES, dataset.NUM_CLASSES))
    confusion[7] = 0  # a class without ground-truth pixels is greyed, not divided by zero
    plots.confusion_matrix(confusion.tolist(), tmp_path / "confusion_matrix.png")
    assert read_picture(tmp_path / "confusion_matrix.png").shape[:2] == size_of(plots.CONFUSION_SIZE)
    metrics = {**validation(1, 0.4)["val"]}
    plots.class_scores(metrics, tmp_path / "per_class_scores.png")
    plots.video_scores(metrics, tmp_path / "per_video_scores.png")
    for name in ("per_class_scores.png", "per_video_scores.png"):
        assert read_picture(tmp_path / name).shape[:2] == size_of(plots.SCORES_SIZE)


def test_the_smoothed_loss_starts_at_the_first_value_and_follows_a_constant():
    assert plots.smoothed([4.0, 4.0, 4.0]) == pytest.approx([4.0, 4.0, 4.0])
    assert plots.smoothed([1.0, 0.0])[0] == pytest.approx(1.0)
