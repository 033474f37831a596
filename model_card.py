"""The model card of a trained model folder, README.md, the way the Hugging Face hub reads one: metadata written by
huggingface_hub (base model, licence, tags, a model-index holding every split scored so far) above a body that says
what the model is, how it was trained, how well it does, what it is for and how to load it.

The results live in evaluations.json. Training adds its best validation, and every scoring of the folder's model by
run_inference.py adds its own; the card is then rewritten from config.json and that record. Both files are written
like every other output (outputs.OutputFolder: locked, staged, in the folder's ledger), so a README.md that someone
edited is never written over."""

import json
import shlex
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

import dataset
import files
import hub
import outputs
import run_directory
import sharding

CARD_FILE = "README.md"
EVALUATIONS_FILE = "evaluations.json"
# What `hf upload USER/REPO MODEL_DIR --exclude ...` leaves out: the resumable checkpoint (optimizer state, large),
# and its shards (--fsdp), locks, the ledger, killed writes, the trackers' logs and the predictions (frames of the
# data set in pictures)
UPLOAD_EXCLUDE = (
    "checkpoint.pt",
    f"{sharding.FOLDER}/*",
    ".lock",
    outputs.LEDGER,
    ".*.partial",
    ".staging-*",
    "inference/*",
    "tensorboard/*",
    "wandb/*",
    "wandb_run_id",
)
DINOV3_LICENSE = {
    "license": "other",
    "license_name": "dinov3-license",
    "license_link": "https://ai.meta.com/resources/models-and-libraries/dinov3-license/",
}
SCORE_NOTE = (
    "official score: the geometric mean of mIoU and mNSD over the videos, as the SAR-RARP50 toolkit computes it"
)
METRICS = (("score", "official_score", "official score"), ("mIoU", "mean_iou", "mIoU"), ("mNSD", "mean_nsd", "mNSD"))
HIDDEN_SETTINGS = ("data_directory", "output_directory", "hf_token_file", "config", "resume", "report_to")


def upload_command(model_directory: str, repository: str = "USER/REPO") -> str:
    """The hf command that uploads a model folder but for UPLOAD_EXCLUDE (its --exclude takes one pattern each)."""
    excluded = " ".join(f"--exclude {shlex.quote(pattern)}" for pattern in UPLOAD_EXCLUDE)
    return f"hf upload {repository} {shlex.quote(model_directory)} {excluded}"


def backbone_license(backbone: str) -> dict:
    """The backbone's licence as card metadata: Meta's DINOv3 licence for its releases, else what a local folder's own
    card says, else nothing (unknown)."""
    if backbone.startswith("facebook/dinov3-") or backbone in hub.BACKBONES:
        return dict(DINOV3_LICENSE)
    card = Path(backbone) / CARD_FILE
    if card.is_file():
        try:
            data = ModelCard.load(card).data
        except Exception:  # a README.md that is no card
            return {}
        return {k: getattr(data, k, None) for k in DINOV3_LICENSE if getattr(data, k, None)}
    return {}


def evaluation_of(result: dict, split: str, checkpoint: str, how: str) -> dict:
    """One entry of evaluations.json from a score (metrics.summarize's dict, as metrics.json holds it)."""
    return {
        "split": split,
        "checkpoint": checkpoint,
        "how": how,
        "score": result["score"],
        "mIoU": result["mIoU"],
        "mNSD": result["mNSD"],
        "frames": result.get("frames"),
        "videos": len(result.get("videos") or ()),
        "classes": result.get("classes", {}),
    }


def card_data(config: dict, evaluations: list[dict]) -> ModelCardData:
    backbone = hub.BACKBONES.get(config["backbone"], config["backbone"])
    results = [
        EvalResult(
            task_type="image-segmentation",
            task_name="surgical instrument segmentation",
            dataset_type="sar-rarp50",
            dataset_name="SAR-RARP50",
            dataset_split=e["split"],
            metric_type=kind,
            metric_name=f"{name} ({e['checkpoint']} weights, {e['how']})",
            metric_config=e["checkpoint"],
            metric_value=round(e[metric], 4),
        )
        for e in evaluations
        for metric, kind, name in METRICS
    ]
    return ModelCardData(
        base_model=backbone if hub.is_hub_id(backbone) else None,
        **backbone_license(backbone),
        library_name="pytorch",
        pipeline_tag="image-segmentation",
        tags=["surgical", "sar-rarp50", "dinov3", "semantic-segmentation", config.get("backbone_training", "lora")],
        datasets=["SAR-RARP50"],
        model_name=Path(config.get("arguments", {}).get("output_directory", "model")).name,
        eval_results=results or None,
    )


