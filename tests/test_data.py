"""Data foundation: release in, frame-accurate frames, validated samples, video-level split, augmentation."""

import os
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import dataset
import discovery
import losses
from conftest import ROOT, run_script

UNPACK = ROOT / "scripts" / "unpack_sarrarp.sh"
EXTRACT = ROOT / "scripts" / "extract_frames.sh"


def zip_folder(folder: Path, archive: Path, top: str = "") -> None:
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "frames" not in path.parts:
                z.write(path, top + path.relative_to(folder).as_posix())


def sequential_frames(video: Path) -> list[np.ndarray]:
    capture, frames = cv2.VideoCapture(str(video)), []
    while True:
        ok, frame = capture.read()
        if not ok:
            return frames
        frames.append(frame)


# ----------------------------------------------------------------------------- unpacking


def test_unpack_outer_archives_of_video_zips_into_train_and_test(demo_release, tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    for video in discovery.find_video_dirs(demo_release):
        # one inner zip with a top folder named like the video, the others without: both occur
        zip_folder(video, inner / f"{video.name}.zip", top=f"{video.name}/" if video.name == "video_01" else "")
    train_archive, test_archive = tmp_path / "train_set.zip", tmp_path / "test_set.zip"
    with zipfile.ZipFile(train_archive, "w") as train, zipfile.ZipFile(test_archive, "w") as test:
        for z in sorted(inner.glob("*.zip")):
            (test if int(z.stem.split("_")[1]) > 40 else train).write(z, f"train_set/{z.name}")
    output = tmp_path / "out"

    result = run_script(UNPACK, train_archive, test_archive, "--output", output)
    expected = sorted(p.relative_to(demo_release).as_posix() for p in demo_release.rglob("segmentation/*.png"))
    assert sorted(p.relative_to(output).as_posix() for p in output.rglob("segmentation/*.png")) == expected
    assert (output / "train" / "video_01" / "video_left.avi").exists()
    assert (output / "test" / "video_41" / "video_left.avi").exists()
    assert "8 video(s) unpacked" in result.stdout  # 5 operations, one in two parts, + 2 test videos

    again = run_script(UNPACK, train_archive, test_archive, "--output", output)
    assert "0 video(s) unpacked, 8 already present" in again.stdout


def test_unpack_accepts_a_folder_of_video_zips(demo_release, tmp_path):
    zips = tmp_path / "zips"
    zips.mkdir()
    zip_folder(demo_release / "test" / "video_41", zips / "video_41.zip")
    run_script(UNPACK, zips, "--output", tmp_path / "out")
    assert (tmp_path / "out" / "test" / "video_41" / "segmentation" / "000000000.png").exists()


def test_unpack_refuses_entries_escaping_the_output_folder(tmp_path):
    archive = tmp_path / "video_03.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("video_left.avi", b"x")
        z.writestr("../../escaped.txt", b"gotcha")
    result = run_script(UNPACK, archive, "--output", tmp_path / "out", check=False)
    assert result.returncode != 0
    assert "refusing zip entry '../../escaped.txt'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (tmp_path / "out" / "train" / "video_03").exists()


def test_unpack_reports_a_corrupt_archive_in_one_line(tmp_path):
    archive = tmp_path / "train_set.zip"
    archive.write_bytes(b"not a zip at all")
    result = run_script(UNPACK, archive, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {archive} is not a valid zip file (corrupt or incomplete download)"


# ----------------------------------------------------------------------------- frame extraction


def test_extracted_frames_are_exactly_frame_i_of_sequential_decoding(demo_release):
    for video in discovery.find_video_dirs(demo_release):
        decoded = sequential_frames(video / "video_left.avi")
        masks = sorted((video / "segmentation").glob("*.png"))
        assert masks
        for mask in masks:
            frame = cv2.imread(str(video / "frames" / mask.name))
            assert np.array_equal(frame, decoded[int(mask.stem)]), f"{video.name}/{mask.name} is not frame {mask.stem}"
            assert not np.array_equal(frame, decoded[int(mask.stem) + 1])  # consecutive frames differ: a real check


def test_extraction_at_ten_per_second_writes_every_sixth_frame(release_copy):
    video = release_copy / "test" / "video_41"
    run_script(EXTRACT, video, "--rate", "10", "--output-name", "rgb")
    names = sorted(p.name for p in (video / "rgb").glob("*.png"))
    assert names == [f"{i:09d}.png" for i in range(0, 180, 6)]
    assert np.array_equal(
        cv2.imread(str(video / "rgb" / "000000042.png")), sequential_frames(video / "video_left.avi")[42]
    )


def test_extraction_rerun_skips_finished_videos_and_leaves_no_partial_files(release_copy):
    frames = sorted(release_copy.rglob("frames/*.png"))
    before = {p: p.stat().st_mtime_ns for p in frames}
    result = run_script(EXTRACT, release_copy)
    assert "0 frames written" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in frames} == before
    frames[0].unlink()  # as if the run had been killed before writing it
    assert "1 frames written" in run_script(EXTRACT, release_copy).stdout
    assert not [p for p in release_copy.rglob("*") if p.name.endswith(".partial")]


def test_unreadable_video_is_reported_without_stopping_the_others(release_copy):
    for frames in release_copy.rglob("frames"):
        shutil.rmtree(frames)
    broken = release_copy / "train" / "video_02" / "video_left.avi"
    broken.write_bytes(b"\x00" * 1000)
    result = run_script(EXTRACT, release_copy, check=False)
    assert result.returncode == 1
    assert str(broken) in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert (release_copy / "test" / "video_42" / "frames" / "000000060.png").exists()
    assert "7/8 videos done" in result.stdout


# ----------------------------------------------------------------------------- discovery and validation


def test_discovery_pairs_masks_with_frames_including_parts_and_rgb_folders(release_copy):
    videos = discovery.find_video_dirs(release_copy / "train")
    names = [v.name for v in videos]
    assert any(n.endswith("_1") for n in names) and any(n.endswith("_2") for n in names)
    (release_copy / "train" / names[0] / "frames").rename(release_copy / "train" / names[0] / "rgb")
    samples = discovery.find_samples(videos)
    assert len(samples) == 3 * len(videos)
    assert {s.video for s in samples} == set(names)
    assert all(s.image.name == s.mask.name for s in samples)
    assert {s.image.parent.name for s in samples} == {"frames", "rgb"}


def as_palette_png(png: bytes) -> bytes:
    """The same PNG with its IHDR colour type set to 3 (palette), CRC fixed: what OpenCV misreads."""
    ihdr = bytearray(png[12:29])
    ihdr[13] = 3
    return png[:12] + bytes(ihdr) + struct.pack(">I", zlib.crc32(bytes(ihdr))) + png[33:]


def scanned(release: Path, **kwargs):
    samples = discovery.find_samples(discovery.find_video_dirs(release / "train"), **kwargs)
    return discovery.scan_samples(samples, **kwargs)


def test_a_mask_without_a_frame_is_a_clear_error_or_skipped_with_a_warning(release_copy):
    missing = release_copy / "train" / "video_01" / "frames" / "000000060.png"
    missing.unlink()
    with pytest.raises(dataset.DataError, match=r"video_01/segmentation/000000060.png: no frame for this mask"):
        discovery.find_samples(discovery.find_video_dirs(release_copy / "train"))
    with pytest.warns(UserWarning, match="no frame for this mask"):
        samples = discovery.find_samples(discovery.find_video_dirs(release_copy / "train"), skip_bad=True)
    assert len(samples) == 3 * 6 - 1


@pytest.mark.parametrize(
    "damage, message",
    [
        ("resize_frame", r"frames/000000000.png: frame is 64x48 but its mask is 128x96"),
        ("class_12", r"segmentation/000000000.png: class ids 12 above 9"),
        ("truncate_frame", r"frames/000000000.png: truncated PNG"),
        ("garbage_mask", r"segmentation/000000000.png: not a PNG file"),
        ("palette_mask", r"segmentation/000000000.png: palette PNG"),
        ("rgb_mask", r"segmentation/000000000.png: masks must be 8-bit single-channel PNGs"),
    ],
)
def test_bad_samples_give_one_clear_error_naming_the_file(release_copy, damage, message):
    video = release_copy / "train" / "video_01"
    frame, mask = video / "frames" / "000000000.png", video / "segmentation" / "000000000.png"
    if damage == "resize_frame":
        cv2.imwrite(str(frame), cv2.resize(cv2.imread(str(frame)), (64, 48)))
    elif damage == "class_12":
        labels = cv2.imread(str(mask), cv2.IMREAD_UNCHANGED)
        labels[0, 0] = 12
        cv2.imwrite(str(mask), labels)
    elif damage == "truncate_frame":
        frame.write_bytes(frame.read_bytes()[:500])
    elif damage == "garbage_mask":
        mask.write_bytes(b"garbage")
    elif damage == "palette_mask":
        mask.write_bytes(as_palette_png(mask.read_bytes()))
    elif damage == "rgb_mask":
        cv2.imwrite(str(mask), cv2.cvtColor(cv2.imread(str(mask), cv2.IMREAD_UNCHANGED), cv2.COLOR_GRAY2BGR))
    with pytest.raises(dataset.DataError, match=message) as error:
        scanned(release_copy)
    assert "\n" not in str(error.value)
    with pytest.warns(UserWarning, match=message):
        good, _, _ = scanned(release_copy, skip_bad=True)
    assert len(good) == 3 * 6 - 1


def test_mask_statistics_are_cached_and_refreshed_when_a_mask_changes(release_copy, tmp_path):
    statistics = tmp_path / "stats.json"
    samples = discovery.find_samples(discovery.find_video_dirs(release_copy / "train"))
    _, counts, size = discovery.scan_samples(samples, statistics)
    assert size == (96, 128) and counts.shape == (len(samples), 10) and (counts.sum(1) == 96 * 128).all()
    mask = samples[0].mask
    cv2.imwrite(str(mask), np.full((96, 128), 5, np.uint8))
    os.utime(mask, ns=(1, 1))  # a different modification time
    _, refreshed, _ = discovery.scan_samples(samples, statistics)
    assert refreshed[0].tolist() == [0, 0, 0, 0, 0, 96 * 128, 0, 0, 0, 0]
    assert (refreshed[1:] == counts[1:]).all()


# ----------------------------------------------------------------------------- split and class weights

VIDEOS = [
    "video_01",
    "video_02",
    "video_03",
    "video_04",
    "video_05",
    "video_06",
    "video_07",
    "video_11_1",
    "video_11_2",
    "video_15_1",
    "video_15_2",
]


@pytest.mark.parametrize("seed", range(8))
def test_split_is_by_video_keeps_parts_together_and_is_deterministic(seed):
    train, val = dataset.split_by_video(VIDEOS, seed=seed)
    assert not set(train) & set(val) and sorted(train + val) == sorted(VIDEOS)
    assert len({dataset.operation_name(v) for v in val}) == 2  # 20% of 9 operations
    for side in (train, val):
        assert ("video_11_1" in side) == ("video_11_2" in side)
        assert ("video_15_1" in side) == ("video_15_2" in side)
    assert dataset.split_by_video(VIDEOS, seed=seed) == (train, val)


def test_split_can_be_chosen_by_naming_validation_videos():
    train, val = dataset.split_by_video(VIDEOS, val_videos=["video_03", "video_11_2"])
    assert val == ["video_03", "video_11_1", "video_11_2"]
    with pytest.raises(dataset.DataError, match="validation videos not found in the data: video_99"):
        dataset.split_by_video(VIDEOS, val_videos=["video_99"])


def test_class_weights_follow_the_documented_formula_on_a_hand_made_mask():
    mask = np.zeros((10, 10), np.uint8)
    mask[:2, :5] = 3  # 10 pixels of tool shaft
    mask[9, 9] = 5  # 1 pixel of thread
    counts = np.bincount(mask.ravel(), minlength=10)
    frequencies = counts / counts.sum()
    assert frequencies[[0, 3, 5]].tolist() == [0.89, 0.10, 0.01]
    weights = losses.class_weights_from_frequencies(frequencies)
    assert weights[5] == pytest.approx(1 / np.log(1.03))
    assert weights[0] == pytest.approx(1 / np.log(1.91))
    assert weights[1] == pytest.approx(1 / np.log(1.02))  # absent class: the bounded maximum
    assert weights[5] > weights[3] > weights[0]


# ----------------------------------------------------------------------------- resolution and augmentation


def test_training_size_is_half_or_quarter_padded_to_the_patch_grid():
    assert dataset.training_size((1080, 1920), 0.5) == ((540, 960), (544, 960))
    assert dataset.training_size((1080, 1920), 0.25) == ((270, 480), (272, 480))
    assert dataset.training_size((1080, 1920), 1.0) == ((1080, 1920), (1088, 1920))


def striped_sample():
    """A full-resolution mask with asymmetric shapes, and the image drawn from it at half resolution."""
    mask = np.zeros((192, 256), np.uint8)
    mask[20:80, 10:60] = 3
    mask[120:180, 140:250] = 5
    mask[40:50, 120:240] = 8
    image = cv2.resize(np.repeat(mask[..., None] * 25, 3, axis=2), (128, 96), interpolation=cv2.INTER_NEAREST)
    return image, mask


def misaligned_fraction(image, mask):
    labels = image[..., 0] // 25
    low_res = cv2.resize(mask, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
    labelled = low_res != dataset.IGNORE_INDEX
    return ((labels != low_res) & labelled).mean()


def test_spatial_augmentation_moves_image_and_full_resolution_mask_together():
    image, mask = striped_sample()
    augment = dataset.spatial_augmentation()
    flipped = 0
    for _ in range(40):
        out = augment(image=image, mask=mask)
        assert out["image"].shape == image.shape and out["mask"].shape == mask.shape
        assert misaligned_fraction(out["image"], out["mask"]) < 0.04
        flipped += misaligned_fraction(out["image"], mask) > 0.1
    assert flipped > 10  # the transforms did move things, so the check above is not vacuous
    assert misaligned_fraction(image[:, ::-1], mask) > 0.1  # flipping only the image is caught


def test_augmented_mask_values_stay_a_subset_of_the_original_plus_ignore():
    _, mask = striped_sample()
    augment = dataset.spatial_augmentation()
    for _ in range(40):
        values = set(np.unique(augment(image=cv2.resize(mask, (128, 96)), mask=mask)["mask"]).tolist())
        assert values <= {0, 3, 5, 8, dataset.IGNORE_INDEX}


def test_dataset_yields_uint8_images_at_training_size_and_full_resolution_masks(demo_release):
    samples, _, size = discovery.scan_samples(discovery.find_samples(discovery.find_video_dirs(demo_release / "train")))
    for augment in (False, True):
        item = dataset.SegmentationDataset(samples, size, scale=0.5, augment=augment)[0]
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 48, 64)
        assert item["mask"].dtype == torch.uint8 and item["mask"].shape == (96, 128)
    plain = dataset.SegmentationDataset(samples, size, scale=0.25)[0]
    assert plain["image"].shape == (3, 32, 32)  # 24x32 padded to the 16-pixel grid
    assert plain["image"][:, 24:].sum() == 0
    assert torch.equal(plain["mask"], torch.from_numpy(dataset.read_mask(samples[0].mask)))


def test_frame_cache_is_built_once_and_rebuilt_when_the_frame_changes(release_copy):
    samples, _, size = discovery.scan_samples(discovery.find_samples(discovery.find_video_dirs(release_copy / "test")))
    cached_data = dataset.SegmentationDataset(samples, size, scale=0.5, cache_frames=True)
    first = cached_data[0]["image"]
    cached = dataset.cached_frame_path(samples[0].image, (48, 64))
    assert cached.exists()
    uncached = dataset.SegmentationDataset(samples, size, scale=0.5)[0]["image"]
    assert (first.float() - uncached.float()).abs().mean() < 2  # JPEG q95 is close to the source
    built = cached.stat().st_mtime_ns
    cached_data[0]
    assert cached.stat().st_mtime_ns == built
    cv2.imwrite(str(samples[0].image), np.zeros((96, 128, 3), np.uint8))
    os.utime(samples[0].image, ns=(built + 10**9, built + 10**9))
    assert cached_data[0]["image"].sum() == 0
