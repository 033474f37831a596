"""One training step of the segmentation model: time, saved-activation bytes and (on CUDA) peak GPU memory.

A step is exactly what run_training.py does: autocast forward of SegmentationModel (randomly initialised DINOv3
ViT of a real size, LoRA rank 16 on q/k/v/o, MLP head), weighted cross entropy on logits upsampled to the full
1920x1080 source, backward, gradient clipping, AdamW step. Half resolution: input 960x544 (content 960x540).
Grid: gradient checkpointing {off, on} x attention {eager, sdpa} x precision {fp32, bf16 autocast}.

"Saved activations" are the bytes of the unique storages the autograd graph keeps for backward (packed through
torch.autograd.graph.saved_tensors_hooks during the forward, parameters excluded; with checkpointing, the layer
inputs that torch.utils.checkpoint holds for recomputation are added). That is what differs between the
configurations and what dominates GPU memory; it needs no GPU to measure.

On a CPU-only machine the script also prints an EXTRAPOLATED GPU memory estimate (ViT-B/16 half resolution
batch 8, ViT-L/16 full resolution batch 4) from measured saved bytes: it is not a GPU measurement.

    .venv/bin/python benchmarks/bench_train_step.py --quick                 # smoke run, ViT-S only
    .venv/bin/python benchmarks/bench_train_step.py                         # CPU: ViT-S, ViT-B, batch 1, 2 steps
    .venv/bin/python benchmarks/bench_train_step.py --device cuda           # GPU: + ViT-L, batch 8, peak memory
"""

import argparse
import gc
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel
from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTLayer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dataset import NUM_CLASSES  # noqa: E402
from losses import weighted_cross_entropy  # noqa: E402
from model import IMAGENET_MEAN, IMAGENET_STD, SegmentationModel, count_parameters  # noqa: E402

# name: (label, hidden, layers, heads, intermediate), as the DINOv3 LVD-1689M ViT-S/B/L 16 checkpoints
MODELS = {
    "vits": ("ViT-S/16", 384, 12, 6, 1536),
    "vitb": ("ViT-B/16", 768, 12, 12, 3072),
    "vitl": ("ViT-L/16", 1024, 24, 16, 4096),
}
SOURCE_SIZE = (1080, 1920)  # (H, W) of the logits and masks: the full source resolution
RESOLUTIONS = {  # name: (content (h, w), padded (h, w)) of the backbone input
    "half": ((540, 960), (544, 960)),
    "full": ((1080, 1920), (1088, 1920)),
}
LORA_RANK = 16
MB, GB = 1e6, 1e9


def make_model(name, attention, checkpointing, depth=None, device="cpu"):
    _, hidden, layers, heads, intermediate = MODELS[name]
    config = DINOv3ViTConfig(
        hidden_size=hidden, num_hidden_layers=depth or layers, num_attention_heads=heads,
        intermediate_size=intermediate, patch_size=16, num_register_tokens=4, layerscale_value=1e-5,
        key_bias=False, pos_embed_shift=None, pos_embed_jitter=None, pos_embed_rescale=None,  # as model.py
    )
    config._attn_implementation = attention
    torch.manual_seed(0)
    backbone = DINOv3ViTModel(config)
    assert backbone.config._attn_implementation == attention, backbone.config._attn_implementation
    model = SegmentationModel(backbone, IMAGENET_MEAN, IMAGENET_STD, lora_rank=LORA_RANK,
                              gradient_checkpointing=checkpointing)
    return model.to(device).train()


def make_optimizer(model):
    head = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("head.")]
    lora = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    return torch.optim.AdamW([{"params": lora, "lr": 1e-4}, {"params": head, "lr": 1e-3}], weight_decay=0.01), lora + head


def make_batch(batch_size, resolution, device):
    _, (padded_h, padded_w) = RESOLUTIONS[resolution]
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, padded_h, padded_w), dtype=torch.uint8, generator=generator)
    masks = torch.randint(0, NUM_CLASSES, (batch_size, *SOURCE_SIZE), generator=generator)
    weights = torch.rand(NUM_CLASSES, generator=generator) + 0.5
    return images.to(device), masks.to(device), weights.to(device)


