"""The official SAR-RARP50 score, rule by rule, on small hand-made masks with hand-computed values; and the seed
pipeline's own mIoU reported beside it, which must leave the official score untouched."""

import json
import struct
import zlib

import cv2
import numpy as np
import pytest

from metrics import (
    FrameRecord,
    PredictionError,
    confusion_matrix,
    evaluate_directories,
    frame_record,
    frame_scores,
    read_label_png,
    reference_frame_scores,
    summarize,
)

BOTH = [frame_scores, reference_frame_scores]  # every rule holds for the fast and the straightforward version


def score_of(scores_fn, prediction, ground_truth, class_id, tolerance=10.0):
    iou, nsd = scores_fn(prediction, ground_truth, tolerance)
    return iou[class_id - 1], nsd[class_id - 1]


def write_png(path, labels):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), labels)
    return path


def write_palette_png(path, labels):
    """A colour-type-3 PNG; OpenCV can only write greyscale or colour ones."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = labels.shape
    rows = b"".join(b"\x00" + row.tobytes() for row in labels.astype(np.uint8))
    palette = bytes(np.arange(256, dtype=np.uint8).repeat(3))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0))
        + chunk(b"PLTE", palette)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


# -----------------------------------------------------------------------------
# one frame


@pytest.mark.parametrize("scores_fn", BOTH)
def test_a_class_in_neither_mask_scores_one_on_both_metrics(scores_fn):
    iou, nsd = scores_fn(np.zeros((6, 7), np.uint8), np.zeros((6, 7), np.uint8))
    assert iou.shape == nsd.shape == (9,) and iou.dtype == nsd.dtype == np.float64
    assert np.all(iou == 1.0) and np.all(nsd == 1.0)


@pytest.mark.parametrize("scores_fn", BOTH)
def test_a_class_in_exactly_one_mask_scores_zero_on_both_metrics(scores_fn):
    ground_truth = np.zeros((6, 7), np.uint8)
    ground_truth[2:4, 2:4] = 2
    prediction = np.zeros((6, 7), np.uint8)
    prediction[0, 0] = 9
    iou, nsd = scores_fn(prediction, ground_truth)
    assert iou[1] == nsd[1] == 0.0  # class 2: ground truth only
    assert iou[8] == nsd[8] == 0.0  # class 9: prediction only (a single stray pixel costs a whole class)
    assert np.all(np.delete(iou, [1, 8]) == 1.0) and np.all(np.delete(nsd, [1, 8]) == 1.0)


@pytest.mark.parametrize("scores_fn", BOTH)
def test_iou_is_intersection_over_union(scores_fn):
    ground_truth = np.zeros((8, 8), np.uint8)
    ground_truth[2:4, 2:4] = 1  # 4 px
    prediction = np.zeros((8, 8), np.uint8)
    prediction[2:4, 3:6] = 1  # 6 px, 2 of them shared
    iou, _ = score_of(scores_fn, prediction, ground_truth, 1)
    assert iou == pytest.approx(2 / 8)


@pytest.mark.parametrize("scores_fn", BOTH)
def test_pixels_on_the_image_border_are_boundary(scores_fn):
    # Ground truth fills the 5x5 image: its boundary is the 16-pixel outer ring, although no pixel has a
    # neighbour of another class. The prediction fills columns 0-2: boundary = all 15 but the interior
    # (rows 1-3, column 1) = 12 px. With tolerance 0 a boundary pixel counts only when it lies on the other
    # boundary: the 9 ring pixels in columns 0-2, from either side.
    ground_truth = np.ones((5, 5), np.uint8)
    prediction = np.zeros((5, 5), np.uint8)
    prediction[:, :3] = 1
    iou, nsd = score_of(scores_fn, prediction, ground_truth, 1, tolerance=0.0)
    assert iou == pytest.approx(15 / 25)
    assert nsd == pytest.approx((9 + 9) / (12 + 16))


@pytest.mark.parametrize("scores_fn", BOTH)
@pytest.mark.parametrize(
    "offset, counts", [((6, 8), True), ((0, 10), True), ((10, 0), True), ((1, 10), False), ((7, 8), False)]
)
def test_a_boundary_pixel_counts_up_to_distance_tau_inclusive(scores_fn, offset, counts):
    # single pixels: (6, 8) and (0, 10) are exactly 10 away; (1, 10) is 10.05 and (7, 8) 10.63 away
    ground_truth = np.zeros((30, 40), np.uint8)
    ground_truth[5, 5] = 1
    prediction = np.zeros((30, 40), np.uint8)
    prediction[5 + offset[0], 5 + offset[1]] = 1
    iou, nsd = score_of(scores_fn, prediction, ground_truth, 1, tolerance=10.0)
    assert iou == 0.0
    assert nsd == (1.0 if counts else 0.0)


@pytest.mark.parametrize("scores_fn", BOTH)
def test_nsd_counts_close_boundary_pixels_from_both_sides(scores_fn):
    ground_truth = np.zeros((30, 40), np.uint8)
    ground_truth[5, 5] = 1
    prediction = np.zeros((30, 40), np.uint8)
    prediction[5, 15] = 1  # 10 away: counts
    prediction[5, 27] = 1  # 22 away: does not
    _, nsd = score_of(scores_fn, prediction, ground_truth, 1)
    assert nsd == pytest.approx((1 + 1) / (2 + 1))  # the ground-truth pixel is within 10 of the first one


@pytest.mark.parametrize("scores_fn", BOTH)
def test_a_one_pixel_thread_is_all_boundary(scores_fn):
    ground_truth = np.zeros((20, 30), np.uint8)
    ground_truth[5, 2:12] = 5  # 10 px, every one of them boundary
    prediction = np.zeros((20, 30), np.uint8)
    prediction[6, 2:17] = 5  # 15 px one row lower, 5 px longer
    iou, nsd = score_of(scores_fn, prediction, ground_truth, 5, tolerance=1.0)
    assert iou == 0.0
    # prediction: columns 2-11 are 1 px from the ground truth, columns 12-16 more than 1; ground truth: all 10
    assert nsd == pytest.approx((10 + 10) / (15 + 10))
    iou, nsd = score_of(scores_fn, ground_truth, ground_truth, 5, tolerance=0.0)
    assert iou == nsd == 1.0


def random_scene(rng, shape=(200, 300)):
    """Overlapping blobs of several classes, some cut by the image border, some tiny, one a thin line."""
    height, width = shape
    labels = np.zeros(shape, np.uint8)
    for _ in range(rng.integers(3, 9)):
        c = int(rng.integers(1, 10))
        centre = (int(rng.integers(-20, width + 20)), int(rng.integers(-20, height + 20)))
        axes = (int(rng.integers(1, 60)), int(rng.integers(1, 40)))
        cv2.ellipse(labels, centre, axes, float(rng.uniform(0, 180)), 0, 360, c, -1)
    corner = int(rng.integers(1, 10))
    labels[: int(rng.integers(1, 4)), -int(rng.integers(1, 4)) :] = corner  # a few pixels in the top-right corner
    points = rng.integers(0, (width, height), size=(4, 2)).astype(np.int32)
    cv2.polylines(labels, [points], False, int(rng.integers(1, 10)), int(rng.integers(1, 3)))
    return labels


def perturbed(rng, labels):
    """Shifted by a few pixels, one class dilated, plus a stray blob."""
    prediction = np.roll(labels, tuple(rng.integers(-4, 5, size=2)), axis=(0, 1))
    c = int(rng.integers(1, 10))
    grown = cv2.dilate((prediction == c).view(np.uint8), np.ones((5, 5), np.uint8)) > 0
    prediction[grown] = c
    stray = (int(rng.integers(0, labels.shape[1])), int(rng.integers(0, labels.shape[0])))
    cv2.circle(prediction, stray, int(rng.integers(0, 6)), int(rng.integers(1, 10)), -1)
    return prediction


# sqrt(5) catches float32 distances: float32(sqrt(5)) > float64(sqrt(5)), so a pixel sqrt(5) away would drop out
@pytest.mark.parametrize("tolerance", [10.0, 3.0, 2.5, 0.0, np.sqrt(5.0)])
def test_the_fast_version_equals_the_straightforward_one(tolerance):
    rng = np.random.default_rng(int(tolerance * 10))
    for _ in range(15):
        ground_truth = random_scene(rng)
        prediction = perturbed(rng, ground_truth) if rng.random() < 0.8 else random_scene(rng)
        fast, reference = (
            frame_scores(prediction, ground_truth, tolerance),
            reference_frame_scores(prediction, ground_truth, tolerance),
        )
        np.testing.assert_allclose(fast[0], reference[0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(fast[1], reference[1], rtol=0, atol=1e-6)


def test_frame_record_is_frame_scores_plus_which_classes_are_in_either_mask():
    rng = np.random.default_rng(7)
    ground_truth = random_scene(rng)
    prediction = perturbed(rng, ground_truth)
    iou, nsd, present, in_truth = frame_record(prediction, ground_truth)
    fast_iou, fast_nsd = frame_scores(prediction, ground_truth)
    np.testing.assert_array_equal(iou, fast_iou)
    np.testing.assert_array_equal(nsd, fast_nsd)
    in_either = np.union1d(np.unique(prediction), np.unique(ground_truth))
    assert present.dtype == bool and present.tolist() == [c in in_either for c in range(1, 10)]
    assert in_truth.tolist() == [c in np.unique(ground_truth) for c in range(1, 10)]


def test_masks_of_different_shapes_are_refused():
    with pytest.raises(ValueError):
        frame_scores(np.zeros((4, 5), np.uint8), np.zeros((5, 4), np.uint8))


def test_confusion_matrix_rows_are_ground_truth_columns_prediction():
    ground_truth = np.array([[0, 1], [1, 2]], np.uint8)
    prediction = np.array([[0, 1], [2, 2]], np.uint8)
    expected = [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    matrix = confusion_matrix(prediction, ground_truth, num_classes=3)
    assert matrix.dtype == np.int64 and matrix.tolist() == expected
    assert confusion_matrix(prediction, ground_truth).shape == (10, 10)


# -----------------------------------------------------------------------------
# frames -> videos -> dataset


def frames(iou, nsd, count=1):
    return [(np.full(9, float(iou)), np.full(9, float(nsd)))] * count


def test_each_video_weighs_the_same_whatever_its_frame_count():
    result = summarize({"video_01": frames(1.0, 1.0, count=1), "video_02": frames(0.0, 0.5, count=3)})
    assert result["mIoU"] == pytest.approx(0.5)  # not (1 + 0 + 0 + 0) / 4
    assert result["mNSD"] == pytest.approx(0.75)
    assert result["frames"] == 4
    assert result["videos"]["video_02"] == {"mIoU": 0.0, "mNSD": 0.5, "frames": 3}


def test_frame_value_is_the_mean_over_the_nine_classes_and_video_value_the_mean_over_frames():
    iou = np.array([1.0, 0, 0, 0, 0, 0, 0, 0, 0.8])
    result = summarize({"video_01": [(iou, np.ones(9)), (np.zeros(9), np.ones(9))]})
    assert result["videos"]["video_01"]["mIoU"] == pytest.approx(1.8 / 9 / 2)
    assert result["classes"]["tool clasper"] == {"IoU": 0.5, "NSD": 1.0}
    assert result["classes"]["catheter"]["IoU"] == pytest.approx(0.4)
    assert "background" not in result["classes"] and len(result["classes"]) == 9


def test_score_is_the_geometric_mean_of_dataset_miou_and_mnsd():
    result = summarize({"video_01": frames(0.64, 1.0), "video_02": frames(0.64, 0.0)})
    assert result["mIoU"] == pytest.approx(0.64) and result["mNSD"] == pytest.approx(0.5)
    assert result["score"] == pytest.approx(np.sqrt(0.64 * 0.5))


def test_summarize_adds_no_seed_miou_unless_every_frame_says_which_classes_it_has():
    assert "seed_mIoU" not in summarize({"video_01": frames(1.0, 1.0)})
    with_presence = FrameRecord(np.ones(9), np.ones(9), np.ones(9, bool), np.ones(9, bool))
    assert "seed_mIoU" not in summarize({"video_01": [with_presence], "video_02": frames(1.0, 1.0)})
    assert summarize({"video_01": [with_presence]})["seed_mIoU"] == 1.0


# -----------------------------------------------------------------------------
# the seed pipeline's own mIoU: NOT the official score, reported beside it


def pair(prediction, ground_truth):
    return np.array(prediction, np.uint8), np.array(ground_truth, np.uint8)


NO_INSTRUMENT = pair(np.zeros((3, 3)), np.zeros((3, 3)))


SEED_FRAMES = {  # video -> [((prediction, ground truth), seed pipeline's frame value, official frame mIoU)]
    "video_01": [
        # class 1: IoU 2/4; class 9, only predicted: 0, counts; classes 2-8, in neither: skipped (official: 1.0 each)
        (pair([[1, 1, 0], [0, 0, 0], [0, 0, 9]], [[1, 1, 0], [1, 1, 0], [0, 0, 0]]), (0.5 + 0) / 2, (0.5 + 0 + 7) / 9),
        (NO_INSTRUMENT, np.nan, 1.0),  # no instrument in either: skipped (official: 1.0)
        (pair(np.full((3, 3), 3), np.full((3, 3), 3)), 1.0, 1.0),  # perfect
    ],
    "video_02": [(pair([[2, 0, 0], [2, 0, 0], [0, 0, 0]], [[2, 2, 0], [2, 2, 0], [0, 0, 0]]), 0.5, (0.5 + 8) / 9)],
}


def seed_records():
    return {video: [frame_record(*masks) for masks, _, _ in rows] for video, rows in SEED_FRAMES.items()}


def test_each_frame_value_skips_classes_in_neither_mask_and_counts_a_class_in_one_as_zero():
    for rows, records in zip(SEED_FRAMES.values(), seed_records().values()):
        for (_, seed_value, official_value), (iou, _, present, _) in zip(rows, records):
            np.testing.assert_allclose(iou[present].mean() if present.any() else np.nan, seed_value)
            assert iou.mean() == pytest.approx(official_value)


def test_the_seed_miou_pools_every_frame_of_every_video_and_skips_frames_without_instruments():
    result = summarize(seed_records())
    assert result["seed_mIoU"] == pytest.approx((0.25 + 1.0 + 0.5) / 3)  # frames pooled, the empty frame skipped
    assert result["seed_mIoU"] != pytest.approx(((0.25 + 1.0) / 2 + 0.5) / 2)  # not a mean of per-video means
    assert result["mIoU"] == pytest.approx(((7.5 / 9 + 1 + 1) / 3 + 8.5 / 9) / 2)  # the official score: another number


def test_the_seed_miou_leaves_the_official_score_exactly_as_it_was():
    with_presence = summarize(seed_records())
    official = summarize({video: [record[:2] for record in records] for video, records in seed_records().items()})
    assert {key: value for key, value in with_presence.items() if key not in ("seed_mIoU", "classes")} == {
        key: value for key, value in official.items() if key != "classes"
    }
    scores = {name: {"IoU": v["IoU"], "NSD": v["NSD"]} for name, v in with_presence["classes"].items()}
    assert scores == official["classes"]  # the class counts beside them change no score
    assert official == summarize(
        {video: [frame_scores(*masks) for masks, _, _ in rows] for video, rows in SEED_FRAMES.items()}
    )


def test_the_seed_miou_is_nan_when_no_frame_has_an_instrument():
    assert np.isnan(summarize({"video_01": [frame_record(*NO_INSTRUMENT)] * 2})["seed_mIoU"])


# -----------------------------------------------------------------------------
# directories on disk


@pytest.fixture
def ground_truth_dir(tmp_path):
    root = tmp_path / "GT"
    mask = np.zeros((12, 16), np.uint8)
    mask[2:6, 3:9] = 3
    for name in ["000000000.png", "000000060.png"]:
        write_png(root / "video_01" / "segmentation" / name, mask)
    write_png(root / "video_02" / "segmentation" / "000000000.png", mask)
    (root / "video_03").mkdir()  # no segmentation folder: not scored
    write_png(root / "other" / "segmentation" / "000000000.png", mask)  # not a video_* folder: not scored
    return root


@pytest.mark.parametrize("workers", [1, 2])
def test_a_missing_prediction_scores_zero_and_is_listed(ground_truth_dir, tmp_path, workers):
    predictions = tmp_path / "PRED"
    for path in ground_truth_dir.glob("video_*/segmentation/*.png"):
        if path.name != "000000060.png":
            write_png(predictions / path.relative_to(ground_truth_dir), read_label_png(path))  # perfect
    result = evaluate_directories(ground_truth_dir, predictions, workers=workers, progress=False)
    assert result["missing"] == ["video_01/segmentation/000000060.png"]
    assert result["videos"] == {
        "video_01": {"mIoU": 0.5, "mNSD": 0.5, "frames": 2},
        "video_02": {"mIoU": 1.0, "mNSD": 1.0, "frames": 1},
    }
    assert result["mIoU"] == result["mNSD"] == result["score"] == pytest.approx(0.75)
    assert result["seed_mIoU"] == pytest.approx((0 + 1 + 1) / 3)  # the missing frame scores 0 here too; frames pooled
    assert result["frames"] == 3
    confusion = np.array(result["confusion"])  # the two scored frames only
    assert confusion.sum() == 2 * 12 * 16 and confusion[3, 3] == 2 * 24 and confusion[0, 0] == 2 * (192 - 24)
    assert result["ground_truth_dir"] == str(ground_truth_dir) and result["prediction_dir"] == str(predictions)
    assert json.loads(json.dumps(result)) == result


@pytest.mark.parametrize("workers", [1, 2])
def test_a_prediction_of_the_wrong_size_is_an_error_naming_it(ground_truth_dir, tmp_path, workers):
    write_png(tmp_path / "PRED" / "video_02" / "segmentation" / "000000000.png", np.zeros((16, 12), np.uint8))
    with pytest.raises(PredictionError, match="video_02.*000000000.png: size 12x16, ground truth is 16x12"):
        evaluate_directories(ground_truth_dir, tmp_path / "PRED", workers=workers, progress=False)


def test_a_label_png_reads_as_class_ids(tmp_path):
    labels = np.arange(10, dtype=np.uint8).reshape(2, 5)
    np.testing.assert_array_equal(read_label_png(write_png(tmp_path / "ok.png", labels)), labels)


@pytest.mark.parametrize(
    "name, image, problem",
    [
        ("above_9.png", np.full((4, 4), 10, np.uint8), "value 10"),
        ("ignore_255.png", np.full((4, 4), 255, np.uint8), "value 255"),
        ("sixteen_bit.png", np.zeros((4, 4), np.uint16), "16-bit"),
        ("colour.png", np.zeros((4, 4, 3), np.uint8), "colour type 2"),
    ],
)
def test_a_bad_label_png_is_an_error_naming_the_file(tmp_path, name, image, problem):
    path = write_png(tmp_path / name, image)
    with pytest.raises(PredictionError, match=f"{name}.*{problem}"):
        read_label_png(path)


def test_a_palette_png_is_an_error_even_with_valid_indices(tmp_path):
    path = write_palette_png(tmp_path / "palette.png", np.ones((4, 4), np.uint8))
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).ndim == 3  # what OpenCV alone would silently give
    with pytest.raises(PredictionError, match="palette.png.*palette"):
        read_label_png(path)


@pytest.mark.parametrize("content", [b"", b"not a png at all"])
def test_an_unreadable_file_is_an_error_naming_it(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(PredictionError, match="broken.png"):
        read_label_png(path)
    with pytest.raises(PredictionError, match="absent.png"):
        read_label_png(tmp_path / "absent.png")


@pytest.mark.parametrize("channels", [3, 4])
def test_a_colour_prediction_is_read_as_the_official_toolkit_reads_it_channel_0_of_bgr(tmp_path, channels):
    labels = np.arange(10, dtype=np.uint8).reshape(2, 5)
    noise = np.full((2, 5, channels - 1), 200, np.uint8)
    path = write_png(tmp_path / "colour.png", np.dstack([labels, noise]))  # OpenCV writes BGR(A): labels in blue
    np.testing.assert_array_equal(read_label_png(path, as_toolkit=True), labels)
    with pytest.raises(PredictionError, match="colour type"):
        read_label_png(path)  # ground truth stays strict


def test_the_toolkit_reading_still_refuses_what_the_toolkit_misreads(tmp_path):
    with pytest.raises(PredictionError, match="palette"):
        read_label_png(write_palette_png(tmp_path / "palette.png", np.ones((4, 4), np.uint8)), as_toolkit=True)
    with pytest.raises(PredictionError, match="16-bit"):
        read_label_png(write_png(tmp_path / "deep.png", np.zeros((4, 4, 3), np.uint16)), as_toolkit=True)


def test_scoring_lists_the_colour_predictions_it_read_as_the_toolkit(ground_truth_dir, tmp_path):
    predictions = tmp_path / "PRED"
    for path in ground_truth_dir.glob("video_*/segmentation/*.png"):
        labels = read_label_png(path)
        colour = path.parent.parent.name == "video_02"
        write_png(predictions / path.relative_to(ground_truth_dir), cv2.merge([labels] * 3) if colour else labels)
    result = evaluate_directories(ground_truth_dir, predictions, workers=1, progress=False)
    assert result["score"] == 1.0 and result["colour_predictions"] == ["video_02/segmentation/000000000.png"]


def test_scoring_refuses_a_folder_without_predictions_and_the_ground_truth_itself(ground_truth_dir, tmp_path):
    with pytest.raises(PredictionError, match="holds no prediction for any of the 3 ground-truth masks"):
        evaluate_directories(ground_truth_dir, tmp_path, workers=1, progress=False)
    with pytest.raises(PredictionError, match="is the ground truth itself"):
        evaluate_directories(ground_truth_dir, ground_truth_dir, workers=1, progress=False)


def test_a_video_with_an_empty_segmentation_folder_is_named(ground_truth_dir):
    for mask in (ground_truth_dir / "video_02" / "segmentation").glob("*.png"):
        mask.unlink()
    with pytest.raises(ValueError, match="no ground-truth masks for video video_02"):
        evaluate_directories(ground_truth_dir, ground_truth_dir, workers=1, progress=False)
