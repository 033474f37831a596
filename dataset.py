"""Samples of the SAR-RARP50 release (discovery.py finds and checks them) -> split by operation, augmented, batched.

Images leave this module as uint8 RGB at training resolution (normalised on the device by the
model: uint8 is 4x cheaper to pass between worker processes); masks stay at full resolution
because logits are upsampled to the source resolution for the loss and the score.
"""

import collections
import random
import re
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch

import files

# OpenCV's own thread pool deadlocks in forked children (DataLoader workers, process pools) once the
# parent has used it; the pipeline parallelises with processes instead.
cv2.setNumThreads(0)

CLASS_NAMES = (
    "background",
    "tool clasper",
    "tool wrist",
    "tool shaft",
    "suturing needle",
    "thread",
    "suction tool",
    "needle holder",
    "clamps",
    "catheter",
)
NUM_CLASSES = len(CLASS_NAMES)
THIN_CLASSES = ("suturing needle", "thread")  # the classes a 16-pixel patch grid struggles with, marked in every table
IGNORE_INDEX = 255  # mask value for pixels that carry no label (augmentation fill, padding)
PATCH_SIZE = 16
RESOLUTION_SCALES = {"full": 1.0, "half": 0.5, "quarter": 0.25}


class DataError(ValueError):
    """Bad input data; the message is one line that names the file."""


@dataclass(frozen=True)
class Sample:
    video: str  # folder name, e.g. video_11_1
    image: Path
    mask: Path


