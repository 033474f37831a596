"""Fine-tune DINOv3 (LoRA) + a segmentation head (MLP or multi-layer upsampler) for SAR-RARP50 instrument segmentation.

One process:  python run_training.py --data-directory sarrarp --output-directory trained-models
Many GPUs:    torchrun --nproc_per_node 4 run_training.py ...   (DDP; only rank 0 writes and prints)
"""
import argparse
import collections
import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from safetensors import SafetensorError
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import dataset as D
import plots as P
from backbone_files import architecture
from losses import LOSSES, soft_dice_loss, weighted_cross_entropy
from metrics import frame_record, summarize
from tracking import REPORTERS, TrackingError, check_available, open_tracker
from model import (BACKBONE_DTYPES, BACKBONE_TRAINING, BACKBONES, CONFIG_VERSION, DEFAULT_BACKBONE, HEAD_TYPES,
                   LORA_TARGET_MODULES, BackboneError, HeadConfigError, OneLineErrorParser, build_model, count_parameters,
                   parameter_bytes, redact_tokens, resolve_backbone, resolve_hf_token, save_trainable_weights, trainable_state_dict)

# Arguments a resumed run may change; any other change would silently break the schedule, the data
# order or the model (e.g. a new batch size shifts where the epoch resumes).
CHANGEABLE_ON_RESUME = {"resume", "config", "hf_token_file", "num_workers", "val_every", "checkpoint_every", "log_every",
                        "cache_frames", "skip_bad_samples", "data_directory", "output_directory", "backbone",
                        "low_res", "report_to"}
OPTIMIZERS = ("adamw", "adam")
SCHEDULES = ("cosine", "constant")
SELECTION_METRICS = ("score", "mIoU", "seed_mIoU")
VALIDATION_PICTURES = 3  # validation frames pictured for the tracker at each validation, the same every time
NO_DATA_HINT = ("see 'Data preparation' in README.md, or try the built-in demo first: bash scripts/demo.sh")


