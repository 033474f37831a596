"""Cross-validation by operation: train K folds, then score each fold's model on its own validation videos.

    python scripts/cross_validate.py train --folds 5 --output-directory cv -- --config recipes/seed.yaml
    python scripts/cross_validate.py score cv/fold_* --data-directory sarrarp [--tta flip --tta-scales 0.75 1 1.25]

train: run_training.py --folds K --fold i --output-directory OUT/fold_i for i = 0..K-1, one after another, with the
arguments after -- (the same for every fold, so every fold divides the operations the same way). A finished fold is
skipped and an interrupted one resumed, so after a crash the same command carries on. Under torchrun every fold
trains on every GPU: torchrun --nproc-per-node 4 scripts/cross_validate.py train ...

score: predicts each fold's validation videos with that fold's model (out of fold) into OUT/out_of_fold/ (beside the
folders of fold 0, or --output) and scores them together: the official score over every training video, and each fold's,
with their mean and standard deviation. Writes run_inference.py's outputs (metrics.json, per_class.csv,
per_frame.csv, charts, report.html) there, plus folds.csv and cross_validation.json. Other arguments go to run_inference.py
(--tta, --tta-scales, --min-component-size, --batch-size, ...). It uses each fold's last weights by default: best/
was chosen on the very videos scored here, which flatters the score.
"""

import argparse
import csv
import io
import json
import os
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cli  # noqa: E402
import dataset  # noqa: E402
import files  # noqa: E402
import hub  # noqa: E402
import inference  # noqa: E402
import outputs  # noqa: E402
import report  # noqa: E402
import run_directory  # noqa: E402
import run_inference  # noqa: E402
import run_training  # noqa: E402
from cli import OneLineErrorParser  # noqa: E402
from trained_model import ModelDirectoryError  # noqa: E402

MANAGED_BY_TRAIN = ("--folds", "--fold", "--output-directory", "--resume", "--val-videos", "--val-fraction")
MANAGED_BY_SCORE = (
    "--model-directory",
    "--split",
    "--output",
    "--eval-only",
    "--predictions-directory",
    "--all-frames",
)
RESULT_FILE = "cross_validation.json"


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    train = commands.add_parser("train", help="train every fold (resumable)")
    train.add_argument("--folds", type=int, required=True, metavar="K", help="number of folds (at least 2)")
    train.add_argument(
        "--output-directory", default="cross-validation", help="folds go to OUT/fold_i (default: %(default)s)"
    )
    score = commands.add_parser("score", help="score every fold out of fold")
    score.add_argument("fold_directories", nargs="+", metavar="FOLD", help="the fold folders, e.g. cv/fold_*")
    score.add_argument("--data-directory", default="sarrarp", help="the folds' release (default: %(default)s)")
    score.add_argument(
        "--output", metavar="DIR", help="where the out-of-fold predictions go (default: beside the folds, out_of_fold/)"
    )
    score.add_argument(
        "--checkpoint",
        choices=["best", "last"],
        default="last",
        help="which weights of each fold; best was chosen on the videos scored here (default: %(default)s)",
    )
    args, passed_on = parser.parse_known_args(argv)
    passed_on = [token for token in passed_on if token != "--"]
    managed = [
        token.split("=")[0]
        for token in passed_on
        if token.split("=")[0] in (MANAGED_BY_TRAIN if args.command == "train" else MANAGED_BY_SCORE)
    ]
    if managed:
        parser.error(f"{', '.join(managed)}: set by cross_validate.py {args.command} itself")
    if args.command == "train" and args.folds < 2:
        parser.error(f"--folds must be at least 2, got {args.folds}")
    return args, passed_on


# ----------------------------------------------------------------------------- train


def fold_state(directory: Path, requested=None) -> str:
    """new (nothing to resume), interrupted or finished, from the fold's verified checkpoint; a fold trained with other
    settings than requested (run_training's arguments) is refused, never skipped as finished."""
    checkpoint = directory / "checkpoint.pt"
    if not checkpoint.exists():
        return "new"
    if requested is not None:
        saved = run_directory.read_run_config(directory / "config.json")
        changed = run_directory.changed_settings(saved, requested, int(os.environ.get("WORLD_SIZE", 1)))
        if changed:
            raise run_directory.RunDirectoryError(
                f"{directory} was trained with other settings ({'; '.join(changed)}): give the same settings to go "
                "on with these folds, or another --output-directory"
            )
    return "finished" if run_directory.load_checkpoint(checkpoint)["finished"] else "interrupted"


