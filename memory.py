"""How much memory a step will need, found before it runs: the step runs on fake tensors (torch's FakeTensorMode:
shapes and dtypes only, nothing computed or allocated) while every tensor it creates is counted until freed. The
peak is exact in tensor bytes but leaves out the allocator's slack and the kernels' own work buffers: a lower bound
(on the CPU 0.4-0.8 of the resident peak, benchmarks/bench_memory_estimate.py), so a step estimated above the free
memory cannot fit."""

import weakref
from unittest import mock

import torch
import transformers.pytorch_utils
from torch._subclasses import fake_tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

GIB = 2**30
# What a step raises when an op of it cannot run on fake tensors (its output shape depends on the data, say)
NOT_COUNTABLE = (
    fake_tensor.UnsupportedFakeTensorException,
    fake_tensor.DynamicOutputShapeException,
    fake_tensor.DataDependentOutputException,
    fake_tensor.UnsupportedOperatorException,
    fake_tensor.UnsupportedMutationAliasingException,
)


class MemoryNeedError(ValueError):
    """A setting (batch size, scales) needs more memory than the device has free: a bad value for this machine."""


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage the ops inside create, while it lives, and the most at once (peak)."""

    def __init__(self):
        super().__init__()
        self.counted, self.live, self.peak = WeakIdKeyDictionary(), 0, 0

    def freed(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(returned.alias_info for returned in func._schema.returns):
            return out  # a view or an in-place op allocates nothing (a weight's transpose is no memory)
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage() not in self.counted:
                storage = tensor.untyped_storage()
                self.counted[storage] = size = storage.nbytes()
                self.live += size
                weakref.finalize(storage, self.freed, size)
        self.peak = max(self.peak, self.live)
        return out


def peak_bytes(step) -> int:
    """The most tensor bytes alive at once while step() runs, on fake tensors; step makes its own inputs (torch.empty).
    What existed before, as the weights, is not counted."""
    # transformers keeps some tensors in an lru_cache (DINOv3's patch coordinates), skipped while compiling: a fake
    # one cached here would come back in every later real run
    compiling = mock.patch.object(transformers.pytorch_utils, "is_torchdynamo_compiling", lambda: True)
    with compiling, fake_tensor.FakeTensorMode(allow_non_fake_inputs=True), LiveBytes() as live:
        step()
    return live.peak


def free_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can still take: on a GPU the driver's free memory and what torch's cache holds unused;
    on the CPU the kernel's MemAvailable and free swap (None where the system does not say)."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return sum(int(fields[name].split()[0]) * 1024 for name in ("MemAvailable", "SwapFree"))
    except (OSError, KeyError, ValueError):
        return None


def gib(size: int) -> str:
    return f"{size / GIB:.1f} GiB" if size >= GIB else f"{size / 2**20:.0f} MiB"


def check_fits(need: int, items: int, device: torch.device, what: str, lower: str) -> None:
    """Refuse, naming the need and what would fit, when need bytes for items (frames, images) exceed the free memory."""
    free = free_bytes(device)
    if free is None or need <= free:
        return
    fitting = int(free // (need / items))
    kind = "GPU" if device.type == "cuda" else "main"
    advice = f"at most --batch-size {fitting} can fit" if fitting else "even one frame does not fit"
    raise MemoryNeedError(
        f"{what} needs at least {gib(need)} of {kind} memory beyond the weights, {gib(free)} is free "
        f"(at least {gib(need // items)} a frame; {advice}): lower {lower}"
    )
