"""The network: a DINOv3 ViT backbone (frozen, LoRA-adapted or fully trained) and a segmentation head (the seed's
pixel MLP, a per-patch MLP, or a multi-layer upsampler), and how it is built. trained_model.py saves and loads
a trained one."""

import contextlib
import hashlib
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import DINOv3ViTModel

import backbone_files
from dataset import NUM_CLASSES, PATCH_SIZE

# peft 0.21 calls transformers' deprecated is_gradient_checkpointing: noise that tells a user nothing.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

BACKBONE_TRAINING = ("frozen", "lora", "full")
BACKBONE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")  # DINOv3ViTAttention's projections
ALL_LINEAR = "all-linear"  # peft's shortcut: every linear layer of the backbone (attention and MLP)


@dataclass
class LoRA:
    """The LoRA adapters of --backbone-training lora (config.json's "lora"); target_modules: names of the backbone's
    linear layers, or ["all-linear"] for every attention and MLP projection."""

    rank: int = 16
    alpha: float = 32
    dropout: float = 0.1
    target_modules: tuple[str, ...] | list[str] = LORA_TARGET_MODULES


HEAD_TYPES = ("mlp", "patch-mlp", "multilayer")
PATCH_MLP_HIDDEN = 256


class HeadConfigError(ValueError):
    """A head setting that does not fit the backbone; the message says what to choose instead."""


