import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the network
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def run_script(*args, check=True, cwd=ROOT, env=None):
    """Run a project script as a user would; returns the CompletedProcess with text output."""
    command = [str(a) for a in args]
    if command[0].endswith(".py"):
        command.insert(0, sys.executable)
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable, **(env or {})}
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed:\n{result.stdout}\n{result.stderr}")
    return result


def resumable_state(model, optimizer, scheduler, scaler, state: dict) -> tuple[dict, dict]:
    """(checkpoint, weights) for run_directory.save_checkpoint, of a model trained in one process."""
    weights = {name: p.detach() for name, p in model.named_parameters()}
    optimisation = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
    }
    return {"model": weights, **optimisation, **state}, weights


def training_folders(release, backbone, output) -> list:
    """The folders of a run_training.py command line: the data, the backbone and the run's output."""
    return ["--data-directory", release, "--backbone", backbone, "--output-directory", output]


def train_with_own_backbone(release, root: Path, *extra) -> Path:
    """A run_training.py run on release with a tiny DINOv3 of its own in root/tiny-dinov3; returns root/model."""
    from make_tiny_backbone import save_tiny_backbone

    save_tiny_backbone(root / "tiny-dinov3")
    run_script(
        ROOT / "run_training.py",
        "--data-directory",
        release,
        "--output-directory",
        root / "model",
        "--backbone",
        root / "tiny-dinov3",
        *extra,
    )
    return root / "model"


def decode_all(video_path) -> list:
    """Every frame of a video, by OpenCV's sequential read() (what the official toolkit does)."""
    import cv2

    capture = cv2.VideoCapture(str(video_path))
    assert capture.isOpened(), video_path
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def extracted_demo_release(root: Path, **sizes) -> Path:
    """A synthetic release in the SAR-RARP50 layout (scripts/make_demo_data.py), frames extracted."""
    from make_demo_data import make_demo_dataset

    make_demo_dataset(root, train_videos=5, seed=0, **sizes)
    run_script(ROOT / "scripts" / "extract_frames.sh", root, "--jobs", "2")
    return root


@pytest.fixture(scope="session")
def demo_release(tmp_path_factory):
    """A tiny release: 6 training video folders (one operation in two parts), 2 test videos. Copy it to change it."""
    return extracted_demo_release(
        tmp_path_factory.mktemp("release") / "sarrarp", test_videos=2, seconds=3, width=128, height=96
    )


@pytest.fixture(scope="session")
def learnable_release(tmp_path_factory):
    """A larger release (256x144, 6 masks a video) on which a tiny model learns within a minute."""
    return extracted_demo_release(
        tmp_path_factory.mktemp("learnable") / "sarrarp", test_videos=0, seconds=6, width=256, height=144
    )


def background_scores(release: Path, videos: list[str]) -> dict:
    """The official scores of predicting background everywhere on these training-folder videos."""
    import numpy as np

    import dataset
    from metrics import frame_scores, summarize

    return summarize(
        {
            video: [
                frame_scores(np.zeros_like(mask), mask)
                for mask in map(dataset.read_mask, sorted((release / "train" / video / "segmentation").glob("*.png")))
            ]
            for video in videos
        }
    )


@pytest.fixture(scope="session")
def backbone(tmp_path_factory):
    """A tiny randomly initialised DINOv3 (4 layers, hidden size 64) saved like a hub repository. Do not change it."""
    from make_tiny_backbone import save_tiny_backbone

    directory = tmp_path_factory.mktemp("backbone") / "tiny-dinov3"
    save_tiny_backbone(directory)
    return directory


@pytest.fixture
def release_copy(demo_release, tmp_path):
    return shutil.copytree(demo_release, tmp_path / "sarrarp")
