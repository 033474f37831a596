"""Charts drawn with matplotlib: the sizes they promise, never blank, and drawable before any validation."""
import cv2
import numpy as np
import pytest

import dataset as D
import plots as P


def validation(step, score):
    classes = {name: {"IoU": score, "NSD": score} for name in D.CLASS_NAMES[1:]}
    return {"step": step, "val": {"mIoU": score, "mNSD": score, "score": score, "seed_mIoU": score, "classes": classes,
                                  "videos": {"video_41": {"mIoU": score, "mNSD": score, "frames": 3}}}}


def training(step):
    return {"step": step, "epoch": 0, "loss": 2.0 / step, "lr": 1e-3, "images_per_second": 10.0, "peak_memory_mb": 1.0}


def read_picture(path):
    picture = cv2.imread(str(path))
    assert picture is not None, path
    assert picture.std() > 10, f"{path} is blank"  # axes, text and lines, not one flat colour
    return picture


def size_of(inches):
    return round(inches[1] * P.DPI), round(inches[0] * P.DPI)


@pytest.mark.parametrize("records", [
    [training(s) for s in range(1, 101)] + [validation(50, 0.3), validation(100, 0.5)],
    [],                                               # nothing logged yet
    [training(1)],                                    # one step, no validation yet
    [training(1), validation(1, 0.2)],                # a single point of each
], ids=["a run", "empty", "one step", "one point"])
def test_training_curves_draw_at_their_size_whatever_has_been_logged(records, tmp_path):
    P.training_curves(records, tmp_path / "training_curves.png")
    assert read_picture(tmp_path / "training_curves.png").shape[:2] == size_of(P.CURVES_SIZE)


def test_the_confusion_matrix_and_score_bars_draw_at_their_size(tmp_path):
    confusion = np.random.default_rng(0).integers(0, 10_000, (D.NUM_CLASSES, D.NUM_CLASSES))
    confusion[7] = 0  # a class without ground-truth pixels is greyed, not divided by zero
    P.confusion_matrix(confusion.tolist(), tmp_path / "confusion_matrix.png")
    assert read_picture(tmp_path / "confusion_matrix.png").shape[:2] == size_of(P.CONFUSION_SIZE)
    metrics = {**validation(1, 0.4)["val"]}
    P.class_scores(metrics, tmp_path / "per_class_scores.png")
    P.video_scores(metrics, tmp_path / "per_video_scores.png")
    for name in ("per_class_scores.png", "per_video_scores.png"):
        assert read_picture(tmp_path / name).shape[:2] == size_of(P.SCORES_SIZE)


def test_the_smoothed_loss_starts_at_the_first_value_and_follows_a_constant():
    assert P.smoothed([4.0, 4.0, 4.0]) == pytest.approx([4.0, 4.0, 4.0])
    assert P.smoothed([1.0, 0.0])[0] == pytest.approx(1.0)
