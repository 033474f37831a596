"""The official SAR-RARP50 segmentation score: per-class IoU and NSD, averaged frame -> video -> dataset.

Beside it, never instead of it: the seed pipeline's own mIoU (seed_miou), to set a run beside its published figure.
"""

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from scipy import ndimage

import discovery
import files
import progress_bars
from dataset import CLASS_NAMES, NUM_CLASSES

SCORED_CLASSES = range(1, NUM_CLASSES)  # background is never scored
COUNTS = ("ground_truth_frames", "absent_rule_frames")  # per class: frames holding it, frames scored 1 by the rule
CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


class PredictionError(ValueError):
    pass


# -----------------------------------------------------------------------------
# one frame


def reference_frame_scores(
    prediction: np.ndarray, ground_truth: np.ndarray, tolerance: float = 10.0
) -> tuple[np.ndarray, np.ndarray]:
    """Full-frame distance transforms per class, as the challenge toolkit does; kept for tests and benchmarks."""
    iou, nsd = np.ones(NUM_CLASSES - 1), np.ones(NUM_CLASSES - 1)
    for k, c in enumerate(SCORED_CLASSES):
        p, g = prediction == c, ground_truth == c
        if not p.any() and not g.any():
            continue
        if not p.any() or not g.any():
            iou[k] = nsd[k] = 0.0
            continue
        iou[k] = (p & g).sum() / (p | g).sum()
        p_edge = p & ~ndimage.binary_erosion(p, border_value=0)
        g_edge = g & ~ndimage.binary_erosion(g, border_value=0)
        to_g = ndimage.distance_transform_edt(~g_edge)
        to_p = ndimage.distance_transform_edt(~p_edge)
        close = (to_g[p_edge] <= tolerance).sum() + (to_p[g_edge] <= tolerance).sum()
        nsd[k] = close / (p_edge.sum() + g_edge.sum())
    return iou, nsd


def _boundary(mask):
    """Pixels with a 4-neighbour outside the mask; zero border, so pixels on the crop's edge count."""
    return mask - cv2.erode(mask, CROSS, borderType=cv2.BORDER_CONSTANT, borderValue=0)


