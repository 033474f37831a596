"""Fine-tune DINOv3 (LoRA) + a segmentation head (MLP or multi-layer upsampler) for SAR-RARP50 instrument segmentation.

One process:  python run_training.py --data-directory sarrarp --output-directory trained-models
Many GPUs:    torchrun --nproc_per_node 4 run_training.py ...   (DDP; only rank 0 writes and prints)
Sharded, many nodes: --fsdp, scripts/train_multinode.sbatch   (docs/training.md, "Several GPUs" and "Several nodes")
"""

import argparse
import collections
import contextlib
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import cli
import dataset
import discovery
import distributed
import hub
import losses
import memory
import model_card
import options
import outputs
import plots
import progress_bars
import report
import run_directory
import sharding
import tracking
import trained_model
from metrics import frame_record, summarize
from model import (
    HeadConfigError,
    LoRA,
    backbone_fingerprint,
    build_model,
    compile_blocks,
    count_parameters,
    parameter_bytes,
)
from run_directory import RunDirectory


def parse_args(argv=None) -> argparse.Namespace:
    return options.training_arguments(argv, description=__doc__)


# Where a run counts a step's memory before its first step: a GPU's is all it has; a CPU's has swap and page cache
STEP_MEMORY_DEVICES = ("cuda",)
VALIDATION_PICTURES = 3  # validation frames pictured for the tracker at each validation, the same every time


# ----------------------------------------------------------------------------- data


@dataclass
class Data:
    """The training and validation sets, the loss's class weights, and what the run records of them."""

    train: dataset.SegmentationDataset
    val: dataset.SegmentationDataset
    class_weights: torch.Tensor
    records: dict  # split.json, class_weights.json
    fingerprints: dict  # of the masks ("data") and of the frames


def prepare_data(args, rank: int, device) -> Data:
    """Samples, split and class weights. Rank 0 scans (and caches) the masks first and the others reuse its cache;
    an error on rank 0 reaches every rank."""
    train_root = Path(args.data_directory) / "train"
    video_dirs = discovery.find_video_dirs(train_root) if train_root.is_dir() else []
    if not video_dirs:
        raise dataset.DataError(f"no training videos in {train_root}: {cli.NO_DATA_HINT}")
    samples = discovery.find_samples(video_dirs, skip_bad=args.skip_bad_samples)
    statistics_file = Path(args.data_directory) / discovery.STATISTICS_FILE
    scan = lambda: discovery.scan_samples(samples, statistics_file, skip_bad=args.skip_bad_samples)  # noqa: E731
    refusal = dataset.DataError("rank 0 found bad training data (its message says which)")
    scanned = distributed.on_rank_zero(scan, rank, device, refusal, (dataset.DataError,))
    samples, pixel_counts, source_size = scanned if rank == 0 else scan()
    split = choose_split(args, collections.Counter(s.video for s in samples))
    is_train = np.isin([s.video for s in samples], split["train"])
    totals = pixel_counts[is_train].sum(0)
    frequencies = totals / totals.sum()
    weights = losses.class_weights_from_frequencies(frequencies, args.class_weights)
    formula = losses.CLASS_WEIGHTS[args.class_weights][0] + "; f = pixel frequency of the class over the training split"
    records = {
        "split.json": split,
        "class_weights.json": {
            "formula": formula,
            "classes": {
                name: {"frequency": float(f), "weight": float(w)}
                for name, f, w in zip(dataset.CLASS_NAMES, frequencies, weights)
            },
        },
    }
    scale = dataset.RESOLUTION_SCALES[args.resolution]
    train = dataset.SegmentationDataset(
        [s for s, t in zip(samples, is_train) if t],
        source_size,
        scale,
        augment=True,
        cache_frames=args.cache_frames,
        seed=args.seed,
        augmentation=args.augmentation,
    )
    val = dataset.SegmentationDataset(
        [s for s, t in zip(samples, is_train) if not t], source_size, scale, cache_frames=args.cache_frames
    )
    return Data(
        train,
        val,
        torch.tensor(weights, dtype=torch.float32),
        records,
        {
            "data": run_directory.data_fingerprint(samples, pixel_counts),
            "frames": run_directory.frames_fingerprint(samples),
        },
    )


