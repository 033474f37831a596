"""Memory of one training step by backbone training mode (frozen / LoRA / full): measured saved activations, and
GPU memory EXTRAPOLATED from them for ViT-S to ViT-7B at half and full resolution; on CUDA, real steps too.

A step is what run_training.py does: bf16 autocast forward of SegmentationModel (a randomly initialised DINOv3 ViT/16
of a released shape, sdpa attention, the seed's pixel-MLP head), weighted cross entropy on logits upsampled to the
1920x1080 source, backward, gradient clipping, AdamW step. Modes: frozen (only the head trains; the backbone runs under
no_grad), lora (rank 16 on q/k/v/o), full (every backbone weight). Backbone weights in float32, or bfloat16 for the
frozen ones (frozen and LoRA: run_training.py --backbone-dtype bfloat16). Half resolution: input 960x544 (content
960x540); full: 1920x1088 (content 1920x1080).

"Saved activations" are the bytes of the unique storages the autograd graph keeps for backward (packed through
torch.autograd.graph.saved_tensors_hooks during the forward, parameters excluded; with checkpointing, the layer
inputs that torch.utils.checkpoint holds for recomputation are added). They need no GPU to measure. Dropout (LoRA's,
0.1) is counted as CUDA saves it: CUDA's fused kernel keeps a 1-byte mask an element, the CPU's own kernel a 4-byte
float noise tensor, so CPU measurements run torch.native_dropout, the fused kernel's CPU twin (--cpu-dropout: the
CPU's own bytes).

Extrapolation: the layers of a ViT are identical, so per-image saved bytes = other + depth x one layer's bytes, both
measured by a forward of a 1-layer model of the same shape at the real resolution (batch 1, CPU; a 7B layer at full
resolution takes about a minute and ~4 GB). GPU bytes then add weights, gradients and AdamW states, one layer's
recomputation and the full-resolution logits (see print_extrapolation). A full-depth step measured on the CPU (ViT-S by
default) checks the depth extrapolation. These GPU figures are NOT GPU measurements.

    .venv/bin/python benchmarks/bench_train_step.py --quick          # smoke run: ViT-S only (< 1 min)
    .venv/bin/python benchmarks/bench_train_step.py                  # CPU: every shape extrapolated (~10-15 min, 2 cores)
    .venv/bin/python benchmarks/bench_train_step.py --device cuda    # + real ViT-B and ViT-L steps, half res, batch 8
    .venv/bin/python benchmarks/bench_train_step.py --attention-grid # + eager/sdpa x fp32/bf16 steps of LoRA
"""

import argparse
import contextlib
import copy
import gc
import itertools
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel
from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTLayer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from backbone_files import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from dataset import NUM_CLASSES  # noqa: E402
from losses import weighted_cross_entropy  # noqa: E402
from model import BACKBONE_DTYPES, LoRA, SegmentationModel, count_parameters  # noqa: E402

# model.BACKBONES short name: (label, hidden, layers, heads, intermediate, gated SwiGLU MLP), as Meta's DINOv3 ViTs
MODELS = {
    "vits16": ("ViT-S/16", 384, 12, 6, 1536, False),
    "vits16plus": ("ViT-S+/16", 384, 12, 6, 1536, True),
    "vitb16": ("ViT-B/16", 768, 12, 12, 3072, False),
    "vitl16": ("ViT-L/16", 1024, 24, 16, 4096, False),
    "vith16plus": ("ViT-H+/16", 1280, 32, 20, 5120, True),
    "vit7b16": ("ViT-7B/16", 4096, 40, 32, 8192, True),
}
SOURCE_SIZE = (1080, 1920)  # (H, W) of the logits and masks: the full source resolution
RESOLUTIONS = {  # name: (content (h, w), padded (h, w)) of the backbone input
    "half": ((540, 960), (544, 960)),
    "full": ((1080, 1920), (1088, 1920)),
}
EXTRAPOLATED_BATCH = {"half": 8, "full": 4}
LORA_RANK = 16
TRAINABLE_BYTES = 4 + 4 + 8  # per trainable parameter: fp32 weight, gradient, two AdamW states
LOGITS_BYTES = NUM_CLASSES * SOURCE_SIZE[0] * SOURCE_SIZE[1] * 4 * 3  # per image: fp32 logits, softmax, gradient
GPU_GB = 80  # an H100/A100 80 GB
MB, GB = 1e6, 1e9