def what_it_is(config: dict) -> str:
    backbone, training, head = config["backbone"], config.get("backbone_training", "lora"), config["head"]
    lora = config["lora"]
    trained = {
        "frozen": "frozen (only the head was trained)",
        "lora": f"LoRA adapters, rank {lora['rank']}, alpha {lora['alpha']}, on {', '.join(lora['target_modules'])}",
        "full": "fine-tuned in full",
    }[training]
    heads = {
        "mlp": f"the pixel MLP (3 layers, hidden {head.get('hidden')}): each patch token gives its pixels' logits",
        "patch-mlp": f"an MLP per patch token (hidden {head.get('hidden')}), logits upsampled",
        "multilayer": f"a progressive upsampler on layers {head.get('feature_layers')} (width {head.get('width')})",
    }
    resolution = config["resolution"]
    source = "x".join(map(str, reversed(resolution["source_size"])))
    where = (
        f"[{backbone}](https://huggingface.co/{backbone})"
        if hub.is_hub_id(backbone)
        else f"`{backbone}`, a local folder (whoever loads this model needs the same weights: `--backbone DIR`)"
    )
    return "\n".join(
        [
            "Semantic segmentation of surgical instruments in robot-assisted radical prostatectomy video: the "
            f"{len(dataset.CLASS_NAMES)} classes of SAR-RARP50 ({', '.join(dataset.CLASS_NAMES)}).",
            "",
            f"- **Backbone**: {where}, {trained}.",
            f"- **Head**: {heads.get(head['type'], head['type'])}.",
            f"- **Input**: {resolution['name']} resolution ({resolution['scale']} of a {source} frame); the logits "
            f"are upsampled to {source}.",
            f"- **Trained in** {config.get('precision', 'fp32')}; {config['parameters']['trainable']:,} trainable of "
            f"{config['parameters']['total']:,} parameters.",
        ]
    )


def results_section(evaluations: list[dict]) -> str:
    if not evaluations:
        return "No split has been scored yet."
    lines = [
        "| split | weights | how | official score | mIoU | mNSD | videos | frames |",
        "|---|---|---|---:|---:|---:|---:|---:|",
        *(
            f"| {e['split']} | {e['checkpoint']} | {e['how']} | {e['score']:.4f} | {e['mIoU']:.4f} | "
            f"{e['mNSD']:.4f} | {e['videos']} | {e['frames']} |"
            for e in evaluations
        ),
        "",
        f"The {SCORE_NOTE}. Each video weighs the same.",
    ]
    shown = next((e for e in reversed(evaluations) if e["split"] == "test"), evaluations[-1])
    if shown["classes"]:
        lines += [
            "",
            f"Per class ({shown['split']}, {shown['checkpoint']} weights, {shown['how']}; * thin classes, "
            "† in no ground-truth frame, so scored by its false positives only):",
            "",
            "| class | IoU | NSD |",
            "|---|---:|---:|",
        ]
        for name, value in shown["classes"].items():
            marks = (" *" if name in dataset.THIN_CLASSES else "") + (
                " †" if value.get("ground_truth_frames") == 0 else ""
            )
            lines.append(f"| {name}{marks} | {value['IoU']:.4f} | {value['NSD']:.4f} |")
    return "\n".join(lines)


INTENDED_USE = """Research on surgical video: comparing backbones, training methods and heads on SAR-RARP50, and a
starting point for further fine-tuning. **It is not a medical device.** It has not been validated for clinical use
and must not be used for clinical decisions, to guide surgery or in patient care."""


def limitations(evaluations: list[dict]) -> str:
    videos = max((e["videos"] for e in evaluations), default=0)
    return "\n".join(
        [
            f"- Thin classes ({', '.join(dataset.THIN_CLASSES)}) are a few pixels wide: a 16-pixel patch grid "
            "segments them worst, and their scores are the least stable.",
            f"- The scores above are means over {videos or 'a few'} videos of one kind of operation (radical "
            "prostatectomy); they vary a lot from video to video, and another hospital, robot or procedure may "
            "score far lower.",
            "- A class absent from a video's frames is scored 1 when the model predicts none of it (the toolkit's "
            "rule), which lifts the means.",
        ]
    )


def settings_section(config: dict) -> str:
    arguments = {k: v for k, v in config.get("arguments", {}).items() if k not in HIDDEN_SETTINGS}
    rows = [f"| `{name}` | `{json.dumps(value)}` |" for name, value in sorted(arguments.items())]
    return "\n".join(
        ["Every setting of the run, resolved (from `config.json`):", "", "| setting | value |", "|---|---|", *rows]
    )


def licence_section(config: dict) -> str:
    known = backbone_license(hub.BACKBONES.get(config["backbone"], config["backbone"]))
    if known.get("license_link"):
        backbone = f"its licence, [{known['license_name']}]({known['license_link']}), applies to this model too"
    elif known:
        backbone = f"its licence, `{known['license']}`, applies to this model too"
    else:
        backbone = (
            "whose licence this card could not find: check where those weights come from (SurgeNetDINO's, for one, "
            "are for non-commercial use only), as their licence applies to this model too"
        )
    return (
        f"The weights derive from the backbone's: {backbone}. So do the terms of the SAR-RARP50 release it was "
        "trained on. Check both before sharing the model or using it, commercially above all."
    )


