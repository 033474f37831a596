"""Every flag of the entry scripts run_training.py and run_inference.py, with its default and its help, and every check
of their values: one place to look up, add or change a setting. A bad value is one line (cli.OneLineErrorParser)
before anything runs; run_training.py's settings may also come from a YAML/JSON file (--config).
"""

import argparse
import math
import os
import sys

import backbone_files
import cli
import dataset
import hub
import losses
import tracking
from model import BACKBONE_DTYPES, BACKBONE_TRAINING, HEAD_TYPES, LORA_TARGET_MODULES

OPTIMIZERS = ("adamw", "adam")
SCHEDULES = ("cosine", "constant")
SELECTION_METRICS = ("score", "mIoU", "seed_mIoU")
WORKERS = min(8, os.cpu_count() or 1)  # data loader processes by default
# Settings that stand for each other (an alias; one that overrides the other): one on the command line overrides
# every one of its group in the --config file.
SWITCH = dict(
    action=argparse.BooleanOptionalAction, default=False
)  # a flag that is off unless given, with a --no- form
OVERRIDING = (("resolution", "low_res"), ("epochs", "max_steps"))
TTA_SCALES = (0.1, 4.0)  # --tta-scales bounds, relative to the training resolution


# ----------------------------------------------------------------------------- run_training.py


def layer_list(text: str) -> list[int]:
    """'3,6,9,12' -> [3, 6, 9, 12]"""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of layer numbers, e.g. 3,6,9,12"
        ) from None


