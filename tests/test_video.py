"""run_inference.py --input: any video or folder of images, segmented frame-exactly into an overlay video and masks."""

import json
import shutil
import signal
import subprocess
import sys
import time

import cv2
import imageio_ffmpeg
import numpy as np
import pytest

import dataset
import plots
import run_inference
from conftest import ROOT, decode_all, train_with_own_backbone

VIDEO = "test/video_41/video_left.avi"  # 3 s at 60 fps, 128x96, masks and extracted frames at 0, 60, 120


@pytest.fixture(scope="module")
def model(demo_release, tmp_path_factory):
    """A tiny trained model that has also predicted the test split the release way (extracted frames)."""
    flags = (
        "--max-steps 3 --batch-size 2 --num-workers 0 --resolution quarter --warmup-steps 1 --head patch-mlp".split()
    )
    model = train_with_own_backbone(demo_release, tmp_path_factory.mktemp("video_model"), *flags)
    assert infer("--data-directory", demo_release, "--model-directory", model, "--num-workers", "0") == 0
    return model


def infer(*args):
    return run_inference.main([str(a) for a in args])


def infer_video(model, video, output, *args):
    """run_inference on one --input into --output; returns the exit code."""
    return infer("--model-directory", model, "--input", video, "--output", output, *args)


def read_video(path):
    capture = cv2.VideoCapture(str(path))
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return decode_all(path), fps


def mask_indices(folder):
    return sorted(int(p.stem) for p in folder.glob("*.png"))


def test_the_overlay_has_every_frame_and_the_masks_are_the_release_paths_predictions(model, demo_release, tmp_path):
    out = tmp_path / "out"
    assert infer_video(model, demo_release / VIDEO, out, *"--save-masks --batch-size 3".split()) == 0
    source, source_fps = read_video(demo_release / VIDEO)
    frames, fps = read_video(out / "overlay.mp4")
    assert len(frames) == len(source) == 180 and fps == source_fps == 60 and frames[0].shape == source[0].shape
    assert not np.array_equal(frames[0], source[0])  # the prediction is drawn over it
    assert mask_indices(out / "masks") == list(range(180))
    for index in (0, 60, 120):  # frame i of the video is predicted exactly as the extracted frame i
        release_path = cv2.imread(
            str(model / "inference" / "video_41" / "segmentation" / f"{index:09d}.png"), cv2.IMREAD_UNCHANGED
        )
        np.testing.assert_array_equal(
            cv2.imread(str(out / "masks" / f"{index:09d}.png"), cv2.IMREAD_UNCHANGED), release_path
        )
    record = json.loads((out / "predicted_with.json").read_text())
    assert record["frames"] == [0, 180] and record["fps"] == 60


def test_every_start_and_end_choose_the_frames_by_index(model, demo_release, tmp_path):
    out = tmp_path / "out"
    assert infer_video(model, demo_release / VIDEO, out, *"--save-masks --every 10 --start 1 --end 2.5".split()) == 0
    assert mask_indices(out / "masks") == list(range(60, 150, 10))
    assert len(read_video(out / "overlay.mp4")[0]) == 90
    smoothed = tmp_path / "smoothed"
    assert (
        infer_video(
            model,
            demo_release / VIDEO,
            smoothed,
            *"--save-masks --every 10 --start 1 --end 2.5 --temporal-smoothing 0.9".split(),
        )
        == 0
    )
    first = "000000060.png"  # nothing to smooth with yet
    assert (smoothed / "masks" / first).read_bytes() == (out / "masks" / first).read_bytes()


