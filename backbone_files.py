"""Where a DINOv3 backbone comes from: a short name or hub id (hub.py: token, clear refusals), a save_pretrained
directory, or a weight file in Meta's or timm's naming (the .pth of Meta's download form, timm's copies, continued
pre-training such as SurgeNetDINO), whose architecture is read off the tensors and whose weights are renamed to
transformers' DINOv3ViTModel. A key that cannot be placed is an error naming it, never a half-loaded model."""

import json
import os
import pickle
import re
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import RemoteEntryNotFoundError
from safetensors.torch import load_file
from transformers import DINOv3ViTConfig, DINOv3ViTModel, PreTrainedConfig

import hub
from cli import first_line
from hub import BackboneError

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".safetensors")
WRAPPER_KEYS = (
    "teacher",
    "model",
    "model_ema",
    "state_dict",
    "module",
    "student",
)  # training checkpoints nest the weights
ANCHOR = "patch_embed.proj.weight"  # every DINOv3 ViT has it, in Meta's naming and timm's
DEFAULT_HEAD_DIM = 64  # every released DINOv3 ViT; read from rope_embed.periods where a file has them
DEFAULT_ROPE_THETA = 100.0
DINOV3_EPS = 1e-5  # layer_norm_eps of Meta's code, timm's and the hub configs
TIMM_ONLY = ("reg_token", "gamma_1", "q_bias", "fc1_g.weight")  # names only timm's copies use
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSOR_CONFIG = "preprocessor_config.json"
# (hidden size, blocks) of every released DINOv3 ViT; a weight file of another shape needs an explicit opt-in.
RELEASED_ARCHITECTURES = {
    (384, 12): "ViT-S/16, S+/16",
    (768, 12): "ViT-B/16",
    (1024, 24): "ViT-L/16",
    (1280, 32): "ViT-H+/16",
    (4096, 40): "ViT-7B/16",
}
# How far a RoPE base fitted on periods stored in a dtype may lie from the true one (relative), measured on
# base 100 and 10000: bfloat16 0.07%, float16 0.004%.
ROPE_TOLERANCE = {torch.bfloat16: 2e-3, torch.float16: 5e-4}