def layer_list(text: str) -> list[int]:
    """'3,6,9,12' -> [3, 6, 9, 12]"""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer numbers, e.g. 3,6,9,12") from None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE",
                        help="YAML or JSON file of settings (keys as the flags, e.g. lora_rank: 8); flags given on the "
                             "command line override it. recipes/seed.yaml is the design we start from's experiment")
    data = parser.add_argument_group("data")
    data.add_argument("--data-directory", default="sarrarp", help="unpacked release with extracted frames (default: %(default)s)")
    data.add_argument("--output-directory", default="trained-models", help="where weights, logs and curves go (default: %(default)s)")
    data.add_argument("--resolution", choices=list(D.RESOLUTION_SCALES), default="half",
                      help="training resolution relative to the source; logits are always upsampled to the source (default: %(default)s)")
    data.add_argument("--low-res", action="store_true", help="alias for --resolution quarter (the design's flag)")
    data.add_argument("--val-fraction", type=float, default=0.2, help="share of operations held out for validation (default: %(default)s)")
    data.add_argument("--val-videos", nargs="+", metavar="VIDEO", help="validation videos instead of a random split, e.g. video_03 video_11_1")
    data.add_argument("--folds", type=int, metavar="K",
                      help="cross-validation: divide the operations into K groups of about equal frame count (by "
                           "--seed) and validate on group --fold; scripts/cross_validate.py trains every fold")
    data.add_argument("--fold", type=int, metavar="I", help="with --folds: the 0-based group to validate on")
    data.add_argument("--augmentation", choices=D.AUGMENTATIONS, default="default",
                      help="default: flip, affine (p 0.7), colour jitter, gamma, blur/noise; seed: the design we start "
                           "from's flip, affine (always; scale 0.7-1.3, shift 20%%, shear 10) and colour jitter (default: %(default)s)")
    data.add_argument("--cache-frames", action="store_true", help="keep a JPEG copy of every frame at training resolution (faster loading)")
    data.add_argument("--skip-bad-samples", action="store_true", help="warn about and skip bad frames/masks instead of stopping")
    data.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader processes per GPU (default: %(default)s)")

    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default=DEFAULT_BACKBONE,
                       help=f"short name ({', '.join(BACKBONES)}), hub id, local directory saved with save_pretrained, "
                            "or a .pth/.safetensors file in Meta's or timm's naming (default: %(default)s)")
    model.add_argument("--image-mean", type=float, nargs=3, metavar=("R", "G", "B"),
                       help="normalisation mean on a 0..1 scale (default: the backbone's preprocessor_config.json, "
                            "else ImageNet's, which DINOv3 was trained with)")
    model.add_argument("--image-std", type=float, nargs=3, metavar=("R", "G", "B"), help="normalisation std (as --image-mean)")
    model.add_argument("--hf-token-file", help="file holding a Hugging Face token (else HF_TOKEN, ./hf_token.txt, or your hub login)")
    model.add_argument("--backbone-training", choices=BACKBONE_TRAINING, default="lora",
                       help="frozen: only the head trains; lora: LoRA adapters and the head; full: every backbone "
                            "weight too, at --backbone-lr (default: %(default)s)")
    model.add_argument("--backbone-dtype", choices=list(BACKBONE_DTYPES), default="float32",
                       help="dtype the frozen backbone weights are held in; bfloat16 halves their memory (a ViT-7B "
                            "needs it on most GPUs); not with --backbone-training full (default: %(default)s)")
    model.add_argument("--lora-rank", type=int, default=16, help="(default: %(default)s)")
    model.add_argument("--lora-alpha", type=float, default=32, help="(default: %(default)s)")
    model.add_argument("--lora-dropout", type=float, default=0.1, help="(default: %(default)s)")
    model.add_argument("--lora-targets", nargs="+", default=list(LORA_TARGET_MODULES),
                       help="backbone modules given LoRA, or all-linear (attention and MLP projections) (default: %(default)s)")
    model.add_argument("--head", choices=HEAD_TYPES, default="mlp",
                       help="mlp: the design we start from, a 3-layer MLP turning each last-layer patch token into the "
                            "logits of its 16x16 pixels; patch-mlp: a 3-layer MLP giving one prediction per patch, "
                            "upsampled bilinearly; multilayer: several layers fused and upsampled to 1/4 of the input "
                            "by 3x3 convs (default: %(default)s)")
    model.add_argument("--head-hidden", type=int,
                       help="hidden width of the mlp / patch-mlp head (default: 10 x 16 x 16 = 2560 for mlp, as the "
                            "design we start from; 256 for patch-mlp)")
    model.add_argument("--feature-layers", type=layer_list, metavar="3,6,9,12",
                       help="1-based ViT layers the multilayer head reads (default: 4 evenly spaced, ending at the last)")
    model.add_argument("--head-width", type=int, default=256,
                       help="multilayer head: width at 1/16, halved at 1/8 and 1/4; a multiple of 32 (default: %(default)s)")

    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--loss", choices=LOSSES, default="ce",
                              help="ce: class-weighted cross entropy; ce+dice: plus a soft Dice term over classes 1..9 (default: %(default)s)")
    optimisation.add_argument("--class-weights", choices=list(D.CLASS_WEIGHTS), default="enet",
                              help="cross-entropy class weights from each class's pixel frequency f over the training "
                                   "split: enet 1/ln(1.02+f); one-minus-frequency 1-f (the design we start from); "
                                   "none 1 (default: %(default)s)")
    optimisation.add_argument("--dice-weight", type=float, default=1.0, help="weight of the Dice term of --loss ce+dice (default: %(default)s)")
    optimisation.add_argument("--epochs", type=int, default=1, help="(default: %(default)s)")
    optimisation.add_argument("--max-steps", type=int, help="optimizer steps to train for; overrides --epochs")
    optimisation.add_argument("--batch-size", type=int, default=8, help="images per GPU per step (default: %(default)s)")
    optimisation.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer step (default: %(default)s)")
    optimisation.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                              help="adamw: decoupled weight decay; adam: weight decay added to the gradient (L2), "
                                   "as the design we start from with --weight-decay 0 (default: %(default)s)")
    optimisation.add_argument("--lr", type=float, default=2e-4, help="LoRA learning rate (default: %(default)s)")
    optimisation.add_argument("--head-lr", type=float, default=1e-3, help="head learning rate (default: %(default)s)")
    optimisation.add_argument("--backbone-lr", type=float,
                              help="--backbone-training full: learning rate of the backbone's last layer (default: --lr)")
    optimisation.add_argument("--layer-decay", type=float, default=1.0,
                              help="--backbone-training full: each earlier layer's learning rate is this times the "
                                   "next one's (embeddings lowest); 1 is off (default: %(default)s)")
    optimisation.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                              help="after --warmup-steps of linear warm-up: cosine decay to 0, or constant (default: %(default)s)")
    optimisation.add_argument("--warmup-steps", type=int, default=100, help="linear warm-up steps; 0 for none (default: %(default)s)")
    optimisation.add_argument("--weight-decay", type=float, default=0.01, help="(default: %(default)s)")
    optimisation.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clipping; 0 turns it off (default: %(default)s)")
    optimisation.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                              help="autocast precision (default: bf16 on a GPU that has it, else fp32)")
    optimisation.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward: far less memory, ~30%% slower")
    optimisation.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")

    schedule = parser.add_argument_group("validation, logging, checkpoints")
    schedule.add_argument("--val-every", type=int, default=0, help="validate every N steps; 0: at the end of each epoch (default: %(default)s)")
    schedule.add_argument("--selection-metric", choices=SELECTION_METRICS, default="score",
                          help="validation number that picks best/ and drives early stopping: the official score, its "
                               "mIoU, or the design we start from's own mIoU (default: %(default)s)")
    schedule.add_argument("--early-stop-patience", type=int, default=0,
                          help="stop after N validations without a better --selection-metric; 0 never stops early (default: %(default)s)")
    schedule.add_argument("--checkpoint-every", type=int, default=200, help="write the resumable checkpoint every N steps (default: %(default)s)")
    schedule.add_argument("--log-every", type=int, default=10, help="log training loss every N steps (default: %(default)s)")
    schedule.add_argument("--resume", action="store_true", help="continue the run in --output-directory from its checkpoint")
    schedule.add_argument("--report-to", choices=REPORTERS, default="none",
                          help="also log live to TensorBoard (OUTPUT/tensorboard: tensorboard --logdir OUTPUT) or "
                               "Weights & Biases (WANDB_MODE=offline without a network): losses, every validation "
                               "score, and pictures of a few validation frames (default: %(default)s)")
    return parser


