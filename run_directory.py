"""The output folder of a training run as one object: its lock, its records (config.json and the checks that a
resume fits them), its verified checkpoints, its metrics log and its live tracker.

A run is what its records say: --resume refuses changed settings, other data and another backbone; a checkpoint
carries a SHA-256 and replaces the last good one only once it verifies; a second run into a locked folder is
refused. Only rank 0 writes; every check runs on every rank, so that all ranks take the same decision.
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import resource
import shlex
import time
from pathlib import Path

import torch
from safetensors import SafetensorError

import dataset
import distributed
import files
import options
import outputs
import plots
import sharding
import tracking
from backbone_files import architecture, resolve_backbone
from cli import first_line
from model import count_parameters, parameter_bytes
from trained_model import CONFIG_VERSION, save_trainable_weights, trainable_state_dict

# Arguments a resumed run may change; any other change would silently break the schedule, the data
# order or the model (e.g. a new batch size shifts where the epoch resumes).
CHANGEABLE_ON_RESUME = {
    "resume",
    "compile",
    "config",
    "hf_token_file",
    "num_workers",
    "prefetch_factor",
    "persistent_workers",
    "val_every",
    "checkpoint_every",
    "log_every",
    "cache_frames",
    "skip_bad_samples",
    "data_directory",
    "output_directory",
    "backbone",
    "low_res",
    "report_to",
    "max_steps",  # a budget that changes on --resume: run_training.change_budget
    "epochs",
}
SHARED_PATHS = (
    "every node must see --data-directory, --backbone and --output-directory at the same path (a shared file "
    "system, or copies of the data and the backbone on each node; see docs/training.md, several nodes)"
)
START_AGAIN = "restore it, or start a new run in another --output-directory"


class RunDirectoryError(ValueError):
    """The run folder does not fit the request (a run already there, nothing to resume, changed settings, a damaged
    record, a lock held by another run); the message says what to do."""


class CheckpointError(RuntimeError):
    """A checkpoint that is truncated, damaged or not finite; never resumed from."""


class SaveError(OSError):
    """Writing an output failed (full disk, say); the run stays resumable from its last checkpoint."""


class RunDirectory:
    """OUTPUT/: config.json, split.json, class_weights.json, checkpoint.pt, best/ and last/ weights, metrics.jsonl,
    training_curves.png, .lock, and the tracker's logs."""

    def __init__(self, path: Path, rank: int, world: int, device):
        self.path, self.rank, self.world, self.device = path, rank, world, device
        self.checkpoint_path, self.config_path = path / "checkpoint.pt", path / "config.json"
        self.metrics_file = path / "metrics.jsonl"
        self.lock, self.tracker = None, None

    def check_request(self, args) -> dict | None:
        """The saved config.json of the run to resume (None for a new run), after checking that the request fits."""
        inputs = {"the training data": Path(args.data_directory) / "train"}
        if os.path.exists(args.backbone):
            inputs["the backbone"] = Path(args.backbone)
        if args.init_from:
            inputs["the --init-from model"] = Path(args.init_from)
        outputs.check_apart(self.path, inputs)
        if not args.resume:
            if self.checkpoint_path.exists():
                raise RunDirectoryError(
                    f"{self.path} already holds a run: pass --resume to continue it, or choose "
                    "another --output-directory"
                )
            return None
        if not self.checkpoint_path.exists():
            raise RunDirectoryError(f"nothing to resume: {self.checkpoint_path} does not exist")
        saved = read_run_config(self.config_path)
        changed = changed_settings(saved, args, self.world)
        if changed:
            raise RunDirectoryError(
                f"--resume continues a run with its own settings, but these changed: {'; '.join(changed)}"
            )
        return saved

    def check_inputs_shared(self, args) -> None:
        """Before anything is read or written: every rank (on every node) finds the data, the backbone and the run's
        folder as rank 0 does."""
        train, checkpoint = Path(args.data_directory) / "train", self.checkpoint_path
        seen = {
            f"the training data {train}": sorted(os.listdir(train)) if train.is_dir() else None,
            f"the backbone {args.backbone}": os.path.exists(args.backbone),
            f"the run's checkpoint {checkpoint}": checkpoint.exists(),
        }
        distributed.check_same(seen, self.world, RunDirectoryError, SHARED_PATHS)

    def check_records_shared(self, records: dict, fingerprints: dict) -> None:
        """After rank 0 wrote the records: every rank reads them back in the run's folder, and read the same masks,
        frames and backbone weights (a copy on another node that differs is caught)."""
        seen = {f"the {name} that rank 0 wrote in {self.path}": json_or_none(self.path / name) for name in records}
        labels = {"data": "training masks", "frames": "training frames", "backbone": "backbone weights"}
        seen.update({f"the same {labels[name]} (their digest)": digest for name, digest in fingerprints.items()})
        distributed.check_same(seen, self.world, RunDirectoryError, SHARED_PATHS)

    def hold(self, records: dict) -> None:
        """Create the folder, take its lock for this process's life, clear what killed writes left, and write the
        records (split.json, class_weights.json); a refusal on rank 0 reaches every rank."""

        def take():
            self.path.mkdir(parents=True, exist_ok=True)
            lock = lock_run_directory(self.path)
            for folder in (self.path, self.path / "best", self.path / "last"):
                files.remove_partial_files(folder)
            for name, record in records.items():
                files.write_json_atomically(self.path / name, record)
            return lock

        refusal = RunDirectoryError(f"rank 0 could not lock {self.path} (its message says why)")
        self.lock = distributed.on_rank_zero(take, self.rank, self.device, refusal, (RunDirectoryError, OSError))

    def start(self, record: dict) -> None:
        """A new run: its config.json, and no metrics left by a run killed before its first checkpoint."""
        if self.rank == 0:
            self.metrics_file.unlink(missing_ok=True)
            files.write_json_atomically(self.config_path, record)

    def restore(self, checkpoint: dict, model, optimizer, scheduler, scaler, state):
        """Load a verified checkpoint into the run's objects and this rank's RNG; returns the saved loop state, and
        drops from metrics.jsonl what was logged after the checkpoint."""
        if "sharded" in checkpoint:  # --fsdp: the model's and optimizer's shards are beside it
            sharding.load(self.path, checkpoint["sharded"], model, optimizer, self.rank, self.device, CheckpointError)
        else:
            model.load_state_dict(checkpoint["model"], strict=False)
            optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        rng = checkpoint["rng"][self.rank]  # each rank's own generators: LoRA dropout differs per rank
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        saved = type(state)(
            **{
                field.name: checkpoint.get(field.name, getattr(state, field.name))
                for field in dataclasses.fields(state)
            }
        )
        if self.rank == 0 and self.metrics_file.exists():
            kept = [line for line in self.metrics_file.read_text().splitlines() if logged_step(line) <= saved.step]
            self.metrics_file.write_text("".join(line + "\n" for line in kept))
        return saved

    def record_budget(self, budget: dict, step: int) -> None:
        """config.json of a resumed run whose --max-steps/--epochs changed: the new budget, and at which step."""
        if self.rank == 0:
            config = read_run_config(self.config_path)
            before = {name: config["arguments"].get(name) for name in budget}
            config["arguments"].update(budget)
            config.setdefault("budget_changes", []).append({"step": step, "from": before, "to": budget})
            files.write_json_atomically(self.config_path, config)

    def open_tracker(self, report_to: str, resumed_at: int | None) -> bool:
        """Rank 0's --report-to tracker, given the run's config.json; True if there is one."""
        if self.rank == 0:
            self.tracker = tracking.open_tracker(report_to, self.path, read_run_config(self.config_path), resumed_at)
        return self.tracker is not None

    def log(self, record: dict, pictures=None) -> None:
        """One record into metrics.jsonl and to the tracker (rank 0)."""
        if self.rank == 0:
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tracker:
                self.tracker.log(record, pictures or {})

    def save_weights(self, model, name: str) -> dict:
        """best/ or last/weights.safetensors, written by rank 0; every rank calls it (a sharded model's weights are
        gathered). Returns the weights saved (none on other ranks)."""
        weights = trainable_state_dict(model)
        if self.rank == 0:
            save_weights(weights, self.path / name)
        return weights

    def save_checkpoint(self, model, optimizer, scheduler, scaler, state, selection_metric: str) -> None:
        """last/ weights, the resumable checkpoint with every rank's RNG (a sharded model's own state in its shards),
        and the redrawn curves."""
        rng = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }
        rngs = distributed.gather(rng, self.world)
        weights = self.save_weights(model, "last")
        if sharding.is_sharded(model):
            resumable = {
                "model": {},
                "optimizer": {},
                "sharded": sharding.save(self.path, model, optimizer, state.step),
            }
        else:
            resumable = {"model": weights, "optimizer": optimizer.state_dict()}
        if self.rank == 0:
            loop = {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rngs}
            save_checkpoint(self.checkpoint_path, {**resumable, **loop, **dataclasses.asdict(state)}, weights)
            if "sharded" in resumable:
                sharding.remove_stale(self.path, resumable["sharded"])
            plots.training_curves(read_records(self.metrics_file), self.path / "training_curves.png", selection_metric)

    def last_good_checkpoint(self) -> str:
        return last_good_checkpoint(self.checkpoint_path)

    def close(self) -> None:
        """The tracker closed and the folder's lock released: the run writes nothing more."""
        if self.tracker:
            self.tracker.close()
        if self.lock:
            files.unlock_file(self.lock)  # loader workers forked with the file open would otherwise keep it locked
            self.lock = None