def training_parser(description: str = "") -> argparse.ArgumentParser:
    parser = cli.OneLineErrorParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or JSON file of settings (keys as the flags, e.g. lora_rank: 8); flags given on the "
        "command line override it. recipes/seed.yaml is the design we start from's experiment",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data-directory", default="sarrarp", help="unpacked release with extracted frames (default: %(default)s)"
    )
    data.add_argument(
        "--output-directory", default="trained-models", help="where weights, logs and curves go (default: %(default)s)"
    )
    data.add_argument(
        "--resolution",
        default="half",
        choices=list(dataset.RESOLUTION_SCALES),
        help="training resolution relative to the source; logits are always upsampled to the source (default: %(default)s)",
    )
    data.add_argument("--low-res", **SWITCH, help="alias for --resolution quarter (the design's flag)")
    data.add_argument(
        "--val-fraction",
        type=cli.finite_float,
        default=0.2,
        help="share of operations validated on (default: %(default)s)",
    )
    data.add_argument(
        "--val-videos", nargs="+", metavar="VIDEO", help="validation videos instead of a random split (e.g. video_03)"
    )
    data.add_argument(
        "--folds",
        type=int,
        metavar="K",
        help="cross-validation: divide the operations into K groups of about equal frame count (by "
        "--seed) and validate on group --fold; scripts/cross_validate.py trains every fold",
    )
    data.add_argument("--fold", type=int, metavar="I", help="with --folds: the 0-based group to validate on")
    data.add_argument(
        "--split-seed",
        type=int,
        metavar="S",
        help="the seed of the validation split and of the folds, to keep them while --seed changes (default: --seed)",
    )
    data.add_argument(
        "--train-videos",
        type=int,
        metavar="N",
        help="label budget: train on N of the training operations (parts of one count once), drawn by --seed; "
        "for one seed a smaller N's are among a larger N's; validation is unchanged (default: all)",
    )
    data.add_argument(
        "--augmentation",
        choices=dataset.AUGMENTATIONS,
        default="default",
        help="default: flip, affine (p 0.7), colour jitter, gamma, blur/noise; seed: the design we start "
        "from's flip, affine (always; scale 0.7-1.3, shift 20%%, shear 10) and colour jitter (default: %(default)s)",
    )
    data.add_argument(
        "--cache-frames", **SWITCH, help="keep a JPEG copy of each frame at training size (faster loading)"
    )
    data.add_argument("--skip-bad-samples", **SWITCH, help="warn about bad frames/masks and skip them")
    data.add_argument(
        "--num-workers", type=int, default=WORKERS, help="data loader processes per GPU (default: %(default)s)"
    )
    data.add_argument(
        "--prefetch-factor",
        type=int,
        default=2,
        help="batches each loader process prepares ahead; raise it if the GPU waits in bursts (default: %(default)s)",
    )
    data.add_argument(
        "--persistent-workers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the loader processes from one epoch and one validation to the next instead of starting them "
        "again, each holding its own copy of the dataset (default: on)",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--backbone",
        default=hub.DEFAULT_BACKBONE,
        help=f"short name ({', '.join(hub.BACKBONES)}), hub id, local directory saved with save_pretrained, "
        "or a .pth/.safetensors file in Meta's or timm's naming (default: %(default)s)",
    )
    model.add_argument(
        "--any-backbone-architecture",
        **SWITCH,
        help="load a --backbone weight file whose width and depth are no released DINOv3's (a custom or pruned ViT)",
    )
    model.add_argument(
        "--image-mean",
        type=cli.finite_float,
        nargs=3,
        metavar=("R", "G", "B"),
        help="normalisation mean on a 0..1 scale (default: the backbone's preprocessor_config.json, "
        "else ImageNet's, which DINOv3 was trained with)",
    )
    model.add_argument(
        "--image-std",
        type=cli.finite_float,
        nargs=3,
        metavar=("R", "G", "B"),
        help="normalisation std (as --image-mean)",
    )
    model.add_argument(
        "--hf-token-file", help="file holding a Hugging Face token (else HF_TOKEN, ./hf_token.txt, or your hub login)"
    )
    model.add_argument(
        "--backbone-training",
        choices=BACKBONE_TRAINING,
        default="lora",
        help="frozen: only the head trains; lora: LoRA adapters and the head; full: every backbone "
        "weight too, at --backbone-lr (default: %(default)s)",
    )
    model.add_argument(
        "--backbone-dtype",
        choices=list(BACKBONE_DTYPES),
        default="float32",
        help="dtype the frozen backbone weights are held in; bfloat16 halves their memory (a ViT-7B "
        "needs it on most GPUs); not with --backbone-training full (default: %(default)s)",
    )
    model.add_argument("--lora-rank", type=int, default=16, help="(default: %(default)s)")
    model.add_argument("--lora-alpha", type=cli.finite_float, default=32, help="(default: %(default)s)")
    model.add_argument("--lora-dropout", type=cli.finite_float, default=0.1, help="(default: %(default)s)")
    model.add_argument(
        "--lora-targets",
        nargs="+",
        default=list(LORA_TARGET_MODULES),
        help="backbone modules given LoRA, or all-linear (attention and MLP projections) (default: %(default)s)",
    )
    model.add_argument(
        "--head",
        choices=HEAD_TYPES,
        default="mlp",
        help="mlp: the design we start from, a 3-layer MLP turning each last-layer patch token into the "
        "logits of its 16x16 pixels; patch-mlp: a 3-layer MLP giving one prediction per patch, "
        "upsampled bilinearly; multilayer: several layers fused and upsampled to 1/4 of the input "
        "by 3x3 convs (default: %(default)s)",
    )
    model.add_argument(
        "--head-hidden",
        type=int,
        help="hidden width of the mlp / patch-mlp head (default: 10 x 16 x 16 = 2560 for mlp, as the "
        "design we start from; 256 for patch-mlp)",
    )
    model.add_argument(
        "--feature-layers",
        type=layer_list,
        nargs="+",
        metavar="3,6,9,12",
        help="1-based ViT layers the multilayer head reads (default: 4 evenly spaced, ending at the last)",
    )
    model.add_argument(
        "--head-width",
        type=int,
        default=256,
        help="multilayer head: width at 1/16, halved at 1/8 and 1/4; a multiple of 32 (default: %(default)s)",
    )

    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument(
        "--loss",
        choices=losses.LOSSES,
        default="ce",
        help="ce: class-weighted cross entropy; ce+dice: plus a soft Dice term over classes 1..9 (default: %(default)s)",
    )
    optimisation.add_argument(
        "--class-weights",
        choices=list(losses.CLASS_WEIGHTS),
        default="enet",
        help="cross-entropy class weights from each class's pixel frequency f over the training "
        "split: enet 1/ln(1.02+f); one-minus-frequency 1-f (the design we start from); "
        "none 1 (default: %(default)s)",
    )
    optimisation.add_argument(
        "--dice-weight",
        type=cli.finite_float,
        default=1.0,
        help="the Dice term's weight in --loss ce+dice (default: %(default)s)",
    )
    optimisation.add_argument("--epochs", type=int, default=1, help="(default: %(default)s)")
    optimisation.add_argument("--max-steps", type=int, help="optimizer steps to train for; overrides --epochs")
    optimisation.add_argument(
        "--batch-size", type=int, default=8, help="images per GPU per step (default: %(default)s)"
    )
    optimisation.add_argument(
        "--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer step (default: %(default)s)"
    )
    optimisation.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="adamw",
        help="adamw: decoupled weight decay; adam: weight decay added to the gradient (L2), "
        "as the design we start from with --weight-decay 0 (default: %(default)s)",
    )
    optimisation.add_argument(
        "--lr", type=cli.finite_float, default=2e-4, help="LoRA learning rate (default: %(default)s)"
    )
    optimisation.add_argument(
        "--head-lr", type=cli.finite_float, default=1e-3, help="head learning rate (default: %(default)s)"
    )
    optimisation.add_argument(
        "--backbone-lr",
        type=cli.finite_float,
        help="--backbone-training full: the last layer's learning rate (default: --lr)",
    )
    optimisation.add_argument(
        "--layer-decay",
        type=cli.finite_float,
        default=1.0,
        help="--backbone-training full: each earlier layer's learning rate is this times the "
        "next one's (embeddings lowest); 1 is off (default: %(default)s)",
    )
    optimisation.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="cosine",
        help="after --warmup-steps of linear warm-up: cosine decay to 0, or constant (default: %(default)s)",
    )
    optimisation.add_argument(
        "--warmup-steps", type=int, default=100, help="linear warm-up steps; 0 for none (default: %(default)s)"
    )
    optimisation.add_argument("--weight-decay", type=cli.finite_float, default=0.01, help="(default: %(default)s)")
    optimisation.add_argument(
        "--grad-clip",
        type=cli.finite_float,
        default=1.0,
        help="gradient norm clipping; 0 turns it off (default: %(default)s)",
    )
    optimisation.add_argument(
        "--precision",
        choices=list(cli.PRECISIONS),
        help="autocast precision (default: bf16 on an Ampere or newer GPU, fp16 with loss scaling on an older "
        "one, fp32 on the CPU)",
    )
    optimisation.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="TF32 for fp32 matrix products on Ampere or newer GPUs, several times faster than full fp32; recorded "
        "in config.json (default: on; --no-tf32 for full fp32)",
    )
    optimisation.add_argument(
        "--gradient-checkpointing",
        **SWITCH,
        help="recompute activations in the backward pass: far less memory, ~30%% slower",
    )
    optimisation.add_argument(
        "--compile",
        **SWITCH,
        help="torch.compile each backbone layer and the head (faster steps on a GPU after a first slow one; the "
        "weights and checkpoints are the same as uncompiled, so --resume works either way)",
    )
    optimisation.add_argument(
        "--fsdp",
        **SWITCH,
        help="under torchrun, shard the weights, gradients and Adam moments of --backbone-training full across the "
        "processes (FSDP2), for backbones whose full training does not fit one GPU (ViT-H+, 7B); without it each "
        "process holds a whole copy (DDP), which is faster when it fits",
    )
    optimisation.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")

    schedule = parser.add_argument_group("validation, logging, checkpoints")
    schedule.add_argument(
        "--val-every", type=int, default=0, help="validate every N steps; 0: after each epoch (default: %(default)s)"
    )
    schedule.add_argument(
        "--selection-metric",
        default="score",
        choices=SELECTION_METRICS,
        help="validation number that picks best/ and drives early stopping: the official score, its "
        "mIoU, or the design we start from's own mIoU (default: %(default)s)",
    )
    schedule.add_argument(
        "--early-stop-patience",
        type=int,
        default=0,
        help="stop after N validations without a better --selection-metric; 0 never stops early (default: %(default)s)",
    )
    schedule.add_argument(
        "--checkpoint-every",
        type=int,
        default=200,
        help="write the resumable checkpoint each N steps (default: %(default)s)",
    )
    schedule.add_argument(
        "--log-every", type=int, default=10, help="log training loss every N steps (default: %(default)s)"
    )
    schedule.add_argument(
        "--resume",
        **SWITCH,
        help="continue the run in --output-directory from its checkpoint; with a larger --max-steps or --epochs, a "
        "finished run trains on (the schedule is recomputed over the new total: see docs/training.md)",
    )
    schedule.add_argument(
        "--init-from",
        metavar="MODEL_DIR",
        help="start from the trained weights of another run (its best/; or name its best/ or last/ folder): same "
        "backbone, backbone training and head; recorded in config.json",
    )
    schedule.add_argument(
        "--report-to",
        choices=tracking.REPORTERS,
        default="none",
        help="also log live to TensorBoard (OUTPUT/tensorboard: tensorboard --logdir OUTPUT) or "
        "Weights & Biases (WANDB_MODE=offline without a network): losses, every validation "
        "score, and pictures of a few validation frames (default: %(default)s)",
    )
    return parser


