"""scripts/make_demo_data.py: a synthetic dataset in the exact SAR-RARP50 release layout."""

import hashlib
import sys

import cv2
import numpy as np
import pytest

from conftest import ROOT, decode_all, run_script

SCRIPT = ROOT / "scripts" / "make_demo_data.py"
SMALL = ["--seconds", "2", "--width", "128", "--height", "96"]


def read_mask(path):
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert mask is not None, path
    return mask


def mask_digest(root):
    digest = hashlib.sha256()
    for path in sorted(root.rglob("segmentation/*.png")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def small_release(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "sarrarp"
    result = run_script(SCRIPT, "--output", root, "--train-videos", "4", "--test-videos", "2", *SMALL)
    return root, result


def test_layout_is_exactly_the_release_layout(small_release):
    root, result = small_release
    assert sorted(p.name for p in root.iterdir()) == ["test", "train"]
    # 4 train videos: the second-to-last (03) comes in two parts, each a video of its own
    assert sorted(p.name for p in (root / "train").iterdir()) == [
        "video_01",
        "video_02",
        "video_03_1",
        "video_03_2",
        "video_04",
    ]
    assert sorted(p.name for p in (root / "test").iterdir()) == ["video_41", "video_42"]
    for video in sorted(root.glob("*/video_*")):
        assert sorted(p.name for p in video.iterdir()) == [
            "action_continuous.txt",
            "action_discrete.txt",
            "segmentation",
            "video_left.avi",
        ]
        assert sorted(p.name for p in (video / "segmentation").iterdir()) == ["000000000.png", "000000060.png"]
        assert (video / "action_discrete.txt").read_text().strip()
    assert "7 video folders" in result.stdout and "14 masks" in result.stdout and str(root) in result.stdout


def test_videos_are_60_fps_xvid_with_seconds_times_60_frames_and_masks_fit(small_release):
    root, _ = small_release
    classes = set()
    for video in sorted(root.glob("*/video_*")):
        capture = cv2.VideoCapture(str(video / "video_left.avi"))
        assert capture.get(cv2.CAP_PROP_FPS) == 60
        fourcc = int(capture.get(cv2.CAP_PROP_FOURCC))
        # fourcc "XVID" asked for; FFmpeg's MPEG-4 Part 2 encoder tags it FMP4: an inter-frame codec
        assert fourcc.to_bytes(4, "little").decode().upper() in {"XVID", "FMP4", "DIVX"}
        capture.release()
        frames = decode_all(video / "video_left.avi")
        assert len(frames) == 2 * 60
        assert frames[0].shape == (96, 128, 3)
        # objects move: consecutive frames differ, so extracting a neighbour instead of frame i shows
        for i in (59, 60):
            assert np.abs(frames[i].astype(int) - frames[i + 1].astype(int)).mean() > 0.5, (video, i)
        video_classes = set()
        for path in sorted((video / "segmentation").glob("*.png")):
            mask = read_mask(path)
            assert mask.dtype == np.uint8 and mask.shape == (96, 128)  # 8-bit single channel, video size
            assert mask.max() <= 9
            video_classes |= set(np.unique(mask).tolist()) - {0}
        assert {1, 2, 3} <= video_classes and len(video_classes) <= 6, (video, video_classes)
        classes |= video_classes
    assert {4, 5} <= classes  # the thin ones
    assert len(classes) >= 6, classes


def test_each_mask_labels_exactly_the_pixels_drawn_in_its_frame():
    """Image and mask come from the same scene state: with the objects removed, exactly the
    unlabelled pixels stay the same."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_demo_data

    for seed in range(3):
        scene = make_demo_data.Scene(np.random.default_rng(seed), 160, 96, set(make_demo_data.EXTRA_CLASSES))
        for index in (0, 37, 60):
            image, mask = scene.frame(index / 60, index)
            objects = scene.back, scene.middle, scene.front
            scene.back, scene.middle, scene.front = [], [], []
            background, empty = scene.frame(index / 60, index)
            scene.back, scene.middle, scene.front = objects
            assert not empty.any()
            changed = (image != background).any(axis=2)
            assert not (changed & (mask == 0)).any()  # nothing drawn outside the mask
            labelled = mask > 0
            assert changed[labelled].mean() > 0.97  # and the mask covers what was drawn
            assert set(np.unique(mask).tolist()) - {0} >= {1, 2, 3, 4, 5}


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    args = ["--train-videos", "3", "--test-videos", "1", "--seconds", "1", "--width", "128", "--height", "96"]
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        run_script(SCRIPT, "--output", tmp_path / name, "--seed", seed, *args)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert mask_digest(a) == mask_digest(b)
    assert mask_digest(a) != mask_digest(c)
    for video in sorted(p.relative_to(a) for p in a.glob("*/video_*")):
        frames_a, frames_b = decode_all(a / video / "video_left.avi"), decode_all(b / video / "video_left.avi")
        assert len(frames_a) == len(frames_b) == 60
        assert all(np.array_equal(x, y) for x, y in zip(frames_a, frames_b)), video
    assert sorted(p.name for p in (a / "train").iterdir()) == ["video_01", "video_02_1", "video_02_2", "video_03"]


def test_refuses_a_non_empty_output_folder_unless_overwrite(tmp_path):
    output = tmp_path / "out"
    (output / "train" / "video_99").mkdir(parents=True)
    (output / "notes.txt").write_text("keep me")
    args = ["--output", output, *"--train-videos 1 --test-videos 1 --seconds 1 --width 64 --height 48".split()]
    result = run_script(SCRIPT, *args, check=False)
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "not empty" in error_lines[0] and "--overwrite" in error_lines[0]
    assert (output / "train" / "video_99").is_dir() and not (output / "test" / "video_41").exists()

    run_script(SCRIPT, *args, "--overwrite")
    assert sorted(p.name for p in (output / "train").iterdir()) == ["video_01"]  # old train/ replaced
    assert (output / "test" / "video_41" / "segmentation" / "000000000.png").exists()
    assert (output / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "bad, word",
    [
        (["--width", "127"], "--width"),
        (["--height", "0"], "--height"),
        (["--seconds", "0"], "--seconds"),
        (["--train-videos", "0"], "--train-videos"),
    ],
)
def test_bad_arguments_give_one_line_errors(tmp_path, bad, word):
    result = run_script(SCRIPT, "--output", tmp_path / "out", *bad, check=False)
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and word in error_lines[0]
    assert not (tmp_path / "out").exists()
