"""Train and score a grid of configurations (backbone x backbone training x head x loss x resolution, LoRA rank for
LoRA runs), each with one or more seeds and label budgets (training operations).

    python benchmarks/ablate.py --data-directory sarrarp --backbones vitl16 --backbone-trainings frozen,lora,full \
        --lora-ranks 8,16 --resolutions half,quarter --heads mlp --losses ce --max-steps 2000
    python benchmarks/ablate.py --backbones vitb16 --heads mlp --losses ce --seeds 0,1,2 \
        --train-video-counts 1,2,4,8,all      # a label-efficiency study: mean +- std over seeds per budget
    python benchmarks/ablate.py --demo      # demo data + a tiny random backbone: plumbing, a few CPU minutes

Each configuration runs run_training.py, then run_inference.py --split val --checkpoint last (the weights at the
fixed budget, not chosen on the data they are scored on), as subprocesses, as a user would: peak memory is then
each configuration's own. Runs go to OUTPUT/<backbone>_<mode>_<head>_<loss>_<resolution>/ (mode: frozen, full or
lora-r<rank>; then _n<N> for a budget of N training operations, _seed<S> with --seeds) with train.log and
inference.log; a configuration already scored is reused, an interrupted one resumed. --recipe FILE passes --config
FILE, and arguments after -- are passed, to every run_training.py call. Writes OUTPUT/ablation.csv and
OUTPUT/ablation.md (with the mean +- std over seeds of each configuration), and with several budgets
OUTPUT/label_efficiency.png.
"""

import argparse
import contextlib
import csv
import io
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import plots  # noqa: E402
import run_training  # noqa: E402
from dataset import CLASS_NAMES, THIN_CLASSES, operation_name  # noqa: E402
from files import write_json_atomically  # noqa: E402
from hub import BACKBONES, DEFAULT_BACKBONE  # noqa: E402
from model import BACKBONE_TRAINING  # noqa: E402

SETTINGS_FILE = "ablation_settings.json"  # in each configuration's folder: the settings its results were made with
DEMO_BANNER = "**demo data + tiny random backbone: these numbers show plumbing, not truth**"
DEMO_TRAINING = ["--batch-size", "4", "--warmup-steps", "2", "--lr", "1e-3", "--head-lr", "3e-3"]


def comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def seed_list(text: str) -> list[int]:
    try:
        return list(dict.fromkeys(int(part) for part in comma_list(text)))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 0,1,2") from None