def choose_split(args, frames_per_video: dict[str, int]) -> dict:
    """split.json: the training and validation videos; with --folds, the fold and every fold's group; with
    --train-videos, the training operations drawn (validation is unchanged)."""
    seed = args.seed if args.split_seed is None else args.split_seed
    if args.folds is None:
        train, val = dataset.split_by_video(list(frames_per_video), args.val_fraction, seed, args.val_videos)
        split = {"train": train, "val": val}
    else:
        groups = dataset.fold_groups(frames_per_video, args.folds, seed)
        train = sorted(video for g, group in enumerate(groups) if g != args.fold for video in group)
        split = {
            "train": train,
            "val": groups[args.fold],
            "folds": args.folds,
            "fold": args.fold,
            "fold_groups": groups,
        }
    if args.train_videos:
        split["train"], drawn = dataset.label_budget(split["train"], args.train_videos, args.seed)
        split["label_budget"] = {"operations": args.train_videos, "drawn": drawn, "seed": args.seed}
    return split


def epoch_batches(training, state) -> tuple:
    """(batches, steps): what is left of this epoch, in the sampler's order for the epoch, from where a resumed run
    stopped."""
    args, data = training.args, training.data
    sampler = DistributedSampler(
        data.train, training.world, training.rank, shuffle=True, seed=args.seed, drop_last=True
    )
    sampler.set_epoch(state.epoch)
    data.train.epoch = state.epoch
    per_step = args.batch_size * args.grad_accum_steps
    loader = training.train_loader
    loader.sampler[:] = list(sampler)[state.batch_in_epoch * per_step :]  # in place: its workers live on
    return iter(loader), len(loader.sampler) // per_step


# ----------------------------------------------------------------------------- model and optimisation


def head_settings(args) -> dict:
    """config.json's "head" as the arguments give it (model.py fills in the default feature layers)."""
    if args.head in ("mlp", "patch-mlp"):
        return {"type": args.head, "hidden": args.head_hidden}
    return {"type": "multilayer", "feature_layers": args.feature_layers, "width": args.head_width}


