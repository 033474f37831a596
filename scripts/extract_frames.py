"""Write frame i of every video_left.avi as frames/{i:09d}.png, exactly as sequential decoding sees it.

Each video is decoded once from the start, counting frames with grab(); only the wanted
frames are retrieved and written. Seeking (CAP_PROP_POS_FRAMES, PyAV seek, ffmpeg -ss)
and timestamp-based indexing land on neighbouring frames for inter-frame codecs, so they
are not used. Writes go to a temporary name and are renamed, so a killed run never leaves
a truncated frame that looks finished, and a re-run only decodes videos with frames missing.
"""
import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import cv2
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dataset import write_image_atomically  # noqa: E402

FRAMES_PER_MASK = 60  # masks are 1 Hz in a 60 fps video
RATES = {"labelled": None, "1": 60, "10": 6, "all": 1}


def wanted_frames(video_dir: Path, rate: str, frame_count: int) -> list[int]:
    """Frame indices to extract: those with a mask, or every k-th frame of the video."""
    if rate == "labelled":
        return sorted(int(p.stem) for p in (video_dir / "segmentation").glob("*.png"))
    return list(range(0, frame_count, RATES[rate]))


def extract_video(video_path: Path, rate: str, output_name: str = "frames") -> tuple[int, int]:
    """Extract the wanted frames of one video; returns (written, already present)."""
    video_dir = video_path.parent
    capture = cv2.VideoCapture(str(video_path))
    if not capture.isOpened():
        raise RuntimeError(f"{video_path}: cannot open the video (missing codec or corrupt file)")
    frame_count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    wanted = wanted_frames(video_dir, rate, frame_count)
    output_dir = video_dir / output_name
    missing = {i for i in wanted if not (output_dir / f"{i:09d}.png").exists()}
    if not missing:
        capture.release()
        return 0, len(wanted)
    output_dir.mkdir(exist_ok=True)
    last = max(missing)
    index = 0
    try:
        while index <= last:
            if not capture.grab():
                raise RuntimeError(
                    f"{video_path}: the video ends at frame {index}, but frame {last} is wanted"
                )
            if index in missing:
                ok, frame = capture.retrieve()
                if not ok:
                    raise RuntimeError(f"{video_path}: cannot decode frame {index}")
                write_image_atomically(output_dir / f"{index:09d}.png", frame)
            index += 1
    finally:
        capture.release()
    return len(missing), len(wanted) - len(missing)


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Extract frame-accurate PNG frames from every video_left.avi under DATA_DIR "
        "into video_XX/frames/{i:09d}.png (frame i of the video).")
    parser.add_argument("data_dir", nargs="?", default="sarrarp",
                        help="folder searched recursively for video_left.avi (default: sarrarp)")
    parser.add_argument("--rate", choices=list(RATES), default="labelled",
                        help="labelled: only frames that have a mask in segmentation/ (default); "
                        "1 / 10: one / ten frames per second; all: every frame")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(),
                        help="videos decoded in parallel (default: number of CPU cores)")
    parser.add_argument("--output-name", default="frames",
                        help="folder name beside video_left.avi (default: frames; the official toolkit uses rgb)")
    args = parser.parse_args()
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        parser.error(f"{data_dir} is not a folder: unpack the dataset first (scripts/unpack_sarrarp.sh)")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    videos = sorted(data_dir.rglob("video_left.avi"))
    if not videos:
        parser.error(f"no video_left.avi found under {data_dir}")

    failures, written, present = [], 0, 0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(extract_video, video, args.rate, args.output_name): video for video in videos}
        progress = tqdm(as_completed(futures), total=len(futures), unit="video", desc="extracting frames")
        for future in progress:
            try:
                new, old = future.result()
                written, present = written + new, present + old
            except Exception as error:  # one bad video must not stop the others
                failures.append(str(error))
                progress.write(f"error: {error}")
    print(f"{len(videos) - len(failures)}/{len(videos)} videos done: {written} frames written, "
          f"{present} already present")
    if failures:
        print(f"{len(failures)} video(s) failed:", *failures, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