def read_png_header(path: Path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type); refuses truncated files."""
    return files.read_png_header(path, DataError)


def read_mask(path: Path) -> np.ndarray:
    """A mask as a 2-D uint8 array of class ids; palette PNGs are refused (OpenCV would return colours)."""
    _, _, bit_depth, colour_type = read_png_header(path)
    if colour_type == files.PNG_PALETTE:
        raise DataError(f"{path}: palette PNG; masks must be 8-bit greyscale class ids")
    if (bit_depth, colour_type) != (8, files.PNG_GREY):
        raise DataError(f"{path}: masks must be 8-bit single-channel PNGs")
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise DataError(f"{path}: unreadable PNG")
    return mask


def read_image(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"{path}: unreadable image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


# ----------------------------------------------------------------------------- split


def operation_name(video: str) -> str:
    """video_11_1 and video_11_2 are two parts of one operation; they must stay on one side of the split."""
    return re.sub(r"^(video_\d+)_\d+$", r"\1", video)


def split_by_video(
    videos: list[str], val_fraction: float = 0.2, seed: int = 0, val_videos: list[str] | None = None
) -> tuple[list[str], list[str]]:
    """Train/validation split by operation, never by frame (neighbouring frames are near-duplicates)."""
    videos = sorted(set(videos))
    operations = sorted({operation_name(v) for v in videos})
    if val_videos:
        chosen = {operation_name(v) for v in val_videos}
        unknown = sorted(chosen - set(operations))
        if unknown:
            raise DataError(f"validation videos not found in the data: {', '.join(unknown)}")
    else:
        if len(operations) < 2:
            raise DataError(f"need at least two videos to split into training and validation, found {len(operations)}")
        count = min(len(operations) - 1, max(1, round(len(operations) * val_fraction)))
        chosen = set(random.Random(seed).sample(operations, count))
    train = [v for v in videos if operation_name(v) not in chosen]
    val = [v for v in videos if operation_name(v) in chosen]
    if not train:
        raise DataError("every video is in the validation split; nothing is left to train on")
    return train, val


def label_budget(videos: list[str], operations: int, seed: int) -> tuple[list[str], list[str]]:
    """(the videos, the operations) of the first `operations` of the training operations in an order drawn with seed:
    parts of an operation stay together, and for one seed a smaller budget's operations are among a larger one's."""
    names = sorted({operation_name(v) for v in videos})
    if operations > len(names):
        raise DataError(
            f"--train-videos {operations}: the training split has {len(names)} operations (the parts of one count once)"
        )
    drawn = random.Random(f"train-videos {seed}").sample(names, len(names))[:operations]
    return [v for v in videos if operation_name(v) in drawn], drawn


FOLD_DRAWS = 200  # seeded orders tried by fold_groups; the most even division wins


def fold_groups(frames_per_video: dict[str, int], folds: int, seed: int = 0) -> list[list[str]]:
    """The videos divided into `folds` validation groups by operation (parts stay together), of about equal frame
    counts: of FOLD_DRAWS orders drawn from seed, in each of which every operation joins the group with the fewest
    frames so far, the one with the smallest gap between the largest and the smallest group."""
    frames_per_operation = collections.Counter()
    for video, frames in frames_per_video.items():
        frames_per_operation[operation_name(video)] += frames
    if folds < 2:
        raise DataError(f"--folds must be at least 2, got {folds}")
    if len(frames_per_operation) < folds:
        raise DataError(f"--folds {folds} needs at least {folds} operations, the data has {len(frames_per_operation)}")
    generator, best = random.Random(seed), None
    for _ in range(FOLD_DRAWS):
        operations = sorted(frames_per_operation)
        generator.shuffle(operations)
        groups, totals = [[] for _ in range(folds)], [0] * folds
        for operation in operations:
            lightest = min(range(folds), key=lambda g: (totals[g], g))
            groups[lightest].append(operation)
            totals[lightest] += frames_per_operation[operation]
        if best is None or max(totals) - min(totals) < best[0]:
            best = max(totals) - min(totals), groups
    group_of = {operation: g for g, group in enumerate(best[1]) for operation in group}
    return [sorted(v for v in frames_per_video if group_of[operation_name(v)] == g) for g in range(folds)]


# ----------------------------------------------------------------------------- resolution and augmentation


def training_size(source_size: tuple[int, int], scale: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """(content, padded) sizes as (height, width): the scaled frame, and that padded up to multiples of 16."""
    content = tuple(max(1, round(side * scale)) for side in source_size)
    padded = tuple(-(-side // PATCH_SIZE) * PATCH_SIZE for side in content)
    return content, padded


class FullResolutionMaskAffine(A.Affine):
    """Affine whose mask may be larger than the image: the mask gets the same geometric transform.

    The image is warped at training resolution (cheap), the label at full resolution (exact),
    by conjugating the image's matrix with the scaling between the two pixel grids.
    """

    def apply_to_mask(self, mask, matrix, output_shape, **params):
        sy, sx = mask.shape[0] / output_shape[0], mask.shape[1] / output_shape[1]
        to_mask = np.array([[sx, 0, (sx - 1) / 2], [0, sy, (sy - 1) / 2], [0, 0, 1]])  # pixel centres
        matrix = to_mask @ np.asarray(matrix) @ np.linalg.inv(to_mask)
        return super().apply_to_mask(mask, matrix, output_shape=mask.shape[:2], **params)


AUGMENTATIONS = ("default", "seed")


def spatial_augmentation(kind: str = "default") -> A.Compose:
    """default: ours; seed: the design we start from's random affine (always applied) and flip."""
    affine = (
        dict(scale=(0.8, 1.25), translate_percent=(-0.1, 0.1), rotate=(-15, 15), p=0.7)
        if kind == "default"
        else dict(scale=(0.7, 1.3), translate_percent=(-0.2, 0.2), rotate=(-15, 15), shear=(-10, 10), p=1.0)
    )
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            FullResolutionMaskAffine(
                **affine,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                fill=0,
                fill_mask=IGNORE_INDEX,
            ),
        ],
        is_check_shapes=False,
    )  # the mask is at full resolution, the image at training resolution


