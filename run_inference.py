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
positives). metrics.json and the printed table also give the seed pipeline's own mIoU (seed_mIoU), labelled as
such: not the official score.
"""
import argparse
import collections
import csv
import io
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

import dataset as D
import plots as P
import video as V
from metrics import SCORED_CLASSES, evaluate_directories, frame_scores, read_label_png, summarize
from model import (BackboneError, ModelDirectoryError, OneLineErrorParser, load_trained_model, read_model_config,
                   redact_tokens, resolve_hf_token)
from report import write_report

NO_DATA_HINT = "see 'Data preparation' in README.md, or try the built-in demo first: bash scripts/demo.sh"
OUTPUT_FILES = ("metrics.json", "per_class.csv", "per_frame.csv", "confusion_matrix.png", "per_class_scores.png",
                "per_video_scores.png", "report.html")
PROVENANCE_FILE = "predicted_with.json"  # how the predictions of each video in a folder were made
SCORES_MANIFEST = ".scores_by_run_inference.json"  # the score files this tool wrote into a folder it did not make
SEED_MIOU_NOTE = ("the seed pipeline's own metric: per-frame IoU over the classes present in prediction or ground truth, "
                  "mean over all frames of all videos; not the official score")


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-directory", default="sarrarp", help="unpacked release with extracted frames (default: %(default)s)")
    parser.add_argument("--model-directory", nargs="+", default=["trained-models"], metavar="MODEL",
                        help="output directory of run_training.py; several: an ensemble averaging their softmax at the "
                             "source resolution (they may differ in head, resolution and backbone) (default: %(default)s)")
    parser.add_argument("--output", metavar="DIR",
                        help="prediction folder (default: MODEL/inference; an ensemble needs one)")
    parser.add_argument("--checkpoint", choices=["best", "last"], default="best", help="which saved weights to use (default: %(default)s)")
    parser.add_argument("--split", choices=["test", "val"], default="test",
                        help="test: the videos in DATA/test; val: the videos listed under 'val' in MODEL/split.json, "
                             "from DATA/train (default: %(default)s)")
    parser.add_argument("--eval-only", action="store_true", help="re-score the predictions in MODEL/inference without loading the model")
    parser.add_argument("--predictions-directory",
                        help="score this prediction folder (official layout) instead, without a model; the scores are written into it")
    parser.add_argument("--batch-size", type=int, default=8, help="(default: %(default)s)")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="frame loading processes (default: %(default)s)")
    parser.add_argument("--backbone", help="hub id, local directory or weight file to use instead of the backbone named in config.json")
    parser.add_argument("--hf-token-file", help="file holding a Hugging Face token (else HF_TOKEN, ./hf_token.txt, or your hub login)")
    parser.add_argument("--tta", choices=["none", "flip"], default="none",
                        help="flip: average the softmax of each frame and of its mirror image (default: %(default)s)")
    parser.add_argument("--tta-scales", nargs="+", type=float, default=[1.0], metavar="S",
                        help="also average over the frame resized to S x each model's training resolution (padded to "
                             "multiples of 16), e.g. 0.75 1 1.25 (default: 1)")
    parser.add_argument("--min-component-size", type=int, default=0,
                        help="relabel connected blobs of a class smaller than this many pixels with the label around them (default: 0, off)")
    parser.add_argument("--all-frames", action="store_true", help="also predict every extracted frame that has no ground-truth mask")
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="autocast precision (default: bf16 on a GPU that has it, else fp32)")
    video = parser.add_argument_group("any video or folder of images (--input; no ground truth, no release layout)")
    video.add_argument("--input", metavar="PATH",
                       help="a video (.avi .mp4 .mkv .mov ...) or a folder of .png/.jpg images to segment; writes an "
                            "H.264 overlay.mp4 (or overlays/ and masks/ for images) to --output (default: "
                            "MODEL/predictions/<input name>/)")
    video.add_argument("--save-masks", action="store_true",
                       help="video: also write each predicted frame's class ids to masks/{frame index:09d}.png (the release's naming)")
    video.add_argument("--every", type=int, default=1, metavar="N",
                       help="video: predict the frames whose index is a multiple of N; the overlay shows the latest prediction (default: 1)")
    video.add_argument("--start", type=float, default=0.0, metavar="SECONDS", help="video: first second to segment (default: 0)")
    video.add_argument("--end", type=float, metavar="SECONDS", help="video: segment up to this second (default: the end)")
    video.add_argument("--temporal-smoothing", type=float, default=0.0, metavar="ALPHA",
                       help="video: average the class probabilities over the predicted frames, each new one weighing "
                            "1 - ALPHA (an exponential moving average; default: 0, off)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.min_component_size < 0:
        parser.error("--min-component-size must be 0 or more")
    if args.num_workers < 0:
        parser.error("--num-workers must be 0 or more")
    if not all(0 < scale < math.inf for scale in args.tta_scales):
        parser.error(f"--tta-scales must be positive numbers, got {' '.join(map(str, args.tta_scales))}")
    if args.every < 1:
        parser.error("--every must be at least 1")
    if not 0 <= args.start < math.inf or (args.end is not None and not args.start < args.end < math.inf):
        parser.error("--start must be 0 or more and --end after it")
    if not 0 <= args.temporal_smoothing < 1:
        parser.error("--temporal-smoothing must be in [0, 1)")
    if args.input and (args.eval_only or args.predictions_directory):
        parser.error("--input segments a video or images with a model: not with --eval-only or --predictions-directory")
    ensemble = len(args.model_directory) > 1
    if ensemble and args.backbone:
        parser.error("--backbone replaces the backbone of one model: give one --model-directory with it")
    if ensemble and not (args.output or args.predictions_directory):
        parser.error("an ensemble's predictions belong to no one model directory: give --output DIR")
    return args


# ----------------------------------------------------------------------------- data

def split_video_dirs(data_directory: Path, model_directories: list[Path], split: str) -> tuple[Path, list[Path]]:
    """(folder holding the split's videos, the split's video folders): DATA/test, or the val videos of the models'
    split.json (the same for every model) in DATA/train."""
    root = data_directory / ("test" if split == "test" else "train")
    found = D.find_video_dirs(root) if root.is_dir() else []
    if split == "test":
        if not found:
            raise D.DataError(f"no test videos in {root}: {NO_DATA_HINT}")
        return root, found
    splits = {directory: validation_videos(directory) for directory in model_directories}
    if len({tuple(videos) for videos in splits.values()}) > 1:
        raise D.DataError("--split val: the models validate on different videos (see their split.json); to score "
                          "cross-validation folds out of fold use scripts/cross_validate.py score")
    val_videos = next(iter(splits.values()))
    by_name = {video_dir.name: video_dir for video_dir in found}
    absent = [video for video in val_videos if video not in by_name]
    if absent:
        raise D.DataError(f"validation videos {', '.join(absent)} (from {model_directories[0] / 'split.json'}) are not "
                          f"in {root}: {NO_DATA_HINT}")
    return root, [by_name[video] for video in val_videos]


def validation_videos(model_directory: Path) -> list[str]:
    split_file = model_directory / "split.json"
    if not split_file.is_file():
        raise D.DataError(f"{split_file} does not exist: --split val needs the model directory of the run that chose the split")
    try:
        val_videos = json.loads(split_file.read_text())["val"]
        assert isinstance(val_videos, list) and all(isinstance(v, str) for v in val_videos)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise D.DataError(f"{split_file} is damaged or edited (it needs a 'val' list of video names): restore it "
                          "from the training run") from None
    return val_videos


def unlabelled_frames(video_dir: Path) -> list[Path]:
    """Extracted frames (frames/, else rgb/) that have no ground-truth mask."""
    masks = {path.name for path in (video_dir / "segmentation").glob("*.png")}
    frames = {path.name: path for folder in reversed(D.FRAME_FOLDERS) for path in (video_dir / folder).glob("*.png")}
    return [path for name, path in sorted(frames.items()) if name not in masks]


class FrameDataset(torch.utils.data.Dataset):
    """Each frame as uint8 (3, h, w) tensors, one per content size (h, w), scaled exactly as in training (no JPEG cache)."""

    def __init__(self, paths: list[Path], content_sizes: list[tuple[int, int]]):
        self.paths, self.content_sizes = paths, content_sizes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        frame = D.read_image(self.paths[index])
        return [torch.from_numpy(D.scale_image(frame, size)).permute(2, 0, 1) for size in self.content_sizes]


# ----------------------------------------------------------------------------- prediction

@dataclass
class Pass:
    """One forward pass of test-time inference: a model on the frame at one size, mirrored or not."""
    model: torch.nn.Module
    size_index: int  # which of the batch's scaled copies of the frame it reads
    content_size: tuple[int, int]
    padded_size: tuple[int, int]
    flip: bool


def inference_passes(members, source_size, tta: str, scales) -> tuple[list[tuple[int, int]], list[Pass]]:
    """(the content sizes a batch needs, every pass): for each model (model, config.json) and each scale, the frame at
    scale x the model's training resolution, padded bottom/right to multiples of 16 as in training; with flip TTA, also
    mirrored. Scale 1 is exactly the training size."""
    sizes, passes = [], []
    for model, config in members:
        for scale in scales:
            content_size, padded_size = D.training_size(source_size, config["resolution"]["scale"] * scale)
            if content_size not in sizes:
                sizes.append(content_size)
            for flip in (False, True) if tta == "flip" else (False,):
                passes.append(Pass(model, sizes.index(content_size), content_size, padded_size, flip))
    return sizes, passes


def pass_logits(step: Pass, inputs, source_size, autocast) -> torch.Tensor:
    """(B, C, H, W) logits at the source size; a mirrored pass mirrors the content before padding (so it stays
    top-left, as in training) and mirrors the answer back."""
    images = inputs[step.size_index].flip(3) if step.flip else inputs[step.size_index]
    padding = (0, step.padded_size[1] - step.content_size[1], 0, step.padded_size[0] - step.content_size[0])
    with autocast():
        logits = step.model(F.pad(images, padding), source_size, step.content_size)
    return logits.flip(3) if step.flip else logits


@torch.no_grad()
def mean_probabilities(passes, inputs, source_size, autocast) -> torch.Tensor:
    """(B, C, H, W) softmax at the source size, averaged over the passes; holds one pass's besides the running sum."""
    total = None
    for step in passes:
        probabilities = pass_logits(step, inputs, source_size, autocast).float().softmax(1)
        total = probabilities if total is None else total.add_(probabilities)
    return total.div_(len(passes))


