"""Train and score a grid of configurations (head x loss x resolution x LoRA rank) with one seed and one budget.

    python benchmarks/ablate.py --data-directory sarrarp --backbone facebook/dinov3-vitb16-pretrain-lvd1689m \
        --max-steps 2000 --heads mlp,multilayer --losses ce,ce+dice --resolutions half --lora-ranks 16
    python benchmarks/ablate.py --demo      # demo data + a tiny random backbone: plumbing, a few CPU minutes

Each configuration runs run_training.py, then run_inference.py --split val --checkpoint last (the weights at the
fixed budget, not chosen on the data they are scored on), as subprocesses, as a user would: peak memory is then
each configuration's own. Runs go to OUTPUT/<configuration>/ with train.log and inference.log; a configuration
already scored is reused, an interrupted one resumed. Arguments after -- go to every run_training.py call.
Writes OUTPUT/ablation.csv and OUTPUT/ablation.md.
"""
import argparse
import csv
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dataset import CLASS_NAMES  # noqa: E402

THIN_CLASSES = ("suturing needle", "thread")
DEMO_BANNER = "**demo data + tiny random backbone: these numbers show plumbing, not truth**"
DEMO_TRAINING = ["--batch-size", "4", "--warmup-steps", "2", "--lr", "1e-3", "--head-lr", "3e-3"]


def comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-directory", default="sarrarp", help="unpacked release with extracted frames (default: %(default)s)")
    parser.add_argument("--backbone", help="hub id or local directory (default: run_training.py's)")
    parser.add_argument("--output-directory", default="ablation", help="(default: %(default)s)")
    parser.add_argument("--heads", type=comma_list, default=["mlp", "multilayer"], help="(default: mlp,multilayer)")
    parser.add_argument("--losses", type=comma_list, default=["ce", "ce+dice"], help="(default: ce,ce+dice)")
    parser.add_argument("--resolutions", type=comma_list, help="(default: half; full with --demo)")
    parser.add_argument("--lora-ranks", type=comma_list, default=["16"], help="(default: 16)")
    parser.add_argument("--max-steps", type=int, help="training steps of every configuration (default: 2000; 30 with --demo)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="data loader processes of training and inference (default: %(default)s)")
    parser.add_argument("--demo", action="store_true",
                        help="build demo data and a tiny random backbone in OUTPUT/demo-data and ablate on them")
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.training_extra = argv[split + 1:]
    args.resolutions = args.resolutions or (["full"] if args.demo else ["half"])
    args.max_steps = args.max_steps or (30 if args.demo else 2000)
    return args


def run_logged(command: list, log_path: Path) -> bool:
    """Run a project script with its output in log_path; True if it succeeded."""
    with open(log_path, "a") as log:
        return subprocess.run([sys.executable, *map(str, command)], stdout=log, stderr=subprocess.STDOUT).returncode == 0


def build_demo_inputs(directory: Path) -> tuple[Path, Path]:
    """(data directory, backbone directory) of a small demo release and a tiny random DINOv3, made once."""
    data, backbone = directory / "sarrarp", directory / "tiny-dinov3"
    directory.mkdir(parents=True, exist_ok=True)
    if not (data / "train").is_dir():
        steps = [[ROOT / "scripts" / "make_demo_data.py", "--output", data, "--seconds", "4", "--width", "128", "--height", "96"],
                 [ROOT / "scripts" / "extract_frames.py", data, "--jobs", "2"]]
        if not all(run_logged(step, directory / "make_demo.log") for step in steps):
            sys.exit(f"error: building the demo data failed; see {directory / 'make_demo.log'}")
    if not (backbone / "config.json").is_file():
        if not run_logged([ROOT / "scripts" / "make_tiny_backbone.py", "--output", backbone], directory / "make_demo.log"):
            sys.exit(f"error: making the tiny backbone failed; see {directory / 'make_demo.log'}")
    return data, backbone


def run_configuration(args, config: dict, run: Path) -> str:
    """Train and score one configuration in run/; 'ok', or what failed."""
    scores = run / "inference" / "metrics.json"
    if scores.is_file():
        return "ok"
    training = [ROOT / "run_training.py", "--data-directory", args.data_directory, "--output-directory", run,
                "--head", config["head"], "--loss", config["loss"], "--resolution", config["resolution"],
                "--lora-rank", config["lora_rank"], "--max-steps", args.max_steps, "--seed", args.seed,
                "--num-workers", args.num_workers, "--val-every", args.max_steps,
                *(["--backbone", args.backbone] if args.backbone else []), *(DEMO_TRAINING if args.demo else []),
                *args.training_extra, *(["--resume"] if (run / "checkpoint.pt").is_file() else [])]
    run.mkdir(parents=True, exist_ok=True)
    if not run_logged(training, run / "train.log"):
        return f"training failed (see {run / 'train.log'})"
    inference = [ROOT / "run_inference.py", "--data-directory", args.data_directory, "--model-directory", run,
                 "--split", "val", "--checkpoint", "last", "--num-workers", args.num_workers,
                 *(["--backbone", args.backbone] if args.backbone else [])]
    if not run_logged(inference, run / "inference.log"):
        return f"inference failed (see {run / 'inference.log'})"
    return "ok"


def result_row(config: dict, run: Path, status: str) -> dict:
    """One table row: the configuration, its official scores per class, speed and memory."""
    row = {"configuration": run.name, **config, "status": status}
    if status != "ok":
        return row
    scores = json.loads((run / "inference" / "metrics.json").read_text())
    training = json.loads((run / "config.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    logged = [r for r in records if "images_per_second" in r]
    arguments = training["arguments"]
    images_per_step = arguments["batch_size"] * arguments["grad_accum_steps"] * training["world_size"]
    row.update(score=scores["score"], mIoU=scores["mIoU"], mNSD=scores["mNSD"],
               images_per_second=logged[-1]["images_per_second"],
               seconds_per_step=images_per_step / logged[-1]["images_per_second"],
               peak_memory_mb=max(r["peak_memory_mb"] for r in logged), memory_of=training["device"],
               trainable_parameters=training["parameters"]["trainable"])
    for name, values in scores["classes"].items():
        row[f"{name} IoU"], row[f"{name} NSD"] = values["IoU"], values["NSD"]
    return row


def write_tables(rows: list[dict], args, output: Path) -> str:
    """ablation.csv (every column) and ablation.md (summary table + per-class table); returns the markdown."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(output / "ablation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    number = lambda value, digits=4: f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    scored = [row for row in rows if row["status"] == "ok"]
    lines = ["# Ablation", ""]
    if args.demo:
        lines += [DEMO_BANNER, ""]
    lines += [f"data `{args.data_directory}`, backbone `{args.backbone or 'run_training.py default'}`, "
              f"{args.max_steps} steps, seed {args.seed}, extra training arguments `{' '.join(args.training_extra) or 'none'}`; "
              "scored with run_inference.py --split val --checkpoint last (official SAR-RARP50 metric).", "",
              "| configuration | score | mIoU | mNSD | thread* IoU/NSD | needle* IoU/NSD | s/step | images/s | peak MB | trainable params |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['configuration']} | {row['status']} |" + " |" * 8)
            continue
        lines.append(f"| {row['configuration']} | {number(row['score'])} | {number(row['mIoU'])} | {number(row['mNSD'])} | "
                     f"{row['thread IoU']:.3f}/{row['thread NSD']:.3f} | "
                     f"{row['suturing needle IoU']:.3f}/{row['suturing needle NSD']:.3f} | {row['seconds_per_step']:.3f} | "
                     f"{row['images_per_second']:.2f} | {row['peak_memory_mb']:.0f} | {row['trainable_parameters']:,} |")
    devices = sorted({row["memory_of"] for row in scored})
    lines += ["", "peak MB: " + ("torch.cuda.max_memory_allocated" if devices == ["cuda"] else
                                 "the training process's peak resident set (CPU run)" if devices == ["cpu"] else
                                 "GPU runs: torch.cuda.max_memory_allocated; CPU runs: peak resident set")
              + "; s/step and images/s: training time only (validation and saving excluded); * thin classes.", "",
              "Per class (IoU/NSD):", "",
              "| configuration | " + " | ".join(name + ("*" if name in THIN_CLASSES else "") for name in CLASS_NAMES[1:]) + " |",
              "|---|" + "---|" * (len(CLASS_NAMES) - 1)]
    for row in scored:
        lines.append(f"| {row['configuration']} | "
                     + " | ".join(f"{row[f'{name} IoU']:.3f}/{row[f'{name} NSD']:.3f}" for name in CLASS_NAMES[1:]) + " |")
    markdown = "\n".join(lines) + "\n"
    (output / "ablation.md").write_text(markdown)
    return markdown


def main(argv=None) -> int:
    args = parse_args(argv)
    output = Path(args.output_directory)
    output.mkdir(parents=True, exist_ok=True)
    if args.demo:
        args.data_directory, args.backbone = build_demo_inputs(output / "demo-data")
    grid = [dict(zip(("head", "loss", "resolution", "lora_rank"), values))
            for values in itertools.product(args.heads, args.losses, args.resolutions, args.lora_ranks)]
    rows = []
    for k, config in enumerate(grid, 1):
        run = output / f"{config['head']}_{config['loss'].replace('+', '-')}_{config['resolution']}_r{config['lora_rank']}"
        print(f"[{k}/{len(grid)}] {run.name} ...", flush=True)
        status = run_configuration(args, config, run)
        rows.append(result_row(config, run, status))
        print(f"[{k}/{len(grid)}] {run.name}: " + (f"score {rows[-1]['score']:.4f}" if status == "ok" else status), flush=True)
    print(write_tables(rows, args, output))
    print(f"tables: {output / 'ablation.md'}, {output / 'ablation.csv'}")
    return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
