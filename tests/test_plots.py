"""Charts drawn with matplotlib: the sizes they promise, never blank, and drawable before any validation."""

from types import SimpleNamespace

import cv2
import numpy as np
import pytest

import dataset
import plots
from options import SELECTION_METRICS


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


# ----------------------------------------------------------------------------- pictures explain themselves (issue 27)

TISSUE = {  # what an overlay's colours are drawn over in a prostatectomy, and the page and legends they sit on
    "tissue": (190, 95, 85),
    "dark tissue": (110, 30, 30),
    "specular tissue": (235, 180, 170),
    "fat": (210, 180, 110),
    "metal": (140, 140, 140),
    "shadow": (40, 40, 40),
    "white": (255, 255, 255),
}


def lab(colour):
    return cv2.cvtColor(np.float32([[colour]]) / 255, cv2.COLOR_RGB2LAB)[0, 0]


def contrast_with_white(colour):
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in np.divide(colour, 255)]
    return 1.05 / (np.dot(linear, (0.2126, 0.7152, 0.0722)) + 0.05)  # WCAG's contrast ratio


def test_every_class_colour_stands_out_on_tissue_on_white_and_from_the_others():
    for c, colour in plots.CLASS_COLOURS.items():
        name = dataset.CLASS_NAMES[c]
        assert contrast_with_white(colour) >= 2, name  # a legend box or chart line does not fade into the page
        for ground, behind in TISSUE.items():
            assert np.linalg.norm(lab(colour) - lab(behind)) >= 30, (name, ground)
        for other, colour_of_other in plots.CLASS_COLOURS.items():
            if other != c:
                assert np.linalg.norm(lab(colour) - lab(colour_of_other)) >= 30, (name, dataset.CLASS_NAMES[other])


@pytest.mark.parametrize("height, width", [(216, 384), (96, 128), (480, 640), (1080, 1920)])
def test_an_overlay_video_frame_has_a_legend_of_every_class_in_at_most_its_bottom_quarter(height, width):
    frame = np.full((height, width, 3), TISSUE["tissue"], np.uint8)
    picture = plots.video_frame((frame, None))
    assert picture.shape == frame.shape
    kept = height - height // 4
    np.testing.assert_array_equal(picture[:kept], frame[:kept])  # the legend takes at most the bottom quarter
    for c, colour in plots.CLASS_COLOURS.items():  # each class's box, in its own colour (opaque)
        assert np.all(picture[kept:] == colour, axis=2).sum() >= 9, dataset.CLASS_NAMES[c]


def drawn_texts(monkeypatch):
    """The texts OpenCV draws from now on, in order."""
    texts, put_text = [], cv2.putText
    monkeypatch.setattr(cv2, "putText", lambda image, text, *args: texts.append(text) or put_text(image, text, *args))
    return texts


def test_a_visualisation_carries_its_video_frame_and_frame_score(monkeypatch, tmp_path):
    truth = np.zeros((48, 64), np.uint8)
    truth[10:30, 10:30], truth[40:42, 5:60] = 3, 5  # tool shaft and thread
    prediction = np.where(truth == 5, 0, truth).astype(np.uint8)  # the thread missed: 8 of the 9 classes score 1
    texts = drawn_texts(monkeypatch)
    picture = plots.visualisation(np.zeros((48, 64, 3), np.uint8), prediction, truth, "video_41/000000060")
    assert texts[0] == "video_41/000000060: frame score 0.889 (mIoU 0.889, mNSD 0.889)"
    assert picture.shape == (plots.TITLE_HEIGHT + 48 + plots.legend_rows(3 * 64) * plots.LEGEND_ROW_HEIGHT, 192, 3)

    cv2.imwrite(str(tmp_path / "000000060.png"), np.zeros((48, 64, 3), np.uint8))
    texts.clear()
    samples = [SimpleNamespace(video="video_41", image=tmp_path / "000000060.png")]
    assert list(plots.validation_pictures(samples, {0: (prediction, truth)})) == ["video_41/000000060"]
    assert texts[0].startswith("video_41/000000060: frame score 0.889")  # what the tracker shows


@pytest.mark.parametrize("selection_metric", SELECTION_METRICS)
def test_the_training_curves_mark_the_best_on_a_drawn_curve_and_name_the_learning_rates_group(
    selection_metric, monkeypatch, tmp_path
):
    records = [training(1)]
    for step, (score, miou, seed) in zip((10, 20, 30), ((0.5, 0.2, 0.1), (0.3, 0.6, 0.2), (0.2, 0.1, 0.7))):
        record = validation(step, score)
        record["val"].update(mIoU=miou, seed_mIoU=seed)
        records.append(record)
    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda figure, path: drawn.append(figure))
    plots.training_curves(records, tmp_path / "training_curves.png", selection_metric)
    loss, lr, scores, thin = drawn[0].axes
    star = next(line for line in scores.get_lines() if line.get_marker() == "*")
    best = (star.get_xdata()[0], star.get_ydata()[0])
    assert best == {"score": (10, 0.5), "mIoU": (20, 0.6), "seed_mIoU": (30, 0.7)}[selection_metric]
    curves = [line for line in scores.get_lines() if line is not star and len(line.get_xdata()) == 3]
    assert any(best in zip(line.get_xdata(), line.get_ydata()) for line in curves)  # on a curve that is drawn
    assert "head's parameter group" in lr.get_title()  # what run_training logs as lr: param_groups[0]