class Variant(NamedTuple):
    mode: str  # backbone training: frozen, lora or full
    checkpointing: bool
    dtype: str  # of the backbone weights: float32, or bfloat16 (frozen weights only)

    def label(self) -> str:
        return (
            f"{self.mode:6} {'bf16' if self.dtype == 'bfloat16' else 'fp32':4} {'on ' if self.checkpointing else 'off'}"
        )


VARIANTS = [
    Variant("frozen", False, "float32"),
    Variant("frozen", False, "bfloat16"),
    Variant("lora", False, "float32"),
    Variant("lora", True, "float32"),
    Variant("lora", False, "bfloat16"),
    Variant("lora", True, "bfloat16"),
    Variant("full", False, "float32"),
    Variant("full", True, "float32"),
]
QUICK_VARIANTS = [
    Variant("frozen", False, "float32"),
    Variant("lora", True, "float32"),
    Variant("full", True, "float32"),
]


class Probe(NamedTuple):
    """Saved bytes per image of a 1-layer model."""

    layer: int  # inside the layer, without checkpointing
    inputs: int  # of the layer's input hidden states: all that a checkpointed layer keeps
    other: int  # outside the layers: embeddings, RoPE, final norm, head, loss


def probed_as(variant: Variant) -> Variant:
    """The probe that stands for this variant. One forward without checkpointing gives both layer figures, and the
    bytes outside the layers do not depend on it. A frozen backbone saves nothing and hands float32 features to the
    head whatever its weights' dtype, so one frozen probe serves both dtypes."""
    return variant._replace(checkpointing=False, dtype="bfloat16" if variant.mode == "frozen" else variant.dtype)


def working_layer(variant: Variant) -> Variant:
    """The probe whose per-layer bytes bound what one layer holds while it runs: the layer recomputed in backward
    (checkpointing), or the layer a frozen backbone runs under no_grad (bounded from above by what LoRA saves)."""
    return Variant("lora" if variant.mode == "frozen" else variant.mode, False, variant.dtype)


@contextlib.contextmanager
def dropout_as_on_cuda(enabled=True):
    """F.dropout as CUDA runs it: its fused kernel (torch.native_dropout), which saves a 1-byte mask for backward where
    the CPU's own kernel saves a float noise tensor (4 bytes an element in fp32)."""
    dropout = torch.nn.functional.dropout

    def fused(input, p=0.5, training=True, inplace=False):
        if training and 0 < p < 1 and input.numel() and not inplace:
            return torch.native_dropout(input, p, True)[0]
        return dropout(input, p, training, inplace)

    with mock.patch.object(torch.nn.functional, "dropout", fused) if enabled else contextlib.nullcontext():
        yield


def make_backbone(name, dtype="float32", depth=None, attention="sdpa", device="cpu") -> DINOv3ViTModel:
    _, hidden, layers, heads, intermediate, gated = MODELS[name]
    config = DINOv3ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=depth or layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu",
        patch_size=16,
        num_register_tokens=4,
        layerscale_value=1e-5,
        key_bias=False,
        pos_embed_shift=None,
        pos_embed_jitter=None,
        pos_embed_rescale=None,  # as model.py
    )
    config._attn_implementation = attention
    torch.manual_seed(0)
    with torch.device(device):
        backbone = DINOv3ViTModel(config).to(BACKBONE_DTYPES[dtype])
    assert backbone.config._attn_implementation == attention, backbone.config._attn_implementation
    return backbone


