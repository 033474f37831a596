"""Predict, picture and score SAR-RARP50 instrument segmentation with a model trained by run_training.py.

    python run_inference.py --data-directory sarrarp --model-directory trained-models [--split test|val]
    python run_inference.py --eval-only                   re-score MODEL/inference; loads no model
    python run_inference.py --predictions-directory DIR   score any prediction folder in the official layout
    python run_inference.py --model-directory A B C --output ensemble --tta flip --tta-scales 0.75 1 1.25
                                                          an ensemble with test-time augmentation
    python run_inference.py --model-directory trained-models --input recording.mp4 [--save-masks --every 60]
                                                          any video (or folder of images): an H.264 overlay video

Predictions go to MODEL/inference/video_XX/segmentation/<mask name>.png: 8-bit class ids at the source size,
the layout the official toolkit reads. Pictures (frame | prediction | ground truth) go to
MODEL/inference/video_XX/visualisations/, the official score to metrics.json, per_class.csv, per_frame.csv and
charts in the prediction folder, with report.html: where the model fails (worst frames per class, false
positives). metrics.json and the printed table also give the baseline's own mIoU (seed_mIoU), labelled as
such: not the official score.
"""

import argparse
import json
import sys
from pathlib import Path

import cli
import dataset
import discovery
import hub
import inference
import model_card
import options
import outputs
import report
import video
from trained_model import ModelDirectoryError


def parse_args(argv=None) -> argparse.Namespace:
    return options.inference_arguments(argv, description=__doc__)


# ----------------------------------------------------------------------------- which videos


def split_video_dirs(data_directory: Path, model_directories: list[Path], split: str) -> tuple[Path, list[Path]]:
    """(folder holding the split's videos, the split's video folders): DATA/test, or the val videos of the models'
    split.json (the same for every model) in DATA/train."""
    root = data_directory / ("test" if split == "test" else "train")
    found = discovery.find_video_dirs(root) if root.is_dir() else []
    if split == "test":
        if not found:
            raise dataset.DataError(f"no test videos in {root}: {cli.NO_DATA_HINT}")
        return root, found
    splits = {directory: validation_videos(directory) for directory in model_directories}
    if len({tuple(videos) for videos in splits.values()}) > 1:
        raise dataset.DataError(
            "--split val: the models validate on different videos (see their split.json); to score "
            "cross-validation folds out of fold use scripts/cross_validate.py score"
        )
    val_videos = next(iter(splits.values()))
    by_name = {video_dir.name: video_dir for video_dir in found}
    absent = [video for video in val_videos if video not in by_name]
    if absent:
        raise dataset.DataError(
            f"validation videos {', '.join(absent)} (from {model_directories[0] / 'split.json'}) are not "
            f"in {root}: {cli.NO_DATA_HINT}"
        )
    return root, [by_name[video] for video in val_videos]


def validation_videos(model_directory: Path) -> list[str]:
    split_file = model_directory / "split.json"
    if not split_file.is_file():
        raise dataset.DataError(
            f"{split_file} does not exist: --split val needs the model directory of the run that chose the split"
        )
    try:
        val_videos = json.loads(split_file.read_text())["val"]
        assert isinstance(val_videos, list) and all(isinstance(v, str) for v in val_videos)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise dataset.DataError(
            f"{split_file} is damaged or edited (it needs a 'val' list of video names): restore it "
            "from the training run"
        ) from None
    return val_videos


def download_shared_models(args) -> list[str]:
    """--model-directory USER/REPO: a model shared on the hub, downloaded (or found in the local cache) and then used
    as a local folder; returns those folders. Outputs that would go into MODEL/ go into ./USER--REPO/ instead, never
    into the hub's cache."""
    shared, token = [], None
    args.output_home = Path(args.model_directory[0])
    for index, name in enumerate(args.model_directory):
        if hub.is_hub_id(name) and not args.predictions_directory:
            token = token or hub.resolve_hf_token(args.hf_token_file)
            args.model_directory[index] = hub.model_snapshot(name, token, args.checkpoint)
            shared.append(args.model_directory[index])
            args.output_home = Path(name.replace("/", "--")) if index == 0 else args.output_home
    return shared


def run(args) -> None:
    shared = download_shared_models(args)
    if args.input:
        return video.segment_input(args)
    model_directories = [Path(directory) for directory in args.model_directory]
    ground_truth_directory, video_dirs = split_video_dirs(Path(args.data_directory), model_directories, args.split)
    predictions_directory = Path(args.predictions_directory or args.output or args.output_home / "inference")
    predicting = not (args.eval_only or args.predictions_directory)
    if not predicting and not predictions_directory.is_dir():
        raise dataset.DataError(
            f"{predictions_directory} does not exist"
            + ("" if args.predictions_directory else ": run without --eval-only first to make predictions")
        )
    prepared = inference.prepare(args, video_dirs) if predicting else None  # every input checked before any output
    if args.eval_only:
        report.check_still_current(predictions_directory, [v.name for v in video_dirs])
    models = inference.model_files(model_directories) if predicting else {}
    with outputs.OutputFolder(predictions_directory, {"the ground truth": ground_truth_directory, **models}) as out:
        report.claim_scores(out, predicting)
        if predicting:
            inference.predict_videos(args, prepared, out)
        metrics = report.score_predictions(args, ground_truth_directory, [v.name for v in video_dirs], out, predicting)
    recorded = model_card.after_scoring(metrics, shared)
    if recorded:
        print(recorded)


EXPECTED_ERRORS = (
    dataset.DataError,
    ModelDirectoryError,
    hub.BackboneError,
    ValueError,
    OSError,
)  # PredictionError too


def main(argv=None) -> int:
    return cli.exit_code(run, parse_args(argv), EXPECTED_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
