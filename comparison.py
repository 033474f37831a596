"""Is the difference between two runs real? Paired statistics over the videos both were scored on: a bootstrap
confidence interval (videos resampled, then frames within each video) and a sign-flip permutation p-value over
videos, for the official score, mIoU, mNSD and each class's IoU. The runs are read from their per_frame.csv."""

import csv
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dataset import CLASS_NAMES
from metrics import SCORED_CLASSES

CLASSES = [CLASS_NAMES[c] for c in SCORED_CLASSES]
METRICS = ("score", "mIoU", "mNSD", *(f"IoU {name}" for name in CLASSES))
EXACT_VIDEOS = 16  # up to 2**16 sign patterns are enumerated; above, PERMUTATION_DRAWS random ones


class ComparisonError(ValueError):
    """Runs that cannot be compared (no scores, other videos or frames); the message names what differs."""


@dataclass
class ScoredRun:
    """One run's official per-frame scores, in per_frame.csv's order."""

    name: str
    folder: Path  # the folder holding per_frame.csv
    keys: list[tuple[str, str]]  # (video, frame) of each row
    iou: np.ndarray  # (frames, 9)
    nsd: np.ndarray  # (frames, 9)


def read_scored_run(path) -> ScoredRun:
    """The scores of a prediction folder, or of a model directory whose inference is done (MODEL/inference)."""
    path = Path(path)
    folder = next((p for p in (path, path / "inference") if (p / "per_frame.csv").is_file()), None)
    if folder is None:
        raise ComparisonError(
            f"{path} holds no per_frame.csv (nor {path}/inference does): score it first with run_inference.py "
            "(--eval-only for its own predictions, --predictions-directory for any folder)"
        )
    with open(folder / "per_frame.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    try:
        iou = np.array([[float(row[f"IoU {name}"]) for name in CLASSES] for row in rows])
        nsd = np.array([[float(row[f"NSD {name}"]) for name in CLASSES] for row in rows])
    except (KeyError, TypeError, ValueError) as error:
        raise ComparisonError(f"{folder / 'per_frame.csv'} is damaged ({error!r}): score the folder again") from None
    if not rows:
        raise ComparisonError(f"{folder / 'per_frame.csv'} has no frame")
    run = ScoredRun(str(path), folder, [(row["video"], row["frame"]) for row in rows], iou, nsd)
    check_against_metrics(run)
    return run


def check_against_metrics(run: ScoredRun) -> None:
    """Refuse a per_frame.csv whose frames do not average to the score in metrics.json beside it (edited, or left by
    another scoring); a folder without metrics.json is taken as it is."""
    try:
        recorded = json.loads((run.folder / "metrics.json").read_text())["score"]
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ComparisonError(
            f"{run.folder / 'metrics.json'} cannot be read ({error!r}): score the folder again"
        ) from None
    score = float(summary(*(means.mean(0) for means in per_video_means(run, video_index(run))))["score"])
    if not math.isclose(score, recorded, abs_tol=1e-6):
        raise ComparisonError(
            f"{run.folder / 'per_frame.csv'} averages to a score of {score:.6f}, but metrics.json beside it says "
            f"{recorded:.6f}: one of them was changed; score the folder again"
        )


def check_same_frames(runs: list[ScoredRun]) -> None:
    """Refuse runs scored on other videos or frames than the first, naming what differs."""
    reference = runs[0]
    for run in runs[1:]:
        videos, own = {v for v, _ in reference.keys}, {v for v, _ in run.keys}
        if videos != own:
            only = sorted(videos - own)[:3] or sorted(own - videos)[:3]
            raise ComparisonError(
                f"{run.name} was scored on other videos than {reference.name} ({', '.join(only)} in only one): "
                "score both on the same split"
            )
        if sorted(run.keys) != sorted(reference.keys):
            differ = sorted(set(run.keys) ^ set(reference.keys))[0]
            raise ComparisonError(
                f"{run.name} was scored on other frames than {reference.name} (e.g. {differ[0]}/{differ[1]} is in only "
                "one): score both on the same frames"
            )


def aligned(reference: ScoredRun, run: ScoredRun) -> ScoredRun:
    """run with its rows in reference's order."""
    order = {key: index for index, key in enumerate(run.keys)}
    rows = [order[key] for key in reference.keys]
    return ScoredRun(run.name, run.folder, reference.keys, run.iou[rows], run.nsd[rows])


def video_index(run: ScoredRun) -> np.ndarray:
    """(frames,) the index of each frame's video."""
    names = sorted({video for video, _ in run.keys})
    return np.array([names.index(video) for video, _ in run.keys])


def summary(iou: np.ndarray, nsd: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of METRICS from per-class means (..., 9), as the official score averages them."""
    miou, mnsd = iou.mean(-1), nsd.mean(-1)
    per_class = {f"IoU {name}": iou[..., k] for k, name in enumerate(CLASSES)}
    return {"score": np.sqrt(miou * mnsd), "mIoU": miou, "mNSD": mnsd, **per_class}


def bootstrap_weights(videos: np.ndarray, resamples: int, generator: np.random.Generator) -> np.ndarray:
    """(resamples, frames) weights of a two-stage bootstrap: videos drawn with replacement, then for every draw of a
    video its frames drawn with replacement; each drawn video weighs the same, as in the official average."""
    count = videos.max() + 1
    drawn = generator.multinomial(count, np.full(count, 1 / count), size=resamples)  # (resamples, videos)
    weights = np.zeros((resamples, len(videos)))
    for video in range(count):
        frames = np.flatnonzero(videos == video)
        picks = generator.multinomial(drawn[:, video] * len(frames), np.full(len(frames), 1 / len(frames)))
        weights[:, frames] = picks / (len(frames) * count)
    return weights


def bootstrap_intervals(reference, run, resamples=10_000, confidence=0.95, seed=0) -> dict[str, tuple[float, float]]:
    """The percentile interval of run - reference for every metric, both runs resampled alike."""
    generator, videos = np.random.default_rng(seed), video_index(reference)
    differences = {name: [] for name in METRICS}
    for chunk in np.array_split(np.arange(resamples), max(1, resamples // 1000)):
        weights = bootstrap_weights(videos, len(chunk), generator)
        ours, theirs = (
            summary(weights @ run.iou, weights @ run.nsd),
            summary(weights @ reference.iou, weights @ reference.nsd),
        )
        for name in METRICS:
            differences[name].append(ours[name] - theirs[name])
    tail = (1 - confidence) / 2 * 100
    return {
        name: tuple(float(x) for x in np.percentile(np.concatenate(values), [tail, 100 - tail]))
        for name, values in differences.items()
    }


def per_video_means(run: ScoredRun, videos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(videos, 9) IoU and NSD means of each video."""
    count = videos.max() + 1
    iou = np.stack([run.iou[videos == v].mean(0) for v in range(count)])
    return iou, np.stack([run.nsd[videos == v].mean(0) for v in range(count)])


def sign_flip_p_values(reference, run, draws=10_000, seed=0) -> dict[str, float]:
    """Two-sided p-values of run - reference: the share of sign patterns (each video's two runs swapped or not) whose
    difference is at least as large as the observed one; every pattern up to EXACT_VIDEOS videos, else random ones."""
    videos = video_index(reference)
    (ref_iou, ref_nsd), (run_iou, run_nsd) = per_video_means(reference, videos), per_video_means(run, videos)
    count = len(ref_iou)
    if count <= EXACT_VIDEOS:
        swapped = np.array(list(itertools.product((False, True), repeat=count)))
    else:
        swapped = np.random.default_rng(seed).random((draws, count)) < 0.5
        swapped[0] = False  # the observed pattern counts, so p is never 0
    mask = swapped[:, :, None]
    theirs = summary(np.where(mask, run_iou, ref_iou).mean(1), np.where(mask, run_nsd, ref_nsd).mean(1))
    ours = summary(np.where(mask, ref_iou, run_iou).mean(1), np.where(mask, ref_nsd, run_nsd).mean(1))
    observed = summary(run_iou.mean(0), run_nsd.mean(0)), summary(ref_iou.mean(0), ref_nsd.mean(0))
    p_values = {}
    for name in METRICS:
        difference = abs(observed[0][name] - observed[1][name])
        flipped = np.abs(ours[name] - theirs[name])
        p_values[name] = float(np.mean(flipped >= difference - 1e-12))
    return p_values


def compare(reference: ScoredRun, run: ScoredRun, resamples=10_000, confidence=0.95, seed=0) -> dict:
    """For every metric: the reference's value, the run's, their difference, its interval and its p-value."""
    run = aligned(reference, run)
    videos = video_index(reference)
    values = [summary(*(means.mean(0) for means in per_video_means(r, videos))) for r in (reference, run)]
    intervals = bootstrap_intervals(reference, run, resamples, confidence, seed)
    p_values = sign_flip_p_values(reference, run, seed=seed)
    return {
        name: {
            "reference": float(values[0][name]),
            "run": float(values[1][name]),
            "difference": float(values[1][name] - values[0][name]),
            "interval": list(intervals[name]),
            "p": p_values[name],
        }
        for name in METRICS
    }