class SavedBytes:
    """Bytes of the unique storages autograd saves for backward, split into backbone layers and the rest.

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
            for value in kwargs.values():  # RoPE cos/sin: computed once, shared by all layers
                for tensor in value if isinstance(value, (tuple, list)) else (value,):
                    self._record(tensor, "other")

    def _post(self, module, args, output):
        self.inside_layer -= 1

    def __enter__(self):
        self.handles = [h for layer in self.layers for h in (
            layer.register_forward_pre_hook(self._pre, with_kwargs=True), layer.register_forward_hook(self._post))]
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


def bench(name, attention, precision, checkpointing, batch_size, steps, device):
    model = make_model(name, attention, checkpointing, device=device)
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
        "model": name, "attention": attention, "precision": precision, "checkpointing": checkpointing,
        "batch": batch_size, "seconds": statistics.median(times[1:] if steps else times), "saved": saved.total(),
        "saved_layers": saved.total("layers"), "saved_other": saved.total("other"),
        "params": count_parameters(model),
    }
    if device.type == "cuda":
        result["peak"] = torch.cuda.max_memory_allocated(device)
        result["images_per_s"] = batch_size / result["seconds"]
    del model, optimizer, params, batch, saved
    release(device)
    return result


def full_depth(name, attention, precision, checkpointing, resolution):
    """Per-image saved bytes and parameter counts of the full-depth model, measured on a 1-layer model of the same
    width (forward only, batch 1, CPU): the layers are identical, so bytes = other + layers x per-layer bytes."""
    layers = MODELS[name][2]
    model = make_model(name, attention, checkpointing, depth=1)
    batch = make_batch(1, resolution, torch.device("cpu"))
    with SavedBytes(model) as saved:
        loss = forward_loss(model, *batch, resolution, precision)
    layer, other = saved.total("layers"), saved.total("other")
    one = count_parameters(model)
    del model, loss, saved, batch
    two = count_parameters(make_model(name, attention, checkpointing, depth=2))  # parameters only, no forward
    release(torch.device("cpu"))
    params = tuple(p1 + (layers - 1) * (p2 - p1) for p1, p2 in zip(one, two))
    return {"saved": other + layers * layer, "layer": layer, "params": params}


def estimate(name, resolution, batch_size, ckpt, no_ckpt):
    """Extrapolated GPU bytes of a step; ckpt/no_ckpt: full_depth() of the same attention/precision."""
    trainable, total = ckpt["params"]
    weights = 4 * total + 3 * 4 * trainable  # fp32 weights; fp32 grads + 2 AdamW states of the trainable ones
    saved = batch_size * ckpt["saved"]
    recompute = batch_size * no_ckpt["layer"]  # backward re-runs one layer at a time, keeping all it saves
    logits = batch_size * NUM_CLASSES * SOURCE_SIZE[0] * SOURCE_SIZE[1] * 4 * 3
    return {"weights": weights, "saved": saved, "recompute": recompute, "logits": logits,
            "total": weights + saved + recompute + logits}


def table_header(cuda):
    header = f"{'model':9} {'attention':9} {'precision':9} {'ckpt':4} {'batch':>5} {'s/step':>8} {'saved MB':>9}" \
             f" {'layers MB':>9} {'other MB':>8}"
    header += f" {'GPU peak MB':>11} {'img/s':>7}" if cuda else ""
    return header + "\n" + "-" * len(header)


def table_row(r, cuda):
    line = f"{MODELS[r['model']][0]:9} {r['attention']:9} {r['precision']:9} {'on' if r['checkpointing'] else 'off':4}" \
           f" {r['batch']:5d} {r['seconds']:8.2f} {r['saved'] / MB:9.0f} {r['saved_layers'] / MB:9.0f}" \
           f" {r['saved_other'] / MB:8.0f}"
    return line + (f" {r['peak'] / MB:11.0f} {r['images_per_s']:7.2f}" if cuda else "")


def print_summary(results, cuda):
    print("\nSummary")
    print("-------")
    by_key = {(r["model"], r["attention"], r["precision"], r["checkpointing"]): r for r in results}
    for (name, attention, precision, ckpt), r in by_key.items():
        if ckpt or (name, attention, precision, True) not in by_key:
            continue
        on = by_key[(name, attention, precision, True)]
        ratio = r["saved"] / on["saved"]
        line = f"{MODELS[name][0]} {attention:5} {precision}: checkpointing cuts saved activations " \
               f"{r['saved'] / MB:.0f} -> {on['saved'] / MB:.0f} MB = {ratio:.1f}x " \
               f"({'meets' if ratio >= 5 else 'MISSES'} the >= 5x target), step {on['seconds'] / r['seconds']:.2f}x the time"
        if cuda:
            line += f"; GPU peak {r['peak'] / MB:.0f} -> {on['peak'] / MB:.0f} MB"
        print(line)
    for name in dict.fromkeys(r["model"] for r in results):
        base, best = by_key.get((name, "eager", "fp32", False)), by_key.get((name, "sdpa", "bf16", True))
        if base and best:
            line = f"{MODELS[name][0]} eager fp32 no-ckpt -> sdpa bf16 ckpt (the defaults): saved activations " \
                   f"{base['saved'] / MB:.0f} -> {best['saved'] / MB:.0f} MB ({base['saved'] / best['saved']:.1f}x less)"
            if cuda:
                line += f", GPU peak {base['peak'] / MB:.0f} -> {best['peak'] / MB:.0f} MB at batch {best['batch']}"
            print(line)
        for precision in ("fp32", "bf16"):
            eager, sdpa = by_key.get((name, "eager", precision, False)), by_key.get((name, "sdpa", precision, False))
            if eager and sdpa:
                print(f"{MODELS[name][0]} {precision} no-ckpt: sdpa saves {sdpa['saved'] / MB:.0f} MB vs eager "
                      f"{eager['saved'] / MB:.0f} MB ({eager['saved'] / sdpa['saved']:.2f}x), "
                      f"{sdpa['seconds']:.2f} vs {eager['seconds']:.2f} s/step")
    if cuda:
        for r in results:
            if r["model"] == "vitb" and (r["attention"], r["precision"], r["checkpointing"]) == ("sdpa", "bf16", True):
                verdict = "meets" if r["peak"] <= 8 * GB and r["batch"] >= 8 else "check"
                print(f"ViT-B/16 half res batch {r['batch']} sdpa bf16 ckpt: GPU peak {r['peak'] / GB:.2f} GB "
                      f"({verdict} the <= 8 GB at batch 8 target)")


def print_extrapolation(results, quick):
    print("\nEXTRAPOLATED GPU memory (CPU measurement of saved-activation bytes, NOT a GPU measurement)")
    print("-------------------------------------------------------------------------------------------")
    print("total = fp32 weights (frozen backbone + LoRA/head) + fp32 grads and 2 AdamW states of the trainable ones")
    print("      + saved activations per image x batch + one layer's no-checkpointing saved bytes x batch (the")
    print("        layer backward recomputes) + full-res logits B x 10 x 1080 x 1920 x 4 B x 3 (logits, softmax, grad).")
    print("Saved bytes per image come from forward passes of 1-layer models of the same width at the same")
    print("resolution (batch 1, CPU): per-layer bytes x depth + embeddings/RoPE/head/loss bytes (layers are")
    print("identical); linear in batch. Not included: CUDA context (~0.5 GB), cuBLAS/attention workspaces, allocator")
    print("fragmentation. The log-softmax is already in the saved bytes, so the logits term counts it twice.")
    by_key = {(r["model"], r["attention"], r["precision"], r["checkpointing"]): r for r in results}
    cases = [("vitb", "half", 8, 8 * GB, "ViT-B/16 half res (960x544) batch 8", "<= 8 GB")]
    if not quick:
        cases.append(("vitl", "full", 4, 24 * GB, "ViT-L/16 full res (1920x1088) batch 4", "fits in 24 GB"))
    configs = [("sdpa", "bf16"), ("sdpa", "fp32"), ("eager", "fp32")]
    for name, resolution, batch_size, target, label, target_text in cases:
        print(f"\n{label}, target {target_text}:")
        for attention, precision in configs:
            if name == "vitl" and precision == "fp32" and attention == "sdpa":
                continue  # each ViT-L full-res probe is a minute of CPU: only the default (sdpa bf16) is probed
            if name == "vitl" and attention == "eager":
                _, (h, w) = RESOLUTIONS[resolution]
                tokens = (h // 16) * (w // 16) + 5
                probs = MODELS[name][3] * tokens ** 2 * 4 * MODELS[name][2] * batch_size
                print(f"  eager fp32 no-ckpt: not probed; its fp32 attention probabilities alone are "
                      f"heads x tokens^2 x 4 B x layers x batch = {probs / GB:.0f} GB")
                continue
            probed = {ckpt: full_depth(name, attention, precision, ckpt, resolution) for ckpt in (True, False)}
            for ckpt in (True, False):
                e = estimate(name, resolution, batch_size, probed[ckpt], probed[False])
                if not ckpt:
                    e["total"] -= e["recompute"]
                    e["recompute"] = 0
                check = ""
                measured = by_key.get((name, attention, precision, ckpt))
                if resolution == "half" and measured:
                    check = f" [full-depth model measured {measured['saved'] / MB:.0f} MB/image; probe " \
                            f"{probed[ckpt]['saved'] / MB:.0f}]"
                print(f"  {attention:5} {precision} ckpt {'on ' if ckpt else 'off'}: {e['total'] / GB:6.2f} GB = "
                      f"weights+optim {e['weights'] / GB:.2f} + saved {e['saved'] / GB:.2f} + recompute "
                      f"{e['recompute'] / GB:.2f} + logits {e['logits'] / GB:.2f}  "
                      f"({'within' if e['total'] <= target else 'OVER'} target){check}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated of vits,vitb,vitl (default: vits,vitb on CPU, all on CUDA; "
                                         "vits with --quick)")
    parser.add_argument("--batch-size", type=int, help="images per step (default: 1 on CPU, 8 on CUDA)")
    parser.add_argument("--steps", type=int, help="timed steps after one warm-up step (default: 2 on CPU, 3 on CUDA); 0 times the warm-up "
                             "step itself (on a slow CPU, where first-step overheads are small against the step)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smoke run: ViT-S, sdpa only, 1 step, ViT-B extrapolation only")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    models = (args.models or ("vits" if args.quick else "vits,vitb,vitl" if cuda else "vits,vitb")).split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}: choose from {','.join(MODELS)}")
    batch_size = args.batch_size or (8 if cuda else 1)
    steps = args.steps if args.steps is not None else 1 if args.quick else 3 if cuda else 2
    attentions = ("sdpa",) if args.quick else ("eager", "sdpa")

    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else f'{torch.get_num_threads()} threads'}), "
          f"torch {torch.__version__}; half resolution: input 960x544 (content 960x540) -> logits 1920x1080; "
          f"batch {batch_size}; LoRA rank {LORA_RANK} on q/k/v/o + MLP head; "
          + (f"median of {steps} step(s) after 1 warm-up\n" if steps else "time of the first (warm-up) step, 1 step per configuration\n"))
    wall = time.perf_counter()
    print(table_header(cuda), flush=True)
    results = []
    for name, ckpt, attention, precision in itertools.product(models, (False, True), attentions, ("fp32", "bf16")):
        try:
            results.append(bench(name, attention, precision, ckpt, batch_size, steps, device))
            print(table_row(results[-1], cuda), flush=True)
        except torch.OutOfMemoryError:
            release(device)
            print(f"{MODELS[name][0]:9} {attention:9} {precision:9} {'on' if ckpt else 'off':4} out of memory", flush=True)
    print("\nparameters: " + "; ".join(
        f"{MODELS[r['model']][0]} {r['params'][0]:,} trainable of {r['params'][1]:,}"
        for r in {r["model"]: r for r in results}.values()))
    print_summary(results, cuda)
    if not cuda:
        print_extrapolation(results, args.quick)
    print(f"\nwall time {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
    main()
