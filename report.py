"""What scoring a prediction folder writes, and the records of who wrote which file in it: metrics.json,
per_class.csv, per_frame.csv, the charts, report.html (where the model fails), the printed table, and
predicted_with.json (how each video's predictions were made).

report.html is self-contained: inline CSS, no JavaScript, no network; its pictures are the charts written beside it
and the frames' visualisations (video_XX/visualisations/), linked relatively so that the folder can be moved.
"""

import csv
import functools
import html
import io
import json
import math
import os
import sys
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import dataset
import files
import outputs
import plots
from metrics import SCORED_CLASSES, evaluate_directories, frame_scores, ground_truth_masks, read_label_png, summarize
from outputs import PROVENANCE_FILE, SCORE_FILES
from plots import CLASS_COLOURS

SEED_MIOU_NOTE = (
    "the baseline's (DinoV3 x SARRAP) own metric: per-frame IoU over the classes present in prediction or ground truth, "
    "mean over all frames of all videos; not the official score"
)

WORST_FRAMES = 4  # frames shown per class and per list
ABSENT_FAILURES = (  # its lowest IoU and NSD frames are where it is predicted: its false positives
    '<p class="none">in no ground-truth frame: it fails only where it is predicted, its frames are under '
    "false positives of absent classes below</p>"
)
CLASSES = [dataset.CLASS_NAMES[c] for c in SCORED_CLASSES]
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { padding: 0.25em 0.8em; text-align: right; }
th:first-child, td:first-child { text-align: left; } tr:nth-child(even) { background: #f4f4f4; }
.row { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
.chart { max-width: 900px; width: 100%; border: 1px solid #ddd; }
.frames { display: flex; flex-wrap: wrap; gap: 0.8em; margin: 0.3em 0 1em; }
figure { margin: 0; width: 330px; } figure img { width: 330px; border: 1px solid #ccc; }
figcaption { font-size: 0.85em; } .none { color: #777; font-style: italic; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border: 1px solid #000; margin-right: 0.4em; }
.warning { color: #a40; } .muted { color: #666; font-size: 0.9em; }
"""


# ----------------------------------------------------------------------------- per_frame.csv


def per_frame_csv(frames: list[dict]) -> bytes:
    """One row per ground-truth mask; floats written in full (repr), so that averaging them gives metrics.json."""
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(
        [
            "video",
            "frame",
            *(f"IoU {name}" for name in CLASSES),
            *(f"NSD {name}" for name in CLASSES),
            *(f"false positive pixels {name}" for name in CLASSES),
            "mIoU",
            "mNSD",
            "score",
            "missing",
        ]
    )
    for frame in frames:
        writer.writerow(
            [
                frame["video"],
                frame["frame"],
                *map(repr, frame["IoU"]),
                *map(repr, frame["NSD"]),
                *frame["false_positives"],
                *map(repr, plots.frame_score(frame["IoU"], frame["NSD"])),
                int(frame["missing"]),
            ]
        )
    return table.getvalue().encode()


# ----------------------------------------------------------------------------- choosing frames


def worst_frames(frames: list[dict], k: int, key: str) -> list[dict]:
    """The frames where class k+1 scores lowest by key (IoU or NSD), below a perfect 1; ties in video, frame order."""
    failing = [frame for frame in frames if frame[key][k] < 1]
    return sorted(failing, key=lambda frame: (frame[key][k], frame["video"], frame["frame"]))[:WORST_FRAMES]


def false_positive_frames(frames: list[dict], k: int) -> list[dict]:
    """The frames with the most pixels of class k+1 predicted where the ground truth has none of it."""
    wrong = [frame for frame in frames if frame["false_positives"][k] > 0]
    return sorted(wrong, key=lambda frame: (-frame["false_positives"][k], frame["video"], frame["frame"]))[
        :WORST_FRAMES
    ]


# ----------------------------------------------------------------------------- report.html


def table(header: list[str], rows: list[list]) -> str:
    def cells(tag, row):
        return "".join(f"<{tag}>{cell}</{tag}>" for cell in row)

    return (
        f"<table><tr>{cells('th', header)}</tr>" + "".join(f"<tr>{cells('td', row)}</tr>" for row in rows) + "</table>"
    )


def swatch(name: str) -> str:
    r, g, b = CLASS_COLOURS[dataset.CLASS_NAMES.index(name)]
    return f'<span class="swatch" style="background: rgb({r}, {g}, {b})"></span>'


def frame_card(frame: dict, caption: str, directory: Path) -> str:
    """A frame's visualisation (frame | prediction | ground truth) where one was written, else its name only."""
    path = f"{frame['video']}/visualisations/{frame['frame']}.png"
    picture, name = html.escape(urllib.parse.quote(path)), html.escape(f"{frame['video']}/{frame['frame']}")
    text = f"{html.escape(frame['video'])} / {html.escape(frame['frame'])}: {caption}"
    if not (directory / path).is_file():
        return f'<figure data-frame="{name}"><figcaption>{text} <span class="none">(no visualisation)</span></figcaption></figure>'
    return (
        f'<figure data-frame="{name}"><a href="{picture}"><img src="{picture}" loading="lazy" alt="{html.escape(path)}"></a>'
        f"<figcaption>{text}</figcaption></figure>"
    )


def frame_list(cards: list[str], empty: str, name: str, kind: str) -> str:
    """The cards in a row marked with their class and list (data-class, data-list), or what it means that there are none."""
    if not cards:
        return f'<p class="none">{empty}</p>'
    return f'<div class="frames" data-class="{html.escape(name)}" data-list="{kind}">{"".join(cards)}</div>'


def worst_lists(frames: list[dict], k: int, name: str, directory: Path) -> str:
    """Class k+1's lowest-IoU and lowest-NSD frames; once, under one heading, where both are the same frames."""
    lowest = {key: worst_frames(frames, k, key) for key in ("IoU", "NSD")}
    same = {key: {(f["video"], f["frame"]) for f in chosen} for key, chosen in lowest.items()}
    kinds = [("IoU and NSD", lowest["IoU"])] if same["IoU"] == same["NSD"] else list(lowest.items())
    parts = []
    for kind, chosen in kinds:
        cards = [frame_card(f, f"IoU {f['IoU'][k]:.3f}, NSD {f['NSD'][k]:.3f}", directory) for f in chosen]
        parts.append(
            f"<h4>lowest {kind}</h4>"
            + frame_list(cards, f"every frame scores {kind} 1 on {html.escape(name)}", name, kind)
        )
    return "".join(parts)


def failure_sections(frames: list[dict], classes: dict, directory: Path) -> str:
    """Every class's worst frames; a class in no ground-truth frame fails only by false positives, shown below."""
    parts = []
    for k, name in enumerate(CLASSES):
        heading = f"<h3>{swatch(name)}{html.escape(plots.class_label(name, classes[name]))}</h3>"
        absent = plots.absent_from_truth(classes[name])
        parts.append(heading + (ABSENT_FAILURES if absent else worst_lists(frames, k, name, directory)))
    return "".join(parts)


def false_positive_sections(frames: list[dict], directory: Path) -> str:
    parts = []
    for k, name in enumerate(CLASSES):
        cards = [
            frame_card(
                f,
                f"{f['false_positives'][k]:,} px of {html.escape(name)} predicted, none in the ground truth",
                directory,
            )
            for f in false_positive_frames(frames, k)
        ]
        if cards:
            count = sum(1 for f in frames if f["false_positives"][k])
            parts.append(
                f"<h3>{swatch(name)}{html.escape(name)}: {count} frame{'s' * (count != 1)}</h3>"
                + frame_list(cards, "", name, "false positives")
            )
    return "".join(parts) or '<p class="none">no frame predicts a class its ground truth does not have</p>'


def score_tables(metrics: dict) -> tuple[str, str, str]:
    """The summary, per-class and per-video tables of the page."""
    seed = "n/a" if metrics.get("seed_mIoU") is None else f"{metrics['seed_mIoU']:.4f}"
    summary = [
        ["official score = sqrt(mIoU x mNSD)", f"<b>{metrics['score']:.4f}</b>"],
        ["mIoU", f"{metrics['mIoU']:.4f}"],
        ["mNSD", f"{metrics['mNSD']:.4f}"],
        ["baseline mIoU (the DinoV3 x SARRAP baseline's own metric, not the official score)", seed],
        ["background everywhere would score", f"{metrics['background_only']['score']:.4f}"],
        ["frames / videos", f"{metrics['frames']} / {len(metrics['videos'])}"],
    ]
    classes = [
        [swatch(c) + html.escape(plots.class_label(c, v)), f"{v['IoU']:.4f}", f"{v['NSD']:.4f}", *class_counts(v)]
        for c, v in metrics["classes"].items()
    ]
    videos = [
        [html.escape(n), f"{v['mIoU']:.4f}", f"{v['mNSD']:.4f}", v["frames"]] for n, v in metrics["videos"].items()
    ]
    return (
        table(["", "value"], summary),
        table(["class", "IoU", "NSD", "ground-truth frames", "scored 1 by the absent-class rule"], classes)
        + f'<p class="none">{html.escape(plots.ABSENT_NOTE)}</p>',
        table(["video", "mIoU", "mNSD", "frames"], videos),
    )


def report_html(metrics: dict, frames: list[dict], directory: Path) -> str:
    """The page: scores, charts, per-class and per-video tables, then the worst frames of every class and the frames
    with false positives of a class absent from the ground truth."""
    summary, classes, videos = score_tables(metrics)
    labels = (
        ("model", "model_directory"),
        ("checkpoint", "checkpoint"),
        ("data", "data_directory"),
        ("split", "split"),
    )
    source = ", ".join(f"{label} {html.escape(str(metrics[key]))}" for label, key in labels if metrics.get(key))
    warnings = "".join(f'<p class="warning">warning: {html.escape(w)}</p>' for w in metrics.get("warnings", []))
    if metrics["missing"]:
        warnings += (
            f'<p class="warning">{len(metrics["missing"])} ground-truth masks have no prediction and score 0</p>'
        )

    def chart(name):
        return f'<img class="chart" src="{name}" alt="{name}">' if (directory / name).is_file() else ""

    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>SAR-RARP50 segmentation report</title><style>{STYLE}</style></head>
<body>
<h1>SAR-RARP50 segmentation report</h1>
<p class="muted">{source}. Scores: the official metric, per-class IoU and NSD (10 px) averaged frame &rarr; video
&rarr; dataset. Files: <a href="metrics.json">metrics.json</a>, <a href="per_class.csv">per_class.csv</a>,
<a href="per_frame.csv">per_frame.csv</a>.</p>
{warnings}{summary}
<h2>Per class</h2><div class="row">{classes}{chart("per_class_scores.png")}</div>
<h2>Per video</h2><div class="row">{videos}{chart("per_video_scores.png")}</div>
<h2>Confusion matrix</h2>{chart("confusion_matrix.png")}
<h2>Where each class fails</h2>
<p class="muted">For each class, the {WORST_FRAMES} frames with its lowest IoU and its lowest NSD (below 1; a frame without the
class in prediction or ground truth scores 1); one list where both are the same frames. Each picture: frame |
prediction | ground truth.</p>
{failure_sections(frames, metrics["classes"], directory)}
<h2>False positives of absent classes</h2>
<p class="muted">A class predicted in a frame whose ground truth has none of it scores IoU 0 and NSD 0 there, however
few its pixels: these frames cost the most for the least error.</p>
{false_positive_sections(frames, directory)}
</body></html>
"""


def write_report(metrics: dict, frames: list[dict], directory: Path) -> None:
    files.write_bytes_atomically(directory / "per_frame.csv", per_frame_csv(frames))
    files.write_bytes_atomically(directory / "report.html", report_html(metrics, frames, directory).encode())


# ----------------------------------------------------------------------------- the scores of a folder


def score_predictions(
    args,
    ground_truth_directory: Path,
    videos: list[str],
    out: outputs.OutputFolder,
    predicted_here: bool,
    one_run: bool = True,
) -> dict:
    """Score the predictions of these videos in the output folder, write metrics.json and the other outputs, print
    the table. one_run=False: the videos were predicted by different runs on purpose (cross-validation folds)."""
    predictions_directory = out.path
    claim_scores(out, predicted_here)
    result = evaluate_directories(ground_truth_directory, predictions_directory, videos=videos, per_frame=True)
    frames = result.pop("per_frame")
    provenance, warnings = provenance_of(predictions_directory, videos, one_run)
    if result["colour_predictions"]:
        warnings.append(
            f"{len(result['colour_predictions'])} prediction PNGs have colour channels (e.g. "
            f"{result['colour_predictions'][0]}): scored as the official toolkit reads them, as channel 0 "
            "of OpenCV's BGR image (blue); write 8-bit single-channel class ids to be sure"
        )
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    seed_miou = result["seed_mIoU"]
    single = provenance if provenance and not provenance.get("mixed") else {}
    metrics = {
        **result,
        "seed_mIoU": None if math.isnan(seed_miou) else seed_miou,  # no frame with an instrument: null, not NaN
        "seed_mIoU_note": SEED_MIOU_NOTE,
        "model_directory": single.get("model_directory"),
        "checkpoint": single.get("checkpoint"),
        "data_directory": str(args.data_directory),
        "split": args.split,
        "inference": {k: v for k, v in provenance.items() if k not in ("model_directory", "checkpoint")}
        if single
        else provenance,
        "warnings": warnings,
        "background_only": background_only_score(ground_truth_directory, videos),
    }
    out.record(SCORE_FILES, begun=True)  # before they are written: a killed write is this project's too
    write_scores(metrics, frames, predictions_directory)
    out.record(SCORE_FILES)
    print_report(metrics, predictions_directory, pictured=predicted_here)
    return metrics


def claim_scores(out: outputs.OutputFolder, predicted_here: bool) -> None:
    """Refuse a folder whose score files are not this project's, before any work."""
    out.claim(SCORE_FILES, instead="choose another output folder" if predicted_here else "score a copy of the folder")


def background_only_score(ground_truth_directory: Path, videos: list[str]) -> dict:
    """Score of predicting background everywhere, the floor a model has to beat."""
    masks = ground_truth_masks(ground_truth_directory, videos)
    return background_only_of(tuple((relative.parts[0], path) for relative, path in masks.items()))


@functools.lru_cache(maxsize=8)  # training asks at every validation, of the same masks
def background_only_of(masks: tuple[tuple[str, Path], ...]) -> dict:
    """The background-everywhere score of these (video, ground-truth mask) pairs."""

    def score(path):
        truth = read_label_png(path)
        return frame_scores(np.zeros_like(truth), truth)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        scores = list(pool.map(score, [path for _, path in masks]))
    per_video = {}
    for (video, _), frame in zip(masks, scores):
        per_video.setdefault(video, []).append(frame)
    result = summarize(per_video)
    return {key: result[key] for key in ("mIoU", "mNSD", "score")}


def class_counts(scores: dict) -> list[str]:
    """A class's ground-truth frames and its frames scored 1 because it is in neither mask, as table cells."""
    return [str(scores["ground_truth_frames"]), str(scores["absent_rule_frames"])]


def print_scores(result: dict, step: int) -> None:
    floor = result.get("background_only")
    print(
        f"step {step}: mIoU {result['mIoU']:.4f}  mNSD {result['mNSD']:.4f}  score {result['score']:.4f}"
        + (f"  (background everywhere: {floor['score']:.4f})" if floor else "")
        + f"   (baseline mIoU {result['seed_mIoU']:.4f}: the baseline's own metric, not the official score)"
    )
    print(
        "  "
        + "  ".join(
            f"{plots.class_label(name, v).replace(' ', '')} {v['IoU']:.2f}/{v['NSD']:.2f}"
            for name, v in result["classes"].items()
        )
        + f"   (IoU/NSD, * thin classes, {plots.ABSENT_MARK} in no validation ground-truth frame: false positives only)"
    )


def write_scores(metrics: dict, frames: list[dict], directory: Path) -> None:
    """Every one of SCORE_FILES, metrics.json last: its presence means every other one is complete."""
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["class", "IoU", "NSD", "ground_truth_frames", "absent_rule_frames"])
    writer.writerows(
        [name, f"{v['IoU']:.6f}", f"{v['NSD']:.6f}", *class_counts(v)] for name, v in metrics["classes"].items()
    )
    files.write_bytes_atomically(directory / "per_class.csv", table.getvalue().encode())
    plots.confusion_matrix(metrics["confusion"], directory / "confusion_matrix.png")
    plots.class_scores(metrics, directory / "per_class_scores.png")
    plots.video_scores(metrics, directory / "per_video_scores.png")
    write_report(metrics, frames, directory)
    files.write_json_atomically(directory / "metrics.json", metrics)


def print_report(metrics: dict, directory: Path, pictured: bool) -> None:
    print(f"\n{'class':<22}{'IoU':>8}{'NSD':>8}{'GT frames':>11}{'scored 1 by rule':>18}")
    for name, v in metrics["classes"].items():
        ground_truth, by_rule = class_counts(v)
        print(f"{plots.class_label(name, v):<22}{v['IoU']:>8.4f}{v['NSD']:>8.4f}{ground_truth:>11}{by_rule:>18}")
    print(f"{'mean':<22}{metrics['mIoU']:>8.4f}{metrics['mNSD']:>8.4f}   (* thin classes)")
    if any(plots.absent_from_truth(v) for v in metrics["classes"].values()):
        print(plots.ABSENT_NOTE)
    print(
        f"official score {metrics['score']:.4f} = sqrt(mIoU x mNSD) over {metrics['frames']} frames of "
        f"{len(metrics['videos'])} videos ({metrics['split']} split)"
    )
    print(
        "  "
        + "  ".join(f"{video} {v['mIoU']:.3f}/{v['mNSD']:.3f}" for video, v in metrics["videos"].items())
        + "   (per video mIoU/mNSD)"
    )
    seed = "n/a (no frame has an instrument)" if metrics["seed_mIoU"] is None else f"{metrics['seed_mIoU']:.4f}"
    print(
        f"baseline mIoU {seed} (the DinoV3 x SARRAP baseline's own metric, not the official score; "
        "its published 0.687 is this number)"
    )
    floor = metrics["background_only"]
    print(
        f"background everywhere would score {floor['score']:.4f} (mIoU {floor['mIoU']:.4f}, mNSD {floor['mNSD']:.4f})"
    )
    if metrics["missing"]:
        shown = ", ".join(metrics["missing"][:5]) + (
            f" and {len(metrics['missing']) - 5} more" if len(metrics["missing"]) > 5 else ""
        )
        print(
            f"warning: {len(metrics['missing'])} ground-truth masks have no prediction and score 0: {shown} "
            f"(all listed in metrics.json)",
            file=sys.stderr,
        )
    print(
        f"metrics: {directory / 'metrics.json'}, per_class.csv, per_frame.csv, confusion_matrix.png, "
        "per_class_scores.png, per_video_scores.png"
    )
    print(f"error analysis (open in a browser): {directory / 'report.html'}")
    if pictured:
        print(f"visualisations: {directory}/video_*/visualisations/")


# ----------------------------------------------------------------------------- records of what is in a folder


def read_provenance(directory: Path) -> dict:
    """{video: how its predictions were made} from predicted_with.json; {} if there is none or it is of a version
    that kept one record for the whole folder (it cannot say which videos it describes)."""
    try:
        record = json.loads((directory / PROVENANCE_FILE).read_text())
        return dict(record["videos"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def provenance(videos: dict) -> dict:
    """predicted_with.json of these videos' records."""
    return {"videos": dict(sorted(videos.items()))}


def check_still_current(directory: Path, videos: list[str]) -> None:
    """Refuse to re-score (--eval-only) predictions whose model's weights changed since they were made: the score
    would be credited to a model that did not make them."""
    for video, record in read_provenance(directory).items():
        for member in record.get("members", []) if video in videos else []:
            weights = Path(member["model_directory"]) / record["checkpoint"] / "weights.safetensors"
            if "weights" in member and weights.is_file() and files.sampled_digest(weights) != member["weights"]:
                raise dataset.DataError(
                    f"the predictions of {video} in {directory} were made with other weights than {weights} holds "
                    "now (it was trained again since): predict again, without --eval-only"
                )


def provenance_of(directory: Path, videos: list[str], one_run: bool = True) -> tuple[dict | None, list[str]]:
    """(how the predictions of these videos were made, one record if one run made them all, else
    {"mixed": True, "videos": ...}; None if none is recorded), and warnings about videos without a record or a mix."""
    recorded = read_provenance(directory)
    known = {video: recorded[video] for video in videos if video in recorded}
    unknown = [video for video in videos if video not in recorded]
    warnings = (
        [
            f"{directory / PROVENANCE_FILE} has no record of how the predictions of {', '.join(unknown)} were "
            "made: they may come from a run that did not finish, or another tool"
        ]
        if unknown
        else []
    )
    runs = {json.dumps(record, sort_keys=True) for record in known.values()}
    if len(runs) > 1:
        if one_run:
            warnings.append(
                f"the predictions in {directory} come from {len(runs)} different runs (see "
                "predicted_with.json): the score mixes them; predict every video with one run to score one model"
            )
        return {"mixed": True, "videos": known}, warnings
    return (next(iter(known.values())) if known else None), warnings
