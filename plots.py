"""Every picture the pipeline draws: frames with their masks (OpenCV: fast enough for a 60 fps video) and charts
of the scores (matplotlib's Agg canvas: no screen, no pyplot state shared between threads)."""

import functools
import io
import math
from pathlib import Path

import cv2
import matplotlib
import numpy as np
from matplotlib.figure import Figure

import dataset
import files
from dataset import THIN_CLASSES
from metrics import SCORED_CLASSES, frame_scores

DPI = 100
CURVES_SIZE = (14, 8)  # inches at DPI: training_curves.png is 1400 x 800 pixels
CONFUSION_SIZE = (10, 8.5)
SCORES_SIZE = (12, 4.5)  # per_class_scores.png and per_video_scores.png
SCORE_CURVES = {  # the validation panel's curves: colour and label
    "mIoU": ("tab:green", "mIoU"),
    "mNSD": ("tab:orange", "mNSD"),
    "score": ("black", "score"),
    "seed_mIoU": ("tab:brown", "baseline mIoU (not the official score)"),
}
OFFICIAL_CURVES = ("mIoU", "mNSD", "score")  # always drawn; seed_mIoU only when it selects the best
LR_TITLE = "learning rate of the head's parameter group (--head-lr)"  # records' lr: param_groups[0], the head's
LR_LABEL = "head; the backbone's groups, if trained, follow the same schedule"
SMOOTHING = 0.9  # exponential moving average of the training loss, debiased as TensorBoard's smoothing is
# Class colours (RGB) of every picture (overlays, legends, charts, report.html); background stays uncoloured. Each
# differs from white and from tissue, fat, metal and shadow by a CIE Lab distance of at least 30 and from the others
# by at least 30, and has a contrast ratio of at least 2 against white: none vanishes on light tissue or a white page.
CLASS_COLOURS = {
    1: (255, 110, 0),  # tool clasper: orange
    2: (0, 190, 220),  # tool wrist: cyan
    3: (0, 90, 220),  # tool shaft: blue
    4: (240, 0, 220),  # suturing needle: magenta
    5: (0, 160, 60),  # thread: green
    6: (0, 120, 120),  # suction tool: teal
    7: (130, 30, 200),  # needle holder: violet
    8: (140, 195, 0),  # clamps: lime
    9: (20, 30, 120),  # catheter: navy
}
OVERLAY_ALPHA = 0.55
LEGEND_ALPHA = 0.75  # the white of the legend over the bottom of an overlay video
MAX_PICTURE_WIDTH = 1280  # wider sources are pictured at half resolution
CAPTION_HEIGHT = 24  # a visualisation's first line: its video, frame and frame score
TITLE_HEIGHT = CAPTION_HEIGHT + 28  # then the panels' titles
LEGEND_ROW_HEIGHT = 26
LEGEND_COLUMN_WIDTH = 170
LEGEND_SCALES = tuple(k / 20 for k in range(20, 3, -1))  # 1 to 0.2: the overlay video's legend shrinks until it fits
FONT = cv2.FONT_HERSHEY_SIMPLEX


# ----------------------------------------------------------------------------- frames

COLOUR_TABLE = np.array(
    [[CLASS_COLOURS.get(c, (0, 0, 0))] for c in range(256)], np.uint8
)  # class id -> colour (cv2.LUT)


