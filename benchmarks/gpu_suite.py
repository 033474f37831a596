"""The GPU measurements, in one command that fits a short GPU window: the most valuable figures first, and
results.json and results.md rewritten after every measurement, so that a run cut off (by --budget-s, or killed)
still leaves everything measured so far.

    python benchmarks/gpu_suite.py                          # on a GPU: ~7 minutes, into gpu-results/
    python benchmarks/gpu_suite.py --budget-s 300 --output DIR
    python benchmarks/gpu_suite.py --device cpu --tiny      # the same code paths in under a minute (the tests run it)

In order of value (random-init, real-size DINOv3 ViTs; --tiny: a 2-layer ViT of width 64 on small frames):
  1. the baseline's recipe (ViT-L/16, LoRA r8 on every linear layer, pixel MLP head, half resolution, batch 6):
     fp32 with TF32 off and on, and bf16, each without and with --gradient-checkpointing;
  2. training steps, bf16: ViT-L, ViT-B and ViT-S in LoRA, full and frozen mode, without and with checkpointing,
     at half (batch 8) and full resolution (batch 4);
  3. validation's peak memory at full resolution (ViT-L, batch 4);
  4. inference frames/s at a 1920x1080 source through inference.segment_frames (ViT-L LoRA, half resolution);
  5. run_inference.py --input's video path on a 1080p60 H.264 video (ViT-B, decoding, the model, overlay, encoding);
  6. training samples/s of one loader worker from 1080p PNGs, on this machine's cores;
  7. ViT-7B/16 frozen with bf16 weights, if time remains.
A training row gives images/s, the peak memory beyond the weights (torch.cuda.max_memory_allocated; on the CPU,
none), the estimate run_training.py prints before its first step (memory.py, fake tensors) and their ratio, and MFU:
the step's FLOPs (torch.utils.flop_counter) per second over the GPU's dense bf16 peak. torch.compile rows come with
run_training.py --compile.
"""

import argparse
import datetime
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import DINOv3ViTConfig, DINOv3ViTModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_loader  # noqa: E402
import bench_train_step  # noqa: E402
import cli  # noqa: E402
import dataset  # noqa: E402
import discovery  # noqa: E402
import files  # noqa: E402
import inference  # noqa: E402
import losses  # noqa: E402
import memory  # noqa: E402
from backbone_files import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from model import ALL_LINEAR, LoRA, SegmentationModel  # noqa: E402