def training_arguments(argv=None, description: str = "") -> argparse.Namespace:
    """run_training.py's flags, over the settings of --config FILE; every value checked before anything runs."""
    parser = training_parser(description)
    argv = sys.argv[1:] if argv is None else list(argv)
    args, sources = cli.parse_with_settings(parser, argv, OVERRIDING)
    check_training_arguments(parser, args, sources)
    return args


def check_training_arguments(parser, args, sources=None) -> None:
    """Every check of run_training.py's arguments; a bad value is one line (parser.error). sources: where each setting
    given came from (cli.parse_with_settings), to name it in the message."""
    sources = sources or {}

    def named(name):  # a flag, and the file it came from if not the command line
        source = sources.get(name, "the command line")
        return cli.flag(name) + ("" if source == "the command line" else f" (from {source})")

    if args.low_res and "resolution" in sources and args.resolution != "quarter":
        parser.error(f"{named('low_res')} and {named('resolution')} {args.resolution} disagree: give one")
    if args.low_res:  # an alias: the run records --resolution quarter either way
        args.resolution, args.low_res = "quarter", False
    if args.feature_layers:  # "3,6" "9" -> [3, 6, 9]
        args.feature_layers = [layer for part in args.feature_layers for layer in part]
    at_least_one = ("epochs", "batch_size", "grad_accum_steps", "log_every", "checkpoint_every", "lora_rank")
    non_negative = ("warmup_steps", "early_stop_patience", "weight_decay", "grad_clip", "val_every", "num_workers")
    cli.check_ranges(
        parser,
        args,
        at_least_one=(*at_least_one, "max_steps", "head_hidden", "train_videos", "prefetch_factor"),
        non_negative=(*non_negative, "seed", "dice_weight", "lr", "head_lr", "backbone_lr"),
        named=named,
    )
    folds = args.folds
    refusals = [
        (not args.lora_alpha > 0, f"{named('lora_alpha')} must be greater than 0"),
        (not 0 <= args.lora_dropout < 1, f"{named('lora_dropout')} must be in [0, 1)"),
        (args.head_width < 32 or args.head_width % 32, f"{named('head_width')} must be a positive multiple of 32"),
        (not 0 < args.val_fraction < 1, f"{named('val_fraction')} must be between 0 and 1"),
        (folds is not None and folds < 2, f"{named('folds')} must be at least 2, got {folds}"),
        (
            folds is not None and (args.fold is None or not 0 <= args.fold < folds),
            f"--folds {folds} needs --fold 0..{(folds or 0) - 1} (the group to validate on), got {args.fold}; "
            "scripts/cross_validate.py train trains every fold",
        ),
        (
            folds is not None and args.val_videos,
            f"{named('val_videos')} and {named('folds')} both choose the validation videos: give one",
        ),
        (folds is None and args.fold is not None, "--fold needs --folds K"),
        (not 0 < args.layer_decay <= 1, f"{named('layer_decay')} must be in (0, 1]"),
        (
            args.backbone_training == "full" and args.backbone_dtype != "float32",
            "--backbone-training full trains every backbone weight, which needs --backbone-dtype float32",
        ),
        (
            (args.image_mean is None) != (args.image_std is None),
            f"{named('image_mean')} and {named('image_std')} go together: give both",
        ),
        (args.image_std is not None and not min(args.image_std) > 0, f"{named('image_std')} must be positive"),
    ]
    for refused, message in refusals + fsdp_refusals(args):
        if refused:
            parser.error(message)
    refuse_unused(parser, args, sources, named)