def segmentation_model(backbone, variant: Variant) -> SegmentationModel:
    model = SegmentationModel(
        backbone,
        IMAGENET_MEAN,
        IMAGENET_STD,
        backbone_training=variant.mode,
        lora=LoRA(rank=LORA_RANK),
        gradient_checkpointing=variant.checkpointing,
    )
    return model.to(next(backbone.parameters()).device).train()


def parameter_summary(name, variant: Variant) -> tuple[int, int, int]:
    """(trainable, total, bytes of the weights + gradients and AdamW states of the trainable ones) of the full-depth
    model, built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        model = segmentation_model(make_backbone(name, variant.dtype, device="meta"), variant)
    trainable, total = count_parameters(model)
    frozen_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return trainable, total, frozen_bytes + TRAINABLE_BYTES * trainable


def make_optimizer(model):
    """AdamW as run_training.py: the backbone's trainable weights (LoRA or all) at one rate, the head at another."""
    head = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("head.")]
    backbone = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    groups = [{"params": backbone, "lr": 1e-4}, {"params": head, "lr": 1e-3}]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.01), backbone + head


def make_batch(batch_size, resolution, device):
    _, (padded_h, padded_w) = RESOLUTIONS[resolution]
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, padded_h, padded_w), dtype=torch.uint8, generator=generator)
    masks = torch.randint(0, NUM_CLASSES, (batch_size, *SOURCE_SIZE), generator=generator)
    weights = torch.rand(NUM_CLASSES, generator=generator) + 0.5
    return images.to(device), masks.to(device), weights.to(device)


class SavedBytes:
    """Bytes of the unique storages autograd saves for backward, split into backbone layers and the rest, and the
    bytes of the layers' input hidden states.

    Non-reentrant checkpointing installs its own saved-tensor hooks inside each layer (the innermost hooks win),
    so nothing inside a checkpointed layer reaches ours; what it does keep, the layer's inputs, is recorded by
    a forward pre-hook on every layer instead.
    """

    def __init__(self, model):
        self.model = model
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.parameters |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        self.layers = [m for m in model.modules() if isinstance(m, DINOv3ViTLayer)]
        assert self.layers, "no DINOv3ViTLayer found"
        self.seen = {}
        self.inputs = 0
        self.inside_layer = 0

    def _record(self, tensor, region=None):
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer in self.parameters or pointer in self.seen or storage.nbytes() == 0:
            return
        self.seen[pointer] = (storage.nbytes(), region or ("layers" if self.inside_layer else "other"))

    def _pack(self, tensor):
        self._record(tensor)
        return tensor

    def _pre(self, module, args, kwargs):
        self.inside_layer += 1
        if torch.is_grad_enabled():
            for tensor in args:  # the hidden states: one per layer
                self._record(tensor, "layers")
                self.inputs += tensor.untyped_storage().nbytes()
            for value in kwargs.values():  # RoPE cos/sin: computed once, shared by all layers
                for tensor in value if isinstance(value, (tuple, list)) else (value,):
                    self._record(tensor, "other")

    def _post(self, module, args, output):
        self.inside_layer -= 1

    def __enter__(self):
        self.handles = [
            h
            for layer in self.layers
            for h in (
                layer.register_forward_pre_hook(self._pre, with_kwargs=True),
                layer.register_forward_hook(self._post),
            )
        ]
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)
        for handle in self.handles:
            handle.remove()

    def total(self, region=None):
        return sum(n for n, r in self.seen.values() if region in (None, r))


def forward_loss(model, images, masks, weights, resolution, precision):
    content_size, _ = RESOLUTIONS[resolution]
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(images, SOURCE_SIZE, content_size)
        return weighted_cross_entropy(logits.float(), masks, weights)