def _within(edge_from, edge_to, tolerance):
    """Which pixels of edge_from lie within tolerance of any pixel of edge_to (exact Euclidean)."""
    distance = cv2.distanceTransform(1 - edge_to, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[edge_from.view(bool)]
    # float32 sqrt from OpenCV -> the exact integer squared distance -> the same float64 sqrt scipy compares
    return np.sqrt(np.rint(distance.astype(np.float64) ** 2)) <= tolerance


class FrameRecord(NamedTuple):
    """One frame's scores of classes 1..9 and which classes it holds: present (in the prediction or the ground
    truth; a class in neither scores 1 by the official rule) and in_truth (in the ground truth)."""

    iou: np.ndarray
    nsd: np.ndarray
    present: np.ndarray
    in_truth: np.ndarray


def frame_record(prediction: np.ndarray, ground_truth: np.ndarray, tolerance: float = 10.0) -> FrameRecord:
    """frame_scores' (iou, nsd) and which classes the frame holds."""
    if prediction.shape != ground_truth.shape:
        raise ValueError(f"prediction {prediction.shape} and ground truth {ground_truth.shape} differ in shape")
    iou, nsd = np.ones(NUM_CLASSES - 1), np.ones(NUM_CLASSES - 1)
    present, in_truth = np.ones(NUM_CLASSES - 1, bool), np.zeros(NUM_CLASSES - 1, bool)
    for k, c in enumerate(SCORED_CLASSES):
        p, g = (prediction == c).view(np.uint8), (ground_truth == c).view(np.uint8)
        px, py, pw, ph = cv2.boundingRect(p)
        gx, gy, gw, gh = cv2.boundingRect(g)
        in_truth[k] = gw > 0
        if pw == 0 and gw == 0:
            present[k] = False
            continue
        if pw == 0 or gw == 0:
            iou[k] = nsd[k] = 0.0
            continue
        # Crop to the union bounding box. It holds every boundary pixel of both masks, so distances measured
        # inside it are exact and need no margin; and a mask pixel on the crop's edge is on its own mask's
        # bounding box, hence boundary in the full image as well, which the zero-border erosion reproduces.
        x0, y0 = min(px, gx), min(py, gy)
        x1, y1 = max(px + pw, gx + gw), max(py + ph, gy + gh)
        p, g = p[y0:y1, x0:x1], g[y0:y1, x0:x1]
        iou[k] = np.count_nonzero(p & g) / np.count_nonzero(p | g)
        p_edge, g_edge = _boundary(p), _boundary(g)
        close = _within(p_edge, g_edge, tolerance).sum() + _within(g_edge, p_edge, tolerance).sum()
        nsd[k] = close / (np.count_nonzero(p_edge) + np.count_nonzero(g_edge))
    return FrameRecord(iou, nsd, present, in_truth)


def frame_scores(
    prediction: np.ndarray, ground_truth: np.ndarray, tolerance: float = 10.0
) -> tuple[np.ndarray, np.ndarray]:
    """IoU and NSD of classes 1..9, each class on a crop around it; equal to reference_frame_scores."""
    return frame_record(prediction, ground_truth, tolerance)[:2]


def confusion_matrix(prediction: np.ndarray, ground_truth: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Pixel counts, rows = ground truth class, columns = predicted class."""
    pairs = ground_truth.ravel().astype(np.int64)
    pairs *= num_classes
    pairs += prediction.ravel()
    return np.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


# -----------------------------------------------------------------------------
# frames -> videos -> dataset


def seed_miou(records: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> float:
    """The seed pipeline's own metric, NOT the official score: each frame's mean IoU over the classes in its
    prediction or ground truth (a frame with none is skipped), then the mean over every frame of every video
    together (no per-video step); NaN if no frame counts."""
    values = [record.iou[record.present].mean() for record in records if record.present.any()]
    return float(np.mean(values)) if values else float("nan")


def summarize(frame_results: dict[str, list[tuple]]) -> dict:
    """Video name -> [(iou, nsd) or a FrameRecord per frame] => dataset, per-video and per-class means (every video
    weighs the same); with FrameRecords, also "seed_mIoU" (see seed_miou) and per class how many frames hold it in
    their ground truth and how many score 1 by the absent-class rule (it is in neither mask)."""
    if not frame_results or not all(frame_results.values()):
        raise ValueError("every video needs at least one scored frame")
    per_video = {
        name: np.array([frame[:2] for frame in frames], dtype=np.float64).mean(axis=0)
        for name, frames in frame_results.items()
    }
    per_class = np.mean(list(per_video.values()), axis=0)  # (2, 9): IoU and NSD per class, mean over videos
    miou, mnsd = per_class.mean(axis=1)
    records = [frame for frames in frame_results.values() for frame in frames]
    recorded = all(isinstance(frame, FrameRecord) for frame in records)
    seed = {"seed_mIoU": seed_miou(records)} if recorded else {}
    counts = np.sum([(r.in_truth, ~r.present) for r in records], axis=0) if recorded else None  # (2, 9), as COUNTS
    return {
        "mIoU": float(miou),
        "mNSD": float(mnsd),
        "score": float(np.sqrt(miou * mnsd)),
        "videos": {
            name: {"mIoU": float(v[0].mean()), "mNSD": float(v[1].mean()), "frames": len(frame_results[name])}
            for name, v in per_video.items()
        },
        "classes": {
            CLASS_NAMES[c]: {"IoU": float(per_class[0, k]), "NSD": float(per_class[1, k])}
            | (dict(zip(COUNTS, map(int, counts[:, k]))) if recorded else {})
            for k, c in enumerate(SCORED_CLASSES)
        },
        "frames": len(records),
        **seed,
    }


# -----------------------------------------------------------------------------
# directories on disk


def read_label_png(path, as_toolkit=False) -> np.ndarray:
    """An 8-bit single-channel PNG as class ids 0..9. as_toolkit: an 8-bit colour PNG is read as the official
    toolkit reads it, as channel 0 of OpenCV's BGR image (palette and 16-bit PNGs, which it misreads, are refused)."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise PredictionError(f"{path}: cannot read ({error.strerror})") from None
    header = files.png_header(data[:26])
    if header is None:
        raise PredictionError(f"{path}: not a PNG file")
    _, _, bit_depth, colour_type = header
    if colour_type == files.PNG_PALETTE:
        raise PredictionError(f"{path}: palette PNG; write class ids as 8-bit single-channel greyscale")
    colour = as_toolkit and bit_depth == 8 and colour_type in files.PNG_COLOUR_TYPES  # as cv2.imread reads them
    if not colour and (bit_depth != 8 or colour_type != 0):
        raise PredictionError(f"{path}: {bit_depth}-bit PNG of colour type {colour_type}; need 8-bit single-channel")
    labels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR if colour else cv2.IMREAD_UNCHANGED)
    if labels is not None and colour:
        labels = np.ascontiguousarray(labels[..., 0])
    if labels is None or labels.ndim != 2 or labels.dtype != np.uint8:
        raise PredictionError(f"{path}: cannot decode as an 8-bit single-channel image")
    if labels.max() >= NUM_CLASSES:
        raise PredictionError(f"{path}: value {labels.max()} above {NUM_CLASSES - 1}")
    return labels


def png_has_colour(path) -> bool:
    with open(path, "rb") as file:
        header = files.png_header(file.read(26))
    return header is not None and header[3] in files.PNG_COLOUR_TYPES


def _score_files(paths):
    ground_truth_path, prediction_path = paths
    ground_truth, prediction = read_label_png(ground_truth_path), read_label_png(prediction_path, as_toolkit=True)
    if prediction.shape != ground_truth.shape:
        raise PredictionError(
            f"{prediction_path}: size {prediction.shape[1]}x{prediction.shape[0]}, "
            f"ground truth is {ground_truth.shape[1]}x{ground_truth.shape[0]}"
        )
    return (*frame_record(prediction, ground_truth), confusion_matrix(prediction, ground_truth))


def false_positive_pixels(confusion: np.ndarray) -> np.ndarray:
    """Per class 1..9: pixels predicted as it in a frame whose ground truth has none of it (0 where it has some),
    the error the official metric punishes hardest: IoU and NSD 0 for the class, whatever the pixel count."""
    absent = confusion.sum(1)[1:] == 0
    return np.where(absent, confusion.sum(0)[1:], 0)


def ground_truth_masks(ground_truth_dir: Path, videos: list[str] | None) -> dict[Path, Path]:
    """{VIDEO/segmentation/NAME.png: its file} of the ground-truth masks of these videos (default every one), the
    video folders found as prediction finds them (discovery.find_video_dirs: any folder with a segmentation/ inside,
    at any depth); each video needs a mask."""
    video_dirs = discovery.find_video_dirs(ground_truth_dir)
    if videos is not None:
        absent = sorted(set(videos) - {video.name for video in video_dirs})
        if absent:
            raise ValueError(f"{ground_truth_dir}: no video folder {', '.join(absent)}")
        video_dirs = [video for video in video_dirs if video.name in set(videos)]
    masks = {}
    for video in video_dirs:
        found = sorted((video / "segmentation").glob("*.png"))
        if not found:
            raise ValueError(
                f"{video / 'segmentation'}: no ground-truth masks for video {video.name}: unpack its "
                "masks there, or move the folder out of the dataset"
            )
        masks.update({Path(video.name, "segmentation", mask.name): mask for mask in found})
    if not masks:
        raise ValueError(f"{ground_truth_dir}: no video_*/segmentation/*.png ground-truth masks")
    return masks


def score_files(jobs: list[tuple[Path, Path]], workers: int | None, progress: bool) -> list:
    """_score_files of every (ground truth, prediction) pair, in parallel processes."""
    workers = workers or os.cpu_count()
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        scored = pool.map(_score_files, jobs, chunksize=4) if pool else map(_score_files, jobs)
        return list(progress_bars.bar(scored, total=len(jobs), desc="scoring", unit="frame", disable=not progress))
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)


