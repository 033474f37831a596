"""Frames/second of the official score: straightforward vs cropped frame_scores vs evaluate_directories, same results.

.venv/bin/python benchmarks/bench_metrics.py --frames 20 --workers 8
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from metrics import evaluate_directories, frame_scores, reference_frame_scores, summarize  # noqa: E402

WIDTH, HEIGHT = 1920, 1080
CLASPER, WRIST, SHAFT, NEEDLE, THREAD, SUCTION = 1, 2, 3, 4, 5, 6
FRAMES_PER_VIDEO = 5


def make_scene(rng):
    """Instrument-like shapes as (class, kind, geometry): shafts entering from the border, tips, needle, thread."""
    shapes = []
    for _ in range(rng.integers(2, 4)):
        tip = rng.uniform((400, 250), (1500, 850))
        angle = rng.uniform(0, 2 * np.pi)
        direction = np.array([np.cos(angle), np.sin(angle)])
        shaft_class = SUCTION if rng.random() < 0.2 else SHAFT
        shapes.append((shaft_class, "bar", (tip, tip + 2500 * direction, rng.uniform(60, 130))))
        wrist = tip - 10 * direction
        shapes.append((WRIST, "blob", (wrist, rng.uniform(35, 55), rng.uniform(25, 40), np.degrees(angle))))
        for side in (-1, 1):
            jaw = wrist - 55 * direction + side * 12 * direction[::-1] * (1, -1)
            shapes.append((CLASPER, "blob", (jaw, rng.uniform(25, 40), rng.uniform(6, 12), np.degrees(angle))))
    centre = rng.uniform((300, 200), (1600, 900))
    start = rng.uniform(0, 360)
    shapes.append((NEEDLE, "arc", (centre, rng.uniform(30, 60), start, start + rng.uniform(120, 200), 4)))
    steps = np.cumsum(rng.normal(0, 25, size=(40, 2)) + rng.normal(0, 15, size=2), axis=0)
    shapes.append((THREAD, "line", (rng.uniform((200, 200), (1700, 900)) + steps, int(rng.integers(2, 4)))))
    return shapes


def draw(shapes, shift=lambda: (0, 0), grow=lambda: 0):
    labels = np.zeros((HEIGHT, WIDTH), np.uint8)
    for c, kind, geometry in shapes:
        offset = np.array(shift(), dtype=np.float64)
        if kind == "bar":
            start, end, width = geometry
            normal = (end - start)[::-1] * (1, -1) / np.linalg.norm(end - start) * (width / 2 + grow())
            corners = np.array([start + normal, start - normal, end - normal, end + normal]) + offset
            cv2.fillPoly(labels, [np.round(corners).astype(np.int32)], c)
        elif kind == "blob":
            centre, a, b, angle = geometry
            axes = (max(int(a + grow()), 1), max(int(b + grow()), 1))
            cv2.ellipse(labels, tuple(np.round(centre + offset).astype(int)), axes, angle, 0, 360, c, -1)
        elif kind == "arc":
            centre, radius, start, stop, thickness = geometry
            cv2.ellipse(
                labels,
                tuple(np.round(centre + offset).astype(int)),
                (int(radius), int(radius)),
                0,
                start,
                stop,
                c,
                max(thickness + grow(), 1),
            )
        else:  # a thin curvy polyline
            points, thickness = geometry
            cv2.polylines(labels, [np.round(points + offset).astype(np.int32)], False, c, max(thickness + grow(), 1))
    return labels


def make_pair(rng):
    """Ground truth and a plausible prediction: every shape shifted/grown by a few px, plus one stray blob."""
    shapes = make_scene(rng)
    ground_truth = draw(shapes)
    prediction = draw(shapes, shift=lambda: rng.integers(-4, 5, size=2), grow=lambda: int(rng.integers(-2, 3)))
    stray = tuple(int(v) for v in rng.uniform((0, 0), (WIDTH, HEIGHT)))
    cv2.circle(prediction, stray, int(rng.integers(4, 15)), int(rng.integers(1, 10)), -1)
    return ground_truth, prediction


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20, help="number of 1920x1080 frames")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes for evaluate_directories")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    pairs = [make_pair(rng) for _ in range(args.frames)]
    videos = [f"video_{i // FRAMES_PER_VIDEO + 1:02d}" for i in range(args.frames)]
    present = np.mean([len(np.setdiff1d(np.union1d(np.unique(g), np.unique(p)), [0])) for g, p in pairs])
    print(
        f"{args.frames} frames {WIDTH}x{HEIGHT}, {present:.1f} classes present per frame on average, "
        f"{os.cpu_count()} CPUs"
    )

    reference, t_reference = timed(lambda: [reference_frame_scores(p, g) for g, p in pairs])
    fast, t_fast = timed(lambda: [frame_scores(p, g) for g, p in pairs])
    difference = max(np.abs(np.array(f) - np.array(r)).max() for f, r in zip(fast, reference))

    with tempfile.TemporaryDirectory() as root:
        for i, ((ground_truth, prediction), video) in enumerate(zip(pairs, videos)):
            for folder, labels in (("GT", ground_truth), ("PRED", prediction)):
                path = Path(root, folder, video, "segmentation", f"{60 * i:09d}.png")
                path.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(path), labels)
        on_disk, t_disk = timed(
            lambda: evaluate_directories(Path(root, "GT"), Path(root, "PRED"), workers=args.workers, progress=False)
        )
    by_video = {}
    for video, scores in zip(videos, fast):
        by_video.setdefault(video, []).append(scores)
    expected = summarize(by_video)
    disk_difference = max(abs(on_disk[k] - expected[k]) for k in ("mIoU", "mNSD", "score"))

    rows = [
        ("(a) reference_frame_scores", 1, t_reference),
        ("(b) frame_scores", 1, t_fast),
        ("(c) evaluate_directories", args.workers, t_disk),
    ]
    print(f"\n{'method':<28}{'procs':>6}{'seconds':>10}{'frames/s':>10}{'vs (a)':>9}{'vs (b)':>9}")
    for name, procs, seconds in rows:
        print(
            f"{name:<28}{procs:>6}{seconds:>10.2f}{args.frames / seconds:>10.2f}"
            f"{t_reference / seconds:>8.1f}x{t_fast / seconds:>8.1f}x"
        )
    print(
        f"\n(c) includes PNG decoding and the confusion matrix. Score {on_disk['score']:.4f} "
        f"(mIoU {on_disk['mIoU']:.4f}, mNSD {on_disk['mNSD']:.4f})"
    )
    print(f"max |(b) - (a)| per class and frame: {difference:.2e}; max |(c) - summarize((b))|: {disk_difference:.2e}")
    if difference > 1e-6 or disk_difference > 1e-6:
        sys.exit("MISMATCH: the versions disagree by more than 1e-6")
    print("results agree to 1e-6")


if __name__ == "__main__":
    main()
