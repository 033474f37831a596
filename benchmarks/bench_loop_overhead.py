"""The loop's overhead: run_training.py's own training step fed by its real DataLoader, against the same step on
batches already in memory (preloaded tensors), with loader workers kept across epochs (the default) and started
again at every epoch (--no-persistent-workers).

    .venv/bin/python benchmarks/bench_loop_overhead.py [--size 1920x1080] [--seconds 4] [--epochs 3]
        [--num-workers N] [--backbone vits|tiny] [--resolution quarter] [--workdir DIR --keep]

It writes a synthetic release in the SAR-RARP50 layout (scripts/make_demo_data.py, frames extracted from H.264 as
scripts/extract_frames.sh does) and a random-init backbone (vits: ViT-S/16's shape; tiny: 4 layers of width 64),
builds the run with run_training.setup from real arguments (LoRA, the pixel-MLP head), and times whole epochs of
run_training.train_step, the epoch starts included. The three modes run interleaved, epoch after epoch, and the
median epoch is reported (the machine may be shared). Figures are printed, never asserted.
"""

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
import run_training  # noqa: E402
from make_demo_data import make_demo_dataset  # noqa: E402
from make_tiny_backbone import save_tiny_backbone  # noqa: E402

BACKBONES = {"vits": dict(hidden_size=384, layers=12, heads=6), "tiny": {}}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def make_inputs(workdir: Path, options) -> tuple[Path, Path]:
    release, backbone = workdir / "sarrarp", workdir / f"backbone-{options.backbone}"
    if not (release / "train").is_dir():
        width, height = map(int, options.size.split("x"))
        log(f"writing a {width}x{height} release, {options.seconds} s a video")
        make_demo_dataset(release, train_videos=5, test_videos=0, seconds=options.seconds, width=width, height=height)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "extract_frames.py"), str(release)], check=True)
    if not (backbone / "config.json").is_file():
        save_tiny_backbone(backbone, **BACKBONES[options.backbone])
    return release, backbone


def make_run(release: Path, backbone: Path, output: Path, options, *extra) -> tuple:
    arguments = ["--data-directory", release, "--backbone", backbone, "--output-directory", output]
    arguments += ["--resolution", options.resolution, "--batch-size", options.batch_size, "--warmup-steps", 1]
    arguments += ["--num-workers", options.num_workers, "--max-steps", 10**6, *extra]
    args = run_training.parse_args([str(a) for a in arguments])
    return run_training.setup(args, lambda *a, **k: None)


def timed_epoch(training, state, preloaded=None) -> float:
    """Seconds a step over one epoch (the loader's start included); preloaded: the batches to feed instead."""
    start = time.perf_counter()
    if preloaded is None:
        batches, steps = run_training.epoch_batches(training, state)
    else:
        batches, steps = iter(preloaded), len(preloaded) // training.args.grad_accum_steps
    for _ in range(steps):
        run_training.train_step(training, batches, state.step + 1)
        state.step += 1
    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    return (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1920x1080", help="source frame size (default: %(default)s)")
    parser.add_argument("--seconds", type=int, default=4, help="seconds (masks) a video (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs timed per mode (default: %(default)s)")
    parser.add_argument("--num-workers", type=int, default=2, help="loader workers (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=2, help="(default: %(default)s)")
    parser.add_argument("--backbone", choices=list(BACKBONES), default="vits", help="(default: %(default)s)")
    parser.add_argument("--resolution", default="quarter", help="(default: %(default)s)")
    parser.add_argument("--workdir", type=Path, help="keep the data here (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep --workdir's data for the next run")
    options = parser.parse_args(argv)
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="loop-overhead-"))
    release, backbone = make_inputs(workdir, options)
    runs = {
        "preloaded tensors": make_run(release, backbone, workdir / "run-preloaded", options, "--num-workers", 0),
        "loader, persistent workers": make_run(release, backbone, workdir / "run-persistent", options),
        "loader, workers started per epoch": make_run(
            release, backbone, workdir / "run-restarted", options, "--no-persistent-workers"
        ),
    }
    training, state = runs["preloaded tensors"]
    batches, steps = run_training.epoch_batches(training, state)
    per_step = training.args.grad_accum_steps
    preloaded = [next(batches) for _ in range(steps * per_step)]  # one epoch of real batches, kept in memory
    log(f"{len(training.data.train)} training samples, {steps} steps an epoch, {options.num_workers} workers")
    seconds = {mode: [] for mode in runs}
    for epoch in range(options.epochs + 1):  # the first epoch of each mode warms up and is not counted
        for mode, (training, state) in runs.items():
            taken = timed_epoch(training, state, preloaded if mode == "preloaded tensors" else None)
            if epoch:
                seconds[mode].append(taken)
        log(f"epoch {epoch} timed")
    baseline = statistics.median(seconds["preloaded tensors"])
    print(f"\n{options.backbone} LoRA, {options.size} source at {options.resolution} resolution, batch ", end="")
    print(f"{options.batch_size}, {options.num_workers} workers, {torch.get_num_threads()} threads, CPU")
    print(f"{'mode':36} {'s/step':>8} {'vs preloaded':>13}")
    for mode, taken in seconds.items():
        median = statistics.median(taken)
        print(f"{mode:36} {median:8.3f} {median / baseline:12.2f}x")
    for training, _ in runs.values():
        training.run.close()
    if not options.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