def budget_list(text: str) -> list[str]:
    """Numbers of training operations, each at least 1, or all."""
    budgets = list(dict.fromkeys(comma_list(text)))
    if not budgets or not all(b == "all" or (b.isdigit() and int(b) >= 1) for b in budgets):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give numbers of training operations (at least 1) or all, e.g. 1,2,all"
        )
    return budgets


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data-directory", default="sarrarp", help="unpacked release with extracted frames (default: %(default)s)"
    )
    parser.add_argument(
        "--backbones",
        type=comma_list,
        help=f"short names ({', '.join(BACKBONES)}), hub ids or local directories (default: {DEFAULT_BACKBONE})",
    )
    parser.add_argument("--backbone", help="a single backbone: the same as --backbones with one value")
    parser.add_argument(
        "--backbone-trainings",
        type=comma_list,
        default=["lora"],
        help=f"of {', '.join(BACKBONE_TRAINING)}; the LoRA ranks apply to lora only (default: lora)",
    )
    parser.add_argument("--output-directory", default="ablation", help="(default: %(default)s)")
    parser.add_argument("--heads", type=comma_list, default=["mlp", "multilayer"], help="(default: mlp,multilayer)")
    parser.add_argument("--losses", type=comma_list, default=["ce", "ce+dice"], help="(default: ce,ce+dice)")
    parser.add_argument("--resolutions", type=comma_list, help="(default: half; full with --demo)")
    parser.add_argument("--lora-ranks", type=comma_list, default=["16"], help="(default: 16)")
    parser.add_argument(
        "--recipe",
        metavar="FILE",
        help="run_training.py --config FILE for every run (flags of the grid override it), e.g. recipes/seed.yaml",
    )
    parser.add_argument(
        "--max-steps", type=int, help="training steps of every configuration (default: 2000; 30 with --demo)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="the seed of every run without --seeds (default: %(default)s)"
    )
    parser.add_argument(
        "--seeds", type=seed_list, help="run every configuration once per seed, e.g. 0,1,2 (folders get _seed<S>)"
    )
    parser.add_argument(
        "--train-video-counts",
        type=budget_list,
        default=["all"],
        help="label budgets: train on N of the training operations (run_training.py --train-videos N), e.g. "
        "1,2,4,8,all (default: all)",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="data loader processes of training and inference (default: %(default)s)",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="build demo data and a tiny random backbone in OUTPUT/demo-data and ablate on them "
        "(the tiny backbone is then the only backbone)",
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.training_extra = argv[split + 1 :]
    unknown = [t for t in args.backbone_trainings if t not in BACKBONE_TRAINING]
    if unknown:
        parser.error(f"unknown backbone trainings {unknown}: choose from {','.join(BACKBONE_TRAINING)}")
    if args.backbones and args.backbone:
        parser.error("give --backbones or --backbone, not both")
    if args.demo and (args.backbones or args.backbone):
        parser.error("--demo makes and uses its own tiny backbone: drop --backbone/--backbones")
    args.backbones = args.backbones or [args.backbone or DEFAULT_BACKBONE]
    args.resolutions = args.resolutions or (["full"] if args.demo else ["half"])
    args.max_steps = args.max_steps or (30 if args.demo else 2000)
    return args


def backbone_label(backbone: str) -> str:
    """A folder-name label: the short name of a released DINOv3 (given short or as its hub id), else the last part
    of the hub id or path."""
    short_names = {hub_id: name for name, hub_id in BACKBONES.items()}
    label = backbone if backbone in BACKBONES else short_names.get(backbone) or Path(backbone.rstrip("/\\")).name
    return re.sub(r"[^A-Za-z0-9.-]+", "-", label)


def mode_label(config: dict) -> str:
    return f"lora-r{config['lora_rank']}" if config["backbone_training"] == "lora" else config["backbone_training"]


def configuration_name(config: dict, with_seed: bool = True) -> str:
    """e.g. vitl16_lora-r8_mlp_ce_half, then _n4 for a budget of 4 training operations and _seed1 for --seeds' 1;
    with_seed=False: the name of the runs that only their seed tells apart."""
    parts = [config["backbone_label"], mode_label(config), config["head"], config["loss"].replace("+", "-")]
    parts += [config["resolution"], *([f"n{config['train_videos']}"] if config.get("train_videos") else [])]
    seed = config.get("seed")
    return "_".join(parts + ([f"seed{seed}"] if with_seed and seed is not None else []))


def repeated(grid: list[dict], seeds: list[int] | None, budgets: list[str]) -> list[dict]:
    """Every configuration of the grid once per label budget (None: all operations) and seed (None: --seed)."""
    return [
        {**config, "train_videos": None if budget == "all" else int(budget), "seed": seed}
        for config in grid
        for budget in budgets
        for seed in seeds or [None]
    ]


def expand_grid(backbones, trainings, lora_ranks, heads, losses, resolutions) -> list[dict]:
    """Every configuration once: a LoRA run per rank, frozen and full runs once (a rank means nothing to them).
    Raises ValueError if two backbones would share a folder label."""
    labels = {backbone: backbone_label(backbone) for backbone in dict.fromkeys(backbones)}
    if len(set(labels.values())) < len(labels):
        raise ValueError(
            f"backbones {list(labels)} do not have distinct folder labels ({list(labels.values())}): "
            "give directories with distinct names"
        )
    unique = lambda values: list(dict.fromkeys(values))  # noqa: E731
    modes = [
        (training, rank)
        for training in unique(trainings)
        for rank in (unique(lora_ranks) if training == "lora" else [None])
    ]
    return [
        {
            "backbone": backbone,
            "backbone_label": labels[backbone],
            "backbone_training": training,
            "lora_rank": rank,
            "head": head,
            "loss": loss,
            "resolution": resolution,
        }
        for backbone, (training, rank), head, loss, resolution in itertools.product(
            labels, modes, unique(heads), unique(losses), unique(resolutions)
        )
    ]


def run_logged(command: list, log_path: Path) -> bool:
    """Run a project script with its output in log_path; True if it succeeded."""
    with open(log_path, "a") as log:
        return (
            subprocess.run([sys.executable, *map(str, command)], stdout=log, stderr=subprocess.STDOUT).returncode == 0
        )


def build_demo_inputs(directory: Path) -> tuple[Path, Path]:
    """(data directory, backbone directory) of a small demo release and a tiny random DINOv3, made once."""
    data, backbone = directory / "sarrarp", directory / "tiny-dinov3"
    directory.mkdir(parents=True, exist_ok=True)
    if not (data / "train").is_dir():
        steps = [
            [ROOT / "scripts" / "make_demo_data.py", "--output", data, *"--seconds 4 --width 128 --height 96".split()],
            [ROOT / "scripts" / "extract_frames.py", data, "--jobs", "2"],
        ]
        if not all(run_logged(step, directory / "make_demo.log") for step in steps):
            sys.exit(f"error: building the demo data failed; see {directory / 'make_demo.log'}")
    if not (backbone / "config.json").is_file():
        if not run_logged(
            [ROOT / "scripts" / "make_tiny_backbone.py", "--output", backbone], directory / "make_demo.log"
        ):
            sys.exit(f"error: making the tiny backbone failed; see {directory / 'make_demo.log'}")
    return data, backbone


def training_command(args, config: dict, run: Path) -> list:
    """run_training.py and its arguments for one configuration: the recipe first, so the grid's flags override it."""
    lora = config["backbone_training"] == "lora"
    return [
        ROOT / "run_training.py",
        *(["--config", args.recipe] if args.recipe else []),
        "--data-directory",
        args.data_directory,
        "--output-directory",
        run,
        "--backbone",
        config["backbone"],
        "--backbone-training",
        config["backbone_training"],
        *(["--lora-rank", config["lora_rank"]] if lora else []),
        "--head",
        config["head"],
        "--loss",
        config["loss"],
        "--resolution",
        config["resolution"],
        "--max-steps",
        args.max_steps,
        "--seed",
        args.seed if config.get("seed") is None else config["seed"],
        *(["--train-videos", config["train_videos"]] if config.get("train_videos") else []),
        *(["--split-seed", args.seed] if config.get("seed") is not None else []),  # every seed, the same validation
        "--num-workers",
        args.num_workers,
        "--val-every",
        args.max_steps,
        *(DEMO_TRAINING if args.demo else []),
        *args.training_extra,
        *(["--resume"] if (run / "checkpoint.pt").is_file() else []),
    ]


def inference_command(args, config: dict, run: Path) -> list:
    return [
        ROOT / "run_inference.py",
        "--data-directory",
        args.data_directory,
        "--model-directory",
        run,
        *"--split val --checkpoint last --num-workers".split(),
        args.num_workers,
        "--backbone",
        config["backbone"],
    ]


def run_settings(args, config: dict, run: Path) -> dict:
    """What a configuration's results depend on: the training settings its command resolves to (a recipe's contents,
    not its path: an edited recipe is a change), and its inference command; neither --resume nor the worker count."""
    tokens = [str(token) for token in training_command(args, config, run)[1:]]
    with contextlib.redirect_stderr(io.StringIO()):  # its notes are printed when the run starts
        resolved = vars(run_training.parse_args(tokens))
    ignored = ("config", "resume", "num_workers", "output_directory")
    inference = [str(token) for token in inference_command(args, config, run) if token != "--resume"]
    return {
        "training": {f"--{k.replace('_', '-')}": v for k, v in resolved.items() if k not in ignored},
        "inference": {flag: value for flag, value in flags(inference).items() if flag != "--num-workers"},
    }


def flags(tokens: list[str]) -> dict:
    """{"--flag": "its values"} of a command (the script itself under "")."""
    parsed, key = {}, ""
    for token in tokens:
        if token.startswith("--"):
            key = token
            parsed.setdefault(key, "")
        else:
            parsed[key] = f"{parsed.get(key, '')} {token}".strip()
    return parsed


def settings_change(run: Path, settings: dict) -> str | None:
    """None if run/ is new or was made with these settings; else what differs."""
    if not run.exists():
        return None
    try:
        recorded = json.loads((run / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return "settings unknown (made by an earlier version, or the record is damaged)"
    if recorded == settings:
        return None
    changes = [
        f"{flag} {old.get(flag, '(none)')} -> {new.get(flag, '(none)')}"
        for part in ("training", "inference")
        for old, new in [(recorded.get(part, {}), settings[part])]
        for flag in dict.fromkeys([*old, *new])
        if old.get(flag) != new.get(flag)
    ]
    return "; ".join(dict.fromkeys(changes))


def run_configuration(args, config: dict, run: Path) -> str:
    """Train and score one configuration in run/; 'ok', or what failed."""
    if (run / "inference" / "metrics.json").is_file():
        return "ok"
    run.mkdir(parents=True, exist_ok=True)
    write_json_atomically(run / SETTINGS_FILE, run_settings(args, config, run))
    if not run_logged(training_command(args, config, run), run / "train.log"):
        return f"training failed (see {run / 'train.log'})"
    if not run_logged(inference_command(args, config, run), run / "inference.log"):
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
    row.update(
        score=scores["score"],
        mIoU=scores["mIoU"],
        mNSD=scores["mNSD"],
        images_per_second=logged[-1]["images_per_second"],
        seconds_per_step=images_per_step / logged[-1]["images_per_second"],
        peak_memory_mb=max(r["peak_memory_mb"] for r in logged),
        memory_of=training["device"],
        trainable_parameters=training["parameters"]["trainable"],
    )
    row.update(background_only_score=scores["background_only"]["score"])
    split = json.loads((run / "split.json").read_text())
    row.update(training_operations=len({operation_name(video) for video in split["train"]}))
    for name, values in scores["classes"].items():
        row[f"{name} IoU"], row[f"{name} NSD"] = values["IoU"], values["NSD"]
        row[f"{name} ground_truth_frames"] = values["ground_truth_frames"]
    return row


def over_seeds(rows: list[dict]) -> list[dict]:
    """Each configuration's scored runs that only their seed tells apart: how many, their training operations, and
    the mean and sample standard deviation of score, mIoU and mNSD; every row also gets its configuration's."""
    groups = {}
    for row in rows:
        if row["status"] == "ok":
            groups.setdefault(configuration_name(row, with_seed=False), []).append(row)
    summaries = []
    for name, runs in groups.items():
        summary = {"configuration": name, "seeds": len(runs), "training_operations": runs[0]["training_operations"]}
        summary["curve"] = configuration_name({**runs[0], "train_videos": None}, with_seed=False)  # every budget
        summary.update(
            {key: runs[0][key] for key in ("backbone_label", "backbone_training", "lora_rank", "train_videos")}
        )
        for metric in ("score", "mIoU", "mNSD"):
            values = np.array([run[metric] for run in runs])
            summary[f"{metric}_mean"] = float(values.mean())
            summary[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        for run in runs:
            run.update({f"{key}_over_seeds": summary[key] for key in ("score_mean", "score_std")}, seeds=len(runs))
        summaries.append(summary)
    return summaries


def seed_lines(summaries: list[dict]) -> list[str]:
    """ablation.md's table of each configuration over its seeds, when some configuration has more than one."""
    if all(summary["seeds"] == 1 for summary in summaries):
        return []
    lines = [
        "",
        "Over seeds (mean ± sample std of the runs that differ only by their seed):",
        "",
        "| configuration | seeds | training operations | score | mIoU | mNSD |",
        "|---|---|---|---|---|---|",
    ]
    for s in summaries:
        spread = [f"{s[metric + '_mean']:.4f} ± {s[metric + '_std']:.4f}" for metric in ("score", "mIoU", "mNSD")]
        lines.append(f"| {s['configuration']} | {s['seeds']} | {s['training_operations']} | {' | '.join(spread)} |")
    return lines


def baseline_lines(scored: list[dict]) -> list[str]:
    """The background-everywhere row of the summary table, when every configuration was scored on the same frames."""
    floors = {row["background_only_score"] for row in scored}
    if len(floors) != 1:
        return []
    return [f"| background everywhere (predicting nothing) | | | {floors.pop():.4f} |" + " |" * 8]


def write_tables(rows: list[dict], args, output: Path) -> str:
    """ablation.csv (every column) and ablation.md (summary table, over seeds, per-class table), and with several
    label budgets label_efficiency.png; returns the markdown."""
    summaries = over_seeds(rows)
    if len({summary["train_videos"] for summary in summaries}) > 1:
        plots.label_efficiency(summaries, output / "label_efficiency.png")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(output / "ablation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    number = lambda value, digits=4: f"{value:.{digits}f}" if isinstance(value, float) else str(value)  # noqa: E731
    scored = [row for row in rows if row["status"] == "ok"]
    lines = ["# Ablation", ""]
    if args.demo:
        lines += [DEMO_BANNER, ""]
    lines += [
        f"data `{args.data_directory}`, {args.max_steps} steps, seeds {','.join(map(str, args.seeds or [args.seed]))}, "
        f"training operations {','.join(args.train_video_counts)}, recipe `{args.recipe or 'none'}`, "
        f"extra training arguments `{' '.join(args.training_extra) or 'none'}`; "
        "scored with run_inference.py --split val --checkpoint last (official SAR-RARP50 metric).",
        "",
        "| configuration | backbone | mode | score | mIoU | mNSD | thread* IoU/NSD | needle* IoU/NSD | s/step | images/s "
        "| peak MB | trainable params |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        described = f"| {row['configuration']} | {row['backbone_label']} | {mode_label(row)} |"
        if row["status"] != "ok":
            lines.append(f"{described} {row['status']} |" + " |" * 8)
            continue
        below = " (below background)" if row["score"] < row["background_only_score"] else ""
        lines.append(
            f"{described} {number(row['score'])}{below} | {number(row['mIoU'])} | {number(row['mNSD'])} | "
            f"{row['thread IoU']:.3f}/{row['thread NSD']:.3f} | "
            f"{row['suturing needle IoU']:.3f}/{row['suturing needle NSD']:.3f} | {row['seconds_per_step']:.3f} | "
            f"{row['images_per_second']:.2f} | {row['peak_memory_mb']:.0f} | {row['trainable_parameters']:,} |"
        )
    devices = sorted({row["memory_of"] for row in scored})
    absent = [name for name in CLASS_NAMES[1:] if scored and all(r[f"{name} ground_truth_frames"] == 0 for r in scored)]
    lines += [
        *baseline_lines(scored),
        *seed_lines(summaries),
        "",
        "peak MB: "
        + (
            "torch.cuda.max_memory_allocated"
            if devices == ["cuda"]
            else "the training process's peak resident set (CPU run)"
            if devices == ["cpu"]
            else "GPU runs: torch.cuda.max_memory_allocated; CPU runs: peak resident set"
        )
        + "; s/step and images/s: training time only (validation and saving excluded); * thin classes.",
        "",
        "Per class (IoU/NSD):" + (f" {plots.ABSENT_NOTE}." if absent else ""),
        "",
        "| configuration | "
        + " | ".join(
            name + ("*" if name in THIN_CLASSES else "") + (f" {plots.ABSENT_MARK}" if name in absent else "")
            for name in CLASS_NAMES[1:]
        )
        + " |",
        "|---|" + "---|" * (len(CLASS_NAMES) - 1),
    ]
    for row in scored:
        lines.append(
            f"| {row['configuration']} | "
            + " | ".join(f"{row[f'{name} IoU']:.3f}/{row[f'{name} NSD']:.3f}" for name in CLASS_NAMES[1:])
            + " |"
        )
    markdown = "\n".join(lines) + "\n"
    (output / "ablation.md").write_text(markdown)
    return markdown


def main(argv=None) -> int:
    args = parse_args(argv)
    output = Path(args.output_directory)
    output.mkdir(parents=True, exist_ok=True)
    if args.demo:
        args.data_directory, backbone = build_demo_inputs(output / "demo-data")
        args.backbones = [str(backbone)]
    try:
        grid = expand_grid(
            args.backbones, args.backbone_trainings, args.lora_ranks, args.heads, args.losses, args.resolutions
        )
        grid = repeated(grid, args.seeds, args.train_video_counts)
    except ValueError as error:
        sys.exit(f"error: {error}")
    runs = {
        configuration_name(config): run_settings(args, config, output / configuration_name(config)) for config in grid
    }
    stale = {name: change for name, settings in runs.items() if (change := settings_change(output / name, settings))}
    if stale:  # old scores are never shown under new settings
        name, change = next(iter(stale.items()))
        others = f" and {len(stale) - 1} more configurations were" if len(stale) > 1 else " was"
        sys.exit(
            f"error: {output / name}{others} made with other settings ({change}): choose another "
            "--output-directory, or delete them to redo them"
        )
    rows = []
    for k, config in enumerate(grid, 1):
        run = output / configuration_name(config)
        print(f"[{k}/{len(grid)}] {run.name} ...", flush=True)
        status = run_configuration(args, config, run)
        rows.append(result_row(config, run, status))
        print(
            f"[{k}/{len(grid)}] {run.name}: " + (f"score {rows[-1]['score']:.4f}" if status == "ok" else status),
            flush=True,
        )
    print(write_tables(rows, args, output))
    print(f"tables: {output / 'ablation.md'}, {output / 'ablation.csv'}")
    return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