def next_commands(args) -> str:
    """What to type after a training run: predict and score the test videos, and look at the curves."""
    output = shlex.quote(args.output_directory)
    lines = [
        f"next: python run_inference.py --model-directory {output} --data-directory {shlex.quote(args.data_directory)}"
        "   (predict and score the test videos)"
    ]
    if args.report_to == "tensorboard":
        lines.append(f"      tensorboard --logdir {output}/tensorboard   (the curves and pictures, live)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- what the metrics log measures


def peak_memory(device) -> dict[str, float]:
    """The peak memory since the previous call, in MB, the GPU's counters then reset so that each record gives its
    own phase's: the tensors' (max_memory_allocated: peak_memory_mb) and the caching allocator's, which is what the
    device must hold (max_memory_reserved: peak_reserved_mb). On the CPU, the process's peak resident set so far (it
    cannot be reset)."""
    if device.type != "cuda":
        return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    peak = {
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
        "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
    }
    torch.cuda.reset_peak_memory_stats(device)
    return peak


class Throughput:
    """Images per second of training alone: time spent validating and saving is left out."""

    def __init__(self):
        self.started, self.images = time.perf_counter(), 0

    def add(self, images: int) -> float:
        self.images += images
        return self.images / (time.perf_counter() - self.started)

    @contextlib.contextmanager
    def paused(self):
        paused_at = time.perf_counter()
        yield
        self.started += time.perf_counter() - paused_at


# ----------------------------------------------------------------------------- records


def run_record(args, model, train_data, precision, world, device, fingerprints) -> dict:
    """config.json: every resolved argument and all that run_inference.py needs to rebuild the model."""
    (trainable, total), (trainable_bytes, total_bytes) = count_parameters(model), parameter_bytes(model)
    return {
        "config_version": CONFIG_VERSION,
        "arguments": {k: v for k, v in vars(args).items() if k != "hf_token_file"},
        "backbone": resolve_backbone(args.backbone),
        "backbone_training": args.backbone_training,
        "backbone_dtype": args.backbone_dtype,
        "backbone_architecture": architecture(model.vit().config),
        "class_names": list(dataset.CLASS_NAMES),
        "num_classes": dataset.NUM_CLASSES,
        "resolution": {
            "name": args.resolution,
            "scale": dataset.RESOLUTION_SCALES[args.resolution],
            "source_size": list(train_data.source_size),
            "content_size": list(train_data.content_size),
            "padded_size": list(train_data.padded_size),
        },
        "normalization": {"mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist()},
        "lora": {
            "rank": args.lora_rank,
            "alpha": args.lora_alpha,
            "dropout": args.lora_dropout,
            "target_modules": args.lora_targets,
        },
        "head": model.head_config,
        "loss": {"type": args.loss, **({"dice_weight": args.dice_weight} if args.loss == "ce+dice" else {})},
        "parameters": {
            "trainable": trainable,
            "total": total,
            "head": sum(p.numel() for p in model.head.parameters()),
            "trainable_mb": trainable_bytes / 2**20,
            "total_mb": total_bytes / 2**20,
        },
        "precision": precision,
        "tf32": args.tf32,
        "world_size": world,
        "device": device.type,
        "fingerprints": fingerprints,
    }


def json_or_none(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_run_config(path: Path) -> dict:
    """config.json of a run, with the keys a resume relies on checked; one line naming what is wrong."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RunDirectoryError(
            f"{path} cannot be read ({first_line(error)}): it was damaged or edited; {START_AGAIN}"
        ) from None
    for key, kind in (("arguments", dict), ("world_size", int)):
        if not isinstance(saved, dict) or not isinstance(saved.get(key), kind):
            raise RunDirectoryError(
                f"{path}: key {key!r} is missing or not a {kind.__name__}; it was damaged or edited: {START_AGAIN}"
            )
    return saved


def data_fingerprint(samples, pixel_counts) -> str:
    """Every mask the run can use (video, name, per-class pixel counts): a resume on other data is caught."""
    listing = [[s.video, s.mask.name, counts.tolist()] for s, counts in zip(samples, pixel_counts)]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def changed_settings(saved: dict, args, world: int) -> list[str]:
    """'--flag old -> new' of every setting of args that differs from a run's config.json, but those a resumed run may
    change, and the number of processes. A setting that a run of an earlier version does not record was at what is
    now its default."""
    defaults = vars(options.training_parser().parse_args([]))
    recorded = {**defaults, **saved["arguments"]}
    changed = [
        f"--{k.replace('_', '-')} {recorded.get(k)} -> {v}"
        for k, v in vars(args).items()
        if k not in CHANGEABLE_ON_RESUME and recorded.get(k) != v
    ]
    return changed + ([f"{saved['world_size']} -> {world} processes"] if saved["world_size"] != world else [])


def frames_fingerprint(samples) -> str:
    """Every frame the run can use (name and a sampled digest of its file): replaced or swapped frames are caught."""
    listing = [[s.video, s.image.name, files.sampled_digest(s.image, 4096)] for s in samples]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def check_fingerprints(saved_config: dict, current: dict) -> None:
    """Refuse a resume whose data, frames or backbone differ from the run's (what earlier versions did not record is
    not compared)."""
    recorded = saved_config.get("fingerprints") or current
    changed = [name for name in ("data", "frames", "backbone") if recorded.get(name, current[name]) != current[name]]
    changed = [name for name in changed if not (name == "frames" and "data" in changed)]  # other videos: other frames
    if changed:
        what = {
            "data": "the training data (videos or masks) differ",
            "backbone": "the backbone's weights differ",
            "frames": "the frames differ (replaced or swapped)",
        }
        raise RunDirectoryError(
            f"--resume refused: {' and '.join(what[c] for c in changed)} from those the run "
            "started with; resume with the original ones, or start a new run in another "
            "--output-directory"
        )


def lock_run_directory(output: Path):
    """An exclusive lock on output/.lock for this process's life (files.lock_file): a second run into the same
    directory is refused, a killed run never blocks its --resume."""
    try:
        return files.lock_file(output / ".lock")
    except files.LockedError as error:
        raise RunDirectoryError(
            f"another training run (pid {error.pid}) is writing to {output}: wait for it to finish, or choose another "
            "--output-directory"
        ) from None


# ----------------------------------------------------------------------------- the metrics log


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


# ----------------------------------------------------------------------------- weights and checkpoints


@contextlib.contextmanager
def writing(path: Path):
    """Turn any failure to write path into one SaveError line: what happened and what to do."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        reason = files.why_not_written(path, error)
        raise SaveError(
            f"could not write {path} ({reason}): free disk space or fix the folder, then continue the run "
            "with --resume from its last checkpoint"
        ) from None


def save_weights(weights: dict, directory: Path) -> None:
    with writing(directory / "weights.safetensors"):
        directory.mkdir(parents=True, exist_ok=True)
        save_trainable_weights(weights, directory / "weights.safetensors")


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


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at path, verified against the digest saved inside it and for finite weights."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        saved_digest = checkpoint.pop("sha256")
    except Exception as error:  # torch.load raises many types on a truncated or empty file
        raise CheckpointError(
            f"{path} is damaged or incomplete ({first_line(error, 80)}): "
            "delete it to start again, or restore it from a backup"
        ) from None
    if state_digest(checkpoint) != saved_digest:
        raise CheckpointError(
            f"{path} is damaged (its contents do not match the checksum written with it): "
            "delete it to start again, or restore it from a backup"
        )
    if not all(torch.isfinite(t).all() for t in checkpoint["model"].values()):
        raise CheckpointError(f"{path} holds non-finite weights: delete it to start again")
    return checkpoint


def save_checkpoint(path: Path, checkpoint: dict, weights: dict) -> None:
    """Everything a killed run needs to continue exactly (the model's trained weights, the optimizer, schedule,
    scaler, RNGs and loop state). Written beside, read back and verified, then renamed over the previous checkpoint,
    which stays until then; a checkpoint of weights that are not finite is never saved (weights: the model's, also
    when checkpoint keeps them in shards)."""
    checkpoint = {**checkpoint, "model": {name: tensor.cpu() for name, tensor in checkpoint["model"].items()}}
    if not all(torch.isfinite(t).all() for t in weights.values()):
        raise FloatingPointError(
            f"the weights became non-finite at step {checkpoint['step']}; the last checkpoint in "
            f"{path} was kept. Lower --lr, or use --precision fp32 / bf16"
        )
    checkpoint["sha256"] = state_digest(checkpoint)
    temporary = files.partial_path(path)
    try:
        with writing(path):
            torch.save(checkpoint, temporary)
            load_checkpoint(temporary)
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)  # what a failed write left


def last_good_checkpoint(path: Path) -> str:
    """What a user can resume from, said only of a checkpoint that verifies."""
    if not path.exists():
        return "no checkpoint was written yet"
    try:
        return f"the last good checkpoint (step {load_checkpoint(path)['step']}) is in {path}"
    except CheckpointError as error:
        return f"no good checkpoint is left: {error}"
