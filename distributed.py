"""One process or many (torchrun): rank, world size and device, and the collectives the loop needs. Every rank takes
the same decisions, so that none waits forever at a barrier another rank never reaches."""

import contextlib
import os
import socket

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule


def setup() -> tuple[int, int, torch.device]:
    """(rank, world size, device); torchrun sets RANK/WORLD_SIZE/LOCAL_RANK."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():  # the device first, and bound to the process group: NCCL then sets up for it alone
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def rank() -> int:
    """This process's rank, before or after setup (torchrun sets RANK)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def any_rank(flag: bool, device) -> bool:
    """True on every rank if flag is True on any rank."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value)
    return value.item() > 0


def gather(value, world: int) -> list:
    """Every rank's value, in rank order ([value] in one process)."""
    if world == 1:
        return [value]
    gathered = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def on_rank_zero(work, rank: int, device, refusal: Exception, errors=(Exception,)):
    """work() on rank 0 only; an error of errors there is raised on every rank (on the others as refusal), so that
    none waits forever. Returns work's result on rank 0, None elsewhere."""
    result, error = None, None
    if rank == 0:
        try:
            result = work()
        except errors as caught:
            error = caught
    if any_rank(error is not None, device):
        raise error or refusal
    return result


def check_same(seen: dict, world: int, error: type[Exception], hint: str) -> None:
    """Every rank sees what rank 0 sees: seen maps what is looked at (e.g. "the training data sarrarp/train") to what
    this rank finds there. A difference raises error on every rank, naming the first rank and host that differs."""
    every = gather((socket.gethostname(), seen), world)
    host, expected = every[0]
    for rank, (other_host, found) in enumerate(every):
        for what, value in found.items():
            if value != expected[what]:
                raise error(f"rank {rank} (on {other_host}) does not see {what} as rank 0 (on {host}) does: {hint}")


def share(count: int, rank: int, world: int) -> list[int]:
    """This rank's indices of count items, the same number on every rank: a sharded model (--fsdp) gathers its weights
    in each forward, on all ranks together. A shorter share repeats its first index (score each index once)."""
    indices = list(range(count))[rank::world]
    return indices + (indices or [0])[:1] * (-(-count // world) - len(indices))


@contextlib.contextmanager
def local_gradients(model):
    """Gradients of what runs inside accumulate on this rank only (DDP's no_sync; FSDP2's gradient sync off)."""
    if not isinstance(model, FSDPModule):
        with model.no_sync():
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
