"""Live experiment tracking for run_training.py --report-to: TensorBoard event files or a Weights & Biases run.

The tracker gets the very records metrics.jsonl gets (flattened to scalars) and, at each validation, a few fixed
validation frames pictured as frame | prediction | ground truth. Only rank 0 tracks.
"""

import importlib.util
import json
import os
import secrets
from pathlib import Path

import cv2
import numpy as np

from cli import first_line

REPORTERS = ("none", "tensorboard", "wandb")  # each tracker is the package of its name
PICTURE_WIDTH = 1440  # validation pictures are shrunk to this width in the logs


class TrackingError(RuntimeError):
    pass


def check_available(report_to: str) -> None:
    """Fail before the run writes anything if the tracker's package is not installed."""
    if report_to != "none" and importlib.util.find_spec(report_to) is None:
        raise TrackingError(f"--report-to {report_to} needs the {report_to} package: pip install {report_to}")


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as flat scalar names: train/loss, val/score, val/IoU/thread, val/video_41/mIoU, ..."""
    if "val" in record:
        val = record["val"]
        values = {f"val/{key}": val[key] for key in ("mIoU", "mNSD", "score", "seed_mIoU") if key in val}
        if "background_only" in val:  # the score of predicting nothing, for reference
            values["val/background_only_score"] = val["background_only"]["score"]
        for name, scores in val["classes"].items():
            values.update({f"val/{metric}/{name}": scores[metric] for metric in ("IoU", "NSD")})
        for name, scores in val["videos"].items():
            values.update({f"val/{name}/{metric}": scores[metric] for metric in ("mIoU", "mNSD")})
        return values
    keys = ("loss", "lr", "images_per_second", "peak_memory_mb", "epoch")
    return {f"train/{key}": record[key] for key in keys if key in record}


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
        images = {f"validation/{name}": self.wandb.Image(shrunk(picture)) for name, picture in pictures.items()}
        self.run.log({**scalars(record), **images}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_tracker(report_to: str, output: Path, config: dict, resumed_at: int | None):
    """The tracker of --report-to (None for none); resumed_at: the checkpoint's step when resuming."""
    trackers = {"tensorboard": TensorBoard, "wandb": WandB}
    return trackers[report_to](output, config, resumed_at) if report_to in trackers else None