# (key in Meta's or timm's naming, transformers' name; None: not used by transformers' model). The fused
# blocks.N.attn.qkv is split by to_transformers_names; rope_embed.periods is read by infer_config.
RENAMES = [
    (r"cls_token", r"embeddings.cls_token"),
    (r"storage_tokens|reg_token", r"embeddings.register_tokens"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.\1"),
    (r"norm\.(weight|bias)", r"norm.\1"),
    (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"model.layer.\1.norm\2.\3"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"model.layer.\1.attention.o_proj.\2"),
    # timm: q and v bias, the key's fixed at 0
    (r"blocks\.(\d+)\.attn\.q_bias", r"model.layer.\1.attention.q_proj.bias"),
    (r"blocks\.(\d+)\.attn\.v_bias", r"model.layer.\1.attention.v_proj.bias"),
    (r"blocks\.(\d+)\.(?:ls1\.gamma|gamma_1)", r"model.layer.\1.layer_scale1.lambda1"),
    (r"blocks\.(\d+)\.(?:ls2\.gamma|gamma_2)", r"model.layer.\1.layer_scale2.lambda1"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"model.layer.\1.mlp.up_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.(?:fc2|w3)\.(weight|bias)", r"model.layer.\1.mlp.down_proj.\2"),
    # SwiGLU: silu(w1 x) * w2 x
    (r"blocks\.(\d+)\.mlp\.(?:w1|fc1_g)\.(weight|bias)", r"model.layer.\1.mlp.gate_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.(?:w2|fc1_x)\.(weight|bias)", r"model.layer.\1.mlp.up_proj.\2"),
    (r"mask_token|rope_embed\.periods|local_cls_norm\.(weight|bias)|blocks\.\d+\.attn\.qkv\.bias_mask", None),
]


class WeightFileError(ValueError):
    """A weight file that is not a DINOv3 ViT we can load exactly; the message names the file and the keys."""


def is_weight_file(path) -> bool:
    return str(path).endswith(WEIGHT_FILE_SUFFIXES)


# ----------------------------------------------------------------------------- name -> backbone


def resolve_backbone(name_or_path) -> str:
    """A short name (vitl16, vit7b16-sat493m...) -> its hub id; hub ids and local paths pass unchanged."""
    name_or_path = str(name_or_path)
    if name_or_path in hub.BACKBONES:
        return hub.BACKBONES[name_or_path]
    if is_weight_file(name_or_path):
        if not os.path.isfile(name_or_path):
            raise BackboneError(f"backbone file {name_or_path} does not exist")
        return os.path.abspath(name_or_path)  # config.json must find it again from any working directory
    if "/" not in name_or_path and not os.path.exists(name_or_path):
        raise BackboneError(
            f"unknown backbone {name_or_path!r}: give a hub id, a local directory, or one of {', '.join(hub.BACKBONES)}"
        )
    return name_or_path


def from_pretrained(name_or_path, token, attn_implementation, local_files_only, dtype) -> DINOv3ViTModel:
    config_dict, _ = PreTrainedConfig.get_config_dict(name_or_path, token=token, local_files_only=local_files_only)
    if config_dict.get("model_type") != "dinov3_vit":
        raise BackboneError(
            f"{name_or_path} is not a DINOv3 ViT checkpoint (its config.json has no model_type dinov3_vit): "
            f"pass a DINOv3 backbone such as {hub.DEFAULT_BACKBONE}"
        )
    # The hub configs randomly shift/jitter/rescale the RoPE patch coordinates in train mode (a pretraining
    # augmentation). Fine-tuning turns them off so training and evaluation see the same patch geometry.
    config = DINOv3ViTConfig.from_dict(
        {**config_dict, "pos_embed_shift": None, "pos_embed_jitter": None, "pos_embed_rescale": None}
    )
    return DINOv3ViTModel.from_pretrained(
        name_or_path,
        config=config,
        token=token,
        local_files_only=local_files_only,
        attn_implementation=attn_implementation,
        dtype=dtype,
    )


def load_backbone(
    name_or_path: str,
    token: str | None = None,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    any_architecture: bool = False,
) -> DINOv3ViTModel:
    """A DINOv3 ViT from a save_pretrained directory, a hub id (local cache first, then the hub) or a weight file in
    Meta's or timm's naming (load_weight_file), in dtype."""
    if is_weight_file(name_or_path) and os.path.isfile(name_or_path):
        try:
            return load_weight_file(name_or_path, attn_implementation, dtype, any_architecture)
        except WeightFileError as error:
            raise BackboneError(str(error)) from None
    if not hub.is_hub_id(name_or_path):
        if not os.path.isdir(name_or_path):
            raise BackboneError(f"backbone directory {name_or_path} does not exist: pass a DINOv3 directory or hub id")
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise BackboneError(
                f"{name_or_path} has no config.json: pass a DINOv3 directory written by save_pretrained"
            )
        try:
            return from_pretrained(name_or_path, None, attn_implementation, local_files_only=True, dtype=dtype)
        except OSError:
            raise BackboneError(
                f"{name_or_path} holds no loadable DINOv3 weights: pass a DINOv3 directory written by save_pretrained"
            ) from None
    try:
        return hub.cached_or_downloaded(
            name_or_path,
            token,
            lambda local_files_only: from_pretrained(
                name_or_path, token, attn_implementation, local_files_only=local_files_only, dtype=dtype
            ),
        )
    except OSError:
        raise BackboneError(
            f"downloading {name_or_path} from the Hugging Face hub failed: retry, or pass a local --backbone directory"
        ) from None


def backbone_normalization(name_or_path: str, token: str | None = None) -> tuple[tuple, tuple]:
    """(mean, std) on a 0..1 scale from the backbone's preprocessor_config.json, ImageNet's if it has none."""
    if not hub.is_hub_id(name_or_path):
        path = os.path.join(name_or_path, PREPROCESSOR_CONFIG)
        path = path if os.path.isfile(path) else None
    else:
        try:
            path = hub.cached_or_downloaded(
                name_or_path,
                token,
                lambda local_files_only: hf_hub_download(
                    name_or_path, PREPROCESSOR_CONFIG, token=token, local_files_only=local_files_only
                ),
            )
        except RemoteEntryNotFoundError:
            path = None
    if path is None:
        return IMAGENET_MEAN, IMAGENET_STD
    with open(path) as f:
        preprocessor = json.load(f)
    return tuple(preprocessor.get("image_mean", IMAGENET_MEAN)), tuple(preprocessor.get("image_std", IMAGENET_STD))


# ----------------------------------------------------------------------------- Meta's and timm's weight files


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors or .pth/.pt file; a pickle that would run code is refused (weights_only)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise WeightFileError(
            f"{path} needs arbitrary code to unpickle (it is not a plain state dict), so it was not loaded: "
            "save its state_dict(), or a .safetensors file, and pass that"
        ) from None
    except Exception as error:
        message = first_line(error)
        raise WeightFileError(f"{path} cannot be read as a weight file ({message}): is it complete?") from None


def unwrap(state, path) -> dict[str, torch.Tensor]:
    """The backbone's tensors, unprefixed: out of {"teacher": ...}/{"model": ...} and a backbone./module. prefix."""
    while isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
            if not any(k.endswith(ANCHOR) for k in tensors):
                raise WeightFileError(
                    f"{path} holds no DINOv3 state dict (top-level keys: {', '.join(list(state)[:6])})"
                )
            state = tensors
        else:
            state = inner
    if not isinstance(state, dict):
        raise WeightFileError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    prefixes = sorted(
        {k[: -len(ANCHOR)] for k in state if k.endswith(ANCHOR)}, key=lambda p: (not p.startswith("teacher"), len(p))
    )
    if not prefixes:
        hint = (
            ": it is in transformers' naming; pass the directory save_pretrained wrote"
            if any(k.endswith("embeddings.patch_embeddings.weight") for k in state)
            else ""
        )
        raise WeightFileError(f"{path} has no {ANCHOR}, so it is no DINOv3 ViT in Meta's or timm's naming{hint}")
    prefix = prefixes[0]  # the teacher's weights where a training checkpoint holds teacher and student
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def split_qkv(layer: str, kind: str, tensor: torch.Tensor, state) -> dict[str, torch.Tensor]:
    """blocks.N.attn.qkv -> q/k/v_proj (in that order along the output). A key bias that Meta's bias_mask zeroes,
    or that is zero, is no key bias: transformers' DINOv3 has one only where a checkpoint really uses it."""
    q, k, v = tensor.chunk(3, dim=0)
    if kind == "bias":
        mask = state.get(f"blocks.{layer}.attn.qkv.bias_mask")
        if mask is not None:
            k = k * mask.chunk(3, dim=0)[1].to(k.dtype)
        parts = {"q": q, "v": v, **({"k": k} if k.any() else {})}
    else:
        parts = {"q": q, "k": k, "v": v}
    return {f"model.layer.{layer}.attention.{name}_proj.{kind}": part for name, part in parts.items()}


def to_transformers_names(state: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    renamed, unknown = {}, []
    for key, tensor in state.items():
        fused = re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key)
        if fused:
            renamed.update(split_qkv(*fused.groups(), tensor, state))
            continue
        for pattern, target in RENAMES:
            match = re.fullmatch(pattern, key)
            if match:
                if target is not None:
                    renamed[match.expand(target)] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise WeightFileError(
            f"{path} has {len(unknown)} key(s) a DINOv3 ViT does not have: {', '.join(unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''}; refusing to load it partly"
        )
    return renamed


def rope_settings(periods: torch.Tensor | None, path) -> tuple[int | None, float]:
    """(head dim, RoPE base) from Meta's rope_embed.periods = base ** (4 i / head_dim), i < head_dim / 4. The base is
    fitted on every period (one period alone is off by 3% in a bfloat16 copy), then snapped to a round value within
    what the file's dtype can hold (bfloat16 keeps 3 significant digits)."""
    if periods is None:
        return None, DEFAULT_ROPE_THETA
    tolerance = ROPE_TOLERANCE.get(periods.dtype, 1e-6)
    periods = periods.double().flatten()
    head_dim = 4 * len(periods)
    if len(periods) < 2:
        return head_dim, DEFAULT_ROPE_THETA
    exponents = 4 * torch.arange(len(periods), dtype=torch.float64) / head_dim
    theta = float(torch.exp((exponents * periods.log()).sum() / (exponents**2).sum()))
    for rounded in (float(f"{theta:.2g}"), round(theta)):
        if abs(theta - rounded) <= tolerance * theta:
            theta = float(rounded)
            break
    if not torch.allclose(periods, theta**exponents, rtol=10 * tolerance):
        raise WeightFileError(
            f"{path}: rope_embed.periods are not base ** (4 i / head_dim) for any base (a min/max-"
            "period RoPE?), which transformers' DINOv3 cannot reproduce"
        )
    return head_dim, theta


def infer_config(weights: dict[str, torch.Tensor], periods, path, attn_implementation: str) -> DINOv3ViTConfig:
    """The architecture the tensors imply: width, depth, heads, MLP, registers, biases, layer scale, patch size."""
    if "embeddings.cls_token" not in weights:
        raise WeightFileError(f"{path} has no cls_token, so it is no DINOv3 ViT")
    hidden = weights["embeddings.cls_token"].shape[-1]
    channels, patch = weights["embeddings.patch_embeddings.weight"].shape[1:3]
    layers = sorted({int(m.group(1)) for k in weights if (m := re.match(r"model\.layer\.(\d+)\.", k))})
    up = [v for k, v in weights.items() if k.endswith("mlp.up_proj.weight")]
    if not layers or not up:
        raise WeightFileError(f"{path} has no transformer blocks (blocks.N.attn.qkv, blocks.N.mlp...)")
    head_dim, theta = rope_settings(periods, path)
    head_dim = head_dim or DEFAULT_HEAD_DIM
    if hidden % head_dim:
        raise WeightFileError(f"{path}: width {hidden} is not a multiple of the head size {head_dim}")
    has = lambda suffix: any(k.endswith(suffix) for k in weights)  # noqa: E731
    registers = weights.get("embeddings.register_tokens")
    config = DINOv3ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers[-1] + 1,
        num_attention_heads=hidden // head_dim,
        intermediate_size=up[0].shape[0],
        patch_size=patch,
        num_channels=channels,
        layer_norm_eps=DINOV3_EPS,
        rope_theta=theta,
        num_register_tokens=0 if registers is None else registers.shape[1],
        use_gated_mlp=has("mlp.gate_proj.weight"),
        hidden_act="silu" if has("mlp.gate_proj.weight") else "gelu",
        query_bias=has("q_proj.bias"),
        key_bias=has("k_proj.bias"),
        value_bias=has("v_proj.bias"),
        proj_bias=has("o_proj.bias"),
        mlp_bias=has("up_proj.bias"),
        layerscale_value=1.0,
        # the hub configs' RoPE shift/jitter/rescale are a pre-training augmentation: off for fine-tuning
        pos_embed_shift=None,
        pos_embed_jitter=None,
        pos_embed_rescale=None,
    )
    config._attn_implementation = attn_implementation
    return config


