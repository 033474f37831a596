"""Any video or folder of images in (run_inference.py --input), overlays and masks out: frame-exact sequential
decoding and H.264 encoding on threads, so that decoding, the model and encoding overlap and memory stays bounded on
an hour-long 1080p recording."""

import logging
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np
import torch

import dataset
import files
import inference
import outputs
import plots
import progress_bars
from discovery import MASK_NAME

VIDEO_SUFFIXES = (".avi", ".mp4", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
QUEUE_FRAMES = 16  # frames decoded ahead of the model, and drawn frames waiting for the encoder
MAX_WAITING = 64  # frames held for the prediction they show (with --every): about 400 MB at 1080p
# superfast: ~57 frames/s of 1080p on 2 cores (veryfast ~43, at 40% of the size; ultrafast ~78, at 2.3x the size)
H264_SETTINGS = ["-preset", "superfast", "-crf", "20", "-movflags", "+faststart", "-f", "mp4"]
END = None  # what a queue holds after the last frame
UNTIL_THE_END = 2**62
# imageio-ffmpeg warns when a writer closes before its first frame (Ctrl-C, a failed decode): such an overlay is never
# kept and our own one line says why
logging.getLogger("imageio_ffmpeg").addFilter(lambda record: "No frames have been written" not in record.getMessage())


@dataclass
class VideoInfo:
    frames: int  # as the container says; decoding counts the real ones
    fps: float
    size: tuple[int, int]  # (height, width)


def probe_video(path: Path) -> VideoInfo:
    """Frame count, rate and size; one line if OpenCV cannot decode a first frame."""
    capture = cv2.VideoCapture(str(path))
    try:
        ok, frame = capture.read() if capture.isOpened() else (False, None)
        if not ok:
            raise dataset.DataError(f"{path} is not a video OpenCV can read, or has no frames")
        fps = capture.get(cv2.CAP_PROP_FPS)
        return VideoInfo(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), fps if fps > 0 else 30.0, frame.shape[:2])
    finally:
        capture.release()


def frame_range(info: VideoInfo, start_s: float, end_s: float | None) -> tuple[int, int]:
    """[first, stop) frame indices of the seconds [start_s, end_s); without end_s, stop is "until decoding ends" (a
    container's frame count may be missing or wrong)."""
    first = round(start_s * info.fps)
    stop = UNTIL_THE_END if end_s is None else round(end_s * info.fps)
    if info.frames > 0 and first >= info.frames:
        raise dataset.DataError(f"--start {start_s:g} s is past the end of the video ({info.frames / info.fps:.1f} s)")
    if stop <= first:
        raise dataset.DataError(f"no frame starts between {start_s:g} s and {end_s:g} s at {info.fps:g} fps")
    return first, stop


class Stage(threading.Thread):
    """A daemon thread whose failure is re-raised by join_checked: an error in decoding or encoding stops the run."""

    def __init__(self, work, name):
        super().__init__(name=name, daemon=True)
        self.work, self.error = work, None

    def run(self):
        try:
            self.work()
        except BaseException as error:  # noqa: B036 (re-raised in the main thread)
            self.error = error

    def join_checked(self):
        self.join()
        if self.error is not None:
            raise self.error


def put(q: queue.Queue, item, halt: threading.Event, consumer: Stage | None = None) -> bool:
    """Put unless the run is stopping (then False), never blocking forever on a queue nobody drains: a consumer
    that died raises its error here."""
    while not halt.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            if consumer is not None and not consumer.is_alive():
                consumer.join_checked()
                raise OSError(f"the {consumer.name} thread stopped early") from None
    return False


def decode_frames(path: Path, first: int, stop: int, prepare, out: queue.Queue, halt: threading.Event) -> None:
    """Put (index, RGB frame, prepare(index, frame)) for frames first..stop-1, in order, then END. Sequential decoding
    with grab(), retrieve() only from first on: seeking and timestamps are not frame-exact in inter-frame codecs."""
    capture = cv2.VideoCapture(str(path))
    try:
        index = 0
        while index < stop and capture.grab():
            if index >= first:
                ok, frame = capture.retrieve()
                if not ok:
                    raise dataset.DataError(f"{path}: frame {index} cannot be decoded")
                frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                if not put(out, (index, frame, prepare(index, frame)), halt):
                    return
            index += 1
        put(out, END, halt)
    finally:
        capture.release()


