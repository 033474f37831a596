"""Unpack the SAR-RARP50 release into OUTPUT/train/video_XX and OUTPUT/test/video_XX.

Accepts the outer train/test archives (zips of per-video zips), single per-video zips, or
folders holding per-video zips. Videos 1-40 go to train/, 41-50 to test/. Each video is
unpacked into a temporary folder and renamed when complete, so a re-run skips finished
videos and an interrupted one is redone. Zip entries that would land outside the output
folder are refused.
"""

import argparse
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import progress_bars  # noqa: E402

VIDEO_ZIP = re.compile(r"(?:^|/)(video_(\d+)(?:_\d+)?)\.zip$")
LAST_TRAINING_VIDEO = 40
CLUTTER = re.compile(r"(^|/)(__MACOSX/|\.DS_Store$|Thumbs\.db$)")  # added by the archiver, not part of the video


class UnpackError(RuntimeError):
    pass


def split_of(video_name: str) -> str:
    return "train" if int(video_name.split("_")[1]) <= LAST_TRAINING_VIDEO else "test"


def safe_extract(archive: zipfile.ZipFile, destination: Path, video_name: str) -> None:
    """Extract every entry, dropping a top folder named like the video and operating-system clutter (__MACOSX/,
    .DS_Store), refusing zip-slip paths and a top folder with other entries beside it."""
    names = [n for n in archive.namelist() if not n.endswith("/") and not CLUTTER.search(n)]
    prefix = video_name + "/"
    inside = [n for n in names if n.startswith(prefix)]
    if inside and len(inside) < len(names):
        beside = sorted({n.split("/")[0] for n in names if not n.startswith(prefix)})
        raise UnpackError(
            f"{video_name}.zip holds a {prefix} folder and also {', '.join(beside[:3])} beside it, which "
            f"would unpack to {video_name}/{video_name}/: delete the extra entries from the zip "
            f"(zip -d {video_name}.zip '{beside[0]}*') and run again"
        )
    strip = prefix if inside else ""
    root = destination.resolve()
    for name in names:
        target = (destination / name[len(strip) :]).resolve()
        if name.startswith(("/", "\\")) or not target.is_relative_to(root):
            raise UnpackError(f"refusing zip entry {name!r}: it would be written outside {destination}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(name) as source, open(target, "wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 20)


def unpack_video_zip(opener, video_name: str, output: Path) -> bool:
    """Unpack one per-video zip; returns False when the video was already there."""
    final = output / split_of(video_name) / video_name
    if final.is_dir():
        return False
    partial = final.with_name(f"{video_name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        with opener() as handle, zipfile.ZipFile(handle) as archive:
            safe_extract(archive, partial, video_name)
    except (zipfile.BadZipFile, UnpackError) as error:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-unpacked is left behind
        if isinstance(error, UnpackError):
            raise
        raise UnpackError(f"{video_name}.zip is not a valid zip file (corrupt or incomplete download)") from None
    partial.rename(final)
    return True


def video_zips(source: Path):
    """Yield (video name, opener) for every per-video zip in a folder, a per-video zip, or an outer archive."""
    if source.is_dir():
        for path in sorted(source.rglob("video_*.zip")):
            match = VIDEO_ZIP.search(path.as_posix())
            if match:
                yield match.group(1), lambda path=path: open(path, "rb")
        return
    match = VIDEO_ZIP.search(source.name)
    if match:
        yield match.group(1), lambda: open(source, "rb")
        return
    try:
        with zipfile.ZipFile(source) as outer:
            inner_names = [n for n in outer.namelist() if VIDEO_ZIP.search(n)]
    except zipfile.BadZipFile:
        raise UnpackError(f"{source} is not a valid zip file (corrupt or incomplete download)") from None
    if not inner_names:
        raise UnpackError(f"{source}: holds no video_XX.zip; is it a SAR-RARP50 archive?")
    for name in sorted(inner_names):
        # Inner zips are copied to a temporary file: reading a zip needs seeks.
        def opener(name=name):
            spool = tempfile.TemporaryFile()
            with zipfile.ZipFile(source) as outer, outer.open(name) as member:
                shutil.copyfileobj(member, spool, 1 << 20)
            spool.seek(0)
            return spool

        yield VIDEO_ZIP.search(name).group(1), opener


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "sources",
        nargs="+",
        metavar="ARCHIVE_OR_DIR",
        help="train/test archives, per-video zips, or folders of per-video zips",
    )
    parser.add_argument("--output", default="sarrarp", help="destination folder (default: sarrarp)")
    args = parser.parse_args()
    output = Path(args.output)
    for source in map(Path, args.sources):
        if not source.exists():
            parser.error(f"{source} does not exist")
    try:
        videos = [v for source in map(Path, args.sources) for v in video_zips(source)]
        if not videos:
            raise UnpackError("found no video_XX.zip in " + ", ".join(args.sources))
        unpacked = sum(
            unpack_video_zip(opener, name, output)
            for name, opener in progress_bars.bar(videos, unit="video", desc="unpacking")
        )
    except (UnpackError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"{unpacked} video(s) unpacked, {len(videos) - unpacked} already present, into {output}/train and {output}/test"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