def train_step(model, optimizer, params, batch, resolution, precision, measure=False):
    """One step as run_training.py; with measure, returns the SavedBytes of its forward."""
    saved = None
    if measure:
        with SavedBytes(model) as saved:
            loss = forward_loss(model, *batch, resolution, precision)
    else:
        loss = forward_loss(model, *batch, resolution, precision)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return saved


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench(name, variant, batch_size, steps, device, attention="sdpa", precision="bf16"):
    """Full-depth training steps at half resolution: median time, saved bytes and (CUDA) peak memory."""
    model = segmentation_model(make_backbone(name, variant.dtype, attention=attention, device=device), variant)
    optimizer, params = make_optimizer(model)
    batch = make_batch(batch_size, "half", device)
    started = time.perf_counter()
    saved = train_step(model, optimizer, params, batch, "half", precision, measure=True)  # also the warm-up
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [time.perf_counter() - started]  # the warm-up step: only reported with steps=0
    for _ in range(steps):
        started = time.perf_counter()
        train_step(model, optimizer, params, batch, "half", precision)
        synchronize(device)
        times.append(time.perf_counter() - started)
    result = {
        "model": name,
        "variant": variant,
        "attention": attention,
        "precision": precision,
        "batch": batch_size,
        "seconds": statistics.median(times[1:] if steps else times),
        "saved": saved.total(),
        "saved_layers": saved.total("layers"),
        "saved_other": saved.total("other"),
    }
    if device.type == "cuda":
        result["peak"] = torch.cuda.max_memory_allocated(device)
        result["images_per_s"] = batch_size / result["seconds"]
    del model, optimizer, params, batch, saved
    release(device)
    return result


def probe(backbone, variant: Variant, resolution) -> Probe:
    """Saved bytes of a forward of a copy of the 1-layer backbone (batch 1, CPU). Its layer gets an input that
    requires grad, as every layer but the first of a LoRA model does (a LoRA model's first layer saves a little less:
    the probe errs high by that)."""
    model = segmentation_model(copy.deepcopy(backbone), variant)
    model.vit().embeddings.register_forward_hook(lambda module, args, output: output.requires_grad_())
    batch = make_batch(1, resolution, torch.device("cpu"))
    with SavedBytes(model) as saved:
        forward_loss(model, *batch, resolution, "bf16")
    return Probe(saved.total("layers"), saved.inputs, saved.total("other"))


def probe_model(name, variants, resolutions, cuda_dropout=True) -> dict:
    """{(probe variant, resolution): Probe} of every probe these variants need: 1-layer models, batch 1, CPU; dropout
    saved as on CUDA unless not cuda_dropout."""
    needed = list(dict.fromkeys(p for v in variants for p in (probed_as(v), working_layer(v))))
    probes = {}
    for dtype in dict.fromkeys(p.dtype for p in needed):
        backbone = make_backbone(name, dtype, depth=1)
        for resolution, variant in itertools.product(resolutions, [p for p in needed if p.dtype == dtype]):
            with dropout_as_on_cuda(cuda_dropout):
                probes[variant, resolution] = probe(backbone, variant, resolution)
        del backbone
        release(torch.device("cpu"))
    return probes


