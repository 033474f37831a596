"""DINOv3 ViT backbone with LoRA adapters and a segmentation head (per-patch MLP, or multi-layer upsampler)."""
import json
import os
import warnings

import huggingface_hub
import torch
import torch.nn.functional as F
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RemoteEntryNotFoundError, RepositoryNotFoundError,
)
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DINOv3ViTConfig, DINOv3ViTModel, PreTrainedConfig

from dataset import NUM_CLASSES, PATCH_SIZE

# peft 0.21 calls transformers' deprecated is_gradient_checkpointing: noise that tells a user nothing.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

DEFAULT_BACKBONE = "facebook/dinov3-vitb16-pretrain-lvd1689m"  # ViT-B/16 pretrained on LVD-1689M
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")  # DINOv3ViTAttention's projections
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSOR_CONFIG = "preprocessor_config.json"
HUB_PROBE_TIMEOUT_S = 5.0


class BackboneError(RuntimeError):
    """The backbone or its token cannot be had; the message says what the user should do."""


def resolve_hf_token(token_file: str | None = None) -> str | None:
    """Token from token_file, else $HF_TOKEN, else ./hf_token.txt, else the `hf auth login` token."""
    if token_file is not None:
        if not os.path.isfile(token_file):
            raise BackboneError(f"token file {token_file} does not exist: pass the file holding your Hugging Face token")
        with open(token_file) as f:
            token = f.read().strip()
        if not token:
            raise BackboneError(f"token file {token_file} is empty: put your Hugging Face token in it")
        return token
    token = os.environ.get("HF_TOKEN", "").strip()
    if token:
        return token
    if os.path.isfile("hf_token.txt"):
        with open("hf_token.txt") as f:
            token = f.read().strip()
        if token:
            return token
    token = huggingface_hub.get_token()
    return token.strip() if token else None


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now, not only as it was when huggingface_hub was imported."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return huggingface_hub.is_offline_mode() or env.strip().lower() in ("1", "on", "yes", "true")


def _unreachable(name: str) -> BackboneError:
    return BackboneError(
        f"cannot reach the Hugging Face hub to download {name}: "
        "pass a local --backbone directory, or run with network access"
    )


def _gated(name: str) -> BackboneError:
    return BackboneError(
        f"{name} is gated: accept its licence on the hub and put your token in hf_token.txt, "
        "set HF_TOKEN, or pass --hf-token-file (or a local --backbone directory)"
    )


def _probe_hub(name: str, token: str | None) -> None:
    """Fail within seconds, with a clear message, where a plain hub download would retry for ~45 s."""
    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json"), token=token, timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError:
        raise _gated(name) from None
    except RepositoryNotFoundError:
        if token is None:
            raise _gated(name) from None
        raise BackboneError(f"{name} is not on the Hugging Face hub or your token cannot see it: check the name") from None
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code in (401, 403):
            raise _gated(name) from None
        raise _unreachable(name) from None
    except Exception:  # DNS, connection refused, timeout, offline mode: all mean the hub cannot be used
        raise _unreachable(name) from None


def _is_hub_id(name_or_path: str) -> bool:
    return not os.path.exists(name_or_path) and name_or_path.count("/") == 1 and not name_or_path.startswith((".", "~"))


def _from_pretrained(name_or_path, token, attn_implementation, local_files_only) -> DINOv3ViTModel:
    config_dict, _ = PreTrainedConfig.get_config_dict(name_or_path, token=token, local_files_only=local_files_only)
    if config_dict.get("model_type") != "dinov3_vit":
        raise BackboneError(
            f"{name_or_path} is not a DINOv3 ViT checkpoint (its config.json has no model_type dinov3_vit): "
            f"pass a DINOv3 backbone such as {DEFAULT_BACKBONE}"
        )
    # The hub configs randomly shift/jitter/rescale the RoPE patch coordinates in train mode (a pretraining
    # augmentation). Fine-tuning turns them off so training and evaluation see the same patch geometry.
    config = DINOv3ViTConfig.from_dict({
        **config_dict, "pos_embed_shift": None, "pos_embed_jitter": None, "pos_embed_rescale": None,
    })
    return DINOv3ViTModel.from_pretrained(
        name_or_path, config=config, token=token, local_files_only=local_files_only,
        attn_implementation=attn_implementation,
    )