def encoded_size(size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the overlay video of frames of size: each side rounded up to even."""
    return tuple(side + side % 2 for side in size)


def encode_frames(path: Path, size: tuple[int, int], fps: float, draw, jobs: queue.Queue, halt: threading.Event) -> int:
    """Draw each queued job (draw(job) -> RGB frame) and encode it into an H.264 MP4 at path; returns the count. H.264
    (yuv420p) needs even sides: an odd side is padded by a black pixel, never rescaled (encoded_size)."""
    (height, width), (even_height, even_width) = size, encoded_size(size)
    padding = ((0, even_height - height), (0, even_width - width), (0, 0))
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (even_width, even_height),
        fps=fps,
        codec="libx264",
        quality=None,
        macro_block_size=2,
        ffmpeg_log_level="error",
        output_params=H264_SETTINGS,
    )
    writer.send(None)  # starts ffmpeg
    count = 0
    try:
        while not halt.is_set():
            try:
                job = jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            if job is END:
                break
            writer.send(np.ascontiguousarray(np.pad(draw(job), padding)))
            count += 1
    finally:
        writer.close()
    return count


def list_images(folder: Path) -> list[Path]:
    """The images of a folder; two that share a name (a.png, a.jpg) are refused: their masks would be one file."""
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise dataset.DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    by_name = {}
    for image in images:
        if image.stem in by_name:
            raise dataset.DataError(
                f"{by_name[image.stem]} and {image} share a name, and would share a mask: rename one"
            )
        by_name[image.stem] = image
    return images


def is_video(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES


def check_writable(folder: Path) -> None:
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise dataset.DataError(f"cannot write to {folder}: {existing} is not a writable directory")


def check_input(path: Path) -> None:
    if not path.exists():
        raise dataset.DataError(f"--input {path} does not exist")
    if not (path.is_dir() or is_video(path)):
        raise dataset.DataError(
            f"--input {path} is neither a video ({', '.join(VIDEO_SUFFIXES)}) nor a folder of images"
        )


def get(q: queue.Queue, producer: Stage):
    """The next item, or the producer's error if it died without finishing."""
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            if not producer.is_alive():
                producer.join_checked()
                if q.empty():
                    return END


def segment_video(
    source: Path,
    info: VideoInfo,
    first: int,
    stop: int,
    *,
    every: int,
    prepare,
    predict_batch,
    batch_size: int,
    draw,
    overlay_path: Path,
    save_mask,
    progress,
) -> int:
    """Decode frames first..stop-1 on one thread, predict every every-th (index % every == 0) in batches here, draw
    each frame with the latest prediction and encode it on another; returns the frames written.

    prepare(frame) -> the model's inputs of a frame, run on the decode thread; predict_batch([inputs]) -> [labels];
    save_mask(index, labels); draw((frame, labels or None)) -> RGB frame. Frames wait for the prediction they show
    (at most MAX_WAITING of them), so memory is bounded whatever the video's length."""
    halt = threading.Event()
    decoded, drawn = queue.Queue(QUEUE_FRAMES), queue.Queue(QUEUE_FRAMES)
    inputs_of = lambda index, frame: prepare(frame) if index % every == 0 else None  # noqa: E731
    decoder = Stage(lambda: decode_frames(source, first, stop, inputs_of, decoded, halt), "decode")
    written = []
    encoder = Stage(
        lambda: written.append(encode_frames(overlay_path, info.size, info.fps, draw, drawn, halt)), "encode"
    )
    decoder.start()
    encoder.start()
    latest, waiting = None, []

    def flush():
        nonlocal latest
        batch = [inputs for _, _, inputs in waiting if inputs is not None]
        predicted = iter(predict_batch(batch) if batch else [])
        for index, frame, inputs in waiting:
            if inputs is not None:
                latest = next(predicted)
                save_mask(index, latest)
            put(drawn, (frame, latest), halt, encoder)
            progress.update(1)
        waiting.clear()

    try:
        while (item := get(decoded, decoder)) is not END:
            waiting.append(item)
            if sum(inputs is not None for _, _, inputs in waiting) == batch_size or len(waiting) >= MAX_WAITING:
                flush()
        flush()
        put(drawn, END, halt, encoder)
        encoder.join_checked()
        decoder.join_checked()
    finally:
        halt.set()  # on an error or Ctrl-C: both threads stop, the decoder releases the video, ffmpeg is closed
        decoder.join()
        encoder.join()
    return written[0]


# ----------------------------------------------------------------------------- segmenting an input


def frame_predictor(args, plan: inference.Plan, source_size):
    """predict_batch([inputs]) -> [labels (H, W) uint8 at the source size] for consecutive frames, each inputs the
    frame at every content size of the plan; with --temporal-smoothing, the argmax of the running mean of the
    softmax."""
    passes, autocast = plan.passes, plan.autocast
    smoothed = None

    def predict_batch(batch):
        nonlocal smoothed
        inputs = [
            torch.from_numpy(np.stack([frame[k] for frame in batch])).permute(0, 3, 1, 2).to(plan.device)
            for k in range(len(batch[0]))
        ]
        if not args.temporal_smoothing:
            labels = list(inference.predict(passes, inputs, source_size, autocast).cpu().numpy())
        else:
            labels = []
            for probabilities in inference.mean_probabilities(passes, inputs, source_size, autocast):
                smoothed = (
                    probabilities.clone()  # its own memory: a view would keep the whole batch alive
                    if smoothed is None
                    else smoothed.mul_(args.temporal_smoothing).add_(probabilities, alpha=1 - args.temporal_smoothing)
                )
                labels.append(smoothed.argmax(0).to(torch.uint8).cpu().numpy())
        if args.min_component_size:
            labels = [
                inference.remove_small_components(frame_labels, args.min_component_size) for frame_labels in labels
            ]
        return labels

    return predict_batch


def segment_video_file(args, source: Path, out: outputs.OutputFolder) -> None:
    info = probe_video(source)
    first, stop = frame_range(info, args.start, args.end)
    members = inference.load_members(args)  # every check before anything on disk changes
    masks = [p for p in (out.path / "masks").glob("*.png") if MASK_NAME.fullmatch(p.name)] if args.save_masks else []
    predicted = [f"masks/{p.name}" for p in masks if first <= int(p.stem) < stop and int(p.stem) % args.every == 0]
    out.claim(["overlay.mp4", outputs.PROVENANCE_FILE, *predicted])
    plan = inference.plan_passes(args, members, info.size, args.batch_size)
    (out.staging / "masks").mkdir(exist_ok=True)

    def save_mask(index, labels):
        if args.save_masks:
            files.write_image_atomically(out.staging / "masks" / f"{index:09d}.png", labels)

    model = dict(
        prepare=lambda frame: [dataset.scale_image(frame, size) for size in plan.sizes],
        predict_batch=frame_predictor(args, plan, info.size),
    )
    written = write_overlay(args, source, info, (first, stop), out, save_mask, **model)
    check_frame_count(source, info, first, stop, written)
    record = {
        "input": str(source),
        "fps": info.fps,
        "size": list(info.size),
        "frames": [first, first + written],
        "every": args.every,
        "temporal_smoothing": args.temporal_smoothing,
        "masks": args.save_masks,
    }
    provenance = {**inference.inference_record(args, members, plan.precision), **record}
    files.write_json_atomically(out.staging / outputs.PROVENANCE_FILE, provenance)
    out.commit(replaced=("overlay.mp4", *(["masks/"] if args.save_masks else [])))
    shown = f"; masks: {out.path / 'masks'}/" if args.save_masks else ""
    (height, width), (even_height, even_width) = info.size, encoded_size(info.size)
    size = f"{width}x{height}" + (
        f", padded to {even_width}x{even_height} for H.264" if height % 2 or width % 2 else ""
    )
    print(f"overlay: {out.path / 'overlay.mp4'} ({written} frames at {info.fps:g} fps, {size}){shown}")


def check_frame_count(source: Path, info: VideoInfo, first: int, stop: int, written: int) -> None:
    """Refuse a video that decodes to another frame count than its container says: frames lost to damage or a cut-off
    file would give every later mask the index of another frame. A source that states no count is taken as decoded."""
    if info.frames <= 0:
        return
    expected = min(stop, info.frames) - first
    if written < expected or (stop == UNTIL_THE_END and written != expected):
        raise dataset.DataError(
            f"{source} decodes to {first + written} frames but its container says {info.frames}: it is damaged or "
            "truncated, so the masks would carry wrong frame indices (nothing was written); repair or re-export it"
        )


def write_overlay(
    args, source: Path, info: VideoInfo, frames: tuple, out: outputs.OutputFolder, save_mask, **model
) -> int:
    """segment_video into the staging folder's overlay.mp4 (moved into place only once complete); model: prepare and
    predict_batch."""
    first, stop = frames
    total = min(stop, info.frames) - first if info.frames > 0 else None
    with progress_bars.bar(total=total, desc=f"segmenting {source.name}", unit="frame") as progress:
        try:
            written = segment_video(
                source,
                info,
                first,
                stop,
                every=args.every,
                batch_size=args.batch_size,
                draw=plots.video_frame,
                overlay_path=out.staging / "overlay.mp4",
                save_mask=save_mask,
                progress=progress,
                **model,
            )
        except files.WriteError:
            raise  # a mask's, naming its file
        except OSError as error:  # the encoder's: a full disk, an ffmpeg that died
            final = out.path / "overlay.mp4"
            raise files.WriteError(f"could not write {final} ({files.why_not_written(final, error)})") from None
    if not written:
        raise dataset.DataError(f"{source} has no frames from {args.start:g} s on")
    return written


def segment_image_folder(args, source: Path, out: outputs.OutputFolder) -> None:
    images = list_images(source)
    members = inference.load_members(args)
    names = [p.stem for p in images]
    out.claim([f"masks/{n}.png" for n in names] + [f"overlays/{n}.jpg" for n in names] + [outputs.PROVENANCE_FILE])
    for folder in ("masks", "overlays"):
        (out.staging / folder).mkdir()
    plans = {}  # by image size
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        decoded = zip(images, pool.map(dataset.read_image, images))
        for path, frame in progress_bars.bar(
            decoded, total=len(images), desc=f"segmenting {source.name}", unit="image"
        ):
            size = frame.shape[:2]
            if size not in plans:
                plans[size] = inference.plan_passes(args, members, size, batch_size=1)
            predict_one = frame_predictor(args, plans[size], size)
            labels = predict_one([[dataset.scale_image(frame, content) for content in plans[size].sizes]])[0]
            files.write_image_atomically(out.staging / "masks" / f"{path.stem}.png", labels)
            overlay = cv2.cvtColor(plots.video_frame((frame, labels)), cv2.COLOR_RGB2BGR)
            files.write_image_atomically(
                out.staging / "overlays" / f"{path.stem}.jpg", overlay, (cv2.IMWRITE_JPEG_QUALITY, 90)
            )
    record = {
        **inference.inference_record(args, members, next(iter(plans.values())).precision),
        "input": str(source),
        "images": [p.name for p in images],
    }
    files.write_json_atomically(out.staging / outputs.PROVENANCE_FILE, record)
    out.commit(replaced=("masks/", "overlays/"))
    print(f"masks: {out.path / 'masks'}/, overlays: {out.path / 'overlays'}/ ({len(images)} images)")


def segment_input(args) -> None:
    """--input: a video or a folder of images, with no ground truth."""
    source = Path(args.input)
    check_input(source)
    name = source.stem if source.is_file() else source.name
    path = Path(args.output or Path(args.output_home) / "predictions" / name)
    check_writable(path)
    inputs = {"the --input": source, **inference.model_files(args.model_directory)}
    with outputs.OutputFolder(path, inputs) as out:
        (segment_video_file if source.is_file() else segment_image_folder)(args, source, out)
