"""Where does the model fail? per_frame.csv and report.html beside a scored prediction folder's metrics.json.

The page is self-contained: inline CSS, no JavaScript, no network; its pictures are the charts written beside it
and the frames' visualisations (video_XX/visualisations/), linked relatively so that the folder can be moved.
"""
import csv
import html
import io
import math
from pathlib import Path

import dataset as D
from metrics import SCORED_CLASSES
from plots import CLASS_COLOURS, THIN_CLASSES

WORST_FRAMES = 4  # frames shown per class and per list
CLASSES = [D.CLASS_NAMES[c] for c in SCORED_CLASSES]
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

def frame_score(frame: dict) -> tuple[float, float, float]:
    """The frame's mIoU, mNSD and their geometric mean, over classes 1..9 (a class absent from both scores 1)."""
    miou, mnsd = sum(frame["IoU"]) / len(CLASSES), sum(frame["NSD"]) / len(CLASSES)
    return miou, mnsd, math.sqrt(miou * mnsd)


def per_frame_csv(frames: list[dict]) -> bytes:
    """One row per ground-truth mask; floats written in full (repr), so that averaging them gives metrics.json."""
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["video", "frame", *(f"IoU {name}" for name in CLASSES), *(f"NSD {name}" for name in CLASSES),
                     *(f"false positive pixels {name}" for name in CLASSES), "mIoU", "mNSD", "score", "missing"])
    for frame in frames:
        writer.writerow([frame["video"], frame["frame"], *map(repr, frame["IoU"]), *map(repr, frame["NSD"]),
                         *frame["false_positives"], *map(repr, frame_score(frame)), int(frame["missing"])])
    return table.getvalue().encode()


# ----------------------------------------------------------------------------- choosing frames

def worst_frames(frames: list[dict], k: int, key: str) -> list[dict]:
    """The frames where class k+1 scores lowest by key (IoU or NSD), below a perfect 1; ties in video, frame order."""
    failing = [frame for frame in frames if frame[key][k] < 1]
    return sorted(failing, key=lambda frame: (frame[key][k], frame["video"], frame["frame"]))[:WORST_FRAMES]


def false_positive_frames(frames: list[dict], k: int) -> list[dict]:
    """The frames with the most pixels of class k+1 predicted where the ground truth has none of it."""
    wrong = [frame for frame in frames if frame["false_positives"][k] > 0]
    return sorted(wrong, key=lambda frame: (-frame["false_positives"][k], frame["video"], frame["frame"]))[:WORST_FRAMES]


# ----------------------------------------------------------------------------- report.html

def table(header: list[str], rows: list[list]) -> str:
    cells = lambda tag, row: "".join(f"<{tag}>{cell}</{tag}>" for cell in row)
    return (f"<table><tr>{cells('th', header)}</tr>" + "".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
            + "</table>")


def swatch(name: str) -> str:
    r, g, b = CLASS_COLOURS[D.CLASS_NAMES.index(name)]
    return f'<span class="swatch" style="background: rgb({r}, {g}, {b})"></span>'


def frame_card(frame: dict, caption: str, directory: Path) -> str:
    """A frame's visualisation (frame | prediction | ground truth) where one was written, else its name only."""
    path = f"{frame['video']}/visualisations/{frame['frame']}.png"
    picture, name = html.escape(path), html.escape(f"{frame['video']}/{frame['frame']}")
    text = f"{html.escape(frame['video'])} / {html.escape(frame['frame'])}: {caption}"
    if not (directory / path).is_file():
        return f'<figure data-frame="{name}"><figcaption>{text} <span class="none">(no visualisation)</span></figcaption></figure>'
    return (f'<figure data-frame="{name}"><a href="{picture}"><img src="{picture}" loading="lazy" alt="{picture}"></a>'
            f'<figcaption>{text}</figcaption></figure>')


def frame_list(cards: list[str], empty: str, name: str, kind: str) -> str:
    """The cards in a row marked with their class and list (data-class, data-list), or what it means that there are none."""
    if not cards:
        return f'<p class="none">{empty}</p>'
    return f'<div class="frames" data-class="{html.escape(name)}" data-list="{kind}">{"".join(cards)}</div>'