def fsdp_refusals(args) -> list[tuple[bool, str]]:
    """--fsdp shards a full fine-tuning across torchrun's processes in bf16 or fp32, and nothing else."""
    training = args.backbone_training
    return [
        (args.fsdp and "RANK" not in os.environ, "--fsdp shards across processes: launch with torchrun"),
        (
            args.fsdp and training != "full",
            f"--fsdp shards --backbone-training full; {training} trains few weights and runs under torchrun "
            "without it (DDP)",
        ),
        (args.fsdp and args.precision == "fp16", "--fsdp trains in bf16 or fp32: give --precision bf16 or fp32"),
    ]


def refuse_unused(parser, args, sources: dict, named) -> None:
    """A setting given for a mode that does not use it is refused if the command line gave it; a --config file's is
    set back to its default with a note (a recipe serves several modes, e.g. in benchmarks/ablate.py): either way no
    run records a setting that had no effect."""
    full, lora, multilayer = (
        args.backbone_training == "full",
        args.backbone_training == "lora",
        args.head == "multilayer",
    )
    uses = {
        "layer_decay": (full, "--backbone-training full"),
        "backbone_lr": (full, "--backbone-training full"),
        **dict.fromkeys(
            ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets"), (lora, "--backbone-training lora")
        ),
        "head_hidden": (not multilayer, "--head mlp and patch-mlp"),
        "head_width": (multilayer, "--head multilayer"),
        "feature_layers": (multilayer, "--head multilayer"),
        "dice_weight": (args.loss == "ce+dice", "--loss ce+dice"),
        "val_fraction": (not (args.folds or args.val_videos), "a random split (not with --val-videos or --folds)"),
        "any_backbone_architecture": (backbone_files.is_weight_file(args.backbone), "a .pth/.safetensors --backbone"),
    }
    for name, (used, where) in uses.items():
        if name not in sources or used:
            continue
        if sources[name] == "the command line":
            parser.error(f"{cli.flag(name)} applies to {where}")
        print(f"note: {named(name)} applies to {where}: not used", file=sys.stderr)
        setattr(args, name, parser.get_default(name))