def evaluate_directories(
    ground_truth_dir,
    prediction_dir,
    workers: int | None = None,
    progress: bool = True,
    videos: list[str] | None = None,
    per_frame: bool = False,
) -> dict:
    """Official score of PRED/video_*/segmentation/*.png against the same names under GT; missing files score 0.

    videos: only these video folders of GT (e.g. a validation split); default every one.
    per_frame: also "per_frame", one record per ground-truth mask (video, frame, IoU, NSD, false_positives, missing),
    in the order the averages take them.
    """
    ground_truth_dir, prediction_dir = Path(ground_truth_dir), Path(prediction_dir)
    masks = ground_truth_masks(ground_truth_dir, videos)
    found = [m for m in masks if (prediction_dir / m).is_file()]
    if not found:
        raise PredictionError(
            f"{prediction_dir} holds no prediction for any of the {len(masks)} ground-truth masks "
            f"(the first would be {prediction_dir / next(iter(masks))}): is it the right folder?"
        )
    if os.path.samefile(masks[found[0]], prediction_dir / found[0]):
        raise PredictionError(
            f"{prediction_dir} is the ground truth itself ({ground_truth_dir}): pass a folder of predictions"
        )
    coloured = [m.as_posix() for m in found if png_has_colour(prediction_dir / m)]
    scored = dict(zip(found, score_files([(masks[m], prediction_dir / m) for m in found], workers, progress)))
    zero = np.zeros(NUM_CLASSES - 1)
    frame_results, frames = {m.parts[0]: [] for m in masks}, []
    for m in masks:  # no prediction: 0 on every class, seed mIoU too; nothing added to the confusion matrix
        if m in scored:
            record, confusion = FrameRecord(*scored[m][:4]), scored[m][4]
        else:
            in_truth = np.isin(list(SCORED_CLASSES), read_label_png(masks[m]))
            record, confusion = FrameRecord(zero, zero, zero == 0, in_truth), None
        frame_results[m.parts[0]].append(record)
        false_positives = zero.astype(np.int64) if confusion is None else false_positive_pixels(confusion)
        frames.append(
            {
                "video": m.parts[0],
                "frame": m.stem,
                "IoU": record.iou.tolist(),
                "NSD": record.nsd.tolist(),
                "false_positives": false_positives.tolist(),
                "missing": confusion is None,
            }
        )
    confusion = sum((s[-1] for s in scored.values()), np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64))
    return {
        **summarize(frame_results),
        "missing": [m.as_posix() for m in masks if m not in scored],
        "colour_predictions": coloured,
        "confusion": confusion.tolist(),
        "ground_truth_dir": str(ground_truth_dir),
        "prediction_dir": str(prediction_dir),
        **({"per_frame": frames} if per_frame else {}),
    }