def train_folds(args, training_arguments: list[str]) -> int:
    output = Path(args.output_directory)
    rank_0 = int(os.environ.get("RANK", 0)) == 0
    for fold in range(args.folds):
        directory = output / f"fold_{fold}"
        argv = [
            *training_arguments,
            *f"--folds {args.folds} --fold {fold}".split(),
            "--output-directory",
            str(directory),
        ]
        state = fold_state(directory, run_training.parse_args(argv))
        if rank_0:
            print(
                f"fold {fold} of {args.folds}: "
                + {"new": "training", "interrupted": "resuming", "finished": "finished, skipped"}[state]
                + f" ({directory})"
            )
        if state == "finished":
            continue
        code = run_training.main(argv + (["--resume"] if state == "interrupted" else []))
        if code != 0:
            print(
                f"error: fold {fold} stopped (see above); run the same command again to carry on: finished folds "
                "are skipped",
                file=sys.stderr,
            )
            return code  # 130 after Ctrl-C
    if rank_0:
        data = shlex.quote(run_training.parse_args(training_arguments).data_directory)
        print(
            f"all {args.folds} folds trained; score them: python scripts/cross_validate.py score "
            f"{shlex.quote(str(output))}/fold_* --data-directory {data}"
        )
    return 0


# ----------------------------------------------------------------------------- score


def read_folds(directories: list[Path]) -> list[tuple[Path, dict]]:
    """(fold folder, its split.json) in fold order, after checking that they are every fold of one division."""
    folds = []
    for directory in directories:
        try:
            split = json.loads((directory / "split.json").read_text())
        except (OSError, ValueError):
            raise dataset.DataError(
                f"{directory} has no readable split.json: pass the fold folders written by "
                "cross_validate.py train (OUT/fold_*)"
            ) from None
        if not isinstance(split, dict) or not {"folds", "fold", "fold_groups", "val"} <= split.keys():
            raise dataset.DataError(f"{directory} was not trained with --folds (its split.json names no fold)")
        if fold_state(directory) != "finished":
            raise dataset.DataError(
                f"{directory} has not finished training: run cross_validate.py train again to finish it, then score"
            )
        folds.append((directory, split))
    check_one_run([directory for directory, _ in folds])
    divisions = {json.dumps([split["folds"], split["fold_groups"]]) for _, split in folds}
    if len(divisions) > 1:
        raise dataset.DataError(
            "the folds come from different divisions of the operations (other --folds or --seed): "
            "give the folds of one cross_validate.py train run"
        )
    count, given = folds[0][1]["folds"], [split["fold"] for _, split in folds]
    repeated = sorted({fold for fold in given if given.count(fold) > 1})
    missing = sorted(set(range(count)) - set(given))
    if repeated or missing:
        raise dataset.DataError(
            f"need each of the {count} folds once: "
            + "; ".join(
                ([f"fold {', '.join(map(str, repeated))} given twice"] if repeated else [])
                + ([f"fold {', '.join(map(str, missing))} missing"] if missing else [])
            )
        )
    return sorted(folds, key=lambda fold: fold[1]["fold"])


def check_one_run(directories: list[Path]) -> None:
    """Refuse folds trained with different settings (other than the fold itself): they are not one experiment."""
    per_fold = ("fold", "output_directory", *run_directory.CHANGEABLE_ON_RESUME)
    settings = [run_directory.read_run_config(d / "config.json")["arguments"] for d in directories]
    for directory, arguments in zip(directories[1:], settings[1:]):
        changed = [
            f"--{k.replace('_', '-')} {settings[0].get(k)} vs {v}"
            for k, v in arguments.items()
            if k not in per_fold and settings[0].get(k) != v
        ]
        if changed:
            raise dataset.DataError(
                f"{directories[0]} and {directory} were trained with other settings ({'; '.join(changed)}): give "
                "the folds of one cross_validate.py train run"
            )


def fold_scores(metrics: dict, videos: list[str]) -> dict:
    """A fold's official score from the per-video means of metrics.json: the mean over (video, class) is the same
    taken over classes first or videos first."""
    miou = float(np.mean([metrics["videos"][video]["mIoU"] for video in videos]))
    mnsd = float(np.mean([metrics["videos"][video]["mNSD"] for video in videos]))
    return {
        "mIoU": miou,
        "mNSD": mnsd,
        "score": float(np.sqrt(miou * mnsd)),
        "frames": sum(metrics["videos"][video]["frames"] for video in videos),
    }