GB = 1e9
# Dense bf16 tensor throughput by device name (the vendors' figures, no sparsity): MFU's denominator
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}
PEAK_BF16_FLOPS |= {"4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}
SEED_LORA = LoRA(rank=8, alpha=8, dropout=0.1, target_modules=[ALL_LINEAR])


def train_plan(tiny: bool) -> list[dict]:
    """The training rows in order of value."""
    models = ["tiny"] if tiny else ["vitl16", "vitb16", "vits16"]
    seed = [
        dict(model=models[0], mode="lora", lora=SEED_LORA, batch=2 if tiny else 6, resolution="half", **setting)
        for setting in (
            dict(precision="fp32", tf32=False, checkpointing=False),
            dict(precision="fp32", tf32=True, checkpointing=False),
            dict(precision="bf16", tf32=True, checkpointing=False),
            dict(precision="fp32", tf32=False, checkpointing=True),
            dict(precision="fp32", tf32=True, checkpointing=True),
            dict(precision="bf16", tf32=True, checkpointing=True),
        )[: 2 if tiny else None]
    ]
    grid = [
        dict(model=name, mode=mode, lora=LoRA(), batch=batch, resolution=resolution, precision="bf16", tf32=True,
             checkpointing=checkpointing)
        for resolution, batch in (("half", 8), ("full", 4))[: 1 if tiny else None]
        for name in models
        for mode in ("lora", "full", "frozen")
        for checkpointing in ((False,) if mode == "frozen" else (False, True))
    ]  # fmt: skip
    return [{"kind": "train", "group": "baseline recipe", **s} for s in seed] + [
        {"kind": "train", "group": "training grid", **s} for s in grid[: 2 if tiny else None]
    ]


def plan(tiny: bool) -> list[dict]:
    """Every measurement, most valuable first."""
    large = "tiny" if tiny else "vitl16"
    later = [
        {"kind": "validate", "group": "validation", "model": large, "batch": 4, "resolution": "full"},
        {"kind": "infer", "group": "inference", "model": large, "batch": 2 if tiny else 8},
        {"kind": "video", "group": "video", "model": "tiny" if tiny else "vitb16", "frames": 8 if tiny else 240},
        {"kind": "loader", "group": "loader", "frames": 4 if tiny else 24},
    ]
    huge = [] if tiny else [dict(kind="train", group="ViT-7B", model="vit7b16", mode="frozen", dtype="bfloat16",
                                 lora=LoRA(), batch=8, resolution="half", precision="bf16", tf32=True,
                                 checkpointing=False)]  # fmt: skip
    return train_plan(tiny) + later + huge


# ----------------------------------------------------------------------------- the model and one step


def make_model(spec: dict, device, tiny: bool) -> SegmentationModel:
    dtype = spec.get("dtype", "float32")
    if spec["model"] == "tiny":
        config = DINOv3ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
        config._attn_implementation = "sdpa"
        with torch.device(device):
            backbone = DINOv3ViTModel(config)
    else:
        backbone = bench_train_step.make_backbone(spec["model"], dtype, device=device)
    settings = dict(lora=spec.get("lora"), head={"type": "mlp"}, gradient_checkpointing=spec.get("checkpointing"))
    model = SegmentationModel(backbone, IMAGENET_MEAN, IMAGENET_STD, spec.get("mode", "frozen"), **settings)
    return model.to(device)


def source_size(tiny: bool) -> tuple[int, int]:
    return (144, 256) if tiny else (1080, 1920)


def make_batch(spec: dict, device, tiny: bool, make=torch.randint) -> tuple:
    """(images, masks, class weights, content size) of a training batch at the spec's resolution."""
    source = source_size(tiny)
    content, padded = dataset.training_size(source, dataset.RESOLUTION_SCALES[spec["resolution"]])
    images = make(0, 256, (spec["batch"], 3, *padded), dtype=torch.uint8, device=device)
    masks = make(0, dataset.NUM_CLASSES, (spec["batch"], *source), dtype=torch.long, device=device)
    return images, masks, torch.ones(dataset.NUM_CLASSES, device=device), content


def step_loss(model, batch, autocast, source) -> torch.Tensor:
    images, masks, weights, content = batch
    with autocast():
        return losses.weighted_cross_entropy(model(images, source, content).float(), masks, weights)


def train_step(model, optimizer, batch, autocast, source) -> None:
    step_loss(model, batch, autocast, source).backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def peak_beyond(device, base: int) -> dict:
    """Peak allocated and reserved bytes since the last reset, beyond base (the weights), in GB; none on the CPU."""
    if device.type != "cuda":
        return {}
    return {
        "peak_gb": (torch.cuda.max_memory_allocated(device) - base) / GB,
        "reserved_gb": torch.cuda.max_memory_reserved(device) / GB,
    }


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_flops(device) -> float | None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


# ----------------------------------------------------------------------------- the measurements


def measure_train(spec: dict, device, tiny: bool) -> dict:
    """Images/s, peak memory beyond the weights beside the count run_training.py prints, and MFU."""
    cli.use_tf32(spec["tf32"])
    model = make_model(spec, device, tiny).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast, source = cli.autocast_for(spec["precision"], device), source_size(tiny)
    fake = lambda: step_loss(model, make_batch(spec, device, tiny, fake_tensor), autocast, source)  # noqa: E731
    estimate = memory.training_step_bytes(fake, optimizer)
    batch, base = make_batch(spec, device, tiny), allocated(device)
    reset_peak(device)
    with FlopCounterMode(display=False) as counter:
        train_step(model, optimizer, batch, autocast, source)  # the warm-up, counted
    steps = 1 if tiny else 5
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, batch, autocast, source)
    synchronize(device)
    seconds = (time.perf_counter() - started) / steps
    result = {"seconds_per_step": seconds, "images_per_s": spec["batch"] / seconds, **peak_beyond(device, base)}
    result["estimate_gb"] = estimate / GB
    if "peak_gb" in result:
        result["measured_over_estimate"] = result["peak_gb"] / result["estimate_gb"]
    peak = peak_flops(device)
    result["tflops"] = counter.get_total_flops() / seconds / 1e12
    if peak:
        result["mfu"] = counter.get_total_flops() / seconds / peak
    return result


def fake_tensor(low, high, size, dtype, device):
    """torch.empty in randint's signature: inside memory.peak_bytes, a fake tensor of that shape."""
    return torch.empty(size, dtype=dtype, device=device)


def measure_validate(spec: dict, device, tiny: bool) -> dict:
    """A validation batch at full resolution (no graph): time and peak memory beyond the weights."""
    model = make_model(spec, device, tiny).eval()
    images, _, _, content = make_batch(spec, device, tiny)
    autocast, base = cli.autocast_for(cli.precision_for(None, device), device), allocated(device)
    reset_peak(device)
    with torch.no_grad(), autocast():
        model(images, source_size(tiny), content)  # the warm-up
        synchronize(device)
        started = time.perf_counter()
        model(images, source_size(tiny), content).argmax(1)
        synchronize(device)
    seconds = time.perf_counter() - started
    return {"frames_per_s": spec["batch"] / seconds, **peak_beyond(device, base)}


