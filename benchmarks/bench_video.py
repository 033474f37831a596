"""Throughput of run_inference.py --input on a 1920x1080 60 fps H.264 video: frames/s of

  (a) plain sequential decoding (OpenCV grab + retrieve of every frame: the floor for a frame-exact reader),
  (b) the whole video path with the model replaced by a no-op (decode + resize + overlay + H.264 encode, overlapped
      on threads: the pipeline's own overhead),
  (c) the whole path with a tiny random DINOv3 at half resolution (on a GPU: --backbone DIR, e.g. a ViT-B/16),

and each stage alone (decode, resize for the model, overlay drawing, encoding) to name the bottleneck.

    python benchmarks/bench_video.py [--seconds 30] [--model-seconds 5] [--backbone DIR] [--batch-size 8]
"""

import argparse
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import imageio_ffmpeg
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import cli  # noqa: E402
import dataset  # noqa: E402
import inference  # noqa: E402
import plots  # noqa: E402
import video  # noqa: E402
from make_tiny_backbone import save_tiny_backbone  # noqa: E402
from model import build_model  # noqa: E402

SIZE, FPS = (1080, 1920), 60


def make_video(path: Path, seconds: float) -> None:
    """Textured tissue drifting, a tool moving across: an H.264 CRF 23 stream like a recording's."""
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.integers(0, 255, (SIZE[0] + 200, SIZE[1] + 200, 3), dtype=np.uint8), (0, 0), 6)
    texture = cv2.normalize(texture, None, 40, 220, cv2.NORM_MINMAX)
    writer = imageio_ffmpeg.write_frames(
        str(path),
        SIZE[::-1],
        fps=FPS,
        codec="libx264",
        quality=None,
        macro_block_size=2,
        ffmpeg_log_level="error",
        output_params=["-preset", "veryfast", "-crf", "23"],
    )
    writer.send(None)
    for i in range(round(seconds * FPS)):
        dy, dx = int(100 + 80 * np.sin(i / 90)), int(100 + 80 * np.cos(i / 70))
        frame = texture[dy : dy + SIZE[0], dx : dx + SIZE[1]].copy()
        x = 200 + (i * 7) % 1400
        cv2.rectangle(frame, (x, 300), (x + 300, 420), (200, 200, 210), -1)
        writer.send(frame)
    writer.close()


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def decode_only(path: Path, frames: int) -> None:
    capture = cv2.VideoCapture(str(path))
    for _ in range(frames):
        capture.grab()
        capture.retrieve()
    capture.release()


def full_path(path: Path, frames: int, out: Path, predict_batch, sizes, batch_size: int) -> int:
    info = video.probe_video(path)
    progress = SimpleNamespace(update=lambda n: None)
    return video.segment_video(
        path,
        info,
        0,
        frames,
        every=1,
        prepare=lambda frame: [dataset.scale_image(frame, s) for s in sizes],
        predict_batch=predict_batch,
        batch_size=batch_size,
        draw=plots.video_frame,
        overlay_path=out,
        save_mask=lambda i, labels: None,
        progress=progress,
    )


def stage_rates(path: Path, frames: int, sizes, out: Path) -> dict:
    """frames/s of each stage alone, on the same frames."""
    capture = cv2.VideoCapture(str(path))
    sample = []
    for _ in range(min(frames, 120)):
        capture.grab()
        sample.append(cv2.cvtColor(capture.retrieve()[1], cv2.COLOR_BGR2RGB))
    capture.release()
    labels = fake_labels()
    drawn = [plots.video_frame((frame, labels)) for frame in sample]
    rates = {"decode (grab + retrieve + BGR->RGB)": frames / timed(lambda: decode_only(path, frames))}
    rates["resize for the model"] = len(sample) / timed(
        lambda: each(sample, lambda f: [dataset.scale_image(f, s) for s in sizes])
    )
    rates["overlay drawing"] = len(sample) / timed(lambda: each(sample, lambda f: plots.video_frame((f, labels))))
    jobs, halt = queue.Queue(), threading.Event()
    for frame in drawn:
        jobs.put((frame, None))
    jobs.put(video.END)
    rates["H.264 encoding"] = len(drawn) / timed(
        lambda: video.encode_frames(out, SIZE, FPS, lambda job: job[0], jobs, halt)
    )
    return rates


def each(frames, work) -> None:
    """work on every frame, its result dropped at once as in the pipeline (not kept: memory would be the cost)."""
    for frame in frames:
        work(frame)


def fake_labels() -> np.ndarray:
    labels = np.zeros(SIZE, np.uint8)
    labels[300:420, 600:900], labels[500:520, 200:1200] = 3, 5
    return labels


def model_predictor(backbone: str | None, device: torch.device):
    if backbone is None:
        backbone = tempfile.mkdtemp(prefix="tiny-dinov3-")
        save_tiny_backbone(backbone)
    model = build_model(backbone, head={"type": "mlp"}).eval().to(device)
    members = [(model, {"resolution": {"scale": 0.5}})]
    sizes, passes = inference.inference_passes(members, SIZE, "none", [1.0])
    precision = cli.precision_for(None, device)
    plan = inference.Plan(device, precision, cli.autocast_for(precision, device), sizes, passes)
    args = SimpleNamespace(temporal_smoothing=0.0, min_component_size=0)
    return video.frame_predictor(args, plan, SIZE), sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=30, help="length of the generated video (default: %(default)s)")
    parser.add_argument(
        "--model-seconds",
        type=int,
        default=5,
        help="seconds of video (c) runs the model on (the CPU is slow) (default: %(default)s)",
    )
    parser.add_argument("--backbone", help="backbone for (c) (default: a tiny random DINOv3)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp(prefix="bench-video-"))
    source, frames = work / "source.mp4", args.seconds * FPS
    print(f"generating {args.seconds} s of 1920x1080 60 fps H.264 ... ", end="", flush=True)
    print(f"{timed(lambda: make_video(source, args.seconds)):.0f} s")
    predict_batch, sizes = model_predictor(args.backbone, device)
    no_op = lambda batch: [fake_labels() for _ in batch]  # noqa: E731

    a = frames / timed(lambda: decode_only(source, frames))
    b = frames / timed(lambda: full_path(source, frames, work / "b.mp4", no_op, sizes, args.batch_size))
    model_frames = min(frames, args.model_seconds * FPS)
    c = model_frames / timed(
        lambda: full_path(source, model_frames, work / "c.mp4", predict_batch, sizes, args.batch_size)
    )
    print(f"\n{'':<62}{'frames/s':>9}{'x real time':>12}")
    for name, rate in (
        ("(a) sequential decoding", a),
        ("(b) video path, no-op model", b),
        (
            f"(c) video path, {'tiny random DINOv3' if args.backbone is None else args.backbone} "
            f"({device.type}, {model_frames} frames)",
            c,
        ),
    ):
        print(f"{name:<62}{rate:>9.1f}{rate / FPS:>12.2f}")
    print(f"(a)/(b): the pipeline's overhead over decoding alone {a / b:.2f}x (target <= 2x)")
    rates = stage_rates(source, min(frames, 600), sizes, work / "stage.mp4")
    print("\neach stage alone (frames/s):")
    for name, rate in rates.items():
        print(f"  {name:<40}{rate:>8.1f}")
    slowest = min(rates, key=rates.get)
    print(
        f"bottleneck of (b): {slowest} ({rates[slowest]:.1f} frames/s); stages run on their own threads, "
        f"so (b) runs at about the slowest stage's rate"
    )


if __name__ == "__main__":
    main()