def how_to_load(config: dict) -> str:
    return f"""With the project that trained it (`run_inference.py` downloads this folder by its hub id, then the
backbone named in its `config.json`, `{config["backbone"]}`):

```bash
python run_inference.py --model-directory USER/REPO --data-directory sarrarp        # score the test videos
python run_inference.py --model-directory USER/REPO --input recording.mp4           # an overlay video
```

From Python:

```python
from huggingface_hub import snapshot_download
import trained_model

model, config = trained_model.load_trained_model(snapshot_download("USER/REPO"))
```"""


def card_text(config: dict, evaluations: list[dict]) -> str:
    """README.md: the metadata block written by huggingface_hub, then the body."""
    name = config["backbone"].rsplit("/", 1)[-1]
    body = "\n\n".join(
        [
            f"# Surgical instrument segmentation, SAR-RARP50: {name} + {config['head']['type']} head",
            what_it_is(config),
            "## Results\n\n" + results_section(evaluations),
            "## Intended use\n\n" + INTENDED_USE,
            "## Limitations\n\n" + limitations(evaluations),
            "## How to load it\n\n" + how_to_load(config),
            "## Licence\n\n" + licence_section(config),
            "## Training settings\n\n" + settings_section(config),
        ]
    )
    return f"---\n{card_data(config, evaluations).to_yaml()}\n---\n\n{body}\n"


def update(model_directory: Path, evaluation: dict | None, tool: str) -> str:
    """Add evaluation (if any) to evaluations.json, replacing one of the same split, weights and way, and rewrite
    README.md; returns what was done, in a line. Not written (and said so): a README.md someone edited, a folder
    locked by another run."""
    model_directory = Path(model_directory)
    try:
        with outputs.OutputFolder(model_directory, tool=tool) as out:
            if not out.ours(CARD_FILE):
                return (
                    f"note: {model_directory / CARD_FILE} was edited or not written by this project: its model card "
                    f"was left as it is (the scores are in {EVALUATIONS_FILE} and metrics.json)"
                )
            evaluations = read_evaluations(model_directory)
            if evaluation is not None:
                same = lambda e: (e["split"], e["checkpoint"], e["how"]) == (  # noqa: E731
                    evaluation["split"], evaluation["checkpoint"], evaluation["how"]
                )  # fmt: skip
                evaluations = [e for e in evaluations if not same(e)] + [evaluation]
            config = json.loads((model_directory / "config.json").read_text())
            files.write_json_atomically(out.staging / EVALUATIONS_FILE, {"evaluations": evaluations})
            (out.staging / CARD_FILE).write_text(card_text(config, evaluations))
            out.commit()
    except outputs.OutputError as error:
        return f"note: the model card was not updated: {error}"
    return f"model card: {model_directory / CARD_FILE} ({len(evaluations)} results)"


def read_evaluations(model_directory: Path) -> list[dict]:
    try:
        return json.loads((Path(model_directory) / EVALUATIONS_FILE).read_text())["evaluations"]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def after_training(model_directory: Path, best_step: int | None) -> str:
    """The card of a run that just ended, holding its best validation (from metrics.jsonl)."""
    records = run_directory.read_records(Path(model_directory) / "metrics.jsonl")
    best = next((r["val"] for r in records if "val" in r and r["step"] == best_step), None)
    how = f"validation during training, step {best_step}"
    written = update(model_directory, best and evaluation_of(best, "val", "best", how), "run_training.py")
    return f"{written}\nshare: {upload_command(str(model_directory))}   (docs/sharing.md)"


def after_scoring(metrics: dict, shared=()) -> str | None:
    """After run_inference.py scored one model's predictions: the score into that model folder's card; None where
    there is no one model folder to add it to (an ensemble, a folder of unknown predictions, a model downloaded from
    the hub, whose folder is the hub cache's)."""
    directory, inference = metrics.get("model_directory"), metrics.get("inference") or {}
    if not isinstance(directory, str) or directory in shared or not metrics.get("checkpoint"):
        return None
    if metrics.get("warnings"):
        return "note: the score was not added to the model card: " + metrics["warnings"][0]
    how = ["run_inference.py"]
    if inference.get("tta", "none") != "none" or list(inference.get("tta_scales", [1.0])) != [1.0]:
        how.append(f"TTA {inference.get('tta')}, scales {' '.join(map(str, inference.get('tta_scales', [])))}")
    if inference.get("min_component_size"):
        how.append(f"components under {inference['min_component_size']} px removed")
    evaluation = evaluation_of(metrics, metrics["split"], metrics["checkpoint"], ", ".join(how))
    return update(Path(directory), evaluation, "run_inference.py")