def load_backbone(name_or_path: str, token: str | None = None, attn_implementation: str = "sdpa") -> DINOv3ViTModel:
    """A DINOv3 ViT from a save_pretrained directory or a hub id (local cache first, then the hub)."""
    if not _is_hub_id(name_or_path):
        if not os.path.isdir(name_or_path):
            raise BackboneError(f"backbone directory {name_or_path} does not exist: pass a DINOv3 directory or hub id")
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise BackboneError(
                f"{name_or_path} has no config.json: pass a DINOv3 directory written by save_pretrained"
            )
        try:
            return _from_pretrained(name_or_path, None, attn_implementation, local_files_only=True)
        except OSError:
            raise BackboneError(
                f"{name_or_path} holds no loadable DINOv3 weights: pass a DINOv3 directory written by save_pretrained"
            ) from None
    try:
        return _from_pretrained(name_or_path, token, attn_implementation, local_files_only=True)
    except OSError:
        pass  # not in the local cache
    if _hub_offline():
        raise _unreachable(name_or_path)
    _probe_hub(name_or_path, token)
    try:
        return _from_pretrained(name_or_path, token, attn_implementation, local_files_only=False)
    except OSError:
        raise BackboneError(
            f"downloading {name_or_path} from the Hugging Face hub failed: retry, or pass a local --backbone directory"
        ) from None


def _preprocessor_config_path(name_or_path: str, token: str | None) -> str | None:
    if not _is_hub_id(name_or_path):
        path = os.path.join(name_or_path, PREPROCESSOR_CONFIG)
        return path if os.path.isfile(path) else None
    try:
        return hf_hub_download(name_or_path, PREPROCESSOR_CONFIG, token=token, local_files_only=True)
    except LocalEntryNotFoundError:
        pass  # not in the local cache
    if _hub_offline():
        raise _unreachable(name_or_path)
    _probe_hub(name_or_path, token)
    try:
        return hf_hub_download(name_or_path, PREPROCESSOR_CONFIG, token=token)
    except RemoteEntryNotFoundError:
        return None


def backbone_normalization(name_or_path: str, token: str | None = None) -> tuple[tuple, tuple]:
    """(mean, std) on a 0..1 scale from the backbone's preprocessor_config.json, ImageNet's if it has none."""
    path = _preprocessor_config_path(name_or_path, token)
    if path is None:
        return IMAGENET_MEAN, IMAGENET_STD
    with open(path) as f:
        preprocessor = json.load(f)
    return tuple(preprocessor.get("image_mean", IMAGENET_MEAN)), tuple(preprocessor.get("image_std", IMAGENET_STD))


MLP_HEAD = {"type": "mlp", "hidden": 256}  # the seed's design, and the default
HEAD_TYPES = ("mlp", "multilayer")


class HeadConfigError(ValueError):
    """A head setting that does not fit the backbone; the message says what to choose instead."""


