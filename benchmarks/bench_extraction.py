r"""Frame extraction: the seed's own ffmpeg command vs our labelled-frame extraction vs plain decoding.

    .venv/bin/python benchmarks/bench_extraction.py [--seconds 60] [--workdir DIR] [--keep]
        [--repeats 2] [--preset veryfast] [--all-frames [--all-frames-seconds N]] [--incorrect-baseline]

Renders a synthetic 1920x1080, 60 fps, H.264 (CRF 23, keyframe every 250 frames, B-frames)
video_left.avi that looks like surgery (scripts/make_demo_data.py's scene at 1080p: panning
tissue texture, tools, needle, thread, clips, sensor noise), with masks for frames 0, 60, ...
in the release layout (video_01/video_left.avi, video_01/segmentation/*.png). Then, each into a
fresh output folder, --repeats times:
  (s) the design we start from, as its README runs it: ffmpeg keeps every 60th frame, named by
      its timestamp (ffmpeg -i video_left.avi -vf "select=not(mod(n\,60))" -vsync vfr -frame_pts 1
      OUT/%09d.png; -fps_mode vfr where the ffmpeg build has dropped -vsync);
  (b) our extraction, as users run it: scripts/extract_frames.py DATA --rate labelled --jobs 1
      (one sequential decode with grab(), retrieve() + PNG write on labelled frames only);
  (c) the floor: one sequential OpenCV decode of the whole video without writing anything,
      with grab() (what (b) does between labelled frames) and with read() (for reference).
A labelled aside, with --all-frames: (a) ffmpeg writes every frame as a PNG (ffmpeg -i
video_left.avi -fps_mode passthrough -start_number 0 OUT/%09d.png), what a naive pipeline does.
Every file (s) and (b) wrote is compared with frame i of a sequential cv2 read() under the name it
pairs with a mask by ({i:09d}.png), and a file under the wrong name is matched to the frame it
holds. The figures are printed, never asserted: report the measured ratios as they are.
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
TARGET_FLOOR = 1.5  # ours at most 1.5x one plain decode


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


def x264_command(ffmpeg: str, output: Path, preset: str = "veryfast", crf: int = 23) -> list[str]:
    """ffmpeg encoding raw BGR frames of WIDTHxHEIGHT at FPS from stdin into an H.264 (libx264) output."""
    return [
        ffmpeg,
        *f"-hide_banner -loglevel error -y -f rawvideo -pix_fmt bgr24 -s {WIDTH}x{HEIGHT} -r {FPS} -i -".split(),
        *"-c:v libx264 -preset".split(),
        preset,
        "-crf",
        str(crf),
        *"-g 250 -pix_fmt yuv420p".split(),
        str(output),
    ]


def ffmpeg_decoding(video: Path) -> list[str]:
    """The start of an ffmpeg command that decodes video, quietly and without reading stdin."""
    return [ffmpeg_exe(), *"-hide_banner -loglevel error -nostdin -i".split(), str(video)]


# ----------------------------------------------------------------------------- the test video


def make_video(video_dir: Path, seconds: int, preset: str, crf: int, seed: int) -> float:
    """Render the video through ffmpeg/libx264 and write masks of frames 0, 60, ...; returns seconds taken."""
    start = time.perf_counter()
    (video_dir / "segmentation").mkdir(parents=True)
    rng = np.random.default_rng([seed, 1])
    scene = demo.Scene(rng, WIDTH, HEIGHT, {demo.NEEDLE, demo.THREAD, demo.SUCTION, demo.CLAMPS})
    command = x264_command(ffmpeg_exe(), video_dir / "video_left.avi", preset, crf)
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
    return run_command(
        [
            sys.executable,
            str(ROOT / "scripts" / "extract_frames.py"),
            str(data),
            *"--rate labelled --jobs 1 --output-name".split(),
            output_name,
        ]
    )


def all_frames(video: Path, output: Path, limit: int | None = None) -> tuple[float, float]:
    """ffmpeg's every-frame PNG dump with its default PNG settings; limit: only the first frames."""
    output.mkdir()
    first = ["-frames:v", str(limit)] if limit else []
    return run_command(
        [
            *ffmpeg_decoding(video),
            *"-fps_mode passthrough".split(),
            *first,
            *"-start_number 0".split(),
            str(output / "%09d.png"),
        ]
    )