def fill_unused(weights, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the file may lack by design: the mask token (pre-training only), layer scale in a model trained without
    it (identity), a key bias in the layers that have none (zero), the empty register block of a model without."""
    unused = re.compile(
        r"embeddings\.(mask_token|register_tokens)"
        r"|model\.layer\.\d+\.(layer_scale[12]\.lambda1|attention\.k_proj\.bias)"
    )
    layer_scale = any("layer_scale" in k for k in weights)
    filled = dict(weights)
    for key, tensor in expected.items():
        if key not in filled and unused.fullmatch(key) and not ("layer_scale" in key and layer_scale):
            filled[key] = torch.ones_like(tensor) if "layer_scale" in key else torch.zeros_like(tensor)
    return filled


def shape_mismatches(weights: dict, expected: dict) -> list[str]:
    """'name (shape) vs (expected shape)' of every tensor whose shape differs from the expected one's."""
    return [
        f"{k} {tuple(weights[k].shape)} vs {tuple(t.shape)}" for k, t in expected.items() if weights[k].shape != t.shape
    ]


def check_complete(weights, expected, path) -> None:
    missing = [k for k in expected if k not in weights]
    if missing:
        blocks = sorted({int(m.group(1)) for k in missing if (m := re.match(r"model\.layer\.(\d+)\.", k))})
        where = f" (block {', '.join(map(str, blocks))})" if blocks else ""
        raise WeightFileError(
            f"{path} is missing {len(missing)} weight(s){where}, e.g. {', '.join(missing[:3])} in "
            "transformers' naming: is the file complete?"
        )
    wrong = shape_mismatches(weights, expected)
    if wrong:
        raise WeightFileError(
            f"{path}: tensor shapes disagree with the architecture they imply (file vs expected): {', '.join(wrong[:2])}"
        )


def load_weight_file(path, attn_implementation="sdpa", dtype=torch.float32, any_architecture=False) -> DINOv3ViTModel:
    """A DINOv3ViTModel holding exactly the weights of a Meta/timm-named file, architecture inferred; one whose width
    and depth are no released DINOv3's only with any_architecture (a file cut short would load as a shallower ViT)."""
    state = unwrap(read_state_dict(path), path)
    weights = to_transformers_names(state, path)
    config = infer_config(weights, state.get("rope_embed.periods"), path, attn_implementation)
    released = RELEASED_ARCHITECTURES.get((config.hidden_size, config.num_hidden_layers))
    if released is None and not any_architecture:
        depths = ", ".join(f"{name}: width {w}, {n} blocks" for (w, n), name in RELEASED_ARCHITECTURES.items())
        raise WeightFileError(
            f"{path} holds blocks 0-{config.num_hidden_layers - 1} of width {config.hidden_size}, which is no released "
            f"DINOv3 ({depths}): is the file cut short? Pass --any-backbone-architecture to load it as it is"
        )
    config.weights_format = "timm" if any(k.endswith(TIMM_ONLY) for k in state) else "meta"
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten: leave the caller's seeded RNG as it was
        model = DINOv3ViTModel(config)
    expected = model.state_dict()
    weights = fill_unused(weights, expected)
    check_complete(weights, expected, path)
    broken = [k for k, tensor in weights.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise WeightFileError(f"{path} holds NaN or infinite values in {len(broken)} tensor(s), e.g. {broken[0]}")
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    return model.to(dtype).eval()


def architecture(config: DINOv3ViTConfig) -> dict:
    """What config.json records of a backbone, wherever it came from."""
    keys = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "patch_size",
        "num_register_tokens",
        "use_gated_mlp",
        "query_bias",
        "key_bias",
        "value_bias",
        "rope_theta",
    )
    return {
        **{k: getattr(config, k) for k in keys},
        "weights_format": getattr(config, "weights_format", "transformers"),
    }