def test_a_folder_of_images_gets_a_mask_and_an_overlay_each(model, demo_release, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("000000000.png", "000000060.png"):
        shutil.copy(demo_release / "test" / "video_41" / "frames" / name, images / name)
    cv2.imwrite(str(images / "extra.jpg"), cv2.imread(str(images / "000000060.png")))
    assert infer("--model-directory", model, "--input", images) == 0
    out = model / "predictions" / "images"
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["000000000.png", "000000060.png", "extra.png"]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["000000000.jpg", "000000060.jpg", "extra.jpg"]
    np.testing.assert_array_equal(
        cv2.imread(str(out / "masks" / "000000060.png"), cv2.IMREAD_UNCHANGED),
        cv2.imread(str(model / "inference" / "video_41" / "segmentation" / "000000060.png"), cv2.IMREAD_UNCHANGED),
    )


@pytest.mark.parametrize(
    "make_input, message",
    [
        (
            lambda d: (d / "broken.mp4").write_bytes(b"not a video at all") and d / "broken.mp4",
            "is not a video OpenCV can read",
        ),
        (lambda d: (d / "empty").mkdir() or d / "empty", "holds no images"),
        (lambda d: d / "missing.avi", "does not exist"),
        (lambda d: (d / "notes.txt").write_text("x") and d / "notes.txt", "neither a video"),
    ],
    ids=["unreadable-video", "empty-folder", "missing", "not-a-video"],
)
def test_bad_input_is_one_line_and_writes_nothing(model, tmp_path, capsys, make_input, message):
    source = make_input(tmp_path)
    assert infer("--model-directory", model, "--input", source, "--output", tmp_path / "out") == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and message in error
    assert not (tmp_path / "out").exists()


def test_an_unwritable_output_or_a_directory_that_is_not_a_model_is_one_line(model, demo_release, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    assert (
        infer("--model-directory", model, "--input", demo_release / VIDEO, "--output", tmp_path / "a-file" / "out") == 1
    )
    assert (
        capsys.readouterr().err
        == f"error: cannot write to {tmp_path / 'a-file' / 'out'}: {tmp_path / 'a-file'} is not a writable directory\n"
    )
    assert infer("--model-directory", tmp_path, "--input", demo_release / VIDEO, "--output", tmp_path / "out") == 1
    assert "is not a trained model directory" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert infer("--model-directory", model, "--input", demo_release / VIDEO, "--start", "9") == 1
    assert "past the end of the video" in capsys.readouterr().err


def test_a_killed_run_leaves_no_overlay_that_looks_finished(model, demo_release, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(ROOT / "run_inference.py"),
        "--model-directory",
        str(model),
        "--input",
        str(demo_release / VIDEO),
        "--output",
        str(out),
        *"--save-masks --batch-size 1 --tta flip --tta-scales 1 2 3".split(),
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # masks are built aside (in out/.staging-PID/) and moved into place only once the overlay is complete
    while not list(out.glob(".staging-*/masks/*.png")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list(out.glob(".staging-*/masks/*.png")), "the run never got going"
    assert not (out / "overlay.mp4").exists() and not (out / "predicted_with.json").exists()
    assert not list((out / "masks").glob("*.png"))  # no mask under its final name either


# ----------------------------------------------------------------------------- the legend (issue 27)


def test_an_overlay_of_a_384x216_video_has_its_legend(model, demo_release, tmp_path):
    frames = [  # the demo's frames at 384x216, stored losslessly
        cv2.cvtColor(cv2.resize(cv2.imread(str(path)), (384, 216)), cv2.COLOR_BGR2RGB)
        for path in sorted((demo_release / "test" / "video_41" / "frames").glob("*.png"))
    ]
    source = tmp_path / "small.mkv"
    writer = imageio_ffmpeg.write_frames(
        str(source), (384, 216), fps=10, codec="ffv1", macro_block_size=1, pix_fmt_out="bgr0", ffmpeg_log_level="error"
    )
    writer.send(None)
    for frame in frames:
        writer.send(frame)
    writer.close()
    assert infer_video(model, source, tmp_path / "out", "--save-masks") == 0
    overlay = [cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) for frame in decode_all(tmp_path / "out" / "overlay.mp4")]
    assert len(overlay) == len(frames) and overlay[0].shape == (216, 384, 3)
    bottom = slice(216 - 216 // 4, None)
    for index, (frame, drawn) in enumerate(zip(frames, overlay)):
        labels = cv2.imread(str(tmp_path / "out" / "masks" / f"{index:09d}.png"), cv2.IMREAD_UNCHANGED)
        legend = drawn[bottom].astype(int)
        assert np.abs(legend - plots.video_frame((frame, labels))[bottom]).mean() < 8  # H.264's loss only
        assert np.abs(legend - plots.overlay(frame, labels)[bottom]).mean() > 40  # not the frame: the legend
        for c, colour in plots.CLASS_COLOURS.items():  # every class's box, in its colour
            near = np.abs(legend - colour).max(axis=2) < 30
            assert near.sum() >= 20, (index, dataset.CLASS_NAMES[c])