def config_file_arguments(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """The settings of a YAML/JSON file as command-line tokens, so argparse checks them as it checks flags."""
    try:
        with open(path, encoding="utf-8") as f:
            settings = yaml.safe_load(f)  # JSON is YAML
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        parser.error(f"cannot read --config {path}: {D.first_line(error)}")
    if not isinstance(settings, dict):
        parser.error(f"--config {path} must hold settings as 'name: value' lines")
    actions = {action.dest: action for action in parser._actions}
    tokens = []
    for key, value in settings.items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None or action.dest in ("help", "config"):
            parser.error(f"--config {path}: unknown setting {key!r} (settings are the flags without '--', e.g. lora_rank)")
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            tokens += [flag] if value else []
        elif value is not None:
            values = value if isinstance(value, list) else [value]
            tokens += [flag, *map(str, values)] if action.nargs == "+" or isinstance(action.nargs, int) else [flag, ",".join(map(str, values))]
    return tokens


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    config_file = parser.parse_known_args(argv)[0].config
    args = parser.parse_args((config_file_arguments(parser, config_file) if config_file else []) + argv)
    if args.low_res:  # an alias: the run records --resolution quarter either way
        args.resolution, args.low_res = "quarter", False
    for name in ("epochs", "batch_size", "grad_accum_steps", "log_every", "checkpoint_every", "lora_rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("warmup_steps", "early_stop_patience", "weight_decay", "grad_clip", "val_every", "num_workers", "seed",
                 "dice_weight", "lr", "head_lr", "backbone_lr"):
        if getattr(args, name) is not None and not getattr(args, name) >= 0:  # "not >=": NaN is refused too
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    if not args.lora_alpha > 0:
        parser.error("--lora-alpha must be greater than 0")
    if not 0 <= args.lora_dropout < 1:
        parser.error("--lora-dropout must be in [0, 1)")
    if args.head_width < 32 or args.head_width % 32:
        parser.error("--head-width must be a positive multiple of 32")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error("--max-steps must be at least 1")
    if not 0 < args.val_fraction < 1:
        parser.error("--val-fraction must be between 0 and 1")
    if args.folds is not None:
        if args.folds < 2:
            parser.error(f"--folds must be at least 2, got {args.folds}")
        if args.fold is None or not 0 <= args.fold < args.folds:
            parser.error(f"--folds {args.folds} needs --fold 0..{args.folds - 1} (the group to validate on), got "
                         f"{args.fold}; scripts/cross_validate.py train trains every fold")
        if args.val_videos:
            parser.error("--val-videos and --folds both choose the validation videos: give one")
    elif args.fold is not None:
        parser.error("--fold needs --folds K")
    if not 0 < args.layer_decay <= 1:
        parser.error("--layer-decay must be in (0, 1]")
    if args.head_hidden is not None and args.head_hidden < 1:
        parser.error("--head-hidden must be at least 1")
    if args.feature_layers and args.head != "multilayer":
        parser.error("--feature-layers applies to --head multilayer")
    if args.backbone_training == "full" and args.backbone_dtype != "float32":
        parser.error("--backbone-training full trains every backbone weight, which needs --backbone-dtype float32")
    if (args.image_mean is None) != (args.image_std is None):
        parser.error("--image-mean and --image-std go together: give both")
    if args.image_std is not None and not min(args.image_std) > 0:
        parser.error("--image-std must be positive")
    return args


def head_settings(args) -> dict:
    """config.json's "head" as the arguments give it (model.py fills in the default feature layers)."""
    if args.head in ("mlp", "patch-mlp"):
        return {"type": args.head, "hidden": args.head_hidden}
    return {"type": "multilayer", "feature_layers": args.feature_layers, "width": args.head_width}


def peak_memory_mb(device) -> float:
    """Peak memory of tensors on the GPU (torch.cuda.max_memory_allocated), else this process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------- distributed helpers

def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); torchrun sets RANK/WORLD_SIZE/LOCAL_RANK."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def any_rank(flag: bool, device) -> bool:
    """True on every rank if flag is True on any rank."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value)
    return value.item() > 0


# ----------------------------------------------------------------------------- data

def prepare_data(args, rank: int, world: int, device):
    """Samples, split and class weights, the JSON records to write (split.json, class_weights.json) and the data's
    fingerprint.

    Rank 0 scans (and caches) the masks first and the others reuse its cache; an error on rank 0
    is passed on to every rank so that none waits forever.
    """
    train_root = Path(args.data_directory) / "train"
    video_dirs = D.find_video_dirs(train_root) if train_root.is_dir() else []
    if not video_dirs:
        raise D.DataError(f"no training videos in {train_root}: {NO_DATA_HINT}")
    samples = D.find_samples(video_dirs, skip_bad=args.skip_bad_samples)
    statistics_file = Path(args.data_directory) / D.STATISTICS_FILE
    error = None
    if rank == 0:
        try:
            scanned = D.scan_samples(samples, statistics_file, skip_bad=args.skip_bad_samples)
        except D.DataError as caught:
            error = caught
    if any_rank(error is not None, device):
        raise error or D.DataError("rank 0 found bad training data (its message says which)")
    if rank != 0:
        scanned = D.scan_samples(samples, statistics_file, skip_bad=args.skip_bad_samples)
    samples, pixel_counts, source_size = scanned
    split = choose_split(args, collections.Counter(s.video for s in samples))
    train_videos = set(split["train"])
    is_train = np.array([s.video in train_videos for s in samples])
    totals = pixel_counts[is_train].sum(0)
    frequencies = totals / totals.sum()
    weights = D.class_weights_from_frequencies(frequencies, args.class_weights)
    records = {
        "split.json": split,
        "class_weights.json": {
            "formula": D.CLASS_WEIGHTS[args.class_weights][0] + "; f = pixel frequency of the class over the training split",
            "classes": {name: {"frequency": float(f), "weight": float(w)}
                        for name, f, w in zip(D.CLASS_NAMES, frequencies, weights)}},
    }
    train_samples = [s for s, t in zip(samples, is_train) if t]
    val_samples = [s for s, t in zip(samples, is_train) if not t]
    return (train_samples, val_samples, source_size, torch.tensor(weights, dtype=torch.float32), records,
            data_fingerprint(samples, pixel_counts))


def choose_split(args, frames_per_video: dict[str, int]) -> dict:
    """split.json: the training and validation videos and, with --folds, the fold and every fold's group."""
    if args.folds is None:
        train, val = D.split_by_video(list(frames_per_video), args.val_fraction, args.seed, args.val_videos)
        return {"train": train, "val": val}
    groups = D.fold_groups(frames_per_video, args.folds, args.seed)
    train = sorted(video for g, group in enumerate(groups) if g != args.fold for video in group)
    return {"train": train, "val": groups[args.fold], "folds": args.folds, "fold": args.fold, "fold_groups": groups}


def logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line half-written by a killed run."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):
        return math.inf


def read_records(metrics_file: Path) -> list[dict]:
    """metrics.jsonl's records, without a line half-written by a killed run; none before the first is logged."""
    lines = metrics_file.read_text().splitlines() if metrics_file.exists() else []
    return [json.loads(line) for line in lines if logged_step(line) != math.inf]


# ----------------------------------------------------------------------------- optimisation

def backbone_layer(name: str, num_layers: int) -> int:
    """Depth of a backbone parameter for layer-wise decay: 0 embeddings, i + 1 transformer layer i, then the final norm."""
    match = re.search(r"\.layer\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return 0 if ".embeddings." in name else num_layers + 1


def parameter_groups(model, args) -> list[dict]:
    """The head at --head-lr; LoRA weights at --lr; a fully trained backbone at --backbone-lr, decayed per layer."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if n.startswith("head.")], "lr": args.head_lr}]
    backbone = [(n, p) for n, p in trainable if not n.startswith("head.")]
    if args.backbone_training == "lora":
        return groups + [{"params": [p for _, p in backbone], "lr": args.lr}]
    num_layers = len(model.vit().model.layer)
    by_layer = {}
    for name, parameter in backbone:
        by_layer.setdefault(backbone_layer(name, num_layers), []).append(parameter)
    top = args.backbone_lr or args.lr
    return groups + [{"params": params, "lr": top * args.layer_decay ** max(0, num_layers - layer)}
                     for layer, params in sorted(by_layer.items())]


def make_optimizer(model, args) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return optimizer(parameter_groups(model, args), weight_decay=args.weight_decay)


def make_scheduler(optimizer, args, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over --warmup-steps (at most half the run), then cosine decay to 0 or constant."""
    warmup = min(args.warmup_steps, total_steps // 2)

    def learning_rate_factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if args.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)


# ----------------------------------------------------------------------------- one step

def accumulate_gradients(wrapped, batches, args, class_weights, source_size, content_size, autocast, scaler, world,
                         device) -> tuple[float, int]:
    """Forward and backward of --grad-accum-steps micro-batches (DDP syncs gradients on the last only); returns their
    summed loss and the images all ranks saw."""
    loss_sum, images_seen = 0.0, 0
    for micro in range(args.grad_accum_steps):
        batch = next(batches)
        images = batch["image"].to(device, non_blocking=True)
        masks = batch["mask"].to(device, non_blocking=True).long()
        sync = micro == args.grad_accum_steps - 1 or world == 1
        with (wrapped.no_sync() if not sync else torch.enable_grad()), autocast():
            logits = wrapped(images, source_size, content_size).float()
            loss = weighted_cross_entropy(logits, masks, class_weights)
            if args.loss == "ce+dice":
                loss = loss + args.dice_weight * soft_dice_loss(logits, masks)
            loss = loss / args.grad_accum_steps
            scaler.scale(loss).backward()  # a disabled scaler (bf16, fp32) passes the loss through
        loss_sum += loss.item()
        images_seen += len(images) * world
    return loss_sum, images_seen


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def validate(model, loader, val_samples, source_size, content_size, device, autocast, rank, world,
             pictured=()) -> tuple[dict, dict]:
    """The official SAR-RARP50 score over the validation frames (each rank scores its share, rank 0 summarises), and
    (prediction, ground truth) of the frames of this rank's share whose indices are in pictured."""
    model.eval()
    scored, kept = [], {}
    for batch in tqdm(loader, desc="validating", unit="batch", leave=False, disable=rank != 0):
        with autocast():
            logits = model(batch["image"].to(device, non_blocking=True), source_size, content_size)
        predictions = logits.argmax(1).to(torch.uint8).cpu().numpy()
        for index, prediction, truth in zip(batch["index"].tolist(), predictions, batch["mask"].numpy()):
            scored.append((val_samples[index].video, frame_record(prediction, truth)))
            if index in pictured:
                kept[index] = prediction, truth
    model.train()
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, scored)
        scored = [item for part in gathered for item in part]
    per_video = {}
    for video, record in scored:
        per_video.setdefault(video, []).append(record)
    return summarize(per_video), kept


def validation_pictures(samples, kept: dict) -> dict[str, np.ndarray]:
    """{video/frame: frame | prediction | ground truth} of validate's kept frames, for the tracker."""
    return {f"{samples[i].video}/{samples[i].image.stem}": P.visualisation(D.read_image(samples[i].image), prediction, truth)
            for i, (prediction, truth) in kept.items()}


# ----------------------------------------------------------------------------- outputs

class SaveError(OSError):
    """Writing an output failed (full disk, say); the run stays resumable from its last checkpoint."""


@contextlib.contextmanager
def writing(path: Path):
    """Turn any failure to write path into one SaveError line: what happened and what to do."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        reason = "no space left on device" if getattr(error, "errno", None) == errno.ENOSPC else D.first_line(error)
        raise SaveError(f"could not write {path} ({reason}): free disk space or fix the folder, then continue the run "
                        "with --resume from its last checkpoint") from None


def save_weights(model, directory: Path) -> None:
    with writing(directory / "weights.safetensors"):
        directory.mkdir(parents=True, exist_ok=True)
        save_trainable_weights(model, directory / "weights.safetensors")


def state_digest(value, digest=None) -> str:
    """SHA-256 over every tensor's bytes and every other value of a (nested) checkpoint, in a fixed order."""
    digest = digest or hashlib.sha256()
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(repr(key).encode())
            state_digest(value[key], digest)
    elif isinstance(value, (list, tuple)):
        for item in value:
            state_digest(item, digest)
    elif isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    else:
        digest.update(repr(value).encode())
    return digest.hexdigest()


class CheckpointError(RuntimeError):
    """A checkpoint that is truncated, damaged or not finite; never resumed from."""


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at path, verified against the digest saved inside it and for finite weights."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        saved_digest = checkpoint.pop("sha256")
    except Exception as error:  # torch.load raises many types on a truncated or empty file
        raise CheckpointError(f"{path} is damaged or incomplete ({D.first_line(error, 80)}): "
                              "delete it to start again, or restore it from a backup") from None
    if state_digest(checkpoint) != saved_digest:
        raise CheckpointError(f"{path} is damaged (its contents do not match the checksum written with it): "
                              "delete it to start again, or restore it from a backup")
    if not all(torch.isfinite(t).all() for t in checkpoint["model"].values()):
        raise CheckpointError(f"{path} holds non-finite weights: delete it to start again")
    return checkpoint


def save_checkpoint(path: Path, model, optimizer, scheduler, scaler, state: dict) -> None:
    """Everything a killed run needs to continue exactly. Written beside, read back and verified, then renamed over
    the previous checkpoint, which stays until then; weights that are not finite are never saved."""
    checkpoint = {
        "model": {name: tensor.cpu() for name, tensor in trainable_state_dict(model).items()},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
        **state,
    }
    if not all(torch.isfinite(t).all() for t in checkpoint["model"].values()):
        raise FloatingPointError(f"the weights became non-finite at step {state['step']}; the last checkpoint in "
                                 f"{path} was kept. Lower --lr, or use --precision fp32 / bf16")
    checkpoint["sha256"] = state_digest(checkpoint)
    temporary = D.partial_path(path)
    try:
        with writing(path):
            torch.save(checkpoint, temporary)
            load_checkpoint(temporary)
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)  # what a failed write left


