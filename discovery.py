"""The SAR-RARP50 release on disk: its video folders, every mask paired with its frame, and every mask and frame
checked before training starts (a bad one is one line naming the file, or skipped with --skip-bad-samples).

Layout: ROOT/{train,test}/video_XX/segmentation/{i:09d}.png holds the mask of frame i of video_left.avi, and
frames/{i:09d}.png (or the official toolkit's rgb/) the frame.
"""

import json
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import files
import progress_bars
from dataset import NUM_CLASSES, DataError, Sample, read_mask, read_png_header

FRAME_FOLDERS = ("frames", "rgb")  # ours, and the official toolkit's
STATISTICS_FILE = "mask_statistics.json"
MASK_NAME = re.compile(r"\d{9}\.png")


def report(error: DataError, skip_bad: bool) -> None:
    if not skip_bad:
        raise error
    warnings.warn(f"skipping: {error}", stacklevel=2)


def find_video_dirs(root: Path) -> list[Path]:
    """Every video folder under root: one named video_* that holds a segmentation/ folder, at any depth, sorted by
    name. Training, prediction and scoring all find the videos this way. Two of one name are an error, as their
    frames and scores would be confused."""
    is_video = lambda folder: folder.name.startswith("video_") and (folder / "segmentation").is_dir()  # noqa: E731
    videos = sorted(files.find_folders(root, is_video), key=lambda p: p.name)
    for first, second in zip(videos, videos[1:]):
        if first.name == second.name:
            raise DataError(f"two video folders are named {first.name}: {first} and {second}; keep one of them")
    return videos


def frame_index(mask: Path) -> int:
    """The index of the video frame a mask labels, read from its name as the release writes it ({index:09d}.png)."""
    if not MASK_NAME.fullmatch(mask.name):
        raise DataError(
            f"{mask}: a mask must be named by the index of its frame in video_left.avi, zero-padded to 9 "
            "digits (e.g. 000000060.png): rename or remove it"
        )
    return int(mask.stem)


def video_masks(video_dir: Path) -> list[Path]:
    """The mask files of one video folder; an empty segmentation/ is an error naming the video."""
    masks = sorted((video_dir / "segmentation").glob("*.png"))
    if not masks:
        raise DataError(
            f"{video_dir / 'segmentation'}: no masks (*.png) for video {video_dir.name}: unpack the "
            "video's masks there, or move the folder out of the dataset"
        )
    return masks


def find_samples(video_dirs: list[Path], skip_bad: bool = False) -> list[Sample]:
    """Pair each mask with its frame (frames/ or rgb/, same file name)."""
    samples = []
    for video_dir in video_dirs:
        try:
            masks = video_masks(video_dir)
        except DataError as error:
            report(error, skip_bad)
            continue
        for mask in masks:
            try:
                frame_index(mask)
            except DataError as error:
                report(error, skip_bad)
                continue
            image = next(
                (video_dir / f / mask.name for f in FRAME_FOLDERS if (video_dir / f / mask.name).exists()), None
            )
            if image is None:
                report(
                    DataError(
                        f"{mask}: no frame for this mask (expected {video_dir / 'frames' / mask.name}; "
                        "run scripts/extract_frames.sh)"
                    ),
                    skip_bad,
                )
                continue
            samples.append(Sample(video_dir.name, image, mask))
    return samples


def mask_statistics(path: Path) -> dict:
    """Size and per-class pixel counts of one mask; refuses class ids above 9."""
    mask = read_mask(path)
    counts = np.bincount(mask.ravel(), minlength=256)
    if counts[NUM_CLASSES:].any():
        bad = np.flatnonzero(counts[NUM_CLASSES:]) + NUM_CLASSES
        raise DataError(f"{path}: class ids {', '.join(map(str, bad[:5]))} above {NUM_CLASSES - 1}")
    return {"shape": list(mask.shape), "pixels": counts[:NUM_CLASSES].tolist()}


def read_statistics(statistics_file: Path | None) -> dict:
    """The cached mask statistics ({} if there are none or the file is damaged: the masks are read again)."""
    if statistics_file is None or not statistics_file.exists():
        return {}
    try:
        cache = json.loads(statistics_file.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def scan_sample(sample: Sample, cache: dict) -> tuple[str, dict] | DataError:
    """(cache key, statistics) of a sample whose frame fits its mask, else the error: the cached statistics while the
    mask's size and modification time are unchanged; the frame's header is read every time (it is cheap)."""
    try:
        stat = sample.mask.stat()
        key = str(sample.mask.resolve())
        entry = cache.get(key)
        if not entry or (entry["size"], entry["mtime_ns"]) != (stat.st_size, stat.st_mtime_ns):
            entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **mask_statistics(sample.mask)}
        width, height, _, _ = read_png_header(sample.image)
        if [height, width] != entry["shape"]:
            raise DataError(
                f"{sample.image}: frame is {width}x{height} but its mask is {entry['shape'][1]}x{entry['shape'][0]}"
            )
        return key, entry
    except DataError as error:
        return error


def scan_samples(
    samples: list[Sample], statistics_file: Path | None = None, skip_bad: bool = False
) -> tuple[list[Sample], np.ndarray, tuple[int, int]]:
    """Validate every sample in parallel; returns the good ones, their per-class pixel counts and the source size.
    Mask pixel counts are cached in statistics_file keyed by path, size and modification time, so the masks are
    read once."""
    cache = read_statistics(statistics_file)
    good, counts, shapes = [], [], set()
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        results = pool.map(lambda sample: scan_sample(sample, cache), samples)
        progress = progress_bars.bar(
            results, total=len(samples), desc="checking masks", unit="mask", leave=False, disable=len(samples) < 200
        )
        for sample, result in zip(samples, progress):
            if isinstance(result, DataError):
                report(result, skip_bad)
                continue
            key, entry = result
            cache[key] = entry
            good.append(sample)
            counts.append(entry["pixels"])
            shapes.add(tuple(entry["shape"]))
    if not good:
        raise DataError("no usable samples found")
    if len(shapes) > 1:
        raise DataError(
            f"videos differ in size ({', '.join(f'{w}x{h}' for h, w in sorted(shapes))}); "
            "one run trains on one source resolution"
        )
    if statistics_file is not None:
        try:
            files.write_json_atomically(statistics_file, cache)
        except OSError:
            pass  # a read-only dataset still works, it is only scanned again next time
    return good, np.array(counts, dtype=np.int64), shapes.pop()
