"""Files the pipeline writes and PNGs it reads: atomic writes (a killed run never leaves a truncated file under a
real name), the leftovers of killed writes, and PNG header checks."""

import errno
import fcntl
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import cv2
import numpy as np

from cli import first_line

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
PNG_GREY, PNG_PALETTE = 0, 3
PNG_COLOUR_TYPES = (2, 4, 6)  # RGB, grey + alpha, RGBA
FULL_DISK_BYTES = 16 * 2**20  # less free space than this after a failed write: the disk is full


def png_header(head: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) from a PNG's first 26 bytes (IHDR is always the first chunk), or None
    if they are not a PNG's."""
    if len(head) < 26 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return width, height, head[24], head[25]


def read_png_header(path: Path, error=OSError) -> tuple[int, int, int, int]:
    """png_header of a file that also ends with an IEND chunk; a truncated or unreadable file raises error."""
    try:
        with open(path, "rb") as file:
            header = png_header(file.read(26))
            if header is None:
                raise error(f"{path}: not a PNG file")
            file.seek(-len(PNG_END), os.SEEK_END)
            tail = file.read()
    except OSError as caught:
        raise error(f"{path}: cannot read ({caught.strerror})") from None
    if tail != PNG_END:
        raise error(f"{path}: truncated PNG (it does not end with an IEND chunk)")
    return header


def find_folders(root: Path, is_wanted) -> list[Path]:
    """The folders at or under root for which is_wanted(folder) holds, without looking inside them. Symbolic links to
    folders are followed (Path.rglob does not), each real folder once; a link back up to root or above is a loop and
    is not followed."""
    found, seen, top = [], set(), os.path.realpath(root)
    for directory, subdirectories, _ in os.walk(root, followlinks=True):
        subdirectories.sort()
        real = os.path.realpath(directory)
        if real in seen or (real != top and os.path.commonpath([real, top]) == real):
            subdirectories.clear()
            continue
        seen.add(real)
        if is_wanted(Path(directory)):
            found.append(Path(directory))
            subdirectories.clear()
    return found


class LockedError(OSError):
    """Another process holds the lock; pid is the holder's, as it wrote it."""

    def __init__(self, pid: str):
        super().__init__(f"locked by process {pid}")
        self.pid = pid


def lock_file(path: Path):
    """An exclusive lock on path for this process's life: the kernel drops it when the process ends, so a killed run
    never blocks the next one. LockedError if another process holds it."""
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise LockedError(holder) from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def unlock_file(lock) -> None:
    """Release a lock_file lock now: unlocked, not only closed, since a forked child holding the file keeps a flock."""
    fcntl.flock(lock, fcntl.LOCK_UN)
    lock.close()


def sampled_digest(path: Path, chunk: int = 1 << 16) -> str:
    """A cheap identity of a file's contents: a SHA-256 of its size and of its first, middle and last chunk bytes."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as file:
        for offset in (0, max(0, size // 2 - chunk // 2), max(0, size - chunk)):
            file.seek(offset)
            digest.update(file.read(chunk))
    return digest.hexdigest()


def partial_path(path: Path) -> Path:
    """Where path is written before it is renamed into place: hidden, and named by the writing process."""
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def remove_partial_files(folder: Path) -> None:
    """Delete what killed writes left in folder (partial_path files of processes no longer running)."""
    for leftover in folder.glob(".*.partial"):
        pid = leftover.name.rsplit(".", 2)[-2]
        if not pid.isdigit() or not process_is_running(int(pid)):
            leftover.unlink(missing_ok=True)


def process_is_running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process has nothing half-written at the moment it cleans up
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


class WriteError(OSError):
    """Writing an output failed; the message names the file and why (a full disk says so)."""


def why_not_written(path: Path, error: BaseException) -> str:
    """Why writing path failed, in words: a full disk is named as such even when a library reports it in its own terms
    (torch.save's "unexpected pos", safetensors' I/O errors)."""
    if getattr(error, "errno", None) == errno.ENOSPC:
        return "no space left on device"
    try:
        if shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free < FULL_DISK_BYTES:
            return "no space left on device"
    except OSError:
        pass
    return getattr(error, "strerror", None) or first_line(error)


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Write under a temporary name, then rename: a killed run never leaves a truncated file under the real name."""
    temporary = partial_path(path)
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise WriteError(f"could not write {path} ({why_not_written(path, error)})") from None


def write_json_atomically(path: Path, data) -> None:
    write_bytes_atomically(path, json.dumps(data, indent=1).encode())


def write_image_atomically(path: Path, image: np.ndarray, parameters=()) -> None:
    """Encode by the file's extension (.png, .jpg) and write atomically."""
    ok, encoded = cv2.imencode(path.suffix, image, list(parameters))
    if not ok:
        raise OSError(f"could not encode {path}")
    write_bytes_atomically(path, encoded.tobytes())
