"""Live experiment tracking for run_training.py --report-to: TensorBoard event files or a Weights & Biases run.

The tracker gets the very records metrics.jsonl gets (flattened to scalars) and, at each validation, the per-class
table with its ground-truth frame counts and the absent-class mark (plots.ABSENT_MARK), and a few fixed validation
frames pictured as frame | prediction | ground truth. Only rank 0 tracks.
"""

import importlib.util
import json
import os
import secrets
from pathlib import Path

import cv2
import numpy as np

import plots
from cli import first_line
from metrics import COUNTS

REPORTERS = ("none", "tensorboard", "wandb")  # each tracker is the package of its name
PICTURE_WIDTH = 1440  # validation pictures are shrunk to this width in the logs


class TrackingError(RuntimeError):
    pass


def check_available(report_to: str) -> None:
    """Fail before the run writes anything if the tracker's package is not installed."""
    if report_to != "none" and importlib.util.find_spec(report_to) is None:
        raise TrackingError(f"--report-to {report_to} needs the {report_to} package: pip install {report_to}")


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as flat scalar names: train/loss, val/score, val/IoU/thread, val/video_41/mIoU,
    val/ground_truth_frames/thread, val/absent_rule_frames/thread, ..."""
    if "val" in record:
        val = record["val"]
        values = {f"val/{key}": val[key] for key in ("mIoU", "mNSD", "score", "seed_mIoU") if key in val}
        if "background_only" in val:  # the score of predicting nothing, for reference
            values["val/background_only_score"] = val["background_only"]["score"]
        for name, scores in val["classes"].items():
            values.update({f"val/{key}/{name}": scores[key] for key in ("IoU", "NSD", *COUNTS)})
        for name, scores in val["videos"].items():
            values.update({f"val/{name}/{metric}": scores[metric] for metric in ("mIoU", "mNSD")})
        values.update({f"val/{key}": value for key, value in val.get("memory", {}).items()})
        return values
    keys = ("loss", "lr", "images_per_second", "peak_memory_mb", "peak_reserved_mb", "epoch")
    return {f"train/{key}": record[key] for key in keys if key in record}


def class_table(val: dict) -> tuple[list[str], list[list]]:
    """(header, rows) of a validation's per-class scores as the printed table shows them: marked by plots.class_label,
    with the ground-truth frames and the frames scored 1 by the absent-class rule."""
    header = ["class", "IoU", "NSD", "ground-truth frames", "scored 1 by the absent-class rule"]
    rows = [
        [plots.class_label(name, v), v["IoU"], v["NSD"], *(v[key] for key in COUNTS)]
        for name, v in val["classes"].items()
    ]
    return header, rows


def markdown_cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value).replace("*", "\\*")  # * is Markdown's emphasis


def markdown_table(val: dict) -> str:
    """class_table as the Markdown TensorBoard's text tab renders, with plots.ABSENT_NOTE under it."""
    header, rows = class_table(val)
    lines = [header, ["---"] * len(header), *rows]
    table = "\n".join("| " + " | ".join(map(markdown_cell, line)) + " |" for line in lines)
    return table + f"\n\n{plots.ABSENT_NOTE}\n\n\\* thin class"


def shrunk(picture: np.ndarray) -> np.ndarray:
    if picture.shape[1] <= PICTURE_WIDTH:
        return picture
    height = round(picture.shape[0] * PICTURE_WIDTH / picture.shape[1])
    return cv2.resize(picture, (PICTURE_WIDTH, height), interpolation=cv2.INTER_AREA)


class TensorBoard:
    """Event files under OUTPUT/tensorboard; a resumed run purges what was logged after its checkpoint."""

    def __init__(self, output: Path, config: dict, resumed_at: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(output / "tensorboard", purge_step=None if resumed_at is None else resumed_at + 1)
        if resumed_at is None:
            self.writer.add_text("config", f"```\n{json.dumps(config, indent=1)}\n```", 0)

    def log(self, record: dict, pictures: dict[str, np.ndarray]) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record["step"])
        if "val" in record:
            self.writer.add_text("validation/classes", markdown_table(record["val"]), record["step"])
        for name, picture in pictures.items():
            self.writer.add_image(f"validation/{name}", shrunk(picture), record["step"], dataformats="HWC")
        self.writer.flush()  # what a crash would lose is at most one record

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A W&B run under OUTPUT/wandb whose id is kept in OUTPUT/wandb_run_id, so that --resume continues that run
    (W&B drops steps it already has). WANDB_MODE=offline works without a network; WANDB_PROJECT names the project."""

    def __init__(self, output: Path, config: dict, resumed_at: int | None):
        import wandb

        id_file = output / "wandb_run_id"
        if resumed_at is None or not id_file.is_file():
            id_file.write_text(secrets.token_hex(8))
        self.wandb = wandb
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "sarrarp50-dinov3"),
                id=id_file.read_text(),
                resume="allow",
                dir=output,
                name=output.name,
                config=config,
            )
        except Exception as error:  # wandb's own errors (no login, no network, ...) have no common base class
            message = first_line(error)
            raise TrackingError(
                f"W&B could not start a run ({message}): run `wandb login`, or set WANDB_MODE=offline "
                "to log without a network"
            ) from None

    def log(self, record: dict, pictures: dict[str, np.ndarray]) -> None:
        media = {f"validation/{name}": self.wandb.Image(shrunk(picture)) for name, picture in pictures.items()}
        if "val" in record:
            header, rows = class_table(record["val"])
            media["validation/classes"] = self.wandb.Table(columns=header, data=rows)
        self.run.log({**scalars(record), **media}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_tracker(report_to: str, output: Path, config: dict, resumed_at: int | None):
    """The tracker of --report-to (None for none); resumed_at: the checkpoint's step when resuming."""
    trackers = {"tensorboard": TensorBoard, "wandb": WandB}
    return trackers[report_to](output, config, resumed_at) if report_to in trackers else None