def make_model(args, device, log):
    token = hub.resolve_hf_token(args.hf_token_file)
    lora = LoRA(args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
    settings = dict(
        backbone_training=args.backbone_training, lora=lora, gradient_checkpointing=args.gradient_checkpointing
    )
    normalization = args.image_mean and (args.image_mean, args.image_std)
    settings.update(head=head_settings(args), any_architecture=args.any_backbone_architecture)
    model = build_model(args.backbone, token, args.backbone_dtype, normalization, **settings)
    model.to(device)
    del token
    (trainable, total), (trainable_bytes, total_bytes) = count_parameters(model), parameter_bytes(model)
    log(
        f"model: {args.backbone} ({args.backbone_training}), {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%); parameters take {total_bytes / 2**20:.1f} MB ({trainable_bytes / 2**20:.1f} MB "
        "trainable)"
    )
    log(
        f"head: {model.head_config}, {sum(p.numel() for p in model.head.parameters()):,} parameters; loss: {args.loss}"
        + (f" (dice weight {args.dice_weight})" if args.loss == "ce+dice" else "")
    )
    return model


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
    top = args.lr if args.backbone_lr is None else args.backbone_lr
    return groups + [
        {"params": params, "lr": top * args.layer_decay ** max(0, num_layers - layer)}
        for layer, params in sorted(by_layer.items())
    ]


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


def change_budget(training, state, saved_arguments: dict, log) -> None:
    """--resume with another --max-steps or --epochs: the run goes on to the new total, a finished one too (unless it
    stopped early). The schedule is recomputed over the new total: the steps taken kept their learning rates and the
    next follow the new curve, so a cosine's rate rises to where the longer cosine is at this step."""
    args, scheduler = training.args, training.scheduler
    budget = {"max_steps": args.max_steps, "epochs": args.epochs}
    before = saved_arguments.get("max_steps") or saved_arguments.get("epochs", 1) * training.steps_per_epoch
    if budget == {name: saved_arguments.get(name) for name in budget}:
        return
    if training.total_steps < state.step:
        raise run_directory.RunDirectoryError(
            f"the run is at step {state.step}, past the {training.total_steps} steps of the new budget: give a "
            "larger --max-steps or --epochs, or the old ones"
        )
    was = training.optimizer.param_groups[0]["lr"]
    for group, base_lr, factor in zip(training.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(state.step)  # what the new schedule gives the next step
    state.finished = state.stopped_early or state.step == training.total_steps
    log(
        f"budget {before} -> {training.total_steps} steps at step {state.step}: the {args.schedule} schedule now spans "
        f"{training.total_steps} steps; the next step's learning rate is {training.optimizer.param_groups[0]['lr']:.3g} "
        f"(it was {was:.3g})" + (" (the run stopped early: it stays stopped)" if state.stopped_early else "")
    )
    training.run.record_budget(budget, state.step)


# ----------------------------------------------------------------------------- set-up


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint, so that a resumed run continues exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_score: float = -1.0
    best_step: int | None = None
    validations_without_improvement: int = 0
    stopped_early: bool = False
    finished: bool = False


@dataclass
class Training:
    """Everything the loop works with, made by setup()."""

    args: argparse.Namespace
    run: RunDirectory
    data: Data
    model: torch.nn.Module
    loss: object  # losses.make_loss: loss(logits, target)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast: object  # cli.autocast_for: autocast() -> a context
    # Both loaders draw their worker seeds from one generator of their own, so that the global RNG (LoRA dropout)
    # advances identically in an uninterrupted and in a resumed run. Their workers live as long as the run.
    train_loader: DataLoader  # its sampler, a list, is each epoch's order (epoch_batches)
    val_loader: DataLoader
    steps_per_epoch: int
    total_steps: int
    wrapped: torch.nn.Module = None  # the model, in DistributedDataParallel under torchrun
    pictured: set = field(default_factory=set)  # validation indices pictured for the tracker

    rank = property(lambda self: self.run.rank)
    world = property(lambda self: self.run.world)
    device = property(lambda self: self.run.device)


def setup(args, log) -> tuple[Training, LoopState]:
    """The run folder, data, model, optimizer and loaders; the state from the checkpoint with --resume. Everything
    that can fail on bad input (the folder, data, backbone, token) runs before anything is written."""
    rank, world, device = distributed.setup()
    run = RunDirectory(Path(args.output_directory), rank, world, device)
    run.check_inputs_shared(args)  # a rank on another node that cannot find them
    saved_config = run.check_request(args)
    torch.manual_seed(args.seed)
    data = prepare_data(args, rank, device)
    model = make_model(args, device, log)
    fingerprints = {**data.fingerprints, "backbone": backbone_fingerprint(model)}
    if saved_config is not None:
        run_directory.check_fingerprints(saved_config, fingerprints)
    checkpoint = run_directory.load_checkpoint(run.checkpoint_path) if args.resume else None
    initial_weights = None
    if args.init_from and checkpoint is None:
        initial_weights = trained_model.load_initial_weights(model, args.init_from)
        log(f"initial weights: {initial_weights['directory']}/{initial_weights['weights']}/ (--init-from)")
    precision = cli.precision_for(args.precision, device)
    cli.use_tf32(args.tf32)
    run.hold(data.records)
    run.check_records_shared(data.records, fingerprints)
    if args.compile:
        compile_blocks(model)
    if args.fsdp:  # before the optimizer, which then steps each rank's shards
        sharding.shard(model, model.vit().model.layer, precision)

    training = make_training(args, run, data, model, precision)
    state = LoopState()
    if checkpoint is not None:
        state = run.restore(checkpoint, model, training.optimizer, training.scheduler, training.scaler, state)
        change_budget(training, state, saved_config["arguments"], log)
    else:
        record = run_directory.run_record(args, model, data.train, precision, world, device, fingerprints)
        run.start({**record, "init_from": initial_weights})
    if not state.finished and run.open_tracker(args.report_to, state.step if checkpoint is not None else None):
        shown = training.val_loader.sampler  # this rank's validation indices
        training.pictured = set(shown[:: max(1, len(shown) // VALIDATION_PICTURES)][:VALIDATION_PICTURES])
    if rank == 0 and not state.finished and device.type in STEP_MEMORY_DEVICES and not args.fsdp:
        report_step_memory(training, log)
    devices = [device.index] if device.type == "cuda" else None
    training.wrapped = DistributedDataParallel(model, device_ids=devices) if world > 1 and not args.fsdp else model
    return training, state


def make_training(args, run, data: Data, model, precision: str) -> Training:
    """The optimizer, schedule, loss and validation loader of a model on this data."""
    steps_per_epoch = len(data.train) // (run.world * args.batch_size * args.grad_accum_steps)
    if steps_per_epoch == 0:
        raise dataset.DataError(
            f"{len(data.train)} training samples make no full step of {run.world} x {args.batch_size} "
            f"x {args.grad_accum_steps} images: lower --batch-size or --grad-accum-steps"
        )
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args, total_steps)
    loss = losses.make_loss(args, data.class_weights.to(run.device))
    scaler = torch.amp.GradScaler(run.device.type, enabled=precision == "fp16")
    autocast = cli.autocast_for(precision, run.device)
    generator = torch.Generator().manual_seed(args.seed)
    val_indices = distributed.share(len(data.val), run.rank, run.world)
    loading = dict(
        batch_size=args.batch_size,
        num_workers=(workers := args.num_workers),
        generator=generator,
        pin_memory=run.device.type == "cuda",  # page-locked batches: the copy to the GPU overlaps the step
        persistent_workers=args.persistent_workers and workers > 0,
        prefetch_factor=args.prefetch_factor if workers else None,
    )
    train_loader = DataLoader(data.train, sampler=[], drop_last=True, **loading)
    val_loader = DataLoader(data.val, sampler=val_indices, **loading)
    optimisation = (loss, optimizer, scheduler, scaler, autocast)
    return Training(args, run, data, model, *optimisation, train_loader, val_loader, steps_per_epoch, total_steps)


# ----------------------------------------------------------------------------- one step


def forward_loss(training: Training, model, images, masks, content_size=None) -> torch.Tensor:
    """The loss of a batch, on logits upsampled to the source resolution (where the metric scores them)."""
    data = training.data.train
    with training.autocast():
        logits = model(images, data.source_size, content_size or data.content_size).float()
        return training.loss(logits, masks)


def train_step(training: Training, batches, step: int) -> tuple[float, int]:
    """Optimizer step number step: forward and backward of --grad-accum-steps micro-batches (DDP syncs gradients on
    the last only), clipping, the update; returns the summed loss and the images all ranks saw."""
    accumulation = training.args.grad_accum_steps
    loss_sum, images_seen = 0.0, 0
    for micro in range(accumulation):
        batch = next(batches)
        images = batch["image"].to(training.device, non_blocking=True)
        masks = batch["mask"].to(training.device, non_blocking=True).long()
        sync = micro == accumulation - 1 or training.world == 1
        with distributed.local_gradients(training.wrapped) if not sync else contextlib.nullcontext():
            loss = forward_loss(training, training.wrapped, images, masks) / accumulation
            training.scaler.scale(loss).backward()  # a disabled scaler (bf16, fp32) passes the loss through
        loss_sum += loss.item()
        images_seen += len(images) * training.world
    if distributed.any_rank(not math.isfinite(loss_sum), training.device):
        raise FloatingPointError(
            f"the loss became {loss_sum} at step {step}; {training.run.last_good_checkpoint()}. "
            "Lower --lr, or use --precision fp32 / bf16"
        )
    if training.args.grad_clip:
        training.scaler.unscale_(training.optimizer)
        torch.nn.utils.clip_grad_norm_(
            [p for p in training.model.parameters() if p.requires_grad], training.args.grad_clip
        )
    training.scaler.step(training.optimizer)
    training.scaler.update()
    training.optimizer.zero_grad(set_to_none=True)
    training.scheduler.step()
    return loss_sum, images_seen


def report_step_memory(training: Training, log) -> None:
    """Before the first step: a step's memory, counted on fake tensors (memory.py), beside the free memory, with the
    settings that would fit when it does not. It warns, never refuses: the count leaves the allocator's slack out."""
    data, model, device = training.data.train, training.model, training.device

    def need(batch_size: int, resolution: str, checkpointing: bool) -> int:
        content, padded = dataset.training_size(data.source_size, dataset.RESOLUTION_SCALES[resolution])
        images = lambda: torch.empty(batch_size, 3, *padded, dtype=torch.uint8, device=device)  # noqa: E731
        masks = lambda: torch.empty(batch_size, *data.source_size, dtype=torch.long, device=device)  # noqa: E731
        loss_of = lambda: forward_loss(training, model, images(), masks(), content)  # noqa: E731
        if not checkpointing or model.vit().is_activation_checkpointing:
            return memory.training_step_bytes(loss_of, training.optimizer)
        model.vit().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        try:
            return memory.training_step_bytes(loss_of, training.optimizer)
        finally:
            model.vit().activation_checkpointing_disable()

    try:
        log(memory.training_advice(need, training.args, device))
    except Exception as error:  # an estimate only: a step it cannot count still runs
        log(f"memory: not estimated ({cli.first_line(error, 100)})")


# ----------------------------------------------------------------------------- validation


@torch.no_grad()
def validate(model, loader, autocast, world: int, pictured=()) -> tuple[dict, dict]:
    """The official SAR-RARP50 score over the validation frames (each rank scores its share of loader's), and
    (prediction, ground truth) of the frames of this rank's share whose indices are in pictured."""
    model.eval()
    data, device = loader.dataset, model.mean.device
    scored, kept = [], {}
    for batch in progress_bars.bar(
        loader, desc="validating", unit="batch", leave=False, disable=distributed.rank() != 0
    ):
        with autocast():
            logits = model(batch["image"].to(device, non_blocking=True), data.source_size, data.content_size)
        predictions = logits.argmax(1).to(torch.uint8).cpu().numpy()
        for index, prediction, truth in zip(batch["index"].tolist(), predictions, batch["mask"].numpy()):
            scored.append((index, data.samples[index].video, frame_record(prediction, truth)))
            if index in pictured:
                kept[index] = prediction, truth
    model.train()
    per_video, every_frame = {}, {index: rest for part in distributed.gather(scored, world) for index, *rest in part}
    for video, record in every_frame.values():  # each frame once (distributed.share repeats some)
        per_video.setdefault(video, []).append(record)
    return summarize(per_video), kept


def validate_and_select(training: Training, state: LoopState) -> None:
    """Validate; keep the best weights by --selection-metric; count validations without improvement and stop early
    after --early-stop-patience of them (the same decision on every rank)."""
    args, step = training.args, state.step
    run_directory.peak_memory(training.device)  # from here, validation's own peak
    result, kept = validate(training.model, training.val_loader, training.autocast, training.world, training.pictured)
    result["memory"] = run_directory.peak_memory(training.device)
    result["background_only"] = report.background_only_of(tuple((s.video, s.mask) for s in training.data.val.samples))
    improved = result[args.selection_metric] > state.best_score
    if improved:
        state.best_score, state.best_step, state.validations_without_improvement = (
            result[args.selection_metric],
            step,
            0,
        )
    else:
        state.validations_without_improvement += 1
    training.run.log({"step": step, "val": result}, plots.validation_pictures(training.data.val.samples, kept))
    if training.rank == 0:
        report.print_scores(result, step)
    if improved:
        training.run.save_weights(training.model, "best")
    if args.early_stop_patience and state.validations_without_improvement >= args.early_stop_patience:
        state.stopped_early = True
        reason = (
            f"early stop at step {step}: validation {args.selection_metric} has not improved for "
            f"{args.early_stop_patience} validations (best {state.best_score:.4f} at step {state.best_step})"
        )
        training.run.log({"step": step, "early_stop": reason})
        if training.rank == 0:
            print(reason)


def save_checkpoint(training: Training, state: LoopState) -> None:
    training.run.save_checkpoint(
        training.model, training.optimizer, training.scheduler, training.scaler, state, training.args.selection_metric
    )


# ----------------------------------------------------------------------------- the loop


def log_step(training: Training, state: LoopState, loss: float, images_per_second: float) -> None:
    """A training record: to metrics.jsonl and the tracker."""
    record = {"step": state.step, "epoch": state.epoch, "loss": loss, "lr": training.scheduler.get_last_lr()[0]}
    memory = run_directory.peak_memory(training.device)  # of training since the previous record
    training.run.log({**record, "images_per_second": images_per_second, **memory})


def train(args) -> None:
    tracking.check_available(args.report_to)
    log = print if distributed.rank() == 0 else (lambda *a, **k: None)
    training, state = setup(args, log)
    if state.finished:
        log(f"{training.run.path} holds a finished run (step {state.step}); nothing to do")
        log(run_directory.next_commands(args))
        return
    if state.step:
        log(f"resuming at step {state.step} of {training.total_steps}")
    total, rank = training.total_steps, training.rank
    with progress_bars.bar(
        total=total, initial=state.step, desc="training", unit="step", disable=rank != 0
    ) as progress:
        throughput = run_directory.Throughput()
        training.model.train()
        while not state.finished:
            batches, steps = epoch_batches(training, state)
            for _ in range(steps):
                loss, images = train_step(training, batches, state.step + 1)
                state.step, state.batch_in_epoch = state.step + 1, state.batch_in_epoch + 1
                images_per_second = throughput.add(images)
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", img_per_s=f"{images_per_second:.1f}", refresh=False)
                last_step = state.step == training.total_steps
                if state.step % args.log_every == 0 or last_step:
                    log_step(training, state, loss, images_per_second)
                end_of_epoch = state.batch_in_epoch == training.steps_per_epoch
                with throughput.paused():  # images/s counts training time, not validation or saving
                    due = state.step % args.val_every == 0 if args.val_every else end_of_epoch
                    if due or last_step:
                        validate_and_select(training, state)
                    if end_of_epoch:
                        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                    state.finished = last_step or state.stopped_early
                    if state.step % args.checkpoint_every == 0 or state.finished:
                        save_checkpoint(training, state)
                if state.finished or end_of_epoch:
                    break
    training.run.close()
    best = f"best validation {args.selection_metric} {state.best_score:.4f} at step {state.best_step}"
    log(f"done: {best}; outputs in {training.run.path}/")
    if rank == 0:
        log(model_card.after_training(training.run.path, state.best_step))
    log(run_directory.next_commands(args))


EXPECTED_ERRORS = (
    dataset.DataError,
    run_directory.RunDirectoryError,
    run_directory.CheckpointError,
    sharding.ShardingError,
    hub.BackboneError,
    HeadConfigError,
    tracking.TrackingError,
    outputs.OutputError,
    trained_model.ModelDirectoryError,
    FloatingPointError,
    OSError,
)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        lower = (
            "add --gradient-checkpointing (the same gradients, far less memory), or lower --batch-size or --resolution"
        )
        return cli.exit_code(train, args, EXPECTED_ERRORS, again="continue with --resume", lower=lower)
    finally:
        distributed.close()


if __name__ == "__main__":
    sys.exit(main())