@torch.no_grad()
def predict(passes, inputs, source_size, autocast) -> torch.Tensor:
    """(B, H, W) uint8 class ids at the source size for inputs, the batch's uint8 (B, 3, h, w) frames at each content
    size of inference_passes: the argmax of the mean softmax; with a single pass, of its logits."""
    if len(passes) == 1:
        return pass_logits(passes[0], inputs, source_size, autocast).argmax(1).to(torch.uint8)
    return mean_probabilities(passes, inputs, source_size, autocast).argmax(1).to(torch.uint8)


def remove_small_components(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Relabel each 8-connected blob of a class 1..9 smaller than min_size pixels with the label most common on
    the ring of pixels around it (background if it fills the image): a stray blob of a class absent from the
    frame costs the frame 1/9 on both metrics."""
    labels = labels.copy()
    height, width = labels.shape
    for c in SCORED_CLASSES:
        _, components, stats, _ = cv2.connectedComponentsWithStats((labels == c).view(np.uint8), connectivity=8)
        for k in np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] < min_size) + 1:
            x, y, w, h = stats[k, :4]
            x0, y0, x1, y1 = max(x - 1, 0), max(y - 1, 0), min(x + w + 1, width), min(y + h + 1, height)
            blob = components[y0:y1, x0:x1] == k
            ring = cv2.dilate(blob.view(np.uint8), np.ones((3, 3), np.uint8)).view(bool) & ~blob
            window = labels[y0:y1, x0:x1]  # a view: assignment below edits labels
            window[blob] = np.bincount(window[ring], minlength=D.NUM_CLASSES).argmax() if ring.any() else 0
    return labels


def save_frame_outputs(labels, frame: Path, mask: Path | None, video_output: Path, min_component_size: int) -> None:
    """One frame's prediction PNG and, where it has ground truth, its picture."""
    if min_component_size:
        labels = remove_small_components(labels, min_component_size)
    D.write_image_atomically(video_output / "segmentation" / frame.name, labels)
    if mask is not None:
        picture = P.visualisation(D.read_image(frame), labels, D.read_mask(mask))
        D.write_image_atomically(video_output / "visualisations" / frame.name, cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))