def summarize_folds(folds, metrics: dict, checkpoint: str, ground_truth: Path) -> dict:
    """Per fold and over the folds: the official scores, and that of predicting background everywhere."""
    per_fold = [
        {
            "fold": split["fold"],
            "model_directory": str(directory),
            "videos": split["val"],
            **fold_scores(metrics, split["val"]),
            "background_only_score": report.background_only_score(ground_truth, split["val"])["score"],
        }
        for directory, split in folds
    ]
    keys = ("mIoU", "mNSD", "score", "background_only_score")
    return {
        "folds": len(folds),
        "checkpoint": checkpoint,
        "per_fold": per_fold,
        "mean": {key: float(np.mean([fold[key] for fold in per_fold])) for key in keys},
        "std": {key: float(np.std([fold[key] for fold in per_fold], ddof=1)) for key in keys},
        "std_note": "sample standard deviation over the folds (ddof=1)",
        "out_of_fold": {key: metrics[key] for key in ("mIoU", "mNSD", "score", "frames")},
    }


def write_fold_table(result: dict, directory: Path) -> None:
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["fold", "videos", "frames", "mIoU", "mNSD", "score", "background_only_score"])
    writer.writerows(
        [
            fold["fold"],
            " ".join(fold["videos"]),
            fold["frames"],
            *(f"{fold[key]:.6f}" for key in ("mIoU", "mNSD", "score", "background_only_score")),
        ]
        for fold in result["per_fold"]
    )
    files.write_bytes_atomically(directory / "folds.csv", table.getvalue().encode())
    files.write_json_atomically(directory / RESULT_FILE, result)


def print_folds(result: dict, directory: Path) -> None:
    print(
        f"\ncross-validation, {result['folds']} folds, each scored on its own validation videos ({result['checkpoint']} weights)"
    )
    print(f"{'fold':<6}{'videos':>7}{'frames':>8}{'mIoU':>8}{'mNSD':>8}{'score':>8}{'background everywhere':>23}")
    for fold in result["per_fold"]:
        below = " (below background)" if fold["score"] < fold["background_only_score"] else ""
        print(
            f"{fold['fold']:<6}{len(fold['videos']):>7}{fold['frames']:>8}{fold['mIoU']:>8.4f}{fold['mNSD']:>8.4f}"
            f"{fold['score']:>8.4f}{fold['background_only_score']:>23.4f}{below}"
        )
    mean, std, pooled = result["mean"], result["std"], result["out_of_fold"]
    print(
        f"mean ± std over folds: score {mean['score']:.4f} ± {std['score']:.4f}  (mIoU {mean['mIoU']:.4f} ± "
        f"{std['mIoU']:.4f}, mNSD {mean['mNSD']:.4f} ± {std['mNSD']:.4f}); background everywhere would score "
        f"{mean['background_only_score']:.4f} ± {std['background_only_score']:.4f}"
    )
    print(
        f"out of fold over all {pooled['frames']} frames: score {pooled['score']:.4f} (mIoU {pooled['mIoU']:.4f}, "
        f"mNSD {pooled['mNSD']:.4f})"
    )
    print(f"cross-validation: {directory / RESULT_FILE}, {directory / 'folds.csv'}")


def score_folds(args, inference_arguments: list[str]) -> int:
    folds = read_folds([Path(directory) for directory in args.fold_directories])
    output = Path(args.output) if args.output else folds[0][0].parent / "out_of_fold"
    common = [
        "--data-directory",
        args.data_directory,
        *"--split val --checkpoint".split(),
        args.checkpoint,
        "--output",
        str(output),
        *inference_arguments,
    ]
    ground_truth, video_dirs = Path(args.data_directory) / "train", []
    inputs = {"the ground truth": ground_truth, **inference.model_files([directory for directory, _ in folds])}
    with outputs.OutputFolder(output, inputs, "cross_validate.py") as out:
        out.claim([*outputs.SCORE_FILES, "folds.csv", RESULT_FILE])
        for directory, split in folds:
            print(f"fold {split['fold']}: predicting its {len(split['val'])} validation videos with {directory}")
            fold_args = run_inference.parse_args(["--model-directory", str(directory), *common])
            _, fold_video_dirs = run_inference.split_video_dirs(Path(args.data_directory), [directory], "val")
            inference.predict_videos(fold_args, inference.prepare(fold_args, fold_video_dirs), out)
            video_dirs += fold_video_dirs
        names = [v.name for v in video_dirs]
        metrics = report.score_predictions(fold_args, ground_truth, names, out, predicted_here=True, one_run=False)
        out.record(["folds.csv", RESULT_FILE], begun=True)
        result = summarize_folds(folds, metrics, args.checkpoint, ground_truth)
        write_fold_table(result, output)
        out.record(["folds.csv", RESULT_FILE])
    print_folds(result, output)
    return 0


def main(argv=None) -> int:
    args, passed_on = parse_args(argv)
    work = train_folds if args.command == "train" else score_folds
    return cli.exit_code(
        lambda _: work(args, passed_on),
        args,
        (dataset.DataError, run_directory.CheckpointError, ModelDirectoryError, hub.BackboneError, ValueError, OSError),
    )


if __name__ == "__main__":
    sys.exit(main())
