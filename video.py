"""Video in, overlay video out: frame-exact sequential decoding and H.264 encoding on threads, so that decoding, the
model and encoding overlap and memory stays bounded on an hour-long 1080p recording."""
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np

import dataset as D

VIDEO_SUFFIXES = (".avi", ".mp4", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
QUEUE_FRAMES = 16  # frames decoded ahead of the model, and drawn frames waiting for the encoder
MAX_WAITING = 64  # frames held for the prediction they show (with --every): about 400 MB at 1080p
# superfast: ~57 frames/s of 1080p on 2 cores (veryfast ~43, at 40% of the size; ultrafast ~78, at 2.3x the size)
H264_SETTINGS = ["-preset", "superfast", "-crf", "20", "-movflags", "+faststart", "-f", "mp4"]
END = None  # what a queue holds after the last frame
UNTIL_THE_END = 2**62


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
            raise D.DataError(f"{path} is not a video OpenCV can read, or has no frames")
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
        raise D.DataError(f"--start {start_s:g} s is past the end of the video ({info.frames / info.fps:.1f} s)")
    if stop <= first:
        raise D.DataError(f"no frame starts between {start_s:g} s and {end_s:g} s at {info.fps:g} fps")
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
                raise OSError(f"the {consumer.name} thread stopped early")
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
                    raise D.DataError(f"{path}: frame {index} cannot be decoded")
                frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                if not put(out, (index, frame, prepare(index, frame)), halt):
                    return
            index += 1
        put(out, END, halt)
    finally:
        capture.release()


def encode_frames(path: Path, size: tuple[int, int], fps: float, draw, jobs: queue.Queue, halt: threading.Event) -> int:
    """Draw each queued job (draw(job) -> RGB frame) and encode it into an H.264 MP4 at path; returns the count."""
    height, width = size
    writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=fps, codec="libx264", quality=None,
                                         macro_block_size=2, ffmpeg_log_level="error", output_params=H264_SETTINGS)
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
            writer.send(np.ascontiguousarray(draw(job)))
            count += 1
    finally:
        writer.close()
    return count


def list_images(folder: Path) -> list[Path]:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise D.DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return images


def is_video(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES


def check_writable(folder: Path) -> None:
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise D.DataError(f"cannot write to {folder}: {existing} is not a writable directory")


def check_input(path: Path) -> None:
    if not path.exists():
        raise D.DataError(f"--input {path} does not exist")
    if not (path.is_dir() or is_video(path)):
        raise D.DataError(f"--input {path} is neither a video ({', '.join(VIDEO_SUFFIXES)}) nor a folder of images")




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


def segment_video(source: Path, info: VideoInfo, first: int, stop: int, every: int, prepare, predict_batch,
                  batch_size: int, draw, overlay_path: Path, save_mask, progress) -> int:
    """Decode frames first..stop-1 on one thread, predict every every-th (index % every == 0) in batches here, draw
    each frame with the latest prediction and encode it on another; returns the frames written.

    prepare(frame) -> the model's inputs of a frame, run on the decode thread; predict_batch([inputs]) -> [labels];
    save_mask(index, labels); draw((frame, labels or None)) -> RGB frame. Frames wait for the prediction they show
    (at most MAX_WAITING of them), so memory is bounded whatever the video's length."""
    halt = threading.Event()
    decoded, drawn = queue.Queue(QUEUE_FRAMES), queue.Queue(QUEUE_FRAMES)
    decoder = Stage(lambda: decode_frames(source, first, stop, lambda i, f: prepare(f) if i % every == 0 else None,
                                          decoded, halt), "decode")
    written = []
    encoder = Stage(lambda: written.append(encode_frames(overlay_path, info.size, info.fps, draw, drawn, halt)), "encode")
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
        halt.set()
    return written[0]