def lora_model(spec, device, tiny):
    model = make_model({**spec, "mode": "lora", "lora": LoRA()}, device, tiny).eval()
    resolution = {"scale": 0.5, "source_size": list(source_size(tiny))}
    return [(model, {"resolution": resolution, "precision": cli.precision_for(None, device)})]


def measure_infer(spec: dict, device, tiny: bool) -> dict:
    """Frames/s of inference.segment_frames (the release path's passes, without the disk) on source-size frames."""
    members = lora_model(spec, device, tiny)
    frames = np.random.default_rng(0).integers(0, 256, (spec["batch"], *source_size(tiny), 3), dtype=np.uint8)
    inference.segment_frames(members, frames)  # the warm-up
    synchronize(device)
    started = time.perf_counter()
    rounds = 1 if tiny else 3
    for _ in range(rounds):
        inference.segment_frames(members, frames)
    synchronize(device)
    return {"frames_per_s": rounds * spec["batch"] / (time.perf_counter() - started)}


def measure_video(spec: dict, device, tiny: bool) -> dict:
    """run_inference.py --input's path (decode, model, overlay, H.264) on a generated 1080p60 video."""
    try:  # the H.264 encoder comes with imageio-ffmpeg, which a lent GPU machine may lack
        import bench_video
        import video
    except ImportError as error:
        return {"error": f"not measured: {error.name} is not installed here"}
    members = lora_model(spec, device, tiny)
    sizes, passes = inference.inference_passes(members, bench_video.SIZE, "none", [1.0])
    precision = members[0][1]["precision"]
    plan = inference.Plan(device, precision, cli.autocast_for(precision, device), sizes, passes)
    predict = video.frame_predictor(
        SimpleNamespace(temporal_smoothing=0.0, min_component_size=0), plan, bench_video.SIZE
    )
    with tempfile.TemporaryDirectory() as work:
        source = Path(work) / "recording.mp4"
        bench_video.make_video(source, spec["frames"] / bench_video.FPS)
        started = time.perf_counter()
        frames = bench_video.full_path(source, spec["frames"], Path(work) / "overlay.mp4", predict, sizes, 8)
        seconds = time.perf_counter() - started
    return {"frames_per_s": frames / seconds, "real_time": frames / seconds / bench_video.FPS}


def measure_loader(spec: dict, device, tiny: bool) -> dict:
    """Training samples/s of one loader worker (this process, one thread) from 1080p PNGs at half resolution."""
    with tempfile.TemporaryDirectory() as work:
        bench_loader.make_data(Path(work) / "video_01", spec["frames"], raw=False, seed=0)
        samples = discovery.find_samples(discovery.find_video_dirs(Path(work)))
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            data = dataset.SegmentationDataset(samples, bench_loader.SOURCE_SIZE, 0.5, augment=True)
            seconds, _ = bench_loader.one_pass(data, epoch=0)
        finally:
            torch.set_num_threads(torch_threads)
    return {"samples_per_s_per_worker": len(samples) / seconds, "cores": torch_threads}


MEASURE = {
    "train": measure_train,
    "validate": measure_validate,
    "infer": measure_infer,
    "video": measure_video,
    "loader": measure_loader,
}


# ----------------------------------------------------------------------------- the run and its records