def default_feature_layers(num_layers: int, count: int = 4) -> list[int]:
    """count evenly spaced 1-based layer indices ending at the last one: [3, 6, 9, 12] of 12, [1, 2, 3, 4] of 4."""
    return sorted({max(1, num_layers * (i + 1) // count) for i in range(count)})


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv + GroupNorm (independent of the small per-GPU batch) + GELU."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.GroupNorm(8, out_channels), nn.GELU())


class MultiLayerHead(nn.Module):
    """Patch tokens of several ViT layers -> per-layer 1x1 projections, summed at 1/16 -> two x2 upsampling conv
    stages -> logits at 1/4 of the input. Summing per-layer projections equals a 1x1 conv on their concatenation,
    without materialising it. Widths: width at 1/16, width/2 at 1/8, width/4 at 1/4."""

    def __init__(self, hidden_size: int, num_layers: int, width: int):
        super().__init__()
        self.projections = nn.ModuleList(nn.Linear(hidden_size, width) for _ in range(num_layers))
        self.stages = nn.ModuleList([conv_block(width, width), conv_block(width, width // 2),
                                     conv_block(width // 2, width // 4)])
        self.classifier = nn.Conv2d(width // 4, NUM_CLASSES, 1)

    def forward(self, layer_tokens: list[torch.Tensor], grid_size: tuple[int, int]) -> torch.Tensor:
        """layer_tokens: (B, h*w, hidden) per layer, grid_size (h, w) -> (B, NUM_CLASSES, 4h, 4w)."""
        fused = sum(projection(tokens) for projection, tokens in zip(self.projections, layer_tokens))
        x = self.stages[0](fused.transpose(1, 2).reshape(fused.shape[0], -1, *grid_size))
        for stage in self.stages[1:]:
            x = stage(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        return self.classifier(x)


def resolve_head_config(head: dict | None, num_layers: int) -> dict:
    """The head settings with defaults filled in and checked against a num_layers-layer backbone."""
    head = dict(head or MLP_HEAD)
    if head["type"] == "mlp":
        return {"type": "mlp", "hidden": head.get("hidden", MLP_HEAD["hidden"])}
    if head["type"] != "multilayer":
        raise HeadConfigError(f"unknown head type {head['type']!r}: choose one of {', '.join(HEAD_TYPES)}")
    layers = list(head.get("feature_layers") or default_feature_layers(num_layers))
    bad = [i for i in layers if not 1 <= i <= num_layers]
    if bad or len(set(layers)) != len(layers):
        raise HeadConfigError(f"feature layers {layers} do not fit this {num_layers}-layer backbone: "
                              f"give distinct 1-based layer indices from 1 to {num_layers}")
    width = head.get("width", 256)
    if width < 32 or width % 32:
        raise HeadConfigError(f"head width {width} must be a positive multiple of 32 (GroupNorm of 8 groups at width/4)")
    return {"type": "multilayer", "feature_layers": sorted(layers), "width": width}


def upsample_to_source(logits, padded_size, content_size, output_size) -> torch.Tensor:
    """Logits over the padded canvas (any stride) -> (B, C, H, W) over the output_size=(H, W) source: upsample the
    canvas at the content's source scale, then keep the top-left source region."""
    (padded_h, padded_w), (content_h, content_w), (out_h, out_w) = padded_size, content_size, output_size
    upsampled_size = (round(padded_h * out_h / content_h), round(padded_w * out_w / content_w))
    logits = F.interpolate(logits, size=upsampled_size, mode="bilinear", align_corners=False)
    return logits[:, :, :out_h, :out_w]


class SegmentationModel(nn.Module):
    """LoRA-adapted frozen DINOv3 ViT and a head: an MLP on every last-layer patch token (head type "mlp"), or a
    progressive upsampler on the patch tokens of several layers, each through the backbone's final norm ("multilayer")."""

    def __init__(self, backbone: DINOv3ViTModel, mean, std, lora_rank=16, lora_alpha=32, lora_dropout=0.1,
                 lora_target_modules=LORA_TARGET_MODULES, head=None, gradient_checkpointing=False):
        super().__init__()
        config = backbone.config
        self.head_config = resolve_head_config(head, config.num_hidden_layers)
        if self.head_config["type"] == "multilayer":
            # Layers after the deepest feature layer would cost compute and leave LoRA weights without gradients
            # (which DDP rejects): drop them.
            backbone.model.layer = backbone.model.layer[:max(self.head_config["feature_layers"])]
            self.head = MultiLayerHead(config.hidden_size, len(self.head_config["feature_layers"]), self.head_config["width"])
        else:
            hidden = self.head_config["hidden"]
            self.head = nn.Sequential(
                nn.Linear(config.hidden_size, hidden), nn.GELU(),
                nn.Linear(hidden, hidden), nn.GELU(),
                nn.Linear(hidden, NUM_CLASSES),
            )
        if gradient_checkpointing:
            # Non-reentrant: the reentrant form silently gives LoRA no gradients, as the layer inputs (the
            # frozen embeddings' output) do not require grad.
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        lora_config = LoraConfig(
            r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=list(lora_target_modules),
        )
        self.backbone = get_peft_model(backbone, lora_config)  # freezes everything but the LoRA weights
        self.num_prefix_tokens = 1 + config.num_register_tokens  # CLS + registers precede the patch tokens
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def head_logits(self, pixels, grid_size) -> torch.Tensor:
        """(B, NUM_CLASSES, h, w) logits at the patch grid (mlp) or at 4x the patch grid (multilayer)."""
        if self.head_config["type"] == "mlp":
            tokens = self.backbone(pixel_values=pixels).last_hidden_state[:, self.num_prefix_tokens:]
            return self.head(tokens).transpose(1, 2).reshape(len(pixels), NUM_CLASSES, *grid_size)
        hidden_states = self.backbone(pixel_values=pixels, output_hidden_states=True).hidden_states  # [0]: embeddings
        norm = self.backbone.get_base_model().norm
        layer_tokens = [norm(hidden_states[i])[:, self.num_prefix_tokens:] for i in self.head_config["feature_layers"]]
        return self.head(layer_tokens, grid_size)

    def forward(self, images, output_size, content_size=None):
        """images (B,3,Hp,Wp) 0..255, padded bottom/right around a content_size=(h,w) region scaled from the
        output_size=(H,W) source; returns (B,NUM_CLASSES,H,W) logits."""
        padded_h, padded_w = images.shape[2:]
        if padded_h % PATCH_SIZE or padded_w % PATCH_SIZE:
            raise ValueError(
                f"image sides must be multiples of {PATCH_SIZE}, got {padded_h}x{padded_w}: pad bottom/right first"
            )
        content_size = content_size or (padded_h, padded_w)
        if content_size[0] > padded_h or content_size[1] > padded_w:
            raise ValueError(f"content_size {content_size[0]}x{content_size[1]} exceeds the padded image {padded_h}x{padded_w}")
        pixels = (images.float() / 255.0 - self.mean) / self.std
        logits = self.head_logits(pixels, (padded_h // PATCH_SIZE, padded_w // PATCH_SIZE))
        return upsample_to_source(logits, (padded_h, padded_w), content_size, output_size)


def build_model(backbone_name_or_path, token=None, lora_rank=16, lora_alpha=32, lora_dropout=0.1,
                lora_target_modules=LORA_TARGET_MODULES, head=None, gradient_checkpointing=False,
                attn_implementation="sdpa") -> SegmentationModel:
    """head: config.json's "head" settings ({"type": "mlp", "hidden": 256} if None)."""
    backbone = load_backbone(backbone_name_or_path, token, attn_implementation)
    mean, std = backbone_normalization(backbone_name_or_path, token)
    return SegmentationModel(
        backbone, mean, std, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        lora_target_modules=lora_target_modules, head=head, gradient_checkpointing=gradient_checkpointing,
    )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def parameter_bytes(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) bytes the parameters take."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return trainable, total


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA and head weights only; the frozen backbone comes from its own checkpoint."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_trainable_weights(model: nn.Module, path) -> None:
    tensors = {name: t.cpu().contiguous() for name, t in trainable_state_dict(model).items()}
    tmp_path = f"{path}.tmp"
    save_file(tensors, tmp_path)
    os.replace(tmp_path, path)  # a killed save never leaves a truncated file under the real name


def load_trainable_weights(model: nn.Module, path) -> None:
    """Load LoRA + head weights; any missing or unexpected key is an error, never silently untrained LoRA."""
    state = load_file(str(path))
    expected = set(trainable_state_dict(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match this model: {len(missing)} trainable weights missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); was it saved with other LoRA/head settings?"
        )
    model.load_state_dict(state, strict=False)


class ModelDirectoryError(ValueError):
    """A model directory that run_training.py did not write (completely); the message says what is missing."""


def load_trained_model(model_directory, checkpoint="best", backbone=None, token=None) -> tuple[SegmentationModel, dict]:
    """(model in eval mode, config.json) rebuilt from a run_training.py output directory and its best/ or last/ weights.

    backbone overrides the config's backbone (e.g. a local copy of the hub checkpoint); the normalisation
    is the one training used, read from config.json.
    """
    config_path = os.path.join(model_directory, "config.json")
    weights_path = os.path.join(model_directory, checkpoint, "weights.safetensors")
    if not os.path.isfile(config_path):
        raise ModelDirectoryError(f"{model_directory} is not a trained model directory (it has no config.json): "
                                  "pass the --output-directory of run_training.py")
    if not os.path.isfile(weights_path):
        raise ModelDirectoryError(f"{model_directory} has no {checkpoint} weights ({weights_path} does not exist): "
                                  "has its training run saved any, or did you mean --checkpoint "
                                  f"{'last' if checkpoint == 'best' else 'best'}?")
    try:
        with open(config_path) as f:
            config = json.load(f)
        lora, head, normalization = config["lora"], config["head"], config["normalization"]
        backbone = backbone or config["backbone"]
    except (ValueError, KeyError, TypeError) as error:
        raise ModelDirectoryError(f"{config_path} is not a run_training.py config ({error!r})") from None
    try:
        model = build_model(backbone, token, lora_rank=lora["rank"], lora_alpha=lora["alpha"],
                            lora_dropout=lora["dropout"], lora_target_modules=lora["target_modules"], head=head)
    except HeadConfigError as error:
        raise ModelDirectoryError(f"{config_path}: {error}") from None
    try:
        load_trainable_weights(model, weights_path)
    except ValueError as error:
        raise ModelDirectoryError(str(error)) from None
    with torch.no_grad():
        model.mean.copy_(torch.tensor(normalization["mean"]).view(1, 3, 1, 1))
        model.std.copy_(torch.tensor(normalization["std"]).view(1, 3, 1, 1))
    return model.eval(), config
