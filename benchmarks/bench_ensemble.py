"""Cost of ensembles and multi-scale test-time augmentation per 1080p frame: time and peak memory as a function of
members x scales (x flip), through run_inference.predict.

    python benchmarks/bench_ensemble.py [--members 1,2,3] [--scales 1 / 0.75,1,1.25] [--device cpu|cuda]

Each configuration runs in its own spawned process, so its peak memory (resident set on the CPU, allocated tensors
on a GPU) is its own. Members are tiny random DINOv3s with the seed's pixel head at half resolution (on the CPU a
real ViT-B would take minutes a frame): the model part of the time is not a real one, but the per-pass work that
does not depend on the backbone (scaling, upsampling 10 logit maps to 1920x1080, softmax, averaging) is, and the
memory of the averaging is what a real ensemble holds besides its models.
"""

import argparse
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import cli  # noqa: E402
import dataset  # noqa: E402
import inference  # noqa: E402
from make_tiny_backbone import save_tiny_backbone  # noqa: E402
from model import build_model  # noqa: E402

SOURCE_SIZE = (1080, 1920)
CONFIG = {"resolution": {"scale": 0.5}}


def peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(backbone: str, members: int, scales: list[float], flip: bool, batch: int, repeats: int, device: str, queue):
    device = torch.device(device)
    torch.manual_seed(0)
    models = [(build_model(backbone, backbone_training="frozen").eval().to(device), CONFIG) for _ in range(members)]
    sizes, passes = inference.inference_passes(models, SOURCE_SIZE, "flip" if flip else "none", scales)
    frame = torch.randint(0, 256, (*SOURCE_SIZE, 3), dtype=torch.uint8).numpy()
    inputs = [
        torch.from_numpy(dataset.scale_image(frame, size)).permute(2, 0, 1)[None].repeat(batch, 1, 1, 1).to(device)
        for size in sizes
    ]
    autocast = cli.autocast_for("fp32", device)
    before = peak_mb(device)  # models and inputs
    inference.predict(passes, inputs, SOURCE_SIZE, autocast)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        inference.predict(passes, inputs, SOURCE_SIZE, autocast)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    queue.put(((time.perf_counter() - started) / repeats / batch, len(passes), before, peak_mb(device)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", default="1,2,3", help="ensemble sizes (default: %(default)s)")
    parser.add_argument(
        "--scales", nargs="+", default=["1", "0.75,1,1.25"], help="scale lists (default: 1 and 0.75,1,1.25)"
    )
    parser.add_argument("--batch-size", type=int, default=2, help="(default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per configuration (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        backbone = str(Path(folder) / "tiny-dinov3")
        save_tiny_backbone(Path(backbone))
        print(
            f"per 1920x1080 frame, batch {args.batch_size}, {args.device}, tiny random DINOv3 members at half "
            "resolution (NOT a real backbone's time)"
        )
        print(
            f"{'members':>8}{'scales':>16}{'flip':>6}{'passes':>8}{'s/frame':>10}{'x 1 pass':>10}"
            f"{'peak MB':>10}{'+ predict MB':>14}"
        )
        single = None
        for members in map(int, args.members.split(",")):
            for scales in args.scales:
                for flip in (False, True):
                    queue = context.Queue()
                    process = context.Process(
                        target=measure,
                        args=(
                            backbone,
                            members,
                            [float(s) for s in scales.split(",")],
                            flip,
                            args.batch_size,
                            args.repeats,
                            args.device,
                            queue,
                        ),
                    )
                    process.start()
                    seconds, passes, before, peak = queue.get()
                    process.join()
                    single = single or seconds
                    print(
                        f"{members:>8}{scales:>16}{'yes' if flip else 'no':>6}{passes:>8}{seconds:>10.3f}"
                        f"{seconds / single:>10.2f}{peak:>10.0f}{peak - before:>14.0f}"
                    )
    probabilities_mb = args.batch_size * dataset.NUM_CLASSES * SOURCE_SIZE[0] * SOURCE_SIZE[1] * 4 / 2**20
    print(
        f"one batch of source-size probabilities is {probabilities_mb:.0f} MB; predict holds at most two (the running "
        "sum and the current pass), whatever the number of members and scales"
    )


if __name__ == "__main__":
    main()
