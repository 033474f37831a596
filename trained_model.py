"""A trained model folder (what run_training.py writes): its weights saved and loaded, its config.json checked, and
the model rebuilt from both, ready for inference or for --init-from."""

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import backbone_files
import files
import sharding
from cli import first_line
from model import HeadConfigError, LoRA, SegmentationModel, backbone_fingerprint, build_model

CONFIG_VERSION = 2  # config.json written before version 2 meant the per-patch head by "mlp"


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained weights: the head, plus LoRA (lora) or the whole backbone (full); a frozen backbone comes from
    its own checkpoint. Of a sharded model (--fsdp) a collective: rank 0 receives the whole weights, the others none."""
    trained = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if sharding.is_sharded(model):
        return {name: tensor for name, tensor in sharding.full_state_dict(model).items() if name in trained}
    return trained


def save_trainable_weights(weights: dict[str, torch.Tensor], path) -> None:
    """weights (trainable_state_dict) as a safetensors file, atomically."""
    tensors = {name: t.cpu().contiguous() for name, t in weights.items()}
    temporary = files.partial_path(Path(path))
    save_file(tensors, str(temporary))
    os.replace(temporary, path)  # a killed save never leaves a truncated file under the real name


def load_trainable_weights(model: nn.Module, path) -> None:
    """Load the trained weights; any missing or unexpected key is an error, never a silently untrained part."""
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors raises its own error type on a truncated or damaged file
        raise ValueError(
            f"{path} is damaged or incomplete ({first_line(error, 80)}): restore it, or train again"
        ) from None
    expected = trainable_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match this model: {len(missing)} trainable weights missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); was it saved with other backbone training, LoRA or head settings?"
        )
    resized = backbone_files.shape_mismatches(state, expected)
    if resized:
        raise ValueError(
            f"{path} does not match this model: {len(resized)} weights differ in shape, e.g. {resized[0]} (the model's); were the "
            "head or LoRA settings of its config.json edited?"
        )
    model.load_state_dict(state, strict=False)


class ModelDirectoryError(ValueError):
    """A model directory that run_training.py did not write (completely); the message says what is missing."""


NUMBER = (int, float)
MODEL_CONFIG_KEYS = {  # what inference reads from config.json: key path ("?": optional) -> type, list of that many numbers
    "backbone": str,
    "lora.rank": int,
    "lora.alpha": NUMBER,
    "lora.dropout": NUMBER,
    "lora.target_modules": list,
    "head.type": str,
    "normalization.mean": 3,
    "normalization.std": 3,
    "resolution.name": str,
    "resolution.scale": NUMBER,
    "resolution.source_size": 2,
    "config_version?": int,
    "backbone_training?": str,
    "backbone_dtype?": str,
}


def read_model_config(path) -> dict:
    """config.json of a trained model, with every key inference relies on checked; one line naming a bad key."""
    damaged = "the file was damaged or edited: restore it from the training run"
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as error:
        raise ModelDirectoryError(f"{path} cannot be read ({first_line(error)}): {damaged}") from None
    for key, kind in MODEL_CONFIG_KEYS.items():
        value = config
        for part in key.rstrip("?").split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None and key.endswith("?"):
            continue
        if isinstance(kind, int):  # a list of that many numbers
            good = (
                isinstance(value, list)
                and len(value) == kind
                and all(isinstance(v, NUMBER) and not isinstance(v, bool) for v in value)
            )
            what = f"a list of {kind} numbers"
        else:
            good = isinstance(value, kind) and not isinstance(value, bool)
            what = {str: "a string", int: "an integer", list: "a list"}.get(kind, "a number")
        if not good:
            raise ModelDirectoryError(f"{path}: key {key.rstrip('?')!r} is missing or not {what}; {damaged}")
    if not 0 < config["resolution"]["scale"] <= 1:
        raise ModelDirectoryError(
            f"{path}: resolution.scale {config['resolution']['scale']} is not in (0, 1]; {damaged}"
        )
    return config


def load_trained_model(model_directory, checkpoint="best", backbone=None, token=None) -> tuple[SegmentationModel, dict]:
    """(model in eval mode, config.json) rebuilt from a run_training.py output directory and its best/ or last/ weights.

    backbone overrides the config's backbone (e.g. a local copy of the hub checkpoint); the normalisation
    is the one training used, read from config.json, whatever the backbone's own preprocessor says.
    """
    config_path = os.path.join(model_directory, "config.json")
    weights_path = os.path.join(model_directory, checkpoint, "weights.safetensors")
    if not os.path.isfile(config_path):
        raise ModelDirectoryError(
            f"{model_directory} is not a trained model directory (it has no config.json): "
            "pass the --output-directory of run_training.py"
        )
    if not os.path.isfile(weights_path):
        raise ModelDirectoryError(
            f"{model_directory} has no {checkpoint} weights ({weights_path} does not exist): "
            "has its training run saved any, or did you mean --checkpoint "
            f"{'last' if checkpoint == 'best' else 'best'}?"
        )
    config = read_model_config(config_path)
    lora, head, normalization = config["lora"], dict(config["head"]), config["normalization"]
    backbone = backbone or config["backbone"]
    if config.get("config_version", 1) < 2 and head["type"] == "mlp":
        head["type"] = "patch-mlp"  # "mlp" named the per-patch head before the seed's pixel MLP became the default
    lora = LoRA(lora["rank"], lora["alpha"], lora["dropout"], lora["target_modules"])
    settings = dict(backbone_training=config.get("backbone_training", "lora"), lora=lora, head=head)
    settings["any_architecture"] = bool(config.get("arguments", {}).get("any_backbone_architecture"))
    dtype, normalization = config.get("backbone_dtype", "float32"), (normalization["mean"], normalization["std"])
    try:
        model = build_model(backbone, token, dtype, normalization, **settings)
    except HeadConfigError as error:
        raise ModelDirectoryError(f"{config_path}: {error}") from None
    recorded = (config.get("fingerprints") or {}).get("backbone")  # runs of earlier versions have no record
    if recorded and backbone_fingerprint(model) != recorded:
        raise ModelDirectoryError(
            f"the backbone {backbone} is not the one {model_directory} was trained with (its weights differ from the "
            "fingerprint in config.json): pass the original with --backbone, or train again"
        )
    try:
        load_trainable_weights(model, weights_path)
    except ValueError as error:
        raise ModelDirectoryError(str(error)) from None
    return model.eval(), config


def load_initial_weights(model: SegmentationModel, source) -> dict:
    """--init-from: the trained weights of another run (its best/, or the best/ or last/ folder named) into a new
    run's model, which must have the same backbone, backbone training and head; returns config.json's record."""
    source = Path(source)
    run, checkpoint = (source.parent, source.name) if source.name in ("best", "last") else (source, "best")
    if not (run / "config.json").is_file():
        raise ModelDirectoryError(
            f"--init-from {source}: not a trained model directory (no config.json in {run}); pass the "
            "--output-directory of a run_training.py run, or its best/ or last/ folder"
        )
    config = read_model_config(run / "config.json")
    recorded = (config.get("fingerprints") or {}).get("backbone")
    if recorded and recorded != backbone_fingerprint(model):
        raise ModelDirectoryError(
            f"--init-from {source}: that run was trained on another backbone ({config['backbone']}); start from a "
            "run of the same --backbone"
        )
    weights = run / checkpoint / "weights.safetensors"
    if not weights.is_file():
        raise ModelDirectoryError(f"--init-from {source}: {weights} does not exist (has that run saved any?)")
    try:
        load_trainable_weights(model, weights)
    except ValueError as error:
        raise ModelDirectoryError(f"--init-from {source}: {error}") from None
    digest = hashlib.sha256()
    with open(weights, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return {"directory": str(run.resolve()), "weights": checkpoint, "sha256": digest.hexdigest()}