# ----------------------------------------------------------------------------- run_inference.py


def inference_parser(description: str = "") -> argparse.ArgumentParser:
    parser = cli.OneLineErrorParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data-directory", default="sarrarp", help="unpacked release with extracted frames (default: %(default)s)"
    )
    parser.add_argument(
        "--model-directory",
        nargs="+",
        default=["trained-models"],
        metavar="MODEL",
        help="output directory of run_training.py, or the hub id USER/REPO of one shared on the Hugging Face hub "
        "(docs/sharing.md); several: an ensemble averaging their softmax at the "
        "source resolution (they may differ in head, resolution and backbone) (default: %(default)s)",
    )
    parser.add_argument(
        "--output", metavar="DIR", help="prediction folder (default: MODEL/inference; an ensemble needs one)"
    )
    parser.add_argument(
        "--checkpoint", choices=["best", "last"], default="best", help="the saved weights to use (default: %(default)s)"
    )
    parser.add_argument(
        "--split",
        default="test",
        choices=["test", "val"],
        help="test: the videos in DATA/test; val: the videos listed under 'val' in MODEL/split.json, "
        "from DATA/train (default: %(default)s)",
    )
    parser.add_argument(
        "--eval-only", **SWITCH, help="re-score the predictions in MODEL/inference without loading the model"
    )
    parser.add_argument(
        "--predictions-directory",
        help="score this prediction folder (official layout) instead, without a model; the scores are written into it",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="(default: %(default)s)")
    parser.add_argument(
        "--num-workers", type=int, default=WORKERS, help="frame loading processes (default: %(default)s)"
    )
    parser.add_argument(
        "--backbone", help="hub id, local directory or weight file to use instead of the backbone named in config.json"
    )
    parser.add_argument(
        "--hf-token-file", help="file holding a Hugging Face token (else HF_TOKEN, ./hf_token.txt, or your hub login)"
    )
    parser.add_argument(
        "--tta",
        choices=["none", "flip"],
        default="none",
        help="flip: average the softmax of each frame and of its mirror image (default: %(default)s)",
    )
    parser.add_argument(
        "--tta-scales",
        nargs="+",
        type=cli.finite_float,
        default=[1.0],
        metavar="S",
        help="also average over the frame resized to S x each model's training resolution (padded to "
        "multiples of 16), e.g. 0.75 1 1.25 (default: 1)",
    )
    parser.add_argument(
        "--min-component-size",
        type=int,
        default=0,
        help="relabel connected blobs of a class smaller than this many pixels with the label around them (default: 0, off)",
    )
    parser.add_argument(
        "--all-frames", **SWITCH, help="also predict every extracted frame that has no ground-truth mask"
    )
    parser.add_argument(
        "--compile", **SWITCH, help="torch.compile each backbone layer and the head of every model (see training)"
    )
    parser.add_argument(
        "--precision",
        choices=list(cli.PRECISIONS),
        help="autocast precision (default: the one the model was trained in, as config.json records it: fp32 stays "
        "fp32; a half precision is bf16 on an Ampere or newer GPU, fp16 on an older one; fp32 on the CPU)",
    )
    any_input = parser.add_argument_group("any video or folder of images (--input; no ground truth, no release layout)")
    any_input.add_argument(
        "--input",
        metavar="PATH",
        help="a video (.avi .mp4 .mkv .mov ...) or a folder of .png/.jpg images to segment; writes an "
        "H.264 overlay.mp4 (or overlays/ and masks/ for images) to --output (default: "
        "MODEL/predictions/<input name>/)",
    )
    any_input.add_argument(
        "--save-masks",
        **SWITCH,
        help="video: also write each predicted frame's class ids to masks/{frame index:09d}.png (the release's naming)",
    )
    any_input.add_argument(
        "--every",
        type=int,
        default=1,
        metavar="N",
        help="video: predict the frames whose index is a multiple of N; the overlay shows the latest prediction (default: 1)",
    )
    any_input.add_argument(
        "--start",
        type=cli.finite_float,
        default=0.0,
        metavar="SECONDS",
        help="video: first second to segment (default: 0)",
    )
    any_input.add_argument(
        "--end", type=cli.finite_float, metavar="SECONDS", help="video: segment up to this second (default: the end)"
    )
    any_input.add_argument(
        "--temporal-smoothing",
        type=cli.finite_float,
        default=0.0,
        metavar="ALPHA",
        help="video: average the class probabilities over the predicted frames, each new one weighing "
        "1 - ALPHA (an exponential moving average; default: 0, off)",
    )
    return parser