def colour_augmentation(kind: str = "default") -> A.Compose:
    if kind == "seed":
        return A.Compose([A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1, p=1.0)])
    return A.Compose(
        [
            A.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.03, p=0.8),
            A.RandomGamma(gamma_limit=(80, 120), p=0.3),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.GaussNoise(std_range=(0.01, 0.05))], p=0.3),
        ]
    )


def cached_frame_path(image: Path, content_size: tuple[int, int]) -> Path:
    height, width = content_size
    return image.parent.parent / f"frames_{width}x{height}" / (image.stem + ".jpg")


def scale_image(frame: np.ndarray, content_size: tuple[int, int]) -> np.ndarray:
    """A full-resolution frame at content_size=(h, w), as training sees it: area-averaged down, linear up."""
    height, width = content_size
    interpolation = cv2.INTER_AREA if height < frame.shape[0] else cv2.INTER_LINEAR
    return cv2.resize(frame, (width, height), interpolation=interpolation)


def read_scaled_image(image: Path, content_size: tuple[int, int], use_cache: bool) -> np.ndarray:
    """The frame resized to training resolution, from the pre-scaled JPEG cache when asked.

    The cache (frames_WxH/ beside frames/, JPEG quality 95, ~44 dB PSNR) is built on first
    use and rebuilt when the source frame is newer than its cached copy.
    """
    cached = cached_frame_path(image, content_size)
    if use_cache and cached.exists() and cached.stat().st_mtime_ns >= image.stat().st_mtime_ns:
        scaled = cv2.imread(str(cached), cv2.IMREAD_COLOR)
        if scaled is not None:
            return cv2.cvtColor(scaled, cv2.COLOR_BGR2RGB)
    scaled = scale_image(read_image(image), content_size)
    if use_cache:
        cached.parent.mkdir(exist_ok=True)
        files.write_image_atomically(cached, cv2.cvtColor(scaled, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    return scaled


class SegmentationDataset(torch.utils.data.Dataset):
    """Yields {"image": uint8 (3, H, W) at training resolution, zero-padded bottom/right to multiples of 16,
    "mask": uint8 (source height, source width) class ids (IGNORE_INDEX where augmentation left no label),
    "index": position in samples}.

    Augmentation is seeded by (seed, epoch, index), so a sample looks the same whichever worker
    loads it: a resumed run sees exactly the images an uninterrupted one would have. The epoch is
    in shared memory, so that loader workers which outlive an epoch (persistent_workers) see the
    next one's.
    """

    def __init__(
        self,
        samples: list[Sample],
        source_size: tuple[int, int],
        scale: float = 0.5,
        augment: bool = False,
        cache_frames: bool = False,
        seed: int = 0,
        augmentation: str = "default",
    ):
        self.samples = samples
        self.seed, self.shared_epoch = seed, torch.zeros((), dtype=torch.int64).share_memory_()
        self.source_size = source_size
        self.content_size, self.padded_size = training_size(source_size, scale)
        self.cache_frames = cache_frames
        self.spatial = spatial_augmentation(augmentation) if augment else None
        self.colour = colour_augmentation(augmentation) if augment else None

    @property
    def epoch(self) -> int:
        return int(self.shared_epoch)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.shared_epoch.fill_(value)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image = read_scaled_image(sample.image, self.content_size, self.cache_frames)
        mask = read_mask(sample.mask)
        if mask.shape != self.source_size:
            raise DataError(
                f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]}, expected "
                f"{self.source_size[1]}x{self.source_size[0]}"
            )
        if self.spatial is not None:
            sample_seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
            self.spatial.set_random_seed(sample_seed)
            self.colour.set_random_seed(sample_seed)
            augmented = self.spatial(image=image, mask=mask)
            image = self.colour(image=augmented["image"])["image"]
            mask = augmented["mask"]
        padded = np.zeros((*self.padded_size, 3), dtype=np.uint8)
        padded[: image.shape[0], : image.shape[1]] = image
        return {
            "image": torch.from_numpy(padded).permute(2, 0, 1).contiguous(),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)),
            "index": index,
        }