def seed_command(video: Path, output: Path) -> tuple[float, float]:
    """The design we start from's extraction: every 60th frame, named by its presentation timestamp."""
    output.mkdir()
    base = [*ffmpeg_decoding(video), "-vf", r"select=not(mod(n\,60))"]
    names = ["-frame_pts", "1", str(output / "%09d.png")]
    probe = subprocess.run([ffmpeg_exe(), "-hide_banner", "-h", "full"], capture_output=True, text=True).stdout
    timing = ["-vsync", "vfr"] if "-vsync" in probe else ["-fps_mode", "vfr"]  # newer builds dropped -vsync
    return run_command([*base, *timing, *names])


def incorrect_select(video: Path, output: Path) -> tuple[float, float]:
    """The notes' wrong command: select every 60th frame without -fps_mode passthrough
    (the output is re-timed to a constant rate, so ffmpeg duplicates the selected frames)."""
    output.mkdir()
    return run_command([*ffmpeg_decoding(video), "-vf", r"select=not(mod(n\,60))", str(output / "%09d.png")])


# ----------------------------------------------------------------------------- frame accuracy


def compare(folder: Path, reference: dict, name_of) -> tuple[int, int, int, int]:
    """(exact, differing, missing, largest pixel difference) frames of folder vs the reference frames; name_of(i) gives the file name."""
    exact = differing = missing = 0
    worst = 0
    for index, frame in reference.items():
        path = folder / name_of(index)
        image = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
        if image is None:
            missing += 1
        elif image.shape == frame.shape and np.array_equal(image, frame):
            exact += 1
        else:
            differing += 1
            if image.shape == frame.shape:
                worst = max(worst, int(np.abs(image.astype(np.int16) - frame).max()))
    return exact, differing, missing, worst


def misnamed(folder: Path, reference: dict) -> list[str]:
    """For each file of folder that does not hold the frame its name says, which labelled frame it holds."""
    notes = []
    for path in sorted(folder.glob("*.png")):
        index = int(path.stem)
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if index in reference and np.array_equal(image, reference[index]):
            continue
        held = next((i for i, frame in reference.items() if np.array_equal(image, frame)), None)
        notes.append(
            f"{path.name} holds "
            + (f"frame {held} (name off by {index - held:+d})" if held is not None else "no labelled frame")
        )
    return notes


def mean(values):
    return sum(values) / len(values)