def list_frames(video_dirs: list[Path], data_directory: Path, all_frames: bool):
    """([(video, frame, mask or None)], source size): every ground-truth frame, checked, and with all_frames every other extracted one."""
    samples = D.find_samples(video_dirs)
    samples, _, source_size = D.scan_samples(samples, data_directory / D.STATISTICS_FILE)
    frames = [(s.video, s.image, s.mask) for s in samples]
    if all_frames:
        frames += [(video_dir.name, path, None) for video_dir in video_dirs for path in unlabelled_frames(video_dir)]
    return frames, source_size


def load_members(args) -> list[tuple[torch.nn.Module, dict]]:
    """(model, config.json) of every --model-directory; each must predict the SAR-RARP50 classes in their order
    (checked for all before any backbone loads)."""
    for directory in args.model_directory:
        config_path = Path(directory) / "config.json"
        names = read_model_config(config_path).get("class_names", list(D.CLASS_NAMES)) if config_path.is_file() else None
        if names not in (None, list(D.CLASS_NAMES)):
            raise ModelDirectoryError(f"{directory} predicts other classes ({', '.join(map(str, names))}) than the "
                                      f"{D.NUM_CLASSES} of SAR-RARP50: it cannot be scored or ensembled here")
    token = resolve_hf_token(args.hf_token_file)
    return [load_trained_model(directory, args.checkpoint, args.backbone, token) for directory in args.model_directory]