def restore(checkpoint: dict, model, optimizer, scheduler, scaler, rank: int, device, state: dict) -> dict:
    """Load a verified checkpoint into the run's objects and this rank's RNG; returns the saved loop state."""
    model.load_state_dict(checkpoint["model"], strict=False)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    rng = checkpoint["rng"][rank]  # each rank's own generators: LoRA dropout differs per rank
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)
    return {k: checkpoint.get(k, v) for k, v in state.items()}


def last_good_checkpoint(path: Path) -> str:
    """What a user can resume from, said only of a checkpoint that verifies."""
    if not path.exists():
        return "no checkpoint was written yet"
    try:
        return f"the last good checkpoint (step {load_checkpoint(path)['step']}) is in {path}"
    except CheckpointError as error:
        return f"no good checkpoint is left: {error}"


def print_scores(result: dict, step: int) -> None:
    print(f"step {step}: mIoU {result['mIoU']:.4f}  mNSD {result['mNSD']:.4f}  score {result['score']:.4f}"
          f"   (seed mIoU {result['seed_mIoU']:.4f}: the seed pipeline's own metric, not the official score)")
    print("  " + "  ".join(f"{name}{'*' if name in P.THIN_CLASSES else ''} {v['IoU']:.2f}/{v['NSD']:.2f}"
                           for name, v in result["classes"].items()) + "   (IoU/NSD, * thin classes)")


