"""A trained model, or an ensemble with test-time augmentation, on frames: class ids at the source size, written
in the official toolkit's layout (VIDEO/segmentation/<mask name>.png) with a picture of each ground-truth frame."""

import argparse
import collections
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import cli
import dataset
import discovery
import files
import hub
import memory
import outputs
import plots
import progress_bars
import report
from metrics import SCORED_CLASSES
from model import compile_blocks
from trained_model import ModelDirectoryError, load_trained_model, read_model_config


def unlabelled_frames(video_dir: Path) -> list[Path]:
    """Extracted frames (frames/, else rgb/) that have no ground-truth mask."""
    masks = {path.name for path in (video_dir / "segmentation").glob("*.png")}
    frames = {
        path.name: path for folder in reversed(discovery.FRAME_FOLDERS) for path in (video_dir / folder).glob("*.png")
    }
    return [path for name, path in sorted(frames.items()) if name not in masks]


class FrameDataset(torch.utils.data.Dataset):
    """Each frame as uint8 (3, h, w) tensors, one per content size (h, w), scaled exactly as in training (no JPEG cache)."""

    def __init__(self, paths: list[Path], content_sizes: list[tuple[int, int]]):
        self.paths, self.content_sizes = paths, content_sizes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        frame = dataset.read_image(self.paths[index])
        return [torch.from_numpy(dataset.scale_image(frame, size)).permute(2, 0, 1) for size in self.content_sizes]


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
            content_size, padded_size = dataset.training_size(source_size, config["resolution"]["scale"] * scale)
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
            window[blob] = np.bincount(window[ring], minlength=dataset.NUM_CLASSES).argmax() if ring.any() else 0
    return labels


def save_frame_outputs(labels, frame: Path, mask: Path | None, video_output: Path, min_component_size: int) -> None:
    """One frame's prediction PNG and, where it has ground truth, its picture."""
    if min_component_size:
        labels = remove_small_components(labels, min_component_size)
    files.write_image_atomically(video_output / "segmentation" / frame.name, labels)
    if mask is not None:
        caption = f"{video_output.name}/{frame.stem}"
        picture = plots.visualisation(dataset.read_image(frame), labels, dataset.read_mask(mask), caption)
        files.write_image_atomically(
            video_output / "visualisations" / frame.name, cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)
        )


def list_frames(video_dirs: list[Path], data_directory: Path, all_frames: bool):
    """([(video, frame, mask or None)], source size): every ground-truth frame, checked, and with all_frames every other extracted one."""
    samples = discovery.find_samples(video_dirs)
    samples, _, source_size = discovery.scan_samples(samples, data_directory / discovery.STATISTICS_FILE)
    frames = [(s.video, s.image, s.mask) for s in samples]
    if all_frames:
        frames += [(video_dir.name, path, None) for video_dir in video_dirs for path in unlabelled_frames(video_dir)]
    return frames, source_size


def load_members(args) -> list[tuple[torch.nn.Module, dict]]:
    """(model, config.json) of every --model-directory; each must predict the SAR-RARP50 classes in their order
    (checked for all before any backbone loads)."""
    for directory in args.model_directory:
        config_path = Path(directory) / "config.json"
        names = (
            read_model_config(config_path).get("class_names", list(dataset.CLASS_NAMES))
            if config_path.is_file()
            else None
        )
        if names not in (None, list(dataset.CLASS_NAMES)):
            raise ModelDirectoryError(
                f"{directory} predicts other classes ({', '.join(map(str, names))}) than the "
                f"{dataset.NUM_CLASSES} of SAR-RARP50: it cannot be scored or ensembled here"
            )
    token = hub.resolve_hf_token(args.hf_token_file)
    members = [
        load_trained_model(directory, args.checkpoint, args.backbone, token) for directory in args.model_directory
    ]
    return [(compile_blocks(model) if args.compile else model, config) for model, config in members]


