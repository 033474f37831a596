"""Is the difference real? Compare runs scored on the same videos, the first as the reference: for each other run the
difference of the official score, mIoU, mNSD and each class's IoU, a 95% interval from a paired bootstrap over videos
(then frames within each video) and a sign-flip permutation p-value over videos.

    python scripts/compare_runs.py runs/baseline runs/multilayer --output comparisons/multilayer

Each run is a prediction folder scored by run_inference.py (it holds per_frame.csv) or a model directory whose
inference is done (MODEL/inference). Writes compare.md, compare.json and compare.png into --output.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cli  # noqa: E402
import comparison  # noqa: E402
import outputs  # noqa: E402
import plots  # noqa: E402

OUTPUT_FILES = ("compare.md", "compare.json", "compare.png")


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "runs", nargs="+", metavar="RUN", help="prediction folders or model directories; the first is the reference"
    )
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="where compare.md, compare.json and compare.png go"
    )
    parser.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default: %(default)s)")
    parser.add_argument("--confidence", type=float, default=0.95, help="of the intervals (default: %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="of the bootstrap and of random sign patterns (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give at least two runs: the reference, then the runs to compare with it")
    if not 0 < args.confidence < 1:
        parser.error("--confidence must be between 0 and 1, e.g. 0.95")
    cli.check_ranges(parser, args, at_least_one=("resamples",))
    return args


def per_video_scores(run: comparison.ScoredRun, videos) -> list[float]:
    iou, nsd = comparison.per_video_means(run, videos)
    return [float(x) for x in comparison.summary(iou, nsd)["score"]]


def sign(value: float) -> str:
    return f"{value:+.4f}"


def markdown(args, result: dict) -> str:
    """compare.md: one table per compared run, and how to read it."""
    videos, patterns = len(result["videos"]), result["sign_patterns"]
    lines = [
        "# Paired comparison",
        "",
        f"Reference: `{result['reference']}`. {videos} videos, {result['frames']} frames, the same in every run.",
        f"Intervals: {round(100 * args.confidence)}% percentile intervals of a paired bootstrap over videos, then frames "
        f"within each video ({args.resamples:,} resamples, seed {args.seed}). p: two-sided sign-flip permutation over "
        f"videos ({patterns}). With {videos} videos no p-value can be below {2 / 2**videos:.3g}.",
        "",
        "An interval that holds 0 is a difference these videos cannot tell from noise; one that does not, at this "
        "confidence, is a difference on operations like these, not a proof on others.",
    ]
    for entry in result["compared"]:
        name, metrics = entry["run"], entry["metrics"]
        lines += ["", f"## `{name}` - reference", "", "| metric | reference | run | difference | interval | p |"]
        lines.append("|---|---:|---:|---:|---|---:|")
        for metric, v in metrics.items():
            low, high = v["interval"]
            lines.append(
                f"| {metric} | {v['reference']:.4f} | {v['run']:.4f} | {sign(v['difference'])} | "
                f"[{sign(low)}, {sign(high)}] | {v['p']:.3g} |"
            )
    return "\n".join(lines) + "\n"


def compare_runs(args) -> int:
    runs = [comparison.read_scored_run(path) for path in args.runs]
    comparison.check_same_frames(runs)
    reference, videos = runs[0], comparison.video_index(runs[0])
    count = videos.max() + 1
    result = {
        "reference": reference.name,
        "videos": sorted({video for video, _ in reference.keys}),
        "frames": len(reference.keys),
        "resamples": args.resamples,
        "confidence": args.confidence,
        "sign_patterns": f"all {2**count:,}" if count <= comparison.EXACT_VIDEOS else "10,000 random",
        "compared": [],  # every run but the reference: {"run", "metrics"}
        "per_video_scores": [],  # every run, the reference first: {"run", "scores"} in the order of "videos"
    }
    for index, run in enumerate(runs):
        run = comparison.aligned(reference, run)
        result["per_video_scores"].append({"run": run.name, "scores": per_video_scores(run, videos)})
        if index:
            metrics = comparison.compare(reference, run, args.resamples, args.confidence, args.seed)
            result["compared"].append({"run": run.name, "metrics": metrics})
    inputs = {f"run {i + 1}": run.folder for i, run in enumerate(runs)}
    with outputs.OutputFolder(Path(args.output), inputs, "compare_runs.py") as out:
        out.claim(OUTPUT_FILES)
        (out.staging / "compare.md").write_text(markdown(args, result))
        (out.staging / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
        plots.run_comparison(result, out.staging / "compare.png")
        out.commit()
    for entry in result["compared"]:
        name, metrics = entry["run"], entry["metrics"]
        score = metrics["score"]
        low, high = score["interval"]
        print(
            f"{name} - {reference.name}: score {sign(score['difference'])} [{sign(low)}, {sign(high)}] p {score['p']:.3g}; "
            f"mIoU {sign(metrics['mIoU']['difference'])}, mNSD {sign(metrics['mNSD']['difference'])}"
        )
    print(f"comparison: {Path(args.output) / 'compare.md'}, compare.json, compare.png")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return cli.exit_code(compare_runs, args, (comparison.ComparisonError, outputs.OutputError, OSError))


if __name__ == "__main__":
    sys.exit(main())