def machine(device) -> dict:
    """What the figures were measured on."""
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    info["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info |= {"gpu": properties.name, "memory_gb": properties.total_memory / GB, "cuda": torch.version.cuda}
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            info["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info |= {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    return info


def label(spec: dict) -> str:
    """A measurement's settings in a few words."""
    if spec["kind"] in ("video", "loader"):
        return f"{spec.get('model', '1080p PNGs')}, {spec['frames']} frames of 1920x1080"
    if spec["kind"] != "train":
        return f"{spec['model']}, batch {spec['batch']}, {'full' if spec['kind'] == 'validate' else 'half'} resolution"
    settings = [spec["model"], spec["mode"], spec["precision"], f"batch {spec['batch']}", spec["resolution"]]
    settings += ["TF32" if spec["tf32"] and spec["precision"] == "fp32" else ""]
    settings += ["checkpointing" if spec["checkpointing"] else "", "bf16 weights" if spec.get("dtype") else ""]
    return ", ".join(s for s in settings if s)


COLUMNS = {  # result key: (column, format)
    "images_per_s": ("images/s", "{:.1f}"),
    "frames_per_s": ("frames/s", "{:.1f}"),
    "samples_per_s_per_worker": ("samples/s a worker", "{:.1f}"),
    "seconds_per_step": ("s/step", "{:.3f}"),
    "peak_gb": ("peak GB beyond weights", "{:.2f}"),
    "reserved_gb": ("reserved GB", "{:.2f}"),
    "estimate_gb": ("estimate GB", "{:.2f}"),
    "measured_over_estimate": ("measured / estimate", "{:.2f}"),
    "tflops": ("TFLOP/s", "{:.1f}"),
    "mfu": ("MFU", "{:.1%}"),
    "real_time": ("x real time", "{:.2f}"),
}


def results_markdown(results: dict) -> str:
    """results.md: the machine, then one table per group, in the order measured."""
    info = results["machine"]
    on = info.get("gpu") or f"CPU ({info.get('cpu')}, {info.get('threads')} threads)"
    versions = f"torch {info['torch']}" + (f", CUDA {info['cuda']}, driver {info['driver']}" if info.get("gpu") else "")
    command = f"`python benchmarks/gpu_suite.py {' '.join(results['arguments'])}`".replace(" `", "`")
    lines = [f"# GPU suite: MEASURED on {on}", "", f"{info['date']}; {versions}; {command}; {results['status']}."]
    for group in dict.fromkeys(r["group"] for r in results["measurements"]):
        rows = [r for r in results["measurements"] if r["group"] == group]
        keys = [k for k in COLUMNS if any(k in r for r in rows)]
        note = any("error" in r for r in rows)
        header = ["settings", *(COLUMNS[k][0] for k in keys)] + (["note"] if note else [])
        lines += [
            "",
            f"## {group}",
            "",
            "| " + " | ".join(header) + " |",
            "|---|" + "---:|" * len(keys) + "---|" * note,
        ]
        for r in rows:
            cells = [r["settings"], *(COLUMNS[k][1].format(r[k]) if k in r else "" for k in keys)]
            lines.append("| " + " | ".join(cells + ([r.get("error", "")] if note else [])) + " |")
    if results["skipped"]:
        lines += ["", "Not measured (the budget ran out): " + "; ".join(results["skipped"]) + "."]
    return "\n".join(lines) + "\n"


def write(results: dict, output: Path) -> None:
    files.write_json_atomically(output / "results.json", results)
    files.write_bytes_atomically(output / "results.md", results_markdown(results).encode())


def run_one(spec: dict, device, tiny: bool) -> dict:
    """One measurement's row; out of memory is a row too (freed after the except block, whose frame holds it)."""
    row = {"group": spec["group"], "kind": spec["kind"], "settings": label(spec)}
    started, failed = time.perf_counter(), None
    try:
        row |= MEASURE[spec["kind"]](spec, device, tiny)
    except torch.OutOfMemoryError:
        failed = "out of memory"
    if failed:
        row["error"] = failed
    bench_train_step.release(device)
    row["wall_s"] = time.perf_counter() - started
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--budget-s", type=float, default=420, help="stop starting measurements after this (default: %(default)s)"
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny ViT on small frames: every code path in < 1 min")
    parser.add_argument("--output", type=Path, default=Path("gpu-results"), help="where results.json and results.md go")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --device cpu --tiny to check the code paths")
    device, started = torch.device(args.device), time.perf_counter()
    args.output.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(device), "arguments": sys.argv[1:] if argv is None else list(argv)}
    results |= {"status": "running", "measurements": [], "skipped": []}
    last_wall = {}  # kind: how long the last one took, to tell whether the next fits
    for spec in plan(args.tiny):
        elapsed = time.perf_counter() - started
        if elapsed + last_wall.get(spec["kind"], 0) > args.budget_s:
            results["skipped"].append(label(spec) + f" ({spec['group']})")
            continue
        row = run_one(spec, device, args.tiny)
        last_wall[spec["kind"]] = row["wall_s"]
        results["measurements"].append(row)
        write(results, args.output)
        print(f"{time.perf_counter() - started:6.0f} s  {row['group']}: {row['settings']}: "
              + ", ".join(f"{COLUMNS[k][0]} {COLUMNS[k][1].format(v)}" for k, v in row.items() if k in COLUMNS)
              + (f" {row['error']}" if "error" in row else ""), flush=True)  # fmt: skip
    results["status"] = f"finished in {time.perf_counter() - started:.0f} s" + (
        f", {len(results['skipped'])} measurements cut off by --budget-s {args.budget_s:g}"
        if results["skipped"]
        else ""
    )
    write(results, args.output)
    print(f"{results['status']}: {args.output / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