def failure_sections(frames: list[dict], directory: Path) -> str:
    parts = []
    for k, name in enumerate(CLASSES):
        lists = []
        for key in ("IoU", "NSD"):
            cards = [frame_card(f, f"IoU {f['IoU'][k]:.3f}, NSD {f['NSD'][k]:.3f}", directory)
                     for f in worst_frames(frames, k, key)]
            lists.append(f"<h4>lowest {key}</h4>" + frame_list(cards, f"every frame scores {key} 1 on {name}", name, key))
        parts.append(f"<h3>{swatch(name)}{html.escape(name)}{' (thin)' if name in THIN_CLASSES else ''}</h3>"
                     + "".join(lists))
    return "".join(parts)


def false_positive_sections(frames: list[dict], directory: Path) -> str:
    parts = []
    for k, name in enumerate(CLASSES):
        cards = [frame_card(f, f"{f['false_positives'][k]:,} px of {html.escape(name)} predicted, none in the ground "
                               "truth", directory) for f in false_positive_frames(frames, k)]
        if cards:
            count = sum(1 for f in frames if f["false_positives"][k])
            parts.append(f"<h3>{swatch(name)}{html.escape(name)}: {count} frame{'s' * (count != 1)}</h3>"
                         + frame_list(cards, "", name, "false positives"))
    return "".join(parts) or '<p class="none">no frame predicts a class its ground truth does not have</p>'


def report_html(metrics: dict, frames: list[dict], directory: Path) -> str:
    """The page: scores, charts, per-class and per-video tables, then the worst frames of every class and the frames
    with false positives of a class absent from the ground truth."""
    seed = "n/a" if metrics.get("seed_mIoU") is None else f"{metrics['seed_mIoU']:.4f}"
    floor = metrics["background_only"]
    summary = table(["", "value"], [
        ["official score = sqrt(mIoU x mNSD)", f"<b>{metrics['score']:.4f}</b>"],
        ["mIoU", f"{metrics['mIoU']:.4f}"], ["mNSD", f"{metrics['mNSD']:.4f}"],
        ["seed mIoU (the seed pipeline's own metric, not the official score)", seed],
        ["background everywhere would score", f"{floor['score']:.4f}"],
        ["frames / videos", f"{metrics['frames']} / {len(metrics['videos'])}"]])
    classes = table(["class", "IoU", "NSD"], [[swatch(name) + html.escape(name), f"{v['IoU']:.4f}", f"{v['NSD']:.4f}"]
                                               for name, v in metrics["classes"].items()])
    videos = table(["video", "mIoU", "mNSD", "frames"], [[html.escape(name), f"{v['mIoU']:.4f}", f"{v['mNSD']:.4f}",
                                                           v["frames"]] for name, v in metrics["videos"].items()])
    source = ", ".join(f"{label} {html.escape(str(metrics[key]))}" for label, key in
                       (("model", "model_directory"), ("checkpoint", "checkpoint"), ("data", "data_directory"),
                        ("split", "split")) if metrics.get(key))
    warnings = "".join(f'<p class="warning">warning: {html.escape(w)}</p>' for w in metrics.get("warnings", []))
    if metrics["missing"]:
        warnings += f'<p class="warning">{len(metrics["missing"])} ground-truth masks have no prediction and score 0</p>'
    chart = lambda name: f'<img class="chart" src="{name}" alt="{name}">' if (directory / name).is_file() else ""
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
class in prediction or ground truth scores 1). Each picture: frame | prediction | ground truth.</p>
{failure_sections(frames, directory)}
<h2>False positives of absent classes</h2>
<p class="muted">A class predicted in a frame whose ground truth has none of it scores IoU 0 and NSD 0 there, however
few its pixels: these frames cost the most for the least error.</p>
{false_positive_sections(frames, directory)}
</body></html>
"""


def write_report(metrics: dict, frames: list[dict], directory: Path) -> None:
    D.write_bytes_atomically(directory / "per_frame.csv", per_frame_csv(frames))
    D.write_bytes_atomically(directory / "report.html", report_html(metrics, frames, directory).encode())
