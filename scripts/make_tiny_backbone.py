"""Save a tiny randomly initialised DINOv3 ViT laid out like a hub repo, for tests and offline demos."""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import progress_bars  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def save_tiny_backbone(output_dir, hidden_size=64, layers=4, heads=4, seed=0, **config):
    """Write config.json, model.safetensors and preprocessor_config.json to output_dir; config: more
    DINOv3ViTConfig settings (e.g. use_gated_mlp=True for the SwiGLU MLP of ViT-S+/H+/7B)."""
    config = DINOv3ViTConfig(
        patch_size=16,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_register_tokens=4,  # as in the released checkpoints
        **config,
    )
    torch.manual_seed(seed)
    DINOv3ViTModel(config).save_pretrained(output_dir)
    with open(os.path.join(output_dir, "preprocessor_config.json"), "w") as f:
        json.dump({"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}, f, indent=2)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", required=True, help="directory to write the backbone to")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gated-mlp", action="store_true", help="SwiGLU MLP, as DINOv3 ViT-S+/H+/7B")
    args = parser.parse_args()
    progress_bars.quiet_library_bars()
    save_tiny_backbone(args.output, args.hidden_size, args.layers, args.heads, args.seed, use_gated_mlp=args.gated_mlp)
    print(f"saved tiny DINOv3 backbone to {args.output}")


if __name__ == "__main__":
    main()
