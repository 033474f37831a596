"""Training-sample throughput of one DataLoader worker: 1080p PNG frames vs the 540p JPEG frame cache.

    .venv/bin/python benchmarks/bench_loader.py [--frames 40] [--workdir DIR] [--repeats 3]
        [--raw-frames] [--keep]

Writes N 1920x1080 frames and masks in the release layout (video_01/frames/{i:09d}.png,
video_01/segmentation/{i:09d}.png) with scripts/make_demo_data.py's scene at 1080p (panning
tissue texture, tools, needle, thread, clips, sensor noise). By default each frame goes through
the path real frames take: rendered -> H.264 CRF 23 video -> decoded with OpenCV -> PNG written
as scripts/extract_frames.py writes it (--raw-frames writes the rendered frames directly; their
sensor noise makes the PNGs larger and slower to decode).

Then, in this one process with one thread (cv2.setNumThreads(1), torch.set_num_threads(1)),
as one DataLoader worker sees it, SegmentationDataset(samples, (1080, 1920), scale=0.5) yields
  augmented training samples/s from the 1080p PNGs and from the frame cache (cache_frames=True,
  after one warm-up pass that builds it), validation samples/s (no augmentation) both ways,
  and where the time of one sample goes, stage by stage, done the way __getitem__ does it.
The modes run interleaved, --repeats rounds, and the median round is reported (the machine is
shared). Figures are printed, never asserted.
"""

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import default_collate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import make_demo_data as demo  # noqa: E402
from bench_extraction import run_in_workdir, x264_command  # noqa: E402
from dataset import SegmentationDataset, cached_frame_path, read_image, read_mask, read_scaled_image  # noqa: E402
from discovery import find_samples, find_video_dirs, scan_samples  # noqa: E402

WIDTH, HEIGHT, FPS = 1920, 1080, 60
SOURCE_SIZE = (HEIGHT, WIDTH)
GPU_RATE = 300  # images/s a GPU consumes
TARGET_PNG, TARGET_CACHE = 12.0, 40.0  # samples/s per worker, from the issue


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def ffmpeg_exe() -> str:
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except ImportError:
        return shutil.which("ffmpeg") or ""


def make_data(video_dir: Path, count: int, raw: bool, seed: int) -> str:
    """Frames one second apart (index 0, 60, ...) and their masks; returns how the frames were made."""
    (video_dir / "frames").mkdir(parents=True)
    (video_dir / "segmentation").mkdir()
    rng = np.random.default_rng([seed, 1])
    scene = demo.Scene(rng, WIDTH, HEIGHT, {demo.NEEDLE, demo.THREAD, demo.SUCTION, demo.CLAMPS})
    indices = [60 * k for k in range(count)]
    rendered = []
    for index in indices:
        image, mask = scene.frame(index / FPS, index)
        cv2.imwrite(str(video_dir / "segmentation" / f"{index:09d}.png"), mask)
        rendered.append(image)
    ffmpeg = ffmpeg_exe()
    if raw or not ffmpeg:
        how = "rendered frames written directly as PNG" + ("" if raw else " (no ffmpeg found)")
    else:
        # each rendered frame is one second of the operation; encode them as a 60 fps video and decode back
        video = video_dir / "video_left.avi"
        command = x264_command(ffmpeg, video)
        subprocess.run(command, input=b"".join(image.tobytes() for image in rendered), check=True)
        capture = cv2.VideoCapture(str(video))
        decoded = []
        while len(decoded) < count:
            ok, frame = capture.read()
            if not ok:
                sys.exit(f"{video}: decoded {len(decoded)} frames, expected {count}")
            decoded.append(frame)
        capture.release()
        video.unlink()
        rendered = decoded
        how = "rendered -> H.264 CRF 23 -> decoded frames, written as PNG (as extract_frames.py does)"
    for index, image in zip(indices, rendered):
        ok, encoded = cv2.imencode(".png", image)
        (video_dir / "frames" / f"{index:09d}.png").write_bytes(encoded.tobytes())
    return how


def folder_bytes(folder: Path, pattern: str) -> tuple[int, int]:
    files = list(folder.glob(pattern))
    return len(files), sum(f.stat().st_size for f in files)


def one_pass(dataset, epoch: int) -> tuple[float, float]:
    """Wall and CPU seconds to load every sample once."""
    dataset.epoch = epoch
    cpu, start = time.process_time(), time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    return time.perf_counter() - start, time.process_time() - cpu