def probe_model_apart(name, variants, resolutions, cuda_dropout=True) -> dict:
    """probe_model in a process of its own, so that the memory a large model's probes leave behind goes back to the
    system before the next model (in one process, ViT-7B's full-resolution probes after the others ran out of 24 GB)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(probe_model, name, variants, resolutions, cuda_dropout).result()


def layer_bytes(probe: Probe, variant: Variant) -> int:
    return probe.inputs if variant.checkpointing else probe.layer


def saved_per_image(name, variant, resolution, probes) -> int:
    """Per-image saved bytes of the full-depth model; probes: {name: probe_model(name, ...)}."""
    probe = probes[name][probed_as(variant), resolution]
    return probe.other + MODELS[name][2] * layer_bytes(probe, variant)


def estimate(name, variant, resolution, batch_size, probes, weights_optim) -> dict:
    """Extrapolated GPU bytes of a step with batch_size images; weights_optim from parameter_summary()."""
    saved = batch_size * saved_per_image(name, variant, resolution, probes)
    running = variant.checkpointing or variant.mode == "frozen"
    layer = batch_size * probes[name][working_layer(variant), resolution].layer if running else 0
    logits = batch_size * LOGITS_BYTES
    return {
        "weights": weights_optim,
        "saved": saved,
        "layer": layer,
        "logits": logits,
        "total": weights_optim + saved + layer + logits,
    }


def measured_header(cuda):
    header = (
        f"{'model':10} {'mode':6} {'wts':4} {'ckpt':4} {'attn':5} {'prec':4} {'batch':>5} {'s/step':>7}"
        f" {'saved MB':>9} {'layers MB':>9} {'other MB':>8} {'probe MB':>8}"
    )
    header += f" {'GPU peak MB':>11} {'img/s':>7} {'extrap. MB':>10}" if cuda else ""
    return header + "\n" + "-" * len(header)


def measured_row(r, probes, summaries, cuda):
    """A measured step, beside its saved bytes (and on CUDA its GPU memory) extrapolated from the probes."""
    name, variant, batch = r["model"], r["variant"], r["batch"]
    probed = (r["attention"], r["precision"]) == ("sdpa", "bf16") and (probed_as(variant), "half") in probes[name]
    line = (
        f"{MODELS[name][0]:10} {variant.label()}  {r['attention']:5} {r['precision']:4} {batch:5d} "
        f"{r['seconds']:7.2f} {r['saved'] / MB:9.0f} {r['saved_layers'] / MB:9.0f} {r['saved_other'] / MB:8.0f} "
        + (f"{batch * saved_per_image(name, variant, 'half', probes) / MB:8.0f}" if probed else f"{'-':>8}")
    )
    if cuda:
        extrapolated = (
            estimate(name, variant, "half", batch, probes, summaries[name, variant][2])["total"] if probed else None
        )
        line += f" {r['peak'] / MB:11.0f} {r['images_per_s']:7.2f} " + (
            f"{extrapolated / MB:10.0f}" if extrapolated else f"{'-':>10}"
        )
    return line


def measure(names, variants, batch_size, steps, device, probes, summaries, grid=False):
    """Run and print full-depth steps; grid: each variant in eager/sdpa x fp32/bf16 instead of sdpa bf16 only."""
    cuda = device.type == "cuda"
    settings = list(itertools.product(("eager", "sdpa"), ("fp32", "bf16"))) if grid else [("sdpa", "bf16")]
    print(measured_header(cuda), flush=True)
    results = []
    for name, variant, (attention, precision) in itertools.product(names, variants, settings):
        out_of_memory = False
        try:
            results.append(bench(name, variant, batch_size, steps, device, attention, precision))
            print(measured_row(results[-1], probes, summaries, cuda), flush=True)
        except torch.OutOfMemoryError:
            out_of_memory = True  # freed below: inside the except block the failed frame still holds its tensors
        if out_of_memory:
            release(device)
            print(f"{MODELS[name][0]:10} {variant.label()}  {attention:5} {precision:4} out of memory", flush=True)
    return results


def print_grid_summary(results, cuda):
    """Checkpointing and attention implementations compared, from the --attention-grid steps."""
    print("\nattention grid: checkpointing and sdpa compared")
    by_key = {(r["model"], r["variant"], r["attention"], r["precision"]): r for r in results}
    for (name, variant, attention, precision), r in by_key.items():
        on = by_key.get((name, variant._replace(checkpointing=True), attention, precision))
        if not variant.checkpointing and on:
            line = (
                f"{MODELS[name][0]} {variant.mode} {attention:5} {precision}: checkpointing cuts saved activations "
                f"{r['saved'] / MB:.0f} -> {on['saved'] / MB:.0f} MB = {r['saved'] / on['saved']:.1f}x, "
                f"step {on['seconds'] / r['seconds']:.2f}x the time"
            )
            print(line + (f"; GPU peak {r['peak'] / MB:.0f} -> {on['peak'] / MB:.0f} MB" if cuda else ""))
    for (name, variant, attention, precision), sdpa in by_key.items():
        eager = by_key.get((name, variant, "eager", precision))
        if attention == "sdpa" and eager:
            print(
                f"{MODELS[name][0]} {' '.join(variant.label().split())} {precision}: sdpa saves "
                f"{sdpa['saved'] / MB:.0f} MB vs eager {eager['saved'] / MB:.0f} MB "
                f"({eager['saved'] / sdpa['saved']:.2f}x), {sdpa['seconds']:.2f} vs {eager['seconds']:.2f} s/step"
            )


def extrapolation_row(name, variant, probes, summary, resolutions):
    trainable, _, weights_optim = summary
    line = f"{MODELS[name][0]:10} {variant.label()}  {trainable:>13,} {weights_optim / GB:8.2f}"
    for resolution in resolutions:
        line += f" {saved_per_image(name, variant, resolution, probes) / MB:9.0f}"
    for resolution in resolutions:
        total = estimate(name, variant, resolution, EXTRAPOLATED_BATCH[resolution], probes, weights_optim)["total"]
        line += f" {total / GB:9.1f}{'!' if total > GPU_GB * GB else ' '}"
    return line


def print_extrapolation(names, variants, probes, summaries, resolutions):
    print(
        "\nEXTRAPOLATED GPU memory of one training step (from CPU measurements of saved bytes; NOT measured on a GPU)"
    )
    print("-------------------------------------------------------------------------------------------------------")
    print(
        f"GB = weights (frozen ones: 4 B/param in fp32, 2 in bf16) + trainable params x {TRAINABLE_BYTES} B (fp32 weight, grad"
    )
    print("  and 2 AdamW states; full: every backbone param) + saved activations/image x batch + one layer at work")
    print(
        "  x batch (checkpointing: the layer backward recomputes; frozen: the layer the no_grad forward runs, bounded"
    )
    print("  by what LoRA saves for it) + full-res logits x batch (10 x 1080 x 1920 x 4 B x 3: logits, softmax, grad).")
    print("MB/img = saved activations per image = other + depth x one layer, both from forwards of 1-layer models at")
    print("  that resolution (batch 1, CPU); checkpointing keeps only each layer's input hidden states.")
    print("Dropout (LoRA's 0.1) counted as CUDA saves it: a 1-byte mask an element (see --cpu-dropout).")
    print("Not included: CUDA context (~0.5 GB), cuBLAS/attention workspaces, allocator fragmentation.")
    print(
        f"bf16 autocast, sdpa, pixel-MLP head (hidden 2560), LoRA rank {LORA_RANK} on q/k/v/o; wts: backbone weights; "
        f"! = over {GPU_GB} GB.\n"
    )
    saved = " ".join(f"{'MB/img ' + r:>9}" for r in resolutions)
    batches = " ".join(f"{'GB ' + r + ' b' + str(EXTRAPOLATED_BATCH[r]):>10}" for r in resolutions)
    header = f"{'model':10} {'mode':6} {'wts':4} {'ckpt':4} {'trainable':>13} {'wts+opt':>8} {saved} {batches}"
    print(header + "\n" + "-" * len(header))
    for name in names:
        for variant in variants:
            print(extrapolation_row(name, variant, probes, summaries[name, variant], resolutions))


def print_fits(names, variants, probes, summaries, resolution):
    """Per model, the variants that fit an 80 GB GPU at this resolution, cheapest first."""
    batch = EXTRAPOLATED_BATCH[resolution]
    print(f"\nFits {GPU_GB} GB at {resolution} resolution, batch {batch} (EXTRAPOLATED GB, cheapest first):")
    for name in names:
        totals = {v: estimate(name, v, resolution, batch, probes, summaries[name, v][2])["total"] for v in variants}
        fitting = sorted((t, v) for v, t in totals.items() if t <= GPU_GB * GB)
        print(
            f"  {MODELS[name][0]:10} "
            + (", ".join(f"{' '.join(v.label().split())} {t / GB:.1f}" for t, v in fitting) or "none")
        )


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models",
        help=f"comma-separated shapes to extrapolate, of {','.join(MODELS)} (default: all; vits16 with --quick)",
    )
    parser.add_argument(
        "--measure",
        help="comma-separated shapes to run full-depth half-resolution steps of (default: "
        "vits16 on CPU, vitb16,vitl16 on CUDA)",
    )
    parser.add_argument("--batch-size", type=int, help="images per measured step (default: 1 on CPU, 8 on CUDA)")
    parser.add_argument(
        "--steps",
        type=int,
        help="timed steps after one warm-up step (default: 0 on CPU, 3 on CUDA); 0 times the warm-up step itself",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--attention-grid",
        action="store_true",
        help="also measure LoRA steps (fp32 weights) in eager/sdpa attention x fp32/bf16 precision",
    )
    parser.add_argument(
        "--cpu-dropout",
        action="store_true",
        help="count dropout as the CPU's own kernel saves it (4-byte noise) instead of CUDA's 1-byte mask",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: ViT-S, half resolution, frozen, LoRA and full (checkpointing on), fp32 weights",
    )
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.models = (args.models or ("vits16" if args.quick else ",".join(MODELS))).split(",")
    args.measure = (args.measure or ("vitb16,vitl16" if cuda and not args.quick else "vits16")).split(",")
    unknown = [m for m in args.models + args.measure if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}: choose from {','.join(MODELS)}")
    args.batch_size = args.batch_size or (8 if cuda else 1)
    args.steps = args.steps if args.steps is not None else 3 if cuda else 0
    return args


def main():
    args = parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    resolutions = ["half"] if args.quick else list(RESOLUTIONS)
    variants = QUICK_VARIANTS if args.quick else VARIANTS
    names = list(dict.fromkeys(args.models + args.measure))
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if cuda else f'{torch.get_num_threads()} threads'}), "
        f"torch {torch.__version__}; random weights; bf16 autocast, sdpa, pixel-MLP head, LoRA rank {LORA_RANK} q/k/v/o"
        f"; dropout saved as {'the CPU kernel does (4-byte noise)' if args.cpu_dropout else 'on CUDA (1-byte mask)'}"
    )
    wall = time.perf_counter()
    probes = {}
    for name in names:
        started = time.perf_counter()
        probes[name] = probe_model_apart(name, variants, resolutions, not args.cpu_dropout)
        print(
            f"probed {MODELS[name][0]}: {len(probes[name])} forwards of a 1-layer model ({'+'.join(resolutions)} "
            f"resolution) in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
    summaries = {(name, v): parameter_summary(name, v) for name in names for v in variants}
    print(
        "\nMEASURED full-depth steps at half resolution (input 960x544), "
        + (f"median of {args.steps} after 1 warm-up" if args.steps else "the first step")
        + "; probe MB: the same saved bytes extrapolated from the 1-layer probes"
        + ("; extrap. MB: the GPU memory extrapolated" if cuda else "")
    )
    with dropout_as_on_cuda(not cuda and not args.cpu_dropout):  # a CUDA step runs CUDA's kernel anyway
        measure(args.measure, variants, args.batch_size, args.steps, device, probes, summaries)
        if args.attention_grid:
            lora = [v for v in variants if v.mode == "lora" and v.dtype == "float32"]
            print_grid_summary(
                measure(args.measure, lora, args.batch_size, args.steps, device, probes, summaries, grid=True), cuda
            )
    print_extrapolation(args.models, variants, probes, summaries, resolutions)
    for resolution in resolutions:
        print_fits(args.models, variants, probes, summaries, resolution)
    print(f"\nwall time {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
    main()