def overlay(frame: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The frame with each labelled pixel blended with its class colour; OpenCV calls on the labels' bounding box
    only (1-6 ms at 1080p)."""
    picture = frame.copy()
    x, y, w, h = cv2.boundingRect(labels)
    if w:
        box, box_labels = frame[y : y + h, x : x + w], labels[y : y + h, x : x + w]
        coloured = cv2.LUT(cv2.merge([box_labels] * 3), COLOUR_TABLE)
        blended = cv2.addWeighted(box, 1 - OVERLAY_ALPHA, coloured, OVERLAY_ALPHA, 0)
        cv2.copyTo(blended, box_labels, picture[y : y + h, x : x + w])  # only where labels > 0
    return picture


def legend_rows(width: int, scale: float = 1.0) -> int:
    columns = max(1, min(len(SCORED_CLASSES), int(width // (LEGEND_COLUMN_WIDTH * scale))))
    return -(-len(SCORED_CLASSES) // columns)


def legend_height(width: int, scale: float = 1.0) -> int:
    return legend_rows(width, scale) * round(LEGEND_ROW_HEIGHT * scale)


def frame_score(iou, nsd) -> tuple[float, float, float]:
    """A frame's mIoU, mNSD and their geometric mean over classes 1..9 (a class absent from both scores 1)."""
    miou, mnsd = float(sum(iou)) / len(iou), float(sum(nsd)) / len(nsd)
    return miou, mnsd, math.sqrt(miou * mnsd)


def put_fitted_text(canvas: np.ndarray, text: str, origin: tuple[int, int], width: int, scale: float) -> None:
    """Black text at origin, shrunk below scale where it would be wider than width."""
    scale = min(scale, scale * width / max(1, cv2.getTextSize(text, FONT, scale, 1)[0][0]))
    cv2.putText(canvas, text, origin, FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)


def visualisation(frame: np.ndarray, prediction: np.ndarray, ground_truth: np.ndarray, name: str = "") -> np.ndarray:
    """RGB picture: frame | prediction overlay | ground-truth overlay, under a caption (name, e.g. video_41/000000060,
    and the frame's official score) and the panels' titles, above the class colour legend.

    Size: 3 x source width, TITLE_HEIGHT + source height + legend_rows(3 x width) x LEGEND_ROW_HEIGHT;
    sources wider than MAX_PICTURE_WIDTH are pictured at half resolution (and scored at full resolution).
    """
    miou, mnsd, score = frame_score(*frame_scores(prediction, ground_truth))
    if frame.shape[1] > MAX_PICTURE_WIDTH:
        size = (frame.shape[1] // 2, frame.shape[0] // 2)
        frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        prediction, ground_truth = (
            cv2.resize(m, size, interpolation=cv2.INTER_NEAREST) for m in (prediction, ground_truth)
        )
    height, width = frame.shape[:2]
    rows = legend_rows(3 * width)
    canvas = np.full((TITLE_HEIGHT + height + rows * LEGEND_ROW_HEIGHT, 3 * width, 3), 255, np.uint8)
    caption = f"{name}: " * bool(name) + f"frame score {score:.3f} (mIoU {miou:.3f}, mNSD {mnsd:.3f})"
    put_fitted_text(canvas, caption, (6, CAPTION_HEIGHT - 6), 3 * width - 12, 0.6)
    panels = (
        ("frame", frame),
        ("prediction", overlay(frame, prediction)),
        ("ground truth", overlay(frame, ground_truth)),
    )
    for i, (title, panel) in enumerate(panels):
        canvas[TITLE_HEIGHT : TITLE_HEIGHT + height, i * width : (i + 1) * width] = panel
        put_fitted_text(canvas, title, (i * width + 6, TITLE_HEIGHT - 8), width - 12, 0.7)
    canvas[TITLE_HEIGHT + height :] = legend_strip(3 * width)
    return canvas


@functools.lru_cache(maxsize=4)
def legend_strip(width: int, scale: float = 1.0) -> np.ndarray:
    """RGB strip, legend_height(width, scale) high: a colour box (outlined in black) and the name of every class,
    drawn at scale."""
    rows, row_height = legend_rows(width, scale), round(LEGEND_ROW_HEIGHT * scale)
    strip = np.full((rows * row_height, width, 3), 255, np.uint8)
    columns = -(-len(SCORED_CLASSES) // rows)
    column_width = width // columns
    for k, c in enumerate(SCORED_CLASSES):
        x, y = (k % columns) * column_width + round(6 * scale), (k // columns) * row_height
        top, side = y + round(5 * scale), round(16 * scale)
        cv2.rectangle(strip, (x - 1, top - 1), (x + side, top + side), (0, 0, 0), 1)
        cv2.rectangle(strip, (x, top), (x + side - 1, top + side - 1), CLASS_COLOURS[c], -1)
        text_origin = (x + round(22 * scale), y + round(19 * scale))
        cv2.putText(strip, dataset.CLASS_NAMES[c], text_origin, FONT, 0.55 * scale, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def validation_pictures(samples, kept: dict) -> dict:
    """{video/frame: frame | prediction | ground truth} of validate's kept frames, for the tracker."""
    names = {i: f"{samples[i].video}/{samples[i].image.stem}" for i in kept}
    return {
        names[i]: visualisation(dataset.read_image(samples[i].image), prediction, truth, names[i])
        for i, (prediction, truth) in kept.items()
    }


@functools.lru_cache(maxsize=4)
def video_legend(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """The legend of a frame of this size, at the largest of LEGEND_SCALES where it takes at most a quarter of the
    height (cut to the frame if it is too small even for the smallest), and the mask of its boxes and text."""
    scale = next((s for s in LEGEND_SCALES if legend_height(width, s) <= height // 4), LEGEND_SCALES[-1])
    legend = legend_strip(width, scale)[:height]
    return legend, (legend.min(axis=2) < 255).view(np.uint8)


def video_frame(job) -> np.ndarray:
    """A frame of the overlay video: the latest prediction over it (none before the first), the legend along the
    bottom, scaled to take at most a quarter of the height: its boxes and names opaque, its white see-through."""
    frame, labels = job
    picture = frame.copy() if labels is None else overlay(frame, labels)
    legend, ink = video_legend(picture.shape[1], picture.shape[0])
    bottom = picture[-len(legend) :]  # a view: writing it draws on the picture
    blended = cv2.addWeighted(bottom, 1 - LEGEND_ALPHA, legend, LEGEND_ALPHA, 0)
    cv2.copyTo(legend, ink, blended)
    bottom[:] = blended
    return picture


# ----------------------------------------------------------------------------- charts


def rgb(colour) -> tuple:
    return tuple(c / 255 for c in colour)


def save_figure(figure: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    files.write_bytes_atomically(path, buffer.getvalue())


def smoothed(values: list[float]) -> list[float]:
    average, out = 0.0, []
    for i, value in enumerate(values, 1):
        average = SMOOTHING * average + (1 - SMOOTHING) * value
        out.append(average / (1 - SMOOTHING**i))
    return out


def mark_best(axes, best) -> None:
    if best is not None:
        axes.axvline(best, color="0.4", linestyle="--", linewidth=1, label=f"best (step {best})")


def say_nothing_yet(axes, text: str) -> None:
    axes.text(0.5, 0.5, text, transform=axes.transAxes, ha="center", va="center", color="0.4")


def plot_training(loss, lr, train: list[dict]) -> None:
    """The loss (raw and smoothed) and the learning rate of the training records."""
    if not train:
        say_nothing_yet(loss, "no training step logged yet")
        say_nothing_yet(lr, "no training step logged yet")
        return
    steps = [r["step"] for r in train]
    loss.plot(steps, [r["loss"] for r in train], color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    loss.plot(steps, smoothed([r["loss"] for r in train]), color="tab:blue", linewidth=2, label="smoothed")
    marker = "." if len(train) < 40 else None
    lr.plot(steps, [r["lr"] for r in train], color="tab:purple", marker=marker, label=LR_LABEL)
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))


def plot_validation(scores, thin, val: list[dict], selection_metric: str) -> None:
    """The official scores and the thin classes' IoU of the validation records, the best by selection_metric marked."""
    steps = [r["step"] for r in val]
    for name, (colour, label) in SCORE_CURVES.items():
        if name in OFFICIAL_CURVES or name == selection_metric:  # the best is marked on a drawn curve
            values = [r["val"].get(name) for r in val]
            values = [np.nan if value is None else value for value in values]
            scores.plot(steps, values, color=colour, marker="o", label=label)
    floor = next((r["val"]["background_only"]["score"] for r in val if "background_only" in r["val"]), None)
    if floor is not None:  # a model below this line does worse than predicting nothing
        scores.axhline(floor, color="tab:red", linestyle=":", label=f"background everywhere {floor:.4f}")
    for name in THIN_CLASSES:
        colour = rgb(CLASS_COLOURS[dataset.CLASS_NAMES.index(name)])
        absent = bool(val) and absent_from_truth(val[-1]["val"]["classes"][name])
        label = f"{name} IoU" + (f" {ABSENT_MARK} in no ground-truth frame: false positives only" if absent else "")
        values = [r["val"]["classes"][name]["IoU"] for r in val]
        thin.plot(steps, values, marker="o", color=colour, linestyle=":" if absent else "-", label=label)
    chosen = [r for r in val if r["val"].get(selection_metric) is not None]
    best = max(chosen, key=lambda r: r["val"][selection_metric], default=None)
    if best:
        value = best["val"][selection_metric]
        star = dict(marker="*", markersize=16, color="gold", markeredgecolor="black", linestyle="none")
        scores.plot([best["step"]], [value], **star, label=f"best {selection_metric} {value:.4f}")
    for axes in (scores, thin):
        mark_best(axes, best["step"] if best else None)
        axes.set_ylim(0, 1)
        axes.set_xlabel("step")
        if not val:
            say_nothing_yet(axes, "no validation yet")


def training_curves(records: list[dict], path: Path, selection_metric: str = "score") -> None:
    """training_curves.png from metrics.jsonl's records: loss (raw and smoothed), learning rate, validation scores
    and the thin classes' IoU against step, the best validation (by selection_metric) marked."""
    train, val = [r for r in records if "loss" in r], [r for r in records if "val" in r]
    figure = Figure(figsize=CURVES_SIZE, layout="constrained")
    (loss, lr), (scores, thin) = figure.subplots(2, 2, sharex=True)
    plot_training(loss, lr, train)
    plot_validation(scores, thin, val, selection_metric)
    titles = ("training loss", LR_TITLE, "validation (official SAR-RARP50 metric)", "thin classes, validation IoU")
    last_step = max([r["step"] for r in train + val] + [1])
    for axes, title in zip((loss, lr, scores, thin), titles):
        axes.set_title(title)
        axes.grid(True, alpha=0.3)
        axes.set_xlim(0, 1.03 * last_step)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(loc="best", fontsize="small")
    save_figure(figure, path)


def count_text(count: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return f"{count:.0f}"


def confusion_matrix(confusion, path: Path) -> None:
    """confusion_matrix.png: each ground-truth class's pixels (a row) split over the predicted classes, as shares
    of the row and pixel counts; rows without pixels are grey."""
    counts = np.asarray(confusion, np.float64)
    totals = counts.sum(1, keepdims=True)
    shares = np.ma.masked_where(np.broadcast_to(totals == 0, counts.shape), counts / np.maximum(totals, 1))
    figure = Figure(figsize=CONFUSION_SIZE, layout="constrained")
    axes = figure.subplots()
    colours = matplotlib.colormaps["Blues"].with_extremes(bad="0.92")
    image = axes.imshow(shares, cmap=colours, vmin=0, vmax=1)
    for i, j in np.ndindex(counts.shape):
        if counts[i, j]:
            axes.text(
                j,
                i,
                f"{shares[i, j]:.2f}\n{count_text(counts[i, j])}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if shares[i, j] > 0.5 else "black",
            )
    names = [name + (" *" if name in THIN_CLASSES else "") for name in dataset.CLASS_NAMES]
    axes.set_xticks(range(len(names)), names, rotation=40, ha="right")
    axes.set_yticks(range(len(names)), names)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("ground-truth class")
    axes.set_title("confusion matrix: share of each ground-truth class's pixels, and pixel count (* thin classes)")
    figure.colorbar(image, ax=axes, shrink=0.8, label="share of the row")
    save_figure(figure, path)


ABSENT_MARK = "†"
ABSENT_NOTE = (
    f"{ABSENT_MARK} in no ground-truth frame: the official rule scores it 1 on a frame that does not predict it and 0 "
    "on one that does, so its number measures false positives only, not a learned class"
)


def class_label(name: str, scores: dict) -> str:
    """A class's name as every table and chart shows it: * thin class, † in no ground-truth frame."""
    return name + (" *" if name in THIN_CLASSES else "") + (f" {ABSENT_MARK}" if absent_from_truth(scores) else "")


def absent_from_truth(scores: dict) -> bool:
    return scores.get("ground_truth_frames") == 0


def score_bars(axes, names: list[str], iou: list[float], nsd: list[float], labels=("IoU", "NSD"), hollow=()) -> None:
    """Side-by-side IoU and NSD bars; the bars at the indices in hollow are drawn as outlines only (no ground truth)."""
    x = np.arange(len(names))
    for offset, values, label, colour in ((-0.2, iou, labels[0], "tab:blue"), (0.2, nsd, labels[1], "tab:orange")):
        bars = axes.bar(x + offset, values, 0.4, label=f"{label} (mean {np.mean(values):.3f})", color=colour)
        for k in hollow:
            bars[k].set(facecolor="none", edgecolor=colour, hatch="//")
        axes.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    axes.set_xticks(x, names, rotation=30 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    axes.set_ylim(0, 1.08)
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(loc="upper right", fontsize="small")


def class_scores(metrics: dict, path: Path) -> None:
    """per_class_scores.png: IoU and NSD of every scored class (the official score's per-class means)."""
    classes = metrics["classes"]
    figure = Figure(figsize=SCORES_SIZE, layout="constrained")
    axes = figure.subplots()
    absent = [k for k, scores in enumerate(classes.values()) if absent_from_truth(scores)]
    score_bars(
        axes,
        [class_label(name, scores) for name, scores in classes.items()],
        [v["IoU"] for v in classes.values()],
        [v["NSD"] for v in classes.values()],
        hollow=absent,
    )
    marks = "; † hatched: in no ground-truth frame, false positives only" if absent else ""
    axes.set_title(f"per class (mean over videos; * thin classes{marks}): official score {metrics['score']:.4f}")
    save_figure(figure, path)


def video_scores(metrics: dict, path: Path) -> None:
    """per_video_scores.png: mIoU and mNSD of every video, which weigh the same in the official score."""
    videos = metrics["videos"]
    figure = Figure(figsize=SCORES_SIZE, layout="constrained")
    axes = figure.subplots()
    score_bars(
        axes, list(videos), [v["mIoU"] for v in videos.values()], [v["mNSD"] for v in videos.values()], ("mIoU", "mNSD")
    )
    floor = metrics.get("background_only")
    for key, colour in (("mIoU", "tab:blue"), ("mNSD", "tab:orange")) if floor else ():
        axes.axhline(
            floor[key], color=colour, linestyle=":", label=f"background everywhere (all videos) {key} {floor[key]:.3f}"
        )
    axes.legend(loc="upper right", fontsize="small")
    axes.set_title("per video: mIoU and mNSD over the scored classes (dotted: predicting background everywhere)")
    save_figure(figure, path)


def run_comparison(result: dict, path: Path) -> None:
    """compare.png: each video's score in every run, joined by a line per video; beside it each run's difference to
    the reference with its interval, for the score, mIoU and mNSD."""
    figure = Figure(figsize=SCORES_SIZE, layout="constrained")
    paired, intervals = figure.subplots(1, 2, width_ratios=(3, 2))
    runs = result["per_video_scores"]
    x = np.arange(len(runs))
    for video, scores in zip(result["videos"], np.array([run["scores"] for run in runs]).T):
        paired.plot(x, scores, marker="o", color="tab:blue", alpha=0.5)
        paired.annotate(video, (x[-1], scores[-1]), xytext=(4, 0), textcoords="offset points", fontsize=7, va="center")
    paired.set_xticks(x, [f"{i}: {Path(run['run']).name}" for i, run in enumerate(runs)], fontsize=8)
    paired.set(ylabel="official score of the video", title="every video in every run (0: the reference)")
    names = ("score", "mIoU", "mNSD")
    for k, entry in enumerate(result["compared"]):
        metrics = entry["metrics"]
        centre = [metrics[n]["difference"] for n in names]
        spread = np.abs(np.array([metrics[n]["interval"] for n in names]).T - centre)
        y = np.arange(len(names)) + 0.2 * k
        intervals.errorbar(centre, y, xerr=spread, fmt="o", capsize=4, label=f"{k + 1}: {Path(entry['run']).name}")
        for value, height, name in zip(centre, y, names):
            p = f"p {metrics[name]['p']:.2g}"
            intervals.annotate(p, (value, height), xytext=(0, 6), textcoords="offset points", fontsize=7, ha="center")
    intervals.axvline(0, color="grey", linestyle="--")
    intervals.set_yticks(np.arange(len(names)), names)
    confidence = round(100 * result["confidence"])
    intervals.set(xlabel="run - reference", title=f"difference, {confidence}% paired bootstrap interval")
    intervals.legend(fontsize=8)
    save_figure(figure, path)


def label_efficiency(summaries: list[dict], path: Path) -> None:
    """label_efficiency.png: the official score against the number of training operations (log axis), mean ± std
    over seeds, a line per configuration (backbone, mode, head, loss, resolution)."""
    figure = Figure(figsize=SCORES_SIZE, layout="constrained")
    axes = figure.subplots()
    curves = {}
    for summary in summaries:
        curves.setdefault(summary["curve"], []).append(summary)
    for curve, points in curves.items():
        points = sorted(points, key=lambda p: p["training_operations"])
        x = [p["training_operations"] for p in points]
        seeds = "/".join(sorted({str(p["seeds"]) for p in points}))
        axes.errorbar(
            x,
            [p["score_mean"] for p in points],
            yerr=[p["score_std"] for p in points],
            marker="o",
            capsize=4,
            label=f"{curve} ({seeds} seeds a point)",
        )
    axes.set_xscale("log", base=2)
    operations = sorted({s["training_operations"] for s in summaries})
    axes.set_xticks(operations, [str(n) for n in operations])
    axes.set(xlabel="training operations (log scale)", ylabel="official score on the validation videos (mean ± std)")
    axes.set_title("label efficiency: score against the number of labelled training operations")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    save_figure(figure, path)
