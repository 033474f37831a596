"""Convert a DINOv3 weight file in Meta's or timm's naming into a save_pretrained directory, once.

    python scripts/convert_backbone.py dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth backbones/vitb16-meta
    python run_training.py --backbone backbones/vitb16-meta ...

The directory (config.json, model.safetensors, preprocessor_config.json) loads with --backbone DIR and with
transformers.AutoModel.from_pretrained(DIR). The architecture is read off the tensors; every key of the file is either
placed or known to be unused by transformers' DINOv3 (mask token, bias mask, local-CLS norm, standard RoPE periods),
else the conversion stops naming the key. The normalisation written is ImageNet's (DINOv3's) unless given.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from backbone_files import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    PREPROCESSOR_CONFIG,
    WEIGHT_FILE_SUFFIXES,
    WeightFileError,
    architecture,
    is_weight_file,
    load_weight_file,
)
from cli import OneLineErrorParser  # noqa: E402
from files import partial_path  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help=f"the weight file ({', '.join(WEIGHT_FILE_SUFFIXES)})")
    parser.add_argument("output", help="directory to write (must not exist, or be empty)")
    rgb = {"type": float, "nargs": 3, "metavar": ("R", "G", "B")}
    parser.add_argument(
        "--image-mean",
        default=IMAGENET_MEAN,
        help="normalisation mean on a 0..1 scale (default: ImageNet's, %(default)s)",
        **rgb,
    )
    parser.add_argument(
        "--image-std", default=IMAGENET_STD, help="normalisation std (default: ImageNet's, %(default)s)", **rgb
    )
    parser.add_argument(
        "--any-architecture", action="store_true", help="convert a file whose width and depth are no released DINOv3's"
    )
    args = parser.parse_args(argv)
    if not is_weight_file(args.file):
        parser.error(f"{args.file} is not a {'/'.join(WEIGHT_FILE_SUFFIXES)} file")
    if not os.path.isfile(args.file):
        parser.error(f"{args.file} does not exist")
    if os.path.exists(args.output) and (not os.path.isdir(args.output) or os.listdir(args.output)):
        parser.error(f"{args.output} exists and is not empty: choose a new directory")
    if not min(args.image_std) > 0:
        parser.error("--image-std must be positive")
    return args


def convert(file, output: Path, mean, std, any_architecture=False) -> dict:
    """Write the converted backbone to output (whole or not at all); returns its architecture."""
    model = load_weight_file(file, any_architecture=any_architecture)
    temporary = partial_path(output)
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        model.save_pretrained(temporary)
        with open(temporary / PREPROCESSOR_CONFIG, "w") as f:
            json.dump(
                {
                    "image_processor_type": "DINOv3ViTImageProcessorFast",
                    "image_mean": list(mean),
                    "image_std": list(std),
                    "source_file": os.path.abspath(file),
                },
                f,
                indent=2,
            )
        if output.exists():
            output.rmdir()  # empty, as parse_args checked
        os.replace(temporary, output)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return architecture(model.config)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        found = convert(args.file, Path(args.output), args.image_mean, args.image_std, args.any_architecture)
    except (WeightFileError, OSError) as error:
        sys.exit(f"convert_backbone.py: error: {error}")
    print(
        f"converted {args.file} ({found['weights_format']} naming) to {args.output}: "
        + ", ".join(f"{k} {v}" for k, v in found.items() if k != "weights_format")
    )


if __name__ == "__main__":
    main()