def inference_arguments(argv=None, description: str = "") -> argparse.Namespace:
    """run_inference.py's flags, every value checked before anything runs."""
    parser = inference_parser(description)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    check_inference_arguments(parser, args, cli.given_settings(parser, argv))
    return args


def check_inference_arguments(parser, args, given=()) -> None:
    """Every check of run_inference.py's arguments; a bad value is one line (parser.error). given: the settings the
    command line gave, refused where they would have no effect."""
    cli.check_ranges(parser, args, at_least_one=("batch_size", "every"))
    ensemble = len(args.model_directory) > 1
    refusals = [
        (args.min_component_size < 0, "--min-component-size must be 0 or more"),
        (args.num_workers < 0, "--num-workers must be 0 or more"),
        (
            not all(0 < scale < math.inf for scale in args.tta_scales),
            f"--tta-scales must be positive numbers, got {' '.join(map(str, args.tta_scales))}",
        ),
        (
            not all(TTA_SCALES[0] <= scale <= TTA_SCALES[1] for scale in args.tta_scales),
            f"--tta-scales must be from {TTA_SCALES[0]} to {TTA_SCALES[1]} times the training resolution, got "
            f"{' '.join(map(str, args.tta_scales))}",
        ),
        (
            not 0 <= args.start < math.inf or (args.end is not None and not args.start < args.end < math.inf),
            "--start must be 0 or more and --end after it",
        ),
        (not 0 <= args.temporal_smoothing < 1, "--temporal-smoothing must be in [0, 1)"),
        (
            args.input and (args.eval_only or args.predictions_directory),
            "--input segments a video or images with a model: not with --eval-only or --predictions-directory",
        ),
        (
            ensemble and args.backbone,
            "--backbone replaces the backbone of one model: give one --model-directory with it",
        ),
        (
            ensemble and not (args.output or args.predictions_directory),
            "an ensemble's predictions belong to no one model directory: give --output DIR",
        ),
    ]
    for refused, message in refusals:
        if refused:
            parser.error(message)
    scoring_only = args.eval_only or args.predictions_directory
    video = bool(args.input) and not os.path.isdir(args.input)
    uses = {
        **dict.fromkeys(("save_masks", "every", "start", "end", "temporal_smoothing"), (video, "--input VIDEO")),
        "all_frames": (not args.input, "the release's videos (not --input)"),
        "split": (not args.input, "the release's videos (not --input)"),
        **dict.fromkeys(
            ("tta", "tta_scales", "min_component_size", "backbone", "precision"),
            (not scoring_only, "predicting (not --eval-only or --predictions-directory)"),
        ),
    }
    for name in given:
        used, where = uses.get(name, (True, ""))
        if not used:
            parser.error(f"{cli.flag(name)} applies to {where}")
