"""Write frame i of every video_left.avi as frames/{i:09d}.png, exactly as sequential decoding sees it.

Each video is decoded once from the start to its end, counting frames with grab(); only the wanted
frames are retrieved and written. Seeking (CAP_PROP_POS_FRAMES, PyAV seek, ffmpeg -ss) and
timestamp-based indexing land on neighbouring frames for inter-frame codecs, so they are not used.
A video whose decoded frame count differs from its container's is damaged (the frames after the
damage would be misnumbered): its frames of this run are deleted and it is reported. Writes go to
a temporary name and are renamed, so a killed run never leaves a truncated frame that looks
finished. frames/.extracted.json records which video file the frames came from: a re-run skips a
video whose frames are all there, and rewrites them all when the video file has changed.
"""

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import progress_bars  # noqa: E402
from discovery import MASK_NAME, frame_index, video_masks  # noqa: E402
from files import find_folders, remove_partial_files, write_image_atomically, write_json_atomically  # noqa: E402

RATES = {"labelled": None, "1": 60, "10": 6, "all": 1}
RECORD = ".extracted.json"  # in the output folder: the video file its frames were decoded from
SAMPLED_CHUNKS, CHUNK_BYTES = 64, 1 << 16


class ExtractionError(RuntimeError):
    """A video that cannot be extracted correctly; the message names it and says what to do."""


def wanted_frames(video_dir: Path, rate: str, frame_count: int) -> list[int]:
    """Frame indices to extract: those with a mask, or every k-th frame of the video."""
    if rate == "labelled":
        return [frame_index(mask) for mask in video_masks(video_dir)]
    return list(range(0, frame_count, RATES[rate]))