def inference_record(args, members, precision: str) -> dict:
    """predicted_with.json's record of how a video was predicted; an ensemble's lists every member."""
    described = [
        {
            "model_directory": str(directory),
            "backbone": args.backbone or config["backbone"],
            "head": config["head"]["type"],
            "resolution": config["resolution"]["name"],
            "weights": files.sampled_digest(Path(directory) / args.checkpoint / "weights.safetensors"),
        }
        for directory, (_, config) in zip(args.model_directory, members)
    ]
    one = len(described) == 1
    return {
        "model_directory": described[0]["model_directory"] if one else [m["model_directory"] for m in described],
        "checkpoint": args.checkpoint,
        "split": args.split,
        "backbone": described[0]["backbone"] if one else [m["backbone"] for m in described],
        "members": described,
        "tta": args.tta,
        "tta_scales": args.tta_scales,
        "min_component_size": args.min_component_size,
        "all_frames": args.all_frames,
        "precision": precision,
    }


def on_device(args, members, source_size):
    """(device, precision, autocast) with every member moved to the device; notes a source size training did not see."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for directory, (model, config) in zip(args.model_directory, members):
        model.to(device)
        if list(source_size) != config["resolution"]["source_size"]:
            trained = config["resolution"]["source_size"]
            print(
                f"note: frames are {source_size[1]}x{source_size[0]}, {directory} was trained on {trained[1]}x"
                f"{trained[0]}; predicting at the same scale ({config['resolution']['name']} resolution)"
            )
    precision = cli.precision_for(args.precision, device, trained_precision(members))
    cli.use_tf32(all(config.get("tf32", True) for _, config in members))
    return device, precision, cli.autocast_for(precision, device)


def trained_precision(members) -> str | None:
    """The precision the members were trained in, from their config.json: fp32 if any was (None: not recorded)."""
    recorded = {config.get("precision") for _, config in members}
    return "fp32" if "fp32" in recorded else next(iter(recorded))


@dataclass
class Plan:
    """How frames of one source size are predicted: where, in which precision, and through which passes."""

    device: torch.device
    precision: str
    autocast: Callable
    sizes: list[tuple[int, int]]  # the content sizes a batch needs (inference_passes)
    passes: list[Pass]


def plan_passes(args, members, source_size, batch_size: int) -> Plan:
    """The Plan for frames of source_size, every member moved to the device; refuses, saying what it needs, a batch
    that cannot fit the device's free memory."""
    device, precision, autocast = on_device(args, members, source_size)
    sizes, passes = inference_passes(members, source_size, args.tta, args.tta_scales)

    def one_batch():
        inputs = [torch.empty(batch_size, 3, *size, dtype=torch.uint8, device=device) for size in sizes]
        predict(passes, inputs, source_size, autocast)

    try:
        need = memory.peak_bytes(one_batch)
    except memory.NOT_COUNTABLE as error:  # the estimate is a safeguard, not a condition
        print(f"note: memory need not estimated ({cli.first_line(error, 80)})", file=sys.stderr)
    else:
        height, width = max(step.padded_size for step in passes)
        described = (
            f"a batch of {batch_size} frame{'s' * (batch_size > 1)} in {len(passes)} passes (up to {width}x{height})"
        )
        memory.check_fits(need, batch_size, device, described, "--batch-size or the largest --tta-scales")
    return Plan(device, precision, autocast, sizes, passes)


def segment_frames(members, frames: np.ndarray, tta: str = "none", scales=(1.0,), precision=None) -> np.ndarray:
    """The Python API's prediction: class ids (H, W) uint8 at the frame's own size for one RGB uint8 frame (H, W, 3),
    or (B, H, W) for a batch (B, H, W, 3), by the passes run_inference.py makes (members: [load_trained_model(...)],
    more than one for an ensemble)."""
    batch = frames[None] if frames.ndim == 3 else frames
    source_size = tuple(batch.shape[1:3])
    names = [config.get("arguments", {}).get("output_directory", "the model") for _, config in members]
    settings = argparse.Namespace(model_directory=names, tta=tta, tta_scales=list(scales), precision=precision)
    plan = plan_passes(settings, members, source_size, len(batch))
    inputs = [
        torch.from_numpy(np.stack([dataset.scale_image(frame, size) for frame in batch])).permute(0, 3, 1, 2)
        for size in plan.sizes
    ]
    labels = predict(plan.passes, [x.to(plan.device) for x in inputs], source_size, plan.autocast).cpu().numpy()
    return labels[0] if frames.ndim == 3 else labels


