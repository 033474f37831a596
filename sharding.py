"""--fsdp: full fine-tuning of backbones too large for one GPU's copy. FSDP2 shards every transformer layer and the
root across the torchrun processes, so each holds 1/world of the weights, gradients and Adam moments.

The resumable checkpoint is sharded too (torch.distributed.checkpoint: every rank writes its own part, into
OUTPUT/sharded/step-N/, named with its SHA-256 by checkpoint.pt); best/ and last/ hold ordinary full weights, which
run_inference.py loads on one device."""

import hashlib
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

import distributed

# The model returns its logits cropped to the image (a view); the loss and the metrics never change them in place,
# which is all that FSDP2's warning about views is about.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor", category=UserWarning)

FOLDER = "sharded"  # OUTPUT/sharded/step-N/: the model's and optimizer's shards of the checkpoint at step N


class ShardingError(ValueError):
    """--fsdp cannot run as asked; the message says what to change."""


def shard(model: torch.nn.Module, layers, precision: str) -> None:
    """fully_shard each layer, then the root (the head and what is left), in place. In bf16 the gathered weights and
    the computation are bf16 while the sharded weights, the optimizer and the gradient reduction stay fp32."""
    if precision == "fp16":
        raise ShardingError("--fsdp trains in bf16 or fp32, not fp16 (this GPU's default): add --precision bf16")
    bf16 = precision == "bf16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight whole, on rank 0's CPU (an empty dict elsewhere); a collective: every rank must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def folder_digest(folder: Path) -> str:
    """SHA-256 over every file of a sharded checkpoint, names and bytes, in name order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def save(run_path: Path, model, optimizer, step: int) -> dict:
    """Every rank writes its shards of the model and optimizer into OUTPUT/sharded/step-N/; returns the record that
    checkpoint.pt keeps of them (the folder and its digest, computed on rank 0)."""
    folder = run_path / FOLDER / f"step-{step}"
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
    digest = folder_digest(folder) if distributed.rank() == 0 else None  # dcp.save returns once every rank wrote
    return {"folder": f"{FOLDER}/{folder.name}", "sha256": digest}


def remove_stale(run_path: Path, kept: dict) -> None:
    """The sharded checkpoints that checkpoint.pt no longer names (rank 0, after it was replaced)."""
    for folder in (run_path / FOLDER).glob("step-*"):
        if f"{FOLDER}/{folder.name}" != kept["folder"]:
            shutil.rmtree(folder, ignore_errors=True)


def load(run_path: Path, sharded: dict, model, optimizer, rank: int, device, error) -> None:
    """The shards of a verified sharded checkpoint into the sharded model and optimizer. Rank 0 checks the digest
    first; a mismatch raises error on every rank."""
    folder = run_path / sharded["folder"]

    def verify():
        if not folder.is_dir() or folder_digest(folder) != sharded["sha256"]:
            raise error(
                f"{folder} is missing or damaged (its contents do not match the checksum in checkpoint.pt): "
                "restore it, or start again in another --output-directory"
            )

    distributed.on_rank_zero(verify, rank, device, error(f"rank 0 could not verify {folder}"), (error,))
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
