"""Frame extraction: every frame to PNG with ffmpeg vs our labelled-frame extraction vs plain decoding.

    .venv/bin/python benchmarks/bench_extraction.py [--seconds 60] [--workdir DIR] [--keep]
        [--repeats 2] [--preset veryfast] [--incorrect-baseline]

Renders a synthetic 1920x1080, 60 fps, H.264 (CRF 23, keyframe every 250 frames, B-frames)
video_left.avi that looks like surgery (scripts/make_demo_data.py's scene at 1080p: panning
tissue texture, tools, needle, thread, clips, sensor noise), with masks for frames 0, 60, ...
in the release layout (video_01/video_left.avi, video_01/segmentation/*.png). Then, each into a
fresh output folder:
  (a) the design we start from: ffmpeg writes every frame as a PNG
      (ffmpeg -i video_left.avi -fps_mode passthrough -start_number 0 OUT/%09d.png);
  (b) our extraction, as users run it: scripts/extract_frames.py DATA --rate labelled --jobs 1
      (one sequential decode with grab(), retrieve() + PNG write on labelled frames only);
  (c) the floor: one sequential OpenCV decode of the whole video without writing anything,
      with grab() (what (b) does between labelled frames) and with read() (for reference).
(b) and (c) run --repeats times, before and after (a), and their mean is used (single runs on
a shared machine vary by ~20%). Every frame (b) wrote is compared with frame i of a sequential
cv2 read(); (a)'s files are compared the same way. The figures are printed, never asserted:
report the measured ratios as they are.
"""
import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import make_demo_data as demo  # noqa: E402

WIDTH, HEIGHT, FPS = 1920, 1080, 60
FRAMES_PER_MASK = 60
TARGET_TIME, TARGET_DISK, TARGET_FLOOR = 30.0, 55.0, 1.5  # from the issue


def ffmpeg_exe() -> str:
    try:
        import imageio_ffmpeg
        return imageio_ffmpeg.get_ffmpeg_exe()
    except ImportError:
        found = shutil.which("ffmpeg")
        if not found:
            sys.exit("needs ffmpeg with libx264: pip install imageio-ffmpeg, or ffmpeg on PATH")
        return found


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_command(command: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, all threads and child processes) of a command."""
    cpu, start = child_cpu(), time.perf_counter()
    subprocess.run(command, check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - start, child_cpu() - cpu


def pngs(folder: Path) -> tuple[int, int]:
    """(file count, bytes) of the PNGs in folder."""
    files = list(folder.glob("*.png"))
    return len(files), sum(f.stat().st_size for f in files)


# ----------------------------------------------------------------------------- the test video

def make_video(video_dir: Path, seconds: int, preset: str, crf: int, seed: int) -> float:
    """Render the video through ffmpeg/libx264 and write masks of frames 0, 60, ...; returns seconds taken."""
    start = time.perf_counter()
    (video_dir / "segmentation").mkdir(parents=True)
    rng = np.random.default_rng([seed, 1])
    scene = demo.Scene(rng, WIDTH, HEIGHT, {demo.NEEDLE, demo.THREAD, demo.SUCTION, demo.CLAMPS})
    command = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{WIDTH}x{HEIGHT}", "-r", str(FPS), "-i", "-",
               "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-g", "250", "-pix_fmt", "yuv420p",
               str(video_dir / "video_left.avi")]
    encoder = subprocess.Popen(command, stdin=subprocess.PIPE)
    frames = seconds * FPS
    try:
        for index in range(frames):
            image, mask = scene.frame(index / FPS, index)
            encoder.stdin.write(image.tobytes())
            if index % FRAMES_PER_MASK == 0:
                cv2.imwrite(str(video_dir / "segmentation" / f"{index:09d}.png"), mask)
            if (index + 1) % (10 * FPS) == 0 or index + 1 == frames:
                log(f"  rendered {index + 1}/{frames} frames ({time.perf_counter() - start:.0f} s)")
    finally:
        encoder.stdin.close()
        if encoder.wait() != 0:
            sys.exit(f"ffmpeg failed encoding {video_dir / 'video_left.avi'}")
    return time.perf_counter() - start


def describe_video(path: Path) -> str:
    capture = cv2.VideoCapture(str(path))
    fourcc = int(capture.get(cv2.CAP_PROP_FOURCC))
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    size = f"{int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))}x{int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))}"
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    codec = fourcc.to_bytes(4, "little").decode("ascii", "replace")
    return f"{size}, {fps:g} fps, {count} frames, fourcc {codec}, {path.stat().st_size / 1e6:.1f} MB"


# ----------------------------------------------------------------------------- the approaches

def decode_floor(video: Path, method: str, keep: set[int] | None = None) -> tuple[float, float, int, dict]:
    """Sequential decode of the whole video with grab() or read(), writing nothing.
    Returns wall s, CPU s, frames decoded and copies of the frames in keep (read() only)."""
    kept = {}
    cpu, start = time.process_time(), time.perf_counter()
    capture = cv2.VideoCapture(str(video))
    count = 0
    if method == "grab":
        while capture.grab():
            count += 1
    else:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            if keep and count in keep:
                kept[count] = frame.copy()
            count += 1
    capture.release()
    return time.perf_counter() - start, time.process_time() - cpu, count, kept


def ours(data: Path, output_name: str) -> tuple[float, float]:
    return run_command([sys.executable, str(ROOT / "scripts" / "extract_frames.py"), str(data),
                        "--rate", "labelled", "--jobs", "1", "--output-name", output_name])


def all_frames(video: Path, output: Path, limit: int | None = None) -> tuple[float, float]:
    """ffmpeg's every-frame PNG dump with its default PNG settings; limit: only the first frames."""
    output.mkdir()
    first = ["-frames:v", str(limit)] if limit else []
    return run_command([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-i", str(video),
                        "-fps_mode", "passthrough", *first, "-start_number", "0", str(output / "%09d.png")])


