"""How close memory.py's estimate of an inference batch comes to the memory the batch really takes: for each setting
(batch size, --tta-scales, flip) the estimate that run_inference.py checks before work starts, beside the peak
measured when the batch runs, and their ratio.

    python benchmarks/bench_memory_estimate.py [--backbone vits16|vitb16|vitl16] [--device cpu|cuda]

The model is a random-init, real-size DINOv3 ViT (frozen, the seed's pixel head) at half resolution of a 1080p
source. Measured: on a GPU, torch.cuda.max_memory_allocated above what was allocated before (and the reserve
of the caching allocator); on the CPU, the resident set's high-water mark (VmHWM, reset through
/proc/self/clear_refs) above the resident set before, after glibc's malloc_trim: it includes the allocator's slack and the libraries' work
buffers, which the estimate (tensor bytes only) leaves out.
"""

import argparse
import ctypes
import gc
import multiprocessing
import sys
import time
from pathlib import Path

import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import cli  # noqa: E402
import inference  # noqa: E402
import memory  # noqa: E402
from model import SegmentationModel  # noqa: E402

SOURCE_SIZE = (1080, 1920)
ARCHITECTURES = {"vits16": (384, 12, 6, 1536), "vitb16": (768, 12, 12, 3072), "vitl16": (1024, 24, 16, 4096)}
SETTINGS = [  # (batch, scales, flip)
    (1, [1.0], False),
    (4, [1.0], False),
    (1, [2.0], False),
    (2, [0.75, 1.0, 1.25], True),
]


def status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def measured_bytes(run, device) -> tuple[int, int]:
    """(peak bytes above the start, reserved-or-resident bytes above the start) while run() runs."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
        run()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - allocated
        return peak, torch.cuda.max_memory_reserved(device) - reserved
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the system, so that reusing it shows as growth
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident set
    resident = status_kib("VmRSS")
    run()
    grown = (status_kib("VmHWM") - resident) * 1024
    return grown, grown


def measure(architecture: str, device: str, setting: tuple, queue) -> None:
    """In a fresh process (so that no memory freed earlier is reused unseen): (estimate, peak, held, seconds)."""
    batch, scales, flip = setting
    device = torch.device(device)
    hidden, depth, heads, mlp = ARCHITECTURES[architecture]
    config = DINOv3ViTConfig(
        hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=mlp
    )
    model = SegmentationModel(DINOv3ViTModel(config), (0.5,) * 3, (0.2,) * 3, "frozen", head={"type": "mlp"})
    model = model.eval().to(device)
    autocast = cli.autocast_for(cli.precision_for(None, device), device)
    members = [(model, {"resolution": {"scale": 0.5}})]
    sizes, passes = inference.inference_passes(members, SOURCE_SIZE, "flip" if flip else "none", scales)
    inputs = [torch.zeros(batch, 3, *size, dtype=torch.uint8, device=device) for size in sizes]
    started = time.perf_counter()
    peak, held = measured_bytes(lambda: inference.predict(passes, inputs, SOURCE_SIZE, autocast), device)
    seconds = time.perf_counter() - started
    made = lambda: [torch.empty(batch, 3, *size, dtype=torch.uint8, device=device) for size in sizes]  # noqa: E731
    estimate = memory.peak_bytes(lambda: inference.predict(passes, made(), SOURCE_SIZE, autocast))
    queue.put((estimate - sum(x.nbytes for x in inputs), peak, held, seconds))  # the measured inputs existed before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", choices=ARCHITECTURES, default="vits16", help="size (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    precision = cli.precision_for(None, torch.device(args.device))
    print(f"{args.backbone} frozen, seed pixel head, half resolution of 1920x1080, {precision}, {args.device}")
    print(f"{'batch':>5} {'passes':<22} {'estimate':>10} {'measured':>10} {'estimate/measured':>18} {'s':>6}")
    context = multiprocessing.get_context("spawn")
    for batch, scales, flip in SETTINGS:
        queue = context.Queue()
        process = context.Process(target=measure, args=(args.backbone, args.device, (batch, scales, flip), queue))
        process.start()
        estimate, peak, held, seconds = queue.get()
        process.join()
        described = f"{len(scales) * (1 + flip)}: {' '.join(map(str, scales))}{' +flip' if flip else ''}"
        print(
            f"{batch:>5} {described:<22} {memory.gib(estimate):>10} {memory.gib(peak):>10} "
            f"{estimate / peak:>18.2f} {seconds:>6.1f}"
            + (f"   (reserved {memory.gib(held)})" if args.device == "cuda" else "")
        )


if __name__ == "__main__":
    main()