def video_identity(video_path: Path) -> dict:
    """Size, modification time and a digest of 64 chunks spread over the file: a replaced video differs."""
    size = video_path.stat().st_size
    digest = hashlib.sha256()
    with open(video_path, "rb") as video:
        for k in range(SAMPLED_CHUNKS):
            video.seek(size * k // SAMPLED_CHUNKS)
            digest.update(video.read(CHUNK_BYTES))
    return {"size": size, "mtime_ns": video_path.stat().st_mtime_ns, "sampled_sha256": digest.hexdigest()}


def read_record(output_dir: Path) -> dict | None:
    try:
        return json.loads((output_dir / RECORD).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def decoder_messages():
    """Collect what the decoder (FFmpeg inside OpenCV, which writes to file descriptor 2) says meanwhile."""
    lines = []
    with tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines += [line for line in sink.read().decode(errors="replace").splitlines() if line.strip()]


def decode_into(capture, video_path: Path, missing: set[int], output_dir: Path, written: list[Path]) -> int:
    """Decode the whole video, writing the missing frames (appended to written); returns the frames decoded."""
    index = 0
    while capture.grab():
        if index in missing:
            ok, frame = capture.retrieve()
            if not ok:
                raise ExtractionError(
                    f"{video_path}: cannot decode frame {index}: the file is damaged; download it again"
                )
            path = output_dir / f"{index:09d}.png"
            write_image_atomically(path, frame)
            written.append(path)
        index += 1
    return index


def extract_video(video_path: Path, rate: str, output_name: str = "frames") -> tuple[int, int, list[str]]:
    """Extract the wanted frames of one video; returns (written, already present, warnings)."""
    video_dir = video_path.parent
    output_dir = video_dir / output_name
    capture = cv2.VideoCapture(str(video_path))
    if not capture.isOpened():
        raise ExtractionError(f"{video_path}: cannot open the video (missing codec or corrupt file)")
    try:
        frame_count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        wanted = wanted_frames(video_dir, rate, frame_count)
        identity, record = video_identity(video_path), read_record(output_dir)
        same_video = record is not None and record.get("video") == identity
        missing = {i for i in wanted if not same_video or not (output_dir / f"{i:09d}.png").exists()}
        if not missing:
            return 0, len(wanted), []
        output_dir.mkdir(exist_ok=True)
        remove_partial_files(output_dir)
        if record is not None and not same_video:  # every frame came from an earlier version of the video
            (output_dir / RECORD).unlink()
            for stale in output_dir.glob("*.png"):
                stale.unlink() if MASK_NAME.fullmatch(stale.name) else None
        written = []
        with decoder_messages() as messages:
            decoded = decode_into(capture, video_path, missing, output_dir, written)
    finally:
        capture.release()
    damage = None
    if frame_count > 0 and decoded != frame_count:
        damage = f"decoded {decoded} frames but its container lists {frame_count}: the file is damaged or truncated"
    elif max(missing) >= decoded:
        damage = f"it has {decoded} frames, but frame {max(missing)} is wanted (by its mask): is it the right video?"
    if damage:
        for path in written:  # frames after a gap would carry the wrong index: none rather than wrong ones
            path.unlink()
        raise ExtractionError(f"{video_path}: {damage}; download it again (none of its frames were kept)")
    problems = [] if frame_count > 0 else ["its container states no frame count, so dropped frames cannot be detected"]
    if messages:
        problems.append(
            f"the decoder reported {len(messages)} problem(s), e.g. {messages[0].strip()!r}: check the "
            "frames, or download the video again"
        )
    write_json_atomically(output_dir / RECORD, {"video": identity, "frame_count": decoded})
    return len(missing), len(wanted) - len(missing), [f"{video_path}: {problem}" for problem in problems]


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Extract frame-accurate PNG frames from every video_left.avi under DATA_DIR "
        "into video_XX/frames/{i:09d}.png (frame i of the video)."
    )
    parser.add_argument(
        "data_dir",
        nargs="?",
        default="sarrarp",
        help="folder searched recursively (symbolic links followed) for video_left.avi (default: sarrarp)",
    )
    parser.add_argument(
        "--rate",
        choices=list(RATES),
        default="labelled",
        help="labelled: only frames that have a mask in segmentation/ (default); "
        "1 / 10: one / ten frames per second; all: every frame",
    )
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count(), help="videos decoded in parallel (default: number of CPU cores)"
    )
    parser.add_argument(
        "--output-name",
        default="frames",
        help="folder name beside video_left.avi (default: frames; the official toolkit uses rgb)",
    )
    args = parser.parse_args()
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        parser.error(f"{data_dir} is not a folder: unpack the dataset first (scripts/unpack_sarrarp.sh)")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    videos = [
        folder / "video_left.avi" for folder in find_folders(data_dir, lambda f: (f / "video_left.avi").is_file())
    ]
    if not videos:
        parser.error(f"no video_left.avi found under {data_dir}")

    failures, written, present = [], 0, 0
    # Ctrl-C reaches the main process only: it stops the workers itself (their frames are written under temporary
    # names, which the next run removes) and says so in one line.
    with ProcessPoolExecutor(
        max_workers=args.jobs, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)
    ) as pool:
        futures = {pool.submit(extract_video, video, args.rate, args.output_name): video for video in videos}
        progress = progress_bars.bar(as_completed(futures), total=len(futures), unit="video", desc="extracting frames")
        try:
            for future in progress:
                try:
                    new, old, warnings = future.result()
                    written, present = written + new, present + old
                    for warning in warnings:
                        progress.write(f"warning: {warning}", file=sys.stderr)
                except Exception as error:  # one bad video must not stop the others
                    failures.append(str(error))
                    progress.write(f"error: {error}", file=sys.stderr)
        except KeyboardInterrupt:
            progress.close()
            pool.shutdown(wait=False, cancel_futures=True)
            for worker in multiprocessing.active_children():
                worker.terminate()
            print(
                "error: interrupted; the frames written so far are kept, run the same command again to finish",
                file=sys.stderr,
            )
            return 130
    print(
        f"{len(videos) - len(failures)}/{len(videos)} videos done: {written} frames written, {present} already present"
    )
    if failures:
        print(f"{len(failures)} video(s) failed:", *failures, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