def run_record(args, model, train_data, precision, world, device, fingerprints) -> dict:
    """config.json: every resolved argument and all that run_inference.py needs to rebuild the model."""
    (trainable, total), (trainable_bytes, total_bytes) = count_parameters(model), parameter_bytes(model)
    return {
        "config_version": CONFIG_VERSION,
        "arguments": {k: v for k, v in vars(args).items() if k != "hf_token_file"},
        "backbone": resolve_backbone(args.backbone), "backbone_training": args.backbone_training,
        "backbone_dtype": args.backbone_dtype, "backbone_architecture": architecture(model.vit().config), "class_names": list(D.CLASS_NAMES), "num_classes": D.NUM_CLASSES,
        "resolution": {"name": args.resolution, "scale": D.RESOLUTION_SCALES[args.resolution],
                       "source_size": list(train_data.source_size), "content_size": list(train_data.content_size),
                       "padded_size": list(train_data.padded_size)},
        "normalization": {"mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist()},
        "lora": {"rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                 "target_modules": args.lora_targets},
        "head": model.head_config,
        "loss": {"type": args.loss, **({"dice_weight": args.dice_weight} if args.loss == "ce+dice" else {})},
        "parameters": {"trainable": trainable, "total": total, "head": sum(p.numel() for p in model.head.parameters()),
                       "trainable_mb": trainable_bytes / 2**20, "total_mb": total_bytes / 2**20},
        "precision": precision, "world_size": world, "device": device.type, "fingerprints": fingerprints,
    }


# ----------------------------------------------------------------------------- the run directory

def check_run_directory(args, output: Path, world: int) -> dict | None:
    """The saved config.json of the run to resume (None for a new run), after checking that the request fits the
    directory. Checked on every rank: an error on rank 0 alone would leave the others waiting at the next barrier."""
    checkpoint_path, config_path = output / "checkpoint.pt", output / "config.json"
    if not args.resume:
        if checkpoint_path.exists():
            raise D.DataError(f"{output} already holds a run: pass --resume to continue it, or choose another --output-directory")
        return None
    if not checkpoint_path.exists():
        raise D.DataError(f"nothing to resume: {checkpoint_path} does not exist")
    saved = read_run_config(config_path)
    changed = [f"--{k.replace('_', '-')} {saved['arguments'].get(k)} -> {v}" for k, v in vars(args).items()
               if k not in CHANGEABLE_ON_RESUME and saved["arguments"].get(k) != v]
    changed += [f"{saved['world_size']} -> {world} processes"] if saved["world_size"] != world else []
    if changed:
        raise D.DataError(f"--resume continues a run with its own settings, but these changed: {'; '.join(changed)}")
    return saved


def read_run_config(path: Path) -> dict:
    """config.json of a run, with the keys a resume relies on checked; one line naming what is wrong."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise D.DataError(f"{path} cannot be read ({D.first_line(error)}): it was damaged or edited; "
                          "restore it, or start a new run in another --output-directory") from None
    for key, kind in (("arguments", dict), ("world_size", int)):
        if not isinstance(saved, dict) or not isinstance(saved.get(key), kind):
            raise D.DataError(f"{path}: key {key!r} is missing or not a {kind.__name__}; it was damaged or edited: "
                              "restore it, or start a new run in another --output-directory")
    return saved


def hold_run_directory(output: Path, rank: int, device):
    """Rank 0 creates output and holds its lock (lock_run_directory); a refusal reaches every rank."""
    lock, error = None, None
    if rank == 0:
        try:
            output.mkdir(parents=True, exist_ok=True)
            lock = lock_run_directory(output)
        except (D.DataError, OSError) as caught:
            error = caught
    if any_rank(error is not None, device):
        raise error or D.DataError(f"rank 0 could not lock {output} (its message says why)")
    return lock


def lock_run_directory(output: Path):
    """An exclusive lock on output/.lock for this process's life (the kernel drops it when a run dies, so a killed
    run never blocks its --resume); a second run into the same directory is refused."""
    lock = open(output / ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        raise D.DataError(f"another training run (pid {lock.read().strip() or '?'}) is writing to {output}: wait for "
                          "it to finish, or choose another --output-directory") from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def data_fingerprint(samples, pixel_counts) -> str:
    """Every mask the run can use (video, name, per-class pixel counts): a resume on other data is caught."""
    listing = [[s.video, s.mask.name, counts.tolist()] for s, counts in zip(samples, pixel_counts)]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def backbone_fingerprint(model) -> str:
    """The backbone's weights as loaded (shapes and a strided sample of values): another backbone is caught."""
    digest = hashlib.sha256()
    for name, tensor in model.vit().state_dict().items():
        if "lora_" in name:
            continue  # adapters are initialised by the run, not loaded
        flat = tensor.detach().flatten()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(flat[::max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def check_fingerprints(saved_config: dict, current: dict) -> None:
    """Refuse a resume whose data or backbone differ from the run's (runs of earlier versions have no record)."""
    recorded = saved_config.get("fingerprints") or current
    changed = [name for name in ("data", "backbone") if recorded.get(name) != current[name]]
    if changed:
        what = {"data": "the training data (videos or masks) differ", "backbone": "the backbone's weights differ"}
        raise D.DataError(f"--resume refused: {' and '.join(what[c] for c in changed)} from those the run started "
                          "with; resume with the original ones, or start a new run in another --output-directory")


# ----------------------------------------------------------------------------- training

def train(args) -> None:
    check_available(args.report_to)
    rank, world, device = setup_distributed()
    output = Path(args.output_directory)
    checkpoint_path = output / "checkpoint.pt"
    config_path = output / "config.json"
    metrics_file = output / "metrics.jsonl"
    log = print if rank == 0 else (lambda *a, **k: None)
    saved_config = check_run_directory(args, output, world)
    torch.manual_seed(args.seed)

    # Everything that can fail on bad input (data, backbone, token) runs before anything is written.
    train_samples, val_samples, source_size, class_weights, records, data = prepare_data(args, rank, world, device)
    scale = D.RESOLUTION_SCALES[args.resolution]
    train_data = D.SegmentationDataset(train_samples, source_size, scale, augment=True, cache_frames=args.cache_frames,
                                       seed=args.seed, augmentation=args.augmentation)
    val_data = D.SegmentationDataset(val_samples, source_size, scale, cache_frames=args.cache_frames)
    content_size = train_data.content_size

    token = resolve_hf_token(args.hf_token_file)
    model = build_model(args.backbone, token, backbone_training=args.backbone_training, backbone_dtype=args.backbone_dtype,
                        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        lora_target_modules=args.lora_targets, head=head_settings(args),
                        gradient_checkpointing=args.gradient_checkpointing,
                        normalization=args.image_mean and (args.image_mean, args.image_std)).to(device)
    del token
    (trainable, total), (trainable_bytes, total_bytes) = count_parameters(model), parameter_bytes(model)
    log(f"model: {args.backbone} ({args.backbone_training}), {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%); "
        f"parameters take {total_bytes / 2**20:.1f} MB ({trainable_bytes / 2**20:.1f} MB trainable)")
    log(f"head: {model.head_config}, {sum(p.numel() for p in model.head.parameters()):,} parameters; loss: {args.loss}"
        + (f" (dice weight {args.dice_weight})" if args.loss == "ce+dice" else ""))

    run_fingerprints = {"data": data, "backbone": backbone_fingerprint(model)}
    if saved_config is not None:
        check_fingerprints(saved_config, run_fingerprints)
    checkpoint = load_checkpoint(checkpoint_path) if args.resume else None

    precision = args.precision or ("bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    lock = hold_run_directory(output, rank, device)  # noqa: F841 (held until the process ends)
    if rank == 0:
        for folder in (output, output / "best", output / "last"):
            D.remove_partial_files(folder)  # left by writes a kill interrupted
        for name, record in records.items():
            D.write_json_atomically(output / name, record)

    optimizer = make_optimizer(model, args)
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    steps_per_epoch = len(train_data) // world // (args.batch_size * args.grad_accum_steps)
    if steps_per_epoch == 0:
        raise D.DataError(f"{len(train_data)} training samples make no full step of {world} x {args.batch_size} x "
                          f"{args.grad_accum_steps} images: lower --batch-size or --grad-accum-steps")
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    scheduler = make_scheduler(optimizer, args, total_steps)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_score": -1.0, "best_step": None, "finished": False,
             "validations_without_improvement": 0, "stopped_early": False}
    if checkpoint is not None:
        state = restore(checkpoint, model, optimizer, scheduler, scaler, rank, device, state)
        if state["finished"]:
            log(f"{output} holds a finished run (step {state['step']}); nothing to do")
            return
        if rank == 0 and metrics_file.exists():  # drop what was logged after the checkpoint
            kept = [line for line in metrics_file.read_text().splitlines() if logged_step(line) <= state["step"]]
            metrics_file.write_text("".join(line + "\n" for line in kept))
        log(f"resuming at step {state['step']} of {total_steps}")
    elif rank == 0:
        metrics_file.unlink(missing_ok=True)  # left by a run killed before its first checkpoint
        D.write_json_atomically(config_path, run_record(args, model, train_data, precision, world, device,
                                                        run_fingerprints))

    wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    val_indices = list(range(len(val_data)))[rank::world]  # no padding: every frame scored exactly once
    # Loaders draw their worker seeds from their own generator, so that the global RNG (LoRA dropout)
    # advances identically in an uninterrupted and in a resumed run.
    loader_generator = torch.Generator().manual_seed(args.seed)
    val_loader = DataLoader(val_data, batch_size=args.batch_size, sampler=val_indices, num_workers=args.num_workers,
                            generator=loader_generator)
    class_weights = class_weights.to(device)
    pictured = set(val_indices[::max(1, len(val_indices) // VALIDATION_PICTURES)][:VALIDATION_PICTURES])
    tracker = open_tracker(args.report_to, output, read_run_config(config_path),
                           state["step"] if checkpoint is not None else None) if rank == 0 else None

    def log_record(record, pictures=None):
        if rank == 0:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")
            if tracker:
                tracker.log(record, pictures or {})

    def evaluate_and_save(step):
        """Validate; keep the best weights; count validations without improvement (the same on every rank)."""
        result, predictions = validate(model, val_loader, val_samples, source_size, content_size, device, autocast,
                                       rank, world, pictured if tracker else ())
        improved = result[args.selection_metric] > state["best_score"]
        if improved:
            state["best_score"], state["best_step"], state["validations_without_improvement"] = result[args.selection_metric], step, 0
        else:
            state["validations_without_improvement"] += 1
        if rank == 0:
            log_record({"step": step, "val": result}, validation_pictures(val_samples, predictions))
            print_scores(result, step)
            if improved:
                save_weights(model, output / "best")
        if args.early_stop_patience and state["validations_without_improvement"] >= args.early_stop_patience:
            state["stopped_early"] = True
            reason = (f"early stop at step {step}: validation {args.selection_metric} has not improved for "
                      f"{args.early_stop_patience} validations (best {state['best_score']:.4f} at step {state['best_step']})")
            log_record({"step": step, "early_stop": reason})
            log(reason)

    def checkpoint(step):
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        rngs = [rng]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng)
        if rank == 0:
            save_weights(model, output / "last")
            save_checkpoint(checkpoint_path, model, optimizer, scheduler, scaler, {**state, "rng": rngs})
            P.training_curves(read_records(metrics_file), output / "training_curves.png", args.selection_metric)

    progress = tqdm(total=total_steps, initial=state["step"], desc="training", unit="step", disable=rank != 0)
    model.train()
    started, images_seen = time.perf_counter(), 0
    while not state["finished"]:
        sampler = DistributedSampler(train_data, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
        sampler.set_epoch(state["epoch"])
        train_data.epoch = state["epoch"]
        indices = list(sampler)[state["batch_in_epoch"] * args.batch_size * args.grad_accum_steps:]
        loader = DataLoader(train_data, batch_size=args.batch_size, sampler=indices, num_workers=args.num_workers,
                            drop_last=True, pin_memory=device.type == "cuda", generator=loader_generator)
        batches = iter(loader)
        for _ in range(len(indices) // (args.batch_size * args.grad_accum_steps)):
            loss_sum, images = accumulate_gradients(wrapped, batches, args, class_weights, source_size, content_size,
                                                    autocast, scaler, world, device)
            images_seen += images
            if any_rank(not math.isfinite(loss_sum), device):
                raise FloatingPointError(f"the loss became {loss_sum} at step {state['step'] + 1}; "
                                         f"{last_good_checkpoint(checkpoint_path)}. "
                                         "Lower --lr, or use --precision fp32 / bf16")
            if args.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable_params, args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state["step"] += 1
            state["batch_in_epoch"] += 1
            step = state["step"]
            throughput = images_seen / (time.perf_counter() - started)
            progress.update(1)
            progress.set_postfix(loss=f"{loss_sum:.4f}", img_per_s=f"{throughput:.1f}")
            if step % args.log_every == 0 or step == total_steps:
                log_record({"step": step, "epoch": state["epoch"], "loss": loss_sum, "lr": scheduler.get_last_lr()[0],
                            "images_per_second": throughput, "peak_memory_mb": peak_memory_mb(device)})
            paused_at = time.perf_counter()
            end_of_epoch = state["batch_in_epoch"] == steps_per_epoch
            if (args.val_every and step % args.val_every == 0) or (not args.val_every and end_of_epoch) or step == total_steps:
                evaluate_and_save(step)
            if end_of_epoch:
                state["epoch"], state["batch_in_epoch"] = state["epoch"] + 1, 0
            state["finished"] = step == total_steps or state["stopped_early"]
            if step % args.checkpoint_every == 0 or state["finished"]:
                checkpoint(step)
            started += time.perf_counter() - paused_at  # images/s counts training time, not validation or saving
            if state["finished"] or end_of_epoch:
                break
    progress.close()
    if tracker:
        tracker.close()
    log(f"done: best validation {args.selection_metric} {state['best_score']:.4f} at step {state['best_step']}; outputs in {output}/")


def one_line(error: BaseException) -> str:
    """The message of an error; a DataLoader worker re-raises with its traceback in the message: its last line."""
    message = (str(error).strip().splitlines() or [type(error).__name__])[-1]
    return message.split(": ", 1)[1] if message.startswith(("dataset.DataError", "DataError")) else message


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except (D.DataError, BackboneError, HeadConfigError, FloatingPointError, CheckpointError, TrackingError,
            OSError) as error:
        print(f"error: {redact_tokens(one_line(error))}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        if "DataLoader worker" not in str(error):
            raise
        print(f"error: a data loader worker died ({D.first_line(error)}), often killed by the system when memory "
              "runs out: lower --num-workers or --batch-size, then continue with --resume", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