def stage_times(dataset: SegmentationDataset, epoch: int, clock) -> dict[str, list[float]]:
    """Per-sample milliseconds of each stage of __getitem__, done as it does them (same seeds)."""
    stages = {name: [] for name in ("png", "resize", "jpeg", "mask", "spatial", "colour", "layout", "collate")}
    height, width = dataset.content_size
    dataset.epoch = epoch
    batch = []
    for index, sample in enumerate(dataset.samples):
        t0 = clock()
        full = read_image(sample.image)  # cv2.imread + BGR->RGB
        t1 = clock()
        scaled = cv2.resize(full, (width, height), interpolation=cv2.INTER_AREA)
        t2 = clock()
        cached = cached_frame_path(sample.image, dataset.content_size)
        image = read_scaled_image(sample.image, dataset.content_size, use_cache=True)  # stat checks + JPEG decode
        t3 = clock()
        mask = read_mask(sample.mask)
        t4 = clock()
        sample_seed = int(np.random.SeedSequence([dataset.seed, dataset.epoch, index]).generate_state(1)[0])
        dataset.spatial.set_random_seed(sample_seed)
        dataset.colour.set_random_seed(sample_seed)
        augmented = dataset.spatial(image=scaled, mask=mask)
        t5 = clock()
        image = dataset.colour(image=augmented["image"])["image"]
        t6 = clock()
        padded = np.zeros((*dataset.padded_size, 3), dtype=np.uint8)
        padded[: image.shape[0], : image.shape[1]] = image
        item = {
            "image": torch.from_numpy(padded).permute(2, 0, 1).contiguous(),
            "mask": torch.from_numpy(np.ascontiguousarray(augmented["mask"])),
            "index": index,
        }
        t7 = clock()
        batch.append(item)
        if len(batch) == 8:  # a worker also collates its batch
            default_collate(batch)
            stages["collate"].append((clock() - t7) / 8 * 1000)
            batch = []
        assert cached.exists()
        for name, (a, b) in zip(
            ("png", "resize", "jpeg", "mask", "spatial", "colour", "layout"),
            ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5), (t5, t6), (t6, t7)),
        ):
            stages[name].append((b - a) * 1000)
    return stages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=40, help="1920x1080 frames (default: 40)")
    parser.add_argument("--workdir", type=Path, help="where the frames go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every mode (default: 3)")
    parser.add_argument(
        "--raw-frames",
        action="store_true",
        help="write rendered frames as PNG directly instead of through H.264 (noisier, slower)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.frames < 1 or args.repeats < 1:
        parser.error("--frames and --repeats must be at least 1")
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    return run_in_workdir(run, args, parser, prefix="bench_loader_")


def run(args, work: Path) -> int:
    video_dir = work / "data" / "video_01"
    log(f"writing {args.frames} frames {WIDTH}x{HEIGHT} + masks to {video_dir}")
    how = make_data(video_dir, args.frames, args.raw_frames, args.seed)
    samples, _, source_size = scan_samples(find_samples(find_video_dirs(work / "data")))
    assert source_size == SOURCE_SIZE, source_size
    png_count, png_bytes = folder_bytes(video_dir / "frames", "*.png")
    _, mask_bytes = folder_bytes(video_dir / "segmentation", "*.png")
    log(
        f"{len(samples)} samples; {how}; PNG {png_bytes / png_count / 1e6:.2f} MB/frame, "
        f"mask {mask_bytes / png_count / 1e3:.0f} kB"
    )

    def dataset(augment, cache):
        return SegmentationDataset(samples, SOURCE_SIZE, scale=0.5, augment=augment, cache_frames=cache)

    modes = {
        "train, 1080p PNG": dataset(True, False),
        "train, cache": dataset(True, True),
        "val, 1080p PNG": dataset(False, False),
        "val, cache": dataset(False, True),
    }
    content = modes["train, cache"].content_size
    cache_dir = cached_frame_path(samples[0].image, content).parent
    log(f"building the frame cache ({cache_dir.name}/) with one pass of the cached training dataset")
    build, _ = one_pass(modes["train, cache"], epoch=0)
    cache_count, cache_bytes = folder_bytes(cache_dir, "*.jpg")
    log(
        f"cache built in {build:.2f} s ({build / len(samples) * 1000:.1f} ms/frame), {cache_count} files, "
        f"{cache_bytes / 1e6:.1f} MB ({cache_bytes / cache_count / 1e3:.0f} kB/frame)"
    )

    seconds = {name: [] for name in modes}
    cpu_seconds = {name: [] for name in modes}
    for round_number in range(1, args.repeats + 1):
        for name, ds in modes.items():
            wall, cpu = one_pass(ds, epoch=round_number)
            seconds[name].append(wall)
            cpu_seconds[name].append(cpu)
        log(
            f"round {round_number}/{args.repeats}: "
            + ", ".join(f"{name} {len(samples) / s[-1]:.1f}/s" for name, s in seconds.items())
        )
    names = ("png", "resize", "jpeg", "mask", "spatial", "colour", "layout", "collate")
    stages = {name: [] for name in names}
    cpu_stages = {name: [] for name in names}
    for round_number in range(1, args.repeats + 1):
        for clock, into in ((time.perf_counter, stages), (time.process_time, cpu_stages)):
            for name, values in stage_times(modes["train, cache"], round_number, clock).items():
                into[name] += values
    log("done")

    rate = {name: len(samples) / statistics.median(s) for name, s in seconds.items()}
    cpu_rate = {name: len(samples) / statistics.median(s) for name, s in cpu_seconds.items()}
    ms = {name: statistics.median(values) if values else float("nan") for name, values in stages.items()}
    cpu_ms = {name: statistics.median(values) if values else float("nan") for name, values in cpu_stages.items()}

    print()
    print(
        f"{len(samples)} samples 1920x1080 -> training size {content[1]}x{content[0]} (padded to "
        f"{modes['val, cache'].padded_size[1]}x{modes['val, cache'].padded_size[0]}), masks kept at 1080p; "
        f"one process, cv2 and torch 1 thread; {os.cpu_count()} CPUs, shared"
    )
    print(
        f"frames: {how}; {png_bytes / png_count / 1e6:.2f} MB/PNG; cache: JPEG q95 at {content[1]}x{content[0]}, "
        f"{cache_bytes / cache_count / 1e3:.0f} kB/frame, {cache_bytes / 1e6:.1f} MB for {cache_count} frames, "
        f"built in {build:.2f} s ({build / len(samples) * 1000:.1f} ms/frame, includes one augmented load)"
    )
    print(
        f"median of {args.repeats} interleaved rounds over all samples. wall: elapsed time; CPU: this "
        "process's CPU time (what an idle core would take; on a shared machine wall > CPU)"
    )
    print()
    header = (
        f"{'per worker':<20}{'samples/s':>10}{'ms/sample':>10}{'workers':>9}"
        f"{'CPU samples/s':>15}{'CPU ms':>8}{'workers':>9}   target (CPU / wall)"
    )
    print(header)
    print("-" * len(header))
    targets = {"train, 1080p PNG": TARGET_PNG, "train, cache": TARGET_CACHE}
    for name, value in rate.items():
        target, by_cpu = targets.get(name), cpu_rate[name]
        verdict = (
            ""
            if target is None
            else (
                f">= {target:.0f}: "
                + ("met" if by_cpu >= target else "NOT met")
                + " / "
                + ("met" if value >= target else "NOT met")
            )
        )
        print(
            f"{name:<20}{value:>10.1f}{1000 / value:>10.1f}{math.ceil(GPU_RATE / value):>9}"
            f"{by_cpu:>15.1f}{1000 / by_cpu:>8.1f}{math.ceil(GPU_RATE / by_cpu):>9}   {verdict}"
        )
    print(
        f"workers: DataLoader workers (one core each) a GPU consuming {GPU_RATE} images/s needs, "
        f"ceil({GPU_RATE} / samples/s)"
    )
    print()
    print("where one augmented sample's time goes (median ms over all samples and rounds):")
    rows = [
        ("PNG decode 1920x1080 (imread + BGR->RGB)", "png", "1080p"),
        ("resize to 960x540 (INTER_AREA)", "resize", "1080p"),
        ("cache: JPEG decode 960x540 (+ 2 stat)", "jpeg", "cache"),
        ("mask read 1920x1080 PNG (+ header check)", "mask", "both"),
        ("spatial aug (image 540p + mask 1080p)", "spatial", "both"),
        ("colour aug (540p)", "colour", "both"),
        ("padding + tensor layout", "layout", "both"),
        ("collate, per sample in batches of 8", "collate", "both"),
    ]
    print(f"{'stage':<46}{'wall ms':>9}{'CPU ms':>9}{'path':>8}")
    for label, key, path in rows:
        print(f"{label:<46}{ms[key]:>9.2f}{cpu_ms[key]:>9.2f}{path:>8}")
    for label, times, rates in (("wall", ms, rate), ("CPU", cpu_ms, cpu_rate)):
        common = sum(times[k] for k in ("mask", "spatial", "colour", "layout"))
        png_path, cache_path = times["png"] + times["resize"] + common, times["jpeg"] + common
        print(
            f"sum of stages without collate, {label}: 1080p PNG path {png_path:.2f} ms (whole sample measured "
            f"{1000 / rates['train, 1080p PNG']:.2f}), cache path {cache_path:.2f} ms "
            f"(measured {1000 / rates['train, cache']:.2f})"
        )
    print(
        f"cache speed-up, training: {rate['train, cache'] / rate['train, 1080p PNG']:.2f}x wall, "
        f"{cpu_rate['train, cache'] / cpu_rate['train, 1080p PNG']:.2f}x CPU; validation: "
        f"{rate['val, cache'] / rate['val, 1080p PNG']:.2f}x wall, "
        f"{cpu_rate['val, cache'] / cpu_rate['val, 1080p PNG']:.2f}x CPU"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
