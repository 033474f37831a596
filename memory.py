"""How much memory a step will need, found before it runs: the step runs on fake tensors (torch's FakeTensorMode:
shapes and dtypes only, nothing computed or allocated) while every tensor it creates is counted until freed. The
peak is exact in tensor bytes but leaves out the allocator's slack and the kernels' own work buffers: a lower bound
(on the CPU 0.4-0.8 of the resident peak, benchmarks/bench_memory_estimate.py), so a step estimated above the free
memory cannot fit."""

import math
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
    eager = torch.compiler.set_stance("force_eager")  # a compiled module (--compile) is counted as it runs eagerly
    with compiling, eager, fake_tensor.FakeTensorMode(allow_non_fake_inputs=True), LiveBytes() as live:
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


def training_step_bytes(loss_of, optimizer) -> int:
    """Estimated bytes a training step adds to the weights: loss_of() makes its inputs and returns the loss, run with
    its backward on fake tensors (torch.autograd.grad, so that no fake gradient lands on a real weight), plus the two
    Adam moments per trainable weight that the first optimizer step allocates."""
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    moments = 2 * sum(p.numel() * p.element_size() for p in trainable)
    return peak_bytes(lambda: torch.autograd.grad(loss_of(), trainable)) + moments


def training_advice(need, args, device: torch.device) -> str:
    """One line: a training step's estimated memory beside the free memory; when it exceeds it, the settings that
    would fit. need(batch_size, resolution, checkpointing) -> bytes; args: the run's (batch_size, grad_accum_steps,
    resolution, gradient_checkpointing, backbone_training)."""
    kind, free = "GPU" if device.type == "cuda" else "main", free_bytes(device)
    batch, resolution, checkpointing = args.batch_size, args.resolution, args.gradient_checkpointing
    needed = need(batch, resolution, checkpointing)
    line = f"memory: a training step needs an estimated {gib(needed)} of {kind} memory beyond the weights"
    if free is None or needed <= free:
        return line + (f", {gib(free)} is free" if free is not None else "")
    fits = []
    if not checkpointing and args.backbone_training != "frozen":
        with_checkpointing = need(batch, resolution, True)
        if with_checkpointing <= free:
            fits.append(f"--gradient-checkpointing (~{gib(with_checkpointing)}, the same gradients)")
    fitting = fitting_batch(needed, need(1, resolution, checkpointing), batch, free)
    images = batch * args.grad_accum_steps  # a step's images, kept by accumulating smaller batches
    smaller = max((b for b in range(1, fitting + 1) if images % b == 0), default=0)
    if smaller:
        fits.append(f"--batch-size {smaller} --grad-accum-steps {images // smaller} (the same {images} images a step)")
    scales = ("full", "half", "quarter")
    lower = next((r for r in scales[scales.index(resolution) + 1 :] if need(batch, r, checkpointing) <= free), None)
    if lower:
        fits.append(f"--resolution {lower}")
    advice = "; would fit: " + ", or ".join(fits) if fits else "; none of checkpointing, batch size or resolution fits"
    return f"{line}, more than the {gib(free)} free: it will likely run out{advice} (the estimate is a lower bound)"


def fitting_batch(needed: int, needed_for_one: int, batch_size: int, free: int) -> int:
    """The largest batch whose need, linear in the batch from needed_for_one to needed, fits in free (0: none)."""
    if needed_for_one > free:
        return 0
    per_image = (needed - needed_for_one) / (batch_size - 1) if batch_size > 1 else needed_for_one
    return 1 + math.floor((free - needed_for_one) / per_image) if per_image > 0 else batch_size