def predict_frames(args, members, frames, source_size, root: Path) -> str:
    """Write every frame's prediction (and picture) under root/VIDEO/; returns the precision used."""
    plan = plan_passes(args, members, source_size, args.batch_size)
    for video in {video for video, _, _ in frames}:
        (root / video / "segmentation").mkdir(parents=True, exist_ok=True)
        (root / video / "visualisations").mkdir(exist_ok=True)
    frame_data = FrameDataset([frame for _, frame, _ in frames], plan.sizes)
    loader = DataLoader(
        frame_data, args.batch_size, num_workers=args.num_workers, pin_memory=plan.device.type == "cuda"
    )
    writers = min(8, os.cpu_count() or 1)
    described = "predicting" + (f" ({len(plan.passes)} passes a frame)" if len(plan.passes) > 1 else "")
    # PNG encoding and pictures overlap with the model
    with (
        ThreadPoolExecutor(writers) as pool,
        progress_bars.bar(total=len(frames), desc=described, unit="frame") as progress,
    ):
        pending, done = collections.deque(), 0
        for inputs in loader:
            inputs = [x.to(plan.device, non_blocking=True) for x in inputs]
            labels = predict(plan.passes, inputs, source_size, plan.autocast)
            for (video, frame, mask), frame_labels in zip(frames[done : done + len(labels)], labels.cpu().numpy()):
                pending.append(
                    pool.submit(save_frame_outputs, frame_labels, frame, mask, root / video, args.min_component_size)
                )
            done += len(labels)
            progress.update(len(labels))
            while len(pending) > 4 * writers:  # bounded memory: wait for the oldest writes
                pending.popleft().result()
        for job in pending:
            job.result()
    return plan.precision


def prepare(args, video_dirs: list[Path]) -> tuple:
    """(frames, source size, members): every input of predict_videos checked and loaded, before any output."""
    frames, source_size = list_frames(video_dirs, Path(args.data_directory), args.all_frames)
    return frames, source_size, load_members(args)


def predict_videos(args, prepared: tuple, out: outputs.OutputFolder) -> None:
    """Predict the frames prepare() listed into the output folder: built aside, then swapped in for what an earlier
    run predicted of these videos, and the scores that described it removed (nothing this project did not write is
    touched)."""
    frames, source_size, members = prepared
    videos = sorted({video for video, _, _ in frames})
    planned = [
        f"{v}/{kind}/{f.name}" for v, f, m in frames for kind in ("segmentation", "visualisations")[: 1 + bool(m)]
    ]
    out.claim([*planned, outputs.PROVENANCE_FILE])
    precision = predict_frames(args, members, frames, source_size, out.staging)
    earlier = report.read_provenance(out.path)
    recorded = {**earlier, **dict.fromkeys(videos, inference_record(args, members, precision))}
    files.write_json_atomically(out.staging / outputs.PROVENANCE_FILE, report.provenance(recorded))
    if earlier:  # a kill while the frames are swapped leaves these videos without a record, not with the old one
        out.write_json(
            outputs.PROVENANCE_FILE, report.provenance({v: r for v, r in earlier.items() if v not in videos})
        )
    out.commit(replaced=[f"{video}/" for video in videos] + list(outputs.SCORE_FILES))


def model_files(model_directories) -> dict[str, Path]:
    """What inference reads of each model directory, which no output may be, hold or lie inside."""
    return {f"{Path(d) / name}": Path(d) / name for d in model_directories for name in ("config.json", "best", "last")}