def default_feature_layers(num_layers: int, count: int = 4) -> list[int]:
    """count evenly spaced 1-based layer indices ending at the last one: [3, 6, 9, 12] of 12, [1, 2, 3, 4] of 4."""
    return sorted({max(1, num_layers * (i + 1) // count) for i in range(count)})


def three_layer_mlp(in_features: int, hidden: int, out_features: int, activation=nn.ReLU) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        activation(),
        nn.Linear(hidden, hidden),
        activation(),
        nn.Linear(hidden, out_features),
    )


class PixelMLPHead(nn.Module):
    """The seed's head: each patch token -> 3-layer MLP -> the C x P x P logits of the P x P pixels under it,
    so every pixel of the input gets its own logits (no bilinear field inside a patch)."""

    def __init__(self, hidden_size: int, hidden: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.mlp = three_layer_mlp(hidden_size, hidden, NUM_CLASSES * patch_size**2)

    def forward(self, tokens: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """tokens (B, h*w, hidden), grid_size (h, w) -> (B, NUM_CLASSES, h*P, w*P)."""
        (h, w), p = grid_size, self.patch_size
        logits = self.mlp(tokens).reshape(len(tokens), h, w, NUM_CLASSES, p, p)  # a token's outputs: class x P x P
        return logits.permute(0, 3, 1, 4, 2, 5).reshape(len(tokens), NUM_CLASSES, h * p, w * p)


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv + GroupNorm (independent of the small per-GPU batch) + GELU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.GroupNorm(8, out_channels), nn.GELU()
    )


class MultiLayerHead(nn.Module):
    """Patch tokens of several ViT layers -> per-layer 1x1 projections, summed at 1/16 -> two x2 upsampling conv
    stages -> logits at 1/4 of the input. Summing per-layer projections equals a 1x1 conv on their concatenation,
    without materialising it. Widths: width at 1/16, width/2 at 1/8, width/4 at 1/4."""

    def __init__(self, hidden_size: int, num_layers: int, width: int):
        super().__init__()
        self.projections = nn.ModuleList(nn.Linear(hidden_size, width) for _ in range(num_layers))
        self.stages = nn.ModuleList(
            [conv_block(width, width), conv_block(width, width // 2), conv_block(width // 2, width // 4)]
        )
        self.classifier = nn.Conv2d(width // 4, NUM_CLASSES, 1)

    def forward(self, layer_tokens: list[torch.Tensor], grid_size: tuple[int, int]) -> torch.Tensor:
        """layer_tokens: (B, h*w, hidden) per layer, grid_size (h, w) -> (B, NUM_CLASSES, 4h, 4w)."""
        fused = sum(projection(tokens) for projection, tokens in zip(self.projections, layer_tokens))
        x = self.stages[0](fused.transpose(1, 2).reshape(fused.shape[0], -1, *grid_size))
        for stage in self.stages[1:]:
            x = stage(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        return self.classifier(x)


def resolve_head_config(head: dict | None, num_layers: int, patch_size: int = PATCH_SIZE) -> dict:
    """The head settings with defaults filled in and checked against a num_layers-layer backbone."""
    head = dict(head or {"type": "mlp"})
    if head["type"] not in HEAD_TYPES:
        raise HeadConfigError(f"unknown head type {head['type']!r}: choose one of {', '.join(HEAD_TYPES)}")
    if head["type"] in ("mlp", "patch-mlp"):
        default = NUM_CLASSES * patch_size**2 if head["type"] == "mlp" else PATCH_MLP_HIDDEN
        hidden = default if head.get("hidden") is None else head["hidden"]
        if hidden < 1:
            raise HeadConfigError(f"head hidden width {hidden} must be at least 1")
        return {"type": head["type"], "hidden": hidden}
    layers = list(head.get("feature_layers") or default_feature_layers(num_layers))
    bad = [i for i in layers if not 1 <= i <= num_layers]
    if bad or len(set(layers)) != len(layers):
        raise HeadConfigError(
            f"feature layers {layers} do not fit this {num_layers}-layer backbone: "
            f"give distinct 1-based layer indices from 1 to {num_layers}"
        )
    width = head.get("width", 256)
    if width < 32 or width % 32:
        raise HeadConfigError(
            f"head width {width} must be a positive multiple of 32 (GroupNorm of 8 groups at width/4)"
        )
    return {"type": "multilayer", "feature_layers": sorted(layers), "width": width}


def check_lora_targets(backbone: nn.Module, targets) -> None:
    """Every LoRA target must name linear layers of the backbone (peft would drop a misspelt one beside a right one)."""
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in backbone.named_modules() if isinstance(m, nn.Linear)})
    if ALL_LINEAR in targets and len(targets) > 1:
        raise HeadConfigError(f"LoRA target {ALL_LINEAR} stands for every linear layer: give it alone")
    unknown = [target for target in targets if target not in linear and target != ALL_LINEAR]
    if unknown or not targets:
        raise HeadConfigError(
            f"LoRA targets {', '.join(unknown) or '(none)'} name no linear layer of the backbone: choose from "
            f"{', '.join(linear)}, or {ALL_LINEAR}"
        )


def upsample_to_source(logits, padded_size, content_size, output_size) -> torch.Tensor:
    """Logits over the padded canvas (any stride) -> (B, C, H, W) over the output_size=(H, W) source: upsample the
    canvas at the content's source scale, then keep the top-left source region."""
    (padded_h, padded_w), (content_h, content_w), (out_h, out_w) = padded_size, content_size, output_size
    upsampled_size = (round(padded_h * out_h / content_h), round(padded_w * out_w / content_w))
    logits = F.interpolate(logits, size=upsampled_size, mode="bilinear", align_corners=False)
    return logits[:, :, :out_h, :out_w]


class SegmentationModel(nn.Module):
    """A DINOv3 ViT trained as backbone_training says (frozen; LoRA adapters, the rest frozen; or every weight) and a
    head: the seed's pixel MLP or a per-patch MLP on the last layer's patch tokens ("mlp", "patch-mlp"), or a
    progressive upsampler on the patch tokens of several layers, each through the backbone's final norm ("multilayer")."""

    def __init__(
        self,
        backbone: DINOv3ViTModel,
        mean,
        std,
        backbone_training="lora",
        lora=None,
        head=None,
        gradient_checkpointing=False,
    ):
        super().__init__()
        if backbone_training not in BACKBONE_TRAINING:
            raise HeadConfigError(
                f"unknown backbone training {backbone_training!r}: choose one of {', '.join(BACKBONE_TRAINING)}"
            )
        config = backbone.config
        self.backbone_training = backbone_training
        self.head_config = resolve_head_config(head, config.num_hidden_layers, config.patch_size)
        if self.head_config["type"] == "multilayer":
            # Layers after the deepest feature layer would cost compute and leave trainable weights without gradients
            # (which DDP rejects): drop them.
            backbone.model.layer = backbone.model.layer[: max(self.head_config["feature_layers"])]
            self.head = MultiLayerHead(
                config.hidden_size, len(self.head_config["feature_layers"]), self.head_config["width"]
            )
        elif self.head_config["type"] == "mlp":
            self.head = PixelMLPHead(config.hidden_size, self.head_config["hidden"], config.patch_size)
        else:
            self.head = three_layer_mlp(config.hidden_size, self.head_config["hidden"], NUM_CLASSES, nn.GELU)
        if gradient_checkpointing and backbone_training != "frozen":  # a frozen backbone keeps no activations
            # Non-reentrant: the reentrant form silently gives LoRA no gradients, as the layer inputs (the
            # frozen embeddings' output) do not require grad.
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        backbone.requires_grad_(backbone_training == "full")
        backbone.embeddings.mask_token.requires_grad_(False)  # only used for masked pretraining: never a gradient
        if backbone_training == "lora":
            lora = lora or LoRA()
            check_lora_targets(backbone, lora.target_modules)
            targets = ALL_LINEAR if list(lora.target_modules) == [ALL_LINEAR] else list(lora.target_modules)
            adapters = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
            backbone = get_peft_model(backbone, adapters)  # freezes everything but the LoRA weights
        self.backbone = backbone
        self.backbone_dtype = next(backbone.parameters()).dtype
        self.num_prefix_tokens = 1 + config.num_register_tokens  # CLS + registers precede the patch tokens
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def vit(self) -> DINOv3ViTModel:
        """The DINOv3 model itself, under its LoRA wrapper if it has one."""
        return self.backbone.get_base_model() if self.backbone_training == "lora" else self.backbone

    def backbone_context(self, device_type: str) -> contextlib.ExitStack:
        """No graph through a frozen backbone; bfloat16 autocast around a bfloat16 backbone, whatever the caller's."""
        stack = contextlib.ExitStack()
        if self.backbone_training == "frozen":
            stack.enter_context(torch.no_grad())
        if self.backbone_dtype == torch.bfloat16:
            stack.enter_context(torch.autocast(device_type, dtype=torch.bfloat16))
        return stack

    def head_logits(self, pixels, grid_size) -> torch.Tensor:
        """(B, NUM_CLASSES, h', w') logits: every pixel (mlp), the patch grid (patch-mlp), 4x the grid (multilayer)."""
        head_type, skip = self.head_config["type"], self.num_prefix_tokens
        with self.backbone_context(pixels.device.type):
            pixels = pixels.to(self.backbone_dtype)
            if head_type == "multilayer":
                layers = self.head_config["feature_layers"]  # transformers keeps these alone, None for the others
                hidden_states = self.backbone(pixel_values=pixels, output_hidden_states=layers).hidden_states
                features = [self.vit().norm(hidden_states[i])[:, skip:].float() for i in layers]  # [0]: embeddings
            else:
                features = self.backbone(pixel_values=pixels).last_hidden_state[:, skip:].float()
        if head_type == "patch-mlp":
            return self.head(features).transpose(1, 2).reshape(len(pixels), NUM_CLASSES, *grid_size)
        return self.head(features, grid_size)

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
            raise ValueError(
                f"content_size {content_size[0]}x{content_size[1]} exceeds the padded image {padded_h}x{padded_w}"
            )
        pixels = (images.float() / 255.0 - self.mean) / self.std
        logits = self.head_logits(pixels, (padded_h // PATCH_SIZE, padded_w // PATCH_SIZE))
        return upsample_to_source(logits, (padded_h, padded_w), content_size, output_size)


def compile_blocks(model: SegmentationModel) -> SegmentationModel:
    """torch.compile each transformer layer and the head in place, as Meta's training does per block: one small graph
    reused by every layer, and the state dict keeps its names, so weights and checkpoints load compiled or not."""
    for layer in model.vit().model.layer:
        layer.compile()
    model.head.compile()
    return model


def build_model(
    backbone_name_or_path, token=None, backbone_dtype="float32", normalization=None, any_architecture=False, **settings
) -> SegmentationModel:
    """The backbone loaded (any_architecture: also a weight file of no released width and depth) and a
    SegmentationModel made of it with settings (backbone_training, lora, head,
    gradient_checkpointing). backbone_dtype: float32 or bfloat16 (frozen weights only: full training needs float32
    weights); normalization: (mean, std) on a 0..1 scale, else the backbone's preprocessor_config.json, else
    ImageNet's (DINOv3's)."""
    if backbone_dtype not in BACKBONE_DTYPES:
        raise HeadConfigError(f"unknown backbone dtype {backbone_dtype!r}: choose one of {', '.join(BACKBONE_DTYPES)}")
    if settings.get("backbone_training") == "full" and backbone_dtype != "float32":
        raise HeadConfigError("full fine-tuning trains every backbone weight, which needs --backbone-dtype float32")
    name_or_path = backbone_files.resolve_backbone(backbone_name_or_path)
    dtype = BACKBONE_DTYPES[backbone_dtype]
    backbone = backbone_files.load_backbone(name_or_path, token, "sdpa", dtype, any_architecture)
    mean, std = normalization or backbone_files.backbone_normalization(name_or_path, token)
    return SegmentationModel(backbone, mean, std, **settings)


def backbone_fingerprint(model) -> str:
    """The backbone's weights as loaded (shapes and a strided sample of values): another backbone is caught."""
    digest = hashlib.sha256()
    for name, tensor in model.vit().state_dict().items():
        if "lora_" in name:
            continue  # adapters are initialised by the run, not loaded
        flat = tensor.detach().flatten()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    return digest.hexdigest()


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