def size_text(size: float) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60, help="video length at 60 fps (default: 60)")
    parser.add_argument("--workdir", type=Path, help="where the video and outputs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs of (b) and (c), split before and after (a) (default: 2)"
    )
    parser.add_argument(
        "--preset",
        default="veryfast",
        help="libx264 preset of the test video (default: veryfast; slower presets take "
        "minutes longer to encode and decode a little more slowly)",
    )
    parser.add_argument("--crf", type=int, default=23, help="libx264 CRF of the test video (default: 23)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--all-frames",
        action="store_true",
        help="also run the aside (a), ffmpeg writing every frame as a PNG (slow: ~35 min for 60 s "
        "on 2 cores with ffmpeg 9)",
    )
    parser.add_argument(
        "--all-frames-seconds",
        type=int,
        help="run (a) on the first N seconds only and scale its time, CPU, disk and files "
        "to the whole video (PNG encoding is per frame, so the cost is linear); default: "
        "the whole video. For when ffmpeg's PNG encoder is slow (ffmpeg 9's default "
        "paeth prediction takes ~0.4 CPU s per 1080p frame)",
    )
    parser.add_argument(
        "--incorrect-baseline",
        action="store_true",
        help="also time ffmpeg select every 60th frame without -fps_mode passthrough "
        "(the command behind the issue's 440 s; as slow as (a))",
    )
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
    log(
        f"rendering {args.seconds} s of {WIDTH}x{HEIGHT} at {FPS} fps "
        f"(libx264 -preset {args.preset} -crf {args.crf} -g 250 -pix_fmt yuv420p) into {video}"
    )
    generation = make_video(video_dir, args.seconds, args.preset, args.crf, args.seed)
    frames = args.seconds * FPS
    wanted = sorted(int(p.stem) for p in (video_dir / "segmentation").glob("*.png"))
    log(f"video ready in {generation:.0f} s: {describe_video(video)}; {len(wanted)} masks")

    timings = {"grab": [], "read": [], "ours": [], "seed": []}
    reference = {}
    for run_number in range(1, args.repeats + 1):
        wall, cpu, count, _ = decode_floor(video, "grab")
        if count != frames:
            sys.exit(f"grab() decoded {count} frames, expected {frames}")
        timings["grab"].append((wall, cpu))
        log(f"(c) grab() every frame, run {run_number}: {wall:.2f} s (CPU {cpu:.2f} s)")
        wall, cpu, count, kept = decode_floor(video, "read", set(wanted) if not reference else None)
        reference = reference or kept
        timings["read"].append((wall, cpu))
        log(f"(c) read() every frame, run {run_number}: {wall:.2f} s (CPU {cpu:.2f} s)")
        timings["ours"].append(ours(data, f"frames_run{run_number}"))
        log(f"(b) extract_frames.py --rate labelled --jobs 1, run {run_number}: {timings['ours'][-1][0]:.2f} s")
        timings["seed"].append(seed_command(video, video_dir / f"seed_run{run_number}"))
        log(f"(s) the seed's ffmpeg select + -frame_pts, run {run_number}: {timings['seed'][-1][0]:.2f} s")

    startup = mean(
        [
            run_command([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import dataset"])[0]
            for _ in range(args.repeats)
        ]
    )
    aside = all_frames_aside(args, video, video_dir, frames, reference) if args.all_frames else None
    incorrect = None
    if args.incorrect_baseline:
        log(r"(x) ffmpeg -i video_left.avi -vf select='not(mod(n\,60))' OUT/%09d.png (no passthrough)")
        x_wall, x_cpu = incorrect_select(video, video_dir / "ffmpeg_select_cfr")
        incorrect = (x_wall, x_cpu, *pngs(video_dir / "ffmpeg_select_cfr"))

    log("checking frame accuracy against a sequential cv2 read()")
    name = lambda i: f"{i:09d}.png"  # noqa: E731 (the name that pairs a frame with its mask)
    ours_checks = [compare(video_dir / f"frames_run{r}", reference, name) for r in range(1, args.repeats + 1)]
    seed_check = compare(video_dir / "seed_run1", reference, name)
    seed_misnamed = misnamed(video_dir / "seed_run1", reference)
    b_exact = all(c[0] == len(wanted) for c in ours_checks)
    (b_wall, b_cpu), (s_wall, s_cpu) = [
        (mean([w for w, _ in timings[k]]), mean([c for _, c in timings[k]])) for k in ("ours", "seed")
    ]
    (g_wall, g_cpu), (r_wall, r_cpu) = [
        (mean([w for w, _ in timings[k]]), mean([c for _, c in timings[k]])) for k in ("grab", "read")
    ]
    (b_files, b_bytes), (s_files, s_bytes) = pngs(video_dir / "frames_run1"), pngs(video_dir / "seed_run1")

    print()
    print(
        f"Video: {args.seconds} s, {describe_video(video)}; {len(wanted)} labelled frames "
        f"(0, 60, ..., {wanted[-1]}); {os.cpu_count()} CPUs, shared"
    )
    print(f"mean of {args.repeats} runs each, interleaved. CPU = user + system seconds of all threads/processes.")
    print()
    header = f"{'approach':<62}{'time s':>9}{'CPU s':>9}{'disk':>11}{'files':>7}"
    print(header)
    print("-" * len(header))
    print(
        f"{'(s) the seed: ffmpeg select every 60th, -vsync vfr -frame_pts':<62}{s_wall:>9.2f}{s_cpu:>9.2f}"
        f"{size_text(s_bytes):>11}{s_files:>7}"
    )
    print(
        f"{'(b) ours: extract_frames.py --rate labelled --jobs 1':<62}{b_wall:>9.2f}{b_cpu:>9.2f}"
        f"{size_text(b_bytes):>11}{b_files:>7}"
    )
    print(f"{'(c) floor: cv2 grab() every frame, no writes':<62}{g_wall:>9.2f}{g_cpu:>9.2f}{'-':>11}{'-':>7}")
    print(f"{'    reference: cv2 read() every frame, no writes':<62}{r_wall:>9.2f}{r_cpu:>9.2f}{'-':>11}{'-':>7}")
    if incorrect:
        print(
            f"{'(x) ffmpeg select every 60th, no passthrough (wrong)':<62}{incorrect[0]:>9.1f}{incorrect[1]:>9.1f}"
            f"{size_text(incorrect[3]):>11}{incorrect[2]:>7}"
        )
    print(
        f"(b) includes {startup:.2f} s of start-up (Python importing torch and albumentations through dataset.py), "
        "paid once per command, not per video"
    )
    print(
        "single runs, s: "
        + "; ".join(f"{key} " + ", ".join(f"{w:.2f}" for w, _ in values) for key, values in timings.items())
    )
    print()
    print(f"{'ratio':<46}{'time':>9}{'CPU':>8}{'disk':>8}")
    print(
        f"{'(s)/(b): the seed over ours':<46}{s_wall / b_wall:>8.2f}x{s_cpu / b_cpu:>7.2f}x{s_bytes / b_bytes:>7.2f}x"
    )
    floor = b_wall / g_wall
    print(
        f"{'(b)/(c): ours over the grab() floor':<46}{floor:>8.2f}x{b_cpu / g_cpu:>7.2f}x"
        f"   target <= {TARGET_FLOOR}x: {'met' if floor <= TARGET_FLOOR else 'NOT met'}"
    )
    print(f"{'(b)/(c) without the start-up':<46}{(b_wall - startup) / g_wall:>8.2f}x")
    print()
    print(f"frames under the name that pairs them with their mask ({{i:09d}}.png holds frame i), of {len(wanted)}:")
    print(
        f"  (b) ours, {args.repeats} runs: "
        + (
            "all exact"
            if b_exact
            else "; ".join(
                f"run {r}: {e} exact, {d} differ (max |diff| {w}), {m} missing"
                for r, (e, d, m, w) in enumerate(ours_checks, 1)
            )
        )
    )
    e, d, m, w = seed_check
    print(
        f"  (s) the seed: {e} exact, {d} differ, {m} missing; "
        + (
            f"{len(seed_misnamed)} files misnamed, e.g. {', '.join(seed_misnamed[:3])}"
            if seed_misnamed
            else "no file misnamed"
        )
    )
    if aside:
        print(aside)
    return 0 if b_exact else 1


def all_frames_aside(args, video: Path, video_dir: Path, frames: int, reference: dict) -> str:
    """(a), every frame to PNG: timed (on the first --all-frames-seconds, scaled), returned as a labelled line."""
    partial = args.all_frames_seconds and args.all_frames_seconds < args.seconds
    limit = args.all_frames_seconds * FPS if partial else None
    log(
        "(a) aside: ffmpeg -i video_left.avi -fps_mode passthrough -start_number 0 OUT/%09d.png"
        + (f" on the first {limit} frames, scaled to {frames}" if partial else " (every frame; slow)")
    )
    wall, cpu = all_frames(video, video_dir / "ffmpeg_all", limit)
    files, size = pngs(video_dir / "ffmpeg_all")
    scale = frames / files
    exact = compare(
        video_dir / "ffmpeg_all", {i: f for i, f in reference.items() if i < files}, lambda i: f"{i:09d}.png"
    )[0]
    return (
        f"aside, not a baseline (no pipeline of the seed's runs it): (a) every frame to PNG would take "
        f"{wall * scale:.0f} s (CPU {cpu * scale:.0f} s), {size_text(size * scale)} in {frames} files"
        + (f" (measured on {files} frames, scaled x{scale:g})" if partial else "")
        + f"; its labelled frames exact: {exact}"
    )


if __name__ == "__main__":
    sys.exit(main())