def incorrect_select(video: Path, output: Path) -> tuple[float, float]:
    """The notes' wrong command: select every 60th frame without -fps_mode passthrough
    (the output is re-timed to a constant rate, so ffmpeg duplicates the selected frames)."""
    output.mkdir()
    return run_command([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-i", str(video),
                        "-vf", r"select=not(mod(n\,60))", str(output / "%09d.png")])


# ----------------------------------------------------------------------------- frame accuracy

def compare(folder: Path, reference: dict, name_of) -> tuple[int, int, int, int]:
    """(exact, differing, missing, largest pixel difference) frames of folder vs the reference frames; name_of(i) gives the file name."""
    exact = differing = missing = 0
    worst = 0
    for index, frame in reference.items():
        image = cv2.imread(str(folder / name_of(index)), cv2.IMREAD_COLOR)
        if image is None:
            missing += 1
        elif image.shape == frame.shape and np.array_equal(image, frame):
            exact += 1
        else:
            differing += 1
            if image.shape == frame.shape:
                worst = max(worst, int(np.abs(image.astype(np.int16) - frame).max()))
    return exact, differing, missing, worst


def mean(values):
    return sum(values) / len(values)


def size_text(size: float) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60, help="video length at 60 fps (default: 60)")
    parser.add_argument("--workdir", type=Path, help="where the video and outputs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of (b) and (c), split before and after (a) (default: 2)")
    parser.add_argument("--preset", default="veryfast",
                        help="libx264 preset of the test video (default: veryfast; slower presets take "
                        "minutes longer to encode and decode a little more slowly)")
    parser.add_argument("--crf", type=int, default=23, help="libx264 CRF of the test video (default: 23)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--all-frames-seconds", type=int,
                        help="run (a) on the first N seconds only and scale its time, CPU, disk and files "
                        "to the whole video (PNG encoding is per frame, so the cost is linear); default: "
                        "the whole video. For when ffmpeg's PNG encoder is slow (ffmpeg 9's default "
                        "paeth prediction takes ~0.4 CPU s per 1080p frame)")
    parser.add_argument("--incorrect-baseline", action="store_true",
                        help="also time ffmpeg select every 60th frame without -fps_mode passthrough "
                        "(the command behind the issue's 440 s; as slow as (a))")
    args = parser.parse_args()
    if args.seconds < 1 or args.repeats < 1:
        parser.error("--seconds and --repeats must be at least 1")
    cv2.setNumThreads(1)  # as scripts/extract_frames.py

    return run_in_workdir(run, args, parser, prefix="bench_extraction_")