def inference_record(args, members, precision: str) -> dict:
    """predicted_with.json's record of how a video was predicted; an ensemble's lists every member."""
    described = [{"model_directory": str(directory), "backbone": args.backbone or config["backbone"],
                  "head": config["head"]["type"], "resolution": config["resolution"]["name"]}
                 for directory, (_, config) in zip(args.model_directory, members)]
    one = len(described) == 1
    return {"model_directory": described[0]["model_directory"] if one else [m["model_directory"] for m in described],
            "checkpoint": args.checkpoint, "split": args.split,
            "backbone": described[0]["backbone"] if one else [m["backbone"] for m in described],
            "members": described, "tta": args.tta, "tta_scales": args.tta_scales,
            "min_component_size": args.min_component_size, "all_frames": args.all_frames, "precision": precision}


def on_device(args, members, source_size):
    """(device, precision, autocast) with every member moved to the device; notes a source size training did not see."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for directory, (model, config) in zip(args.model_directory, members):
        model.to(device)
        if list(source_size) != config["resolution"]["source_size"]:
            trained = config["resolution"]["source_size"]
            print(f"note: frames are {source_size[1]}x{source_size[0]}, {directory} was trained on {trained[1]}x"
                  f"{trained[0]}; predicting at the same scale ({config['resolution']['name']} resolution)")
    precision = args.precision or ("bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    return device, precision, lambda: torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")


def predict_frames(args, members, frames, source_size, predictions_directory: Path) -> None:
    """Write every frame's prediction (and picture) under predictions_directory/VIDEO/, then how they were made."""
    device, precision, autocast = on_device(args, members, source_size)
    sizes, passes = inference_passes(members, source_size, args.tta, args.tta_scales)

    videos = sorted({video for video, _, _ in frames})
    forget_predictions(predictions_directory, videos)
    loader = DataLoader(FrameDataset([frame for _, frame, _ in frames], sizes), batch_size=args.batch_size,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda")
    writers = min(8, os.cpu_count() or 1)
    progress = tqdm(total=len(frames), desc="predicting" + (f" ({len(passes)} passes a frame)" if len(passes) > 1 else ""),
                    unit="frame")
    with ThreadPoolExecutor(writers) as pool:  # PNG encoding and pictures overlap with the model
        pending, done = collections.deque(), 0
        for inputs in loader:
            labels = predict(passes, [x.to(device, non_blocking=True) for x in inputs], source_size, autocast)
            for (video, frame, mask), frame_labels in zip(frames[done:done + len(labels)], labels.cpu().numpy()):
                pending.append(pool.submit(save_frame_outputs, frame_labels, frame, mask,
                                           predictions_directory / video, args.min_component_size))
            done += len(labels)
            progress.update(len(labels))
            while len(pending) > 4 * writers:  # bounded memory: wait for the oldest writes
                pending.popleft().result()
        for job in pending:
            job.result()
    progress.close()
    settings = inference_record(args, members, precision)
    write_provenance(predictions_directory, {**read_provenance(predictions_directory),
                                             **{video: settings for video in videos}})


# ----------------------------------------------------------------------------- records of what is in a folder

def read_provenance(directory: Path) -> dict:
    """{video: how its predictions were made} from predicted_with.json; {} if there is none or it is of a version
    that kept one record for the whole folder (it cannot say which videos it describes)."""
    try:
        record = json.loads((directory / PROVENANCE_FILE).read_text())
        return dict(record["videos"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def write_provenance(directory: Path, videos: dict) -> None:
    D.write_json_atomically(directory / PROVENANCE_FILE, {"videos": dict(sorted(videos.items()))})


def forget_predictions(directory: Path, videos: list[str]) -> None:
    """Remove the record and the files of what an earlier run predicted for these videos (and what a killed write
    left), so that each video folder holds the frames of one run."""
    write_provenance(directory, {v: r for v, r in read_provenance(directory).items() if v not in videos})
    for video in videos:
        for folder in (directory / video / "segmentation", directory / video / "visualisations"):
            folder.mkdir(parents=True, exist_ok=True)
            D.remove_partial_files(folder)
            for old in folder.glob("*.png"):
                old.unlink()


def provenance_of(directory: Path, videos: list[str], one_run: bool = True) -> tuple[dict | None, list[str]]:
    """(how the predictions of these videos were made, one record if one run made them all, else
    {"mixed": True, "videos": ...}; None if none is recorded), and warnings about videos without a record or a mix."""
    recorded = read_provenance(directory)
    known = {video: recorded[video] for video in videos if video in recorded}
    unknown = [video for video in videos if video not in recorded]
    warnings = [f"{directory / PROVENANCE_FILE} has no record of how the predictions of {', '.join(unknown)} were "
                "made: they may come from a run that did not finish, or another tool"] if unknown else []
    runs = {json.dumps(record, sort_keys=True) for record in known.values()}
    if len(runs) > 1:
        if one_run:
            warnings.append(f"the predictions in {directory} come from {len(runs)} different runs (see "
                            "predicted_with.json): the score mixes them; predict every video with one run to score one model")
        return {"mixed": True, "videos": known}, warnings
    return (next(iter(known.values())) if known else None), warnings


def check_outputs_are_ours(directory: Path, predicted_here: bool) -> None:
    """Refuse to overwrite a score file this tool did not write: one listed in the folder's manifest (written with
    the scores), or any in a folder run_inference.py predicted into, is its own."""
    if predicted_here or (directory / PROVENANCE_FILE).is_file():
        return
    try:
        claimed = set(json.loads((directory / SCORES_MANIFEST).read_text()))
    except (OSError, ValueError, TypeError):
        claimed = set()
    for name in OUTPUT_FILES:
        if (directory / name).exists() and name not in claimed:
            raise D.DataError(f"{directory / name} exists and was not written by run_inference.py: move it away, "
                              "or score a copy of the folder")


# ----------------------------------------------------------------------------- scoring

def background_only_score(ground_truth_directory: Path, videos: list[str]) -> dict:
    """Score of predicting background everywhere, the floor a model has to beat."""
    def score(path):
        truth = read_label_png(path)
        return frame_scores(np.zeros_like(truth), truth)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        result = summarize({video: list(pool.map(score, sorted((ground_truth_directory / video / "segmentation").glob("*.png"))))
                            for video in videos})
    return {key: result[key] for key in ("mIoU", "mNSD", "score")}


def write_scores(metrics: dict, frames: list[dict], directory: Path) -> None:
    """Every output of OUTPUT_FILES, metrics.json last: its presence means every other one is complete."""
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["class", "IoU", "NSD"])
    writer.writerows([name, f"{v['IoU']:.6f}", f"{v['NSD']:.6f}"] for name, v in metrics["classes"].items())
    D.write_json_atomically(directory / SCORES_MANIFEST, list(OUTPUT_FILES))  # before them: a killed write is ours too
    D.write_bytes_atomically(directory / "per_class.csv", table.getvalue().encode())
    P.confusion_matrix(metrics["confusion"], directory / "confusion_matrix.png")
    P.class_scores(metrics, directory / "per_class_scores.png")
    P.video_scores(metrics, directory / "per_video_scores.png")
    write_report(metrics, frames, directory)
    D.write_json_atomically(directory / "metrics.json", metrics)


def print_report(metrics: dict, directory: Path, pictured: bool) -> None:
    print(f"\n{'class':<20}{'IoU':>8}{'NSD':>8}")
    for name, v in metrics["classes"].items():
        print(f"{name + (' *' if name in P.THIN_CLASSES else ''):<20}{v['IoU']:>8.4f}{v['NSD']:>8.4f}")
    print(f"{'mean':<20}{metrics['mIoU']:>8.4f}{metrics['mNSD']:>8.4f}   (* thin classes)")
    print(f"official score {metrics['score']:.4f} = sqrt(mIoU x mNSD) over {metrics['frames']} frames of "
          f"{len(metrics['videos'])} videos ({metrics['split']} split)")
    print("  " + "  ".join(f"{video} {v['mIoU']:.3f}/{v['mNSD']:.3f}" for video, v in metrics["videos"].items())
          + "   (per video mIoU/mNSD)")
    seed = "n/a (no frame has an instrument)" if metrics["seed_mIoU"] is None else f"{metrics['seed_mIoU']:.4f}"
    print(f"seed mIoU {seed} (the design we start from's own metric, not the official score; "
          "its published 0.687 is this number)")
    floor = metrics["background_only"]
    print(f"background everywhere would score {floor['score']:.4f} (mIoU {floor['mIoU']:.4f}, mNSD {floor['mNSD']:.4f})")
    if metrics["missing"]:
        shown = ", ".join(metrics["missing"][:5]) + (f" and {len(metrics['missing']) - 5} more" if len(metrics["missing"]) > 5 else "")
        print(f"warning: {len(metrics['missing'])} ground-truth masks have no prediction and score 0: {shown} "
              f"(all listed in metrics.json)", file=sys.stderr)
    print(f"metrics: {directory / 'metrics.json'}, per_class.csv, per_frame.csv, confusion_matrix.png, "
          "per_class_scores.png, per_video_scores.png")
    print(f"error analysis (open in a browser): {directory / 'report.html'}")
    if pictured:
        print(f"visualisations: {directory}/video_*/visualisations/")


def predict_videos(args, video_dirs: list[Path], predictions_directory: Path) -> None:
    """Predict the ground-truth frames of these videos (every extracted frame with --all-frames) into the folder."""
    frames, source_size = list_frames(video_dirs, Path(args.data_directory), args.all_frames)
    members = load_members(args)  # every check before anything on disk changes
    predictions_directory.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:  # stale scores never outlive the predictions they describe
        (predictions_directory / name).unlink(missing_ok=True)
    predict_frames(args, members, frames, source_size, predictions_directory)


def score_predictions(args, ground_truth_directory: Path, videos: list[str], predictions_directory: Path,
                      predicted_here: bool, one_run: bool = True) -> dict:
    """Score the folder's predictions of these videos, write metrics.json and the other outputs, print the table.
    one_run=False: the videos were predicted by different runs on purpose (cross-validation folds)."""
    check_outputs_are_ours(predictions_directory, predicted_here)
    result = evaluate_directories(ground_truth_directory, predictions_directory, videos=videos, per_frame=True)
    frames = result.pop("per_frame")
    provenance, warnings = provenance_of(predictions_directory, videos, one_run)
    if result["colour_predictions"]:
        warnings.append(f"{len(result['colour_predictions'])} prediction PNGs have colour channels (e.g. "
                        f"{result['colour_predictions'][0]}): scored as the official toolkit reads them, as channel 0 "
                        "of OpenCV's BGR image (blue); write 8-bit single-channel class ids to be sure")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    seed_miou = result["seed_mIoU"]
    single = provenance if provenance and not provenance.get("mixed") else {}
    metrics = {
        **result,
        "seed_mIoU": None if math.isnan(seed_miou) else seed_miou,  # no frame with an instrument: null, not NaN
        "seed_mIoU_note": SEED_MIOU_NOTE,
        "model_directory": single.get("model_directory"), "checkpoint": single.get("checkpoint"),
        "data_directory": str(args.data_directory), "split": args.split,
        "inference": {k: v for k, v in provenance.items() if k not in ("model_directory", "checkpoint")} if single
        else provenance,
        "warnings": warnings,
        "background_only": background_only_score(ground_truth_directory, videos),
    }
    write_scores(metrics, frames, predictions_directory)
    print_report(metrics, predictions_directory, pictured=predicted_here)
    return metrics


# ----------------------------------------------------------------------------- any video or folder of images

def frame_predictor(args, passes, source_size, autocast, device):
    """predict_batch([inputs]) -> [labels (H, W) uint8 at the source size] for consecutive frames, each inputs the
    frame at every content size of passes; with --temporal-smoothing, the argmax of the running mean of the softmax."""
    smoothed = None

    def predict_batch(batch):
        nonlocal smoothed
        inputs = [torch.from_numpy(np.stack([frame[k] for frame in batch])).permute(0, 3, 1, 2).to(device)
                  for k in range(len(batch[0]))]
        if not args.temporal_smoothing:
            labels = list(predict(passes, inputs, source_size, autocast).cpu().numpy())
        else:
            labels = []
            for probabilities in mean_probabilities(passes, inputs, source_size, autocast):
                smoothed = probabilities if smoothed is None else smoothed.mul_(args.temporal_smoothing).add_(
                    probabilities, alpha=1 - args.temporal_smoothing)
                labels.append(smoothed.argmax(0).to(torch.uint8).cpu().numpy())
        if args.min_component_size:
            labels = [remove_small_components(frame_labels, args.min_component_size) for frame_labels in labels]
        return labels

    return predict_batch


def clear_folder(folder: Path, pattern: str) -> None:
    """An output folder with nothing of an earlier run in it (nor what a killed write left)."""
    folder.mkdir(parents=True, exist_ok=True)
    D.remove_partial_files(folder)
    for old in folder.glob(pattern):
        old.unlink()


def segment_video_file(args, source: Path, out: Path) -> None:
    info = V.probe_video(source)
    first, stop = V.frame_range(info, args.start, args.end)
    members = load_members(args)  # every check before anything on disk changes
    out.mkdir(parents=True, exist_ok=True)
    final = out / "overlay.mp4"
    for stale in (final, out / PROVENANCE_FILE):
        stale.unlink(missing_ok=True)
    D.remove_partial_files(out)
    if args.save_masks:
        clear_folder(out / "masks", "*.png")
    device, precision, autocast = on_device(args, members, info.size)
    sizes, passes = inference_passes(members, info.size, args.tta, args.tta_scales)
    save_mask = ((lambda index, labels: D.write_image_atomically(out / "masks" / f"{index:09d}.png", labels))
                 if args.save_masks else (lambda index, labels: None))
    progress = tqdm(total=min(stop, info.frames) - first if info.frames > 0 else None, desc=f"segmenting {source.name}",
                    unit="frame")
    partial = D.partial_path(final)
    try:
        written = V.segment_video(source, info, first, stop, args.every,
                                  lambda frame: [D.scale_image(frame, size) for size in sizes],
                                  frame_predictor(args, passes, info.size, autocast, device), args.batch_size,
                                  P.video_frame, partial, save_mask, progress)
        if not written:
            raise D.DataError(f"{source} has no frames from {args.start:g} s on")
        os.replace(partial, final)  # a killed or failed run never leaves a finished-looking overlay
    finally:
        partial.unlink(missing_ok=True)
        progress.close()
    D.write_json_atomically(out / PROVENANCE_FILE, {
        **inference_record(args, members, precision), "input": str(source), "fps": info.fps,
        "size": list(info.size), "frames": [first, first + written], "every": args.every,
        "temporal_smoothing": args.temporal_smoothing, "masks": args.save_masks})
    print(f"overlay: {final} ({written} frames at {info.fps:g} fps, {info.size[1]}x{info.size[0]})"
          + (f"; masks: {out / 'masks'}/" if args.save_masks else ""))


def segment_image_folder(args, source: Path, out: Path) -> None:
    images = V.list_images(source)
    members = load_members(args)
    clear_folder(out / "masks", "*.png")
    clear_folder(out / "overlays", "*.jpg")
    (out / PROVENANCE_FILE).unlink(missing_ok=True)
    device, precision, autocast = None, None, None
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for path, frame in tqdm(zip(images, pool.map(D.read_image, images)), total=len(images),
                                desc=f"segmenting {source.name}", unit="image"):
            if device is None:
                device, precision, autocast = on_device(args, members, frame.shape[:2])
            sizes, passes = inference_passes(members, frame.shape[:2], args.tta, args.tta_scales)
            predict_one = frame_predictor(args, passes, frame.shape[:2], autocast, device)
            labels = predict_one([[D.scale_image(frame, size) for size in sizes]])[0]
            D.write_image_atomically(out / "masks" / f"{path.stem}.png", labels)
            D.write_image_atomically(out / "overlays" / f"{path.stem}.jpg",
                                     cv2.cvtColor(P.video_frame((frame, labels)), cv2.COLOR_RGB2BGR), (cv2.IMWRITE_JPEG_QUALITY, 90))
    D.write_json_atomically(out / PROVENANCE_FILE, {**inference_record(args, members, precision), "input": str(source),
                                                   "images": [path.name for path in images]})
    print(f"masks: {out / 'masks'}/, overlays: {out / 'overlays'}/ ({len(images)} images)")


def segment_input(args) -> None:
    """--input: a video or a folder of images, with no ground truth."""
    source = Path(args.input)
    V.check_input(source)
    out = Path(args.output or Path(args.model_directory[0]) / "predictions" / (source.stem if source.is_file() else source.name))
    V.check_writable(out)
    (segment_video_file if source.is_file() else segment_image_folder)(args, source, out)


def run(args) -> None:
    if args.input:
        return segment_input(args)
    model_directories = [Path(directory) for directory in args.model_directory]
    ground_truth_directory, video_dirs = split_video_dirs(Path(args.data_directory), model_directories, args.split)
    predictions_directory = Path(args.predictions_directory or args.output or model_directories[0] / "inference")
    predicting = not (args.eval_only or args.predictions_directory)
    if predicting:
        predict_videos(args, video_dirs, predictions_directory)
    elif not predictions_directory.is_dir():
        raise D.DataError(f"{predictions_directory} does not exist" + ("" if args.predictions_directory else
                          ": run without --eval-only first to make predictions"))
    score_predictions(args, ground_truth_directory, [video_dir.name for video_dir in video_dirs], predictions_directory,
                      predicting)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (D.DataError, ModelDirectoryError, BackboneError, ValueError, OSError) as error:  # PredictionError is a ValueError
        # DataLoader workers re-raise with their traceback in the message: keep its last line.
        message = str(error).strip().splitlines()[-1]
        message = message.split(": ", 1)[1] if message.startswith(("dataset.DataError", "DataError")) else message
        print(f"error: {redact_tokens(message)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