def run_in_workdir(run, args, parser, prefix: str) -> int:
    """run(args, work) in --workdir (which must be empty) or in a temporary folder, removed unless --keep."""
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        if any(args.workdir.iterdir()):
            parser.error(f"{args.workdir} is not empty")
        work = args.workdir
    else:
        work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        return run(args, work)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> int:
    data = work / "data"
    video_dir = data / "video_01"
    video = video_dir / "video_left.avi"
    print(f"{os.cpu_count()} CPUs, OpenCV {cv2.__version__}, ffmpeg {ffmpeg_exe()}")
    log(f"rendering {args.seconds} s of {WIDTH}x{HEIGHT} at {FPS} fps "
        f"(libx264 -preset {args.preset} -crf {args.crf} -g 250 -pix_fmt yuv420p) into {video}")
    generation = make_video(video_dir, args.seconds, args.preset, args.crf, args.seed)
    frames = args.seconds * FPS
    wanted = sorted(int(p.stem) for p in (video_dir / "segmentation").glob("*.png"))
    log(f"video ready in {generation:.0f} s: {describe_video(video)}; {len(wanted)} masks")

    grab, read, extraction = [], [], []
    reference = {}
    first = args.repeats - args.repeats // 2  # runs before (a); the rest after

    def measure_b_and_c(run_number: int) -> None:
        nonlocal reference
        wall, cpu, count, _ = decode_floor(video, "grab")
        if count != frames:
            sys.exit(f"grab() decoded {count} frames, expected {frames}")
        grab.append((wall, cpu))
        log(f"(c) grab() every frame, run {run_number}: {wall:.2f} s (CPU {cpu:.2f} s)")
        wall, cpu, count, kept = decode_floor(video, "read", set(wanted) if not reference else None)
        if count != frames:
            sys.exit(f"read() decoded {count} frames, expected {frames}")
        reference = reference or kept
        read.append((wall, cpu))
        log(f"(c) read() every frame, run {run_number}: {wall:.2f} s (CPU {cpu:.2f} s)")
        wall, cpu = ours(data, f"frames_run{run_number}")
        extraction.append((wall, cpu))
        log(f"(b) extract_frames.py --rate labelled --jobs 1, run {run_number}: {wall:.2f} s (CPU {cpu:.2f} s)")

    for run_number in range(1, first + 1):
        measure_b_and_c(run_number)
    partial = args.all_frames_seconds and args.all_frames_seconds < args.seconds
    limit = args.all_frames_seconds * FPS if partial else None
    log("(a) ffmpeg -i video_left.avi -fps_mode passthrough -start_number 0 OUT/%09d.png "
        + (f"on the first {limit} frames (-frames:v {limit}), scaled to {frames}" if partial
           else "(every frame; the slow part)"))
    a_wall, a_cpu = all_frames(video, video_dir / "ffmpeg_all", limit)
    a_files, a_bytes = pngs(video_dir / "ffmpeg_all")
    log(f"(a) done: {a_wall:.1f} s (CPU {a_cpu:.1f} s), {a_files} files, {size_text(a_bytes)}")
    a_measured = (a_wall, a_cpu, a_files, a_bytes)
    if partial:
        if a_files != limit:
            sys.exit(f"(a) wrote {a_files} files for the first {limit} frames")
        scale = frames / limit
        a_wall, a_cpu, a_files, a_bytes = a_wall * scale, a_cpu * scale, frames, a_bytes * scale
    for run_number in range(first + 1, args.repeats + 1):
        measure_b_and_c(run_number)

    incorrect = None
    if args.incorrect_baseline:
        log(r"(x) ffmpeg -i video_left.avi -vf select='not(mod(n\,60))' OUT/%09d.png (no passthrough)")
        x_wall, x_cpu = incorrect_select(video, video_dir / "ffmpeg_select_cfr")
        x_files, x_bytes = pngs(video_dir / "ffmpeg_select_cfr")
        incorrect = (x_wall, x_cpu, x_files, x_bytes)
        log(f"(x) done: {x_wall:.1f} s, {x_files} files")

    log("checking frame accuracy against a sequential cv2 read()")
    b_files, b_bytes = pngs(video_dir / "frames_run1")
    checks = [compare(video_dir / f"frames_run{r}", reference, lambda i: f"{i:09d}.png")
              for r in range(1, args.repeats + 1)]
    b_exact = all(c[0] == len(wanted) for c in checks)
    a_check = compare(video_dir / "ffmpeg_all", {i: f for i, f in reference.items() if i < (limit or frames)},
                      lambda i: f"{i:09d}.png")

    b_wall, b_cpu = mean([w for w, _ in extraction]), mean([c for _, c in extraction])
    g_wall, g_cpu = mean([w for w, _ in grab]), mean([c for _, c in grab])
    r_wall, r_cpu = mean([w for w, _ in read]), mean([c for _, c in read])

    def runs(values):
        return ", ".join(f"{w:.2f}" for w, _ in values)

    print()
    print(f"Video: {args.seconds} s, {describe_video(video)}; {len(wanted)} labelled frames "
          f"(0, 60, ..., {wanted[-1]}); {os.cpu_count()} CPUs, shared")
    print(f"(b) and (c): mean of {args.repeats} runs, {first} before and {args.repeats - first} after (a). "
          "CPU = user + system seconds of all threads/processes.")
    print()
    header = f"{'approach':<58}{'time s':>9}{'CPU s':>9}{'disk':>11}{'files':>7}"
    print(header)
    print("-" * len(header))
    a_label = "(a) ffmpeg, every frame to PNG (-fps_mode passthrough)" + (" *" if partial else "")
    print(f"{a_label:<58}{a_wall:>9.1f}{a_cpu:>9.1f}{size_text(a_bytes):>11}{a_files:>7}")
    if incorrect:
        x_wall, x_cpu, x_files, x_bytes = incorrect
        print(f"{'(x) ffmpeg select every 60th, no passthrough (wrong)':<58}{x_wall:>9.1f}{x_cpu:>9.1f}"
              f"{size_text(x_bytes):>11}{x_files:>7}")
    print(f"{'(b) extract_frames.py --rate labelled --jobs 1':<58}{b_wall:>9.2f}{b_cpu:>9.2f}"
          f"{size_text(b_bytes):>11}{b_files:>7}")
    print(f"{'(c) floor: cv2 grab() every frame, no writes':<58}{g_wall:>9.2f}{g_cpu:>9.2f}{'-':>11}{'-':>7}")
    print(f"{'    reference: cv2 read() every frame, no writes':<58}{r_wall:>9.2f}{r_cpu:>9.2f}{'-':>11}{'-':>7}")
    print(f"single runs, s: (b) {runs(extraction)}; grab() {runs(grab)}; read() {runs(read)}")
    if partial:
        w, c, n, size = a_measured
        print(f"* (a) measured on the first {n} frames: {w:.1f} s, CPU {c:.1f} s, {size_text(size)}; "
              f"scaled x{frames / n:g} to the whole video ({w / n * 1000:.0f} ms, CPU {c / n * 1000:.0f} ms, "
              f"{size / n / 1e6:.2f} MB per frame)")
    else:
        print(f"(a) per frame: {a_wall / a_files * 1000:.0f} ms, CPU {a_cpu / a_files * 1000:.0f} ms, "
              f"{a_bytes / a_files / 1e6:.2f} MB; (b) per labelled frame: {b_bytes / b_files / 1e6:.2f} MB")
    print()
    time_ratio, disk_ratio, floor_ratio = a_wall / b_wall, a_bytes / b_bytes, b_wall / g_wall

    def verdict(ok):
        return "met" if ok else "NOT met"

    print(f"{'ratio':<46}{'measured':>10}{'CPU':>8}{'target':>10}")
    print(f"{'(a)/(b) time':<46}{time_ratio:>9.1f}x{a_cpu / b_cpu:>7.1f}x{'>= 30x':>10}  "
          f"{verdict(time_ratio >= TARGET_TIME)}")
    print(f"{'(a)/(b) disk':<46}{disk_ratio:>9.1f}x{'':>8}{'>= 55x':>10}  {verdict(disk_ratio >= TARGET_DISK)}")
    print(f"{'(b)/(c) time vs grab() floor':<46}{floor_ratio:>9.2f}x{b_cpu / g_cpu:>7.2f}x{'<= 1.5x':>10}  "
          f"{verdict(floor_ratio <= TARGET_FLOOR)}")
    print(f"{'(b)/read() time':<46}{b_wall / r_wall:>9.2f}x{b_cpu / r_cpu:>7.2f}x")
    print(f"{'(a)/(b) files':<46}{a_files / b_files:>9.1f}x")
    if incorrect:
        print(f"{'(x)/(b) time (wrong baseline)':<46}{incorrect[0] / b_wall:>9.1f}x")
    print(f"upper bound on (a)/(b) time for one video: (a)/(c grab) = {a_wall / g_wall:.1f}x "
          "(a frame-accurate extraction of an inter-frame video decodes it all)")
    print()
    print(f"frame accuracy of (b) vs sequential cv2 read(), {len(wanted)} labelled frames x {args.repeats} runs: "
          + ("pixel-identical" if b_exact else "MISMATCH ") +
          "; ".join(f"run {r}: {e} exact, {d} differ (max |diff| {w}), {m} missing"
                    for r, (e, d, m, w) in enumerate(checks, 1) if not b_exact))
    e, d, m, w = a_check
    checked = "labelled frames it wrote" if partial else "files"
    print(f"(a) {checked} NNNNNNNNN.png (from 0) vs read() at the same index: {e} exact, {d} differ "
          f"(max |diff| {w}), {m} missing; "
          f"(a) wrote {a_measured[2]} files for {limit or frames} frames")
    return 0 if b_exact else 1


if __name__ == "__main__":
    sys.exit(main())
