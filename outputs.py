"""Output folders in which nothing of the user's is lost: a folder that is, holds or lies inside an input is refused
before anything is written; one run at a time writes into it; a file is replaced or removed only if this project
wrote it (its ledger, .written.json, lists every such file); new files are built in a hidden staging folder and
moved into place once complete, so that a killed or failed run leaves the folder as it was."""

import json
import os
import shutil
from pathlib import Path

import files

LEDGER = ".written.json"
LOCK = ".lock"
PROVENANCE_FILE = "predicted_with.json"  # how the predictions of each video in a folder were made
LEGACY_SCORES_MANIFEST = ".scores_by_run_inference.json"  # the earlier versions' record of their score files
SCORE_FILES = (
    "metrics.json",
    "per_class.csv",
    "per_frame.csv",
    "confusion_matrix.png",
    "per_class_scores.png",
    "per_video_scores.png",
    "report.html",
)  # what scoring writes


class OutputError(ValueError):
    """An output location that would lose or mix up the user's files; the message says what to choose instead."""


def check_apart(output: Path, inputs: dict[str, Path]) -> None:
    """Refuse an output that is, holds or lies inside any input (what: path)."""
    out = output.resolve()
    for what, path in inputs.items():
        path = Path(path).resolve()
        if out == path or out.is_relative_to(path) or path.is_relative_to(out):
            where = (
                f"is {what} itself"
                if out == path
                else "lies inside " + what
                if out.is_relative_to(path)
                else "holds " + what
            )
            raise OutputError(f"{output} {where} ({path}): choose an output folder apart from the inputs")


def stamp(path: Path) -> list[int]:
    """What identifies a file's contents cheaply: its size and modification time."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def legacy_ledger(folder: Path) -> set[str]:
    """The files that versions without a ledger wrote: predictions of the videos their predicted_with.json records,
    the score files of their manifest, or every score file in a folder they predicted into."""
    try:
        videos = json.loads((folder / PROVENANCE_FILE).read_text())["videos"]
    except (OSError, ValueError, KeyError, TypeError):
        videos = None
    written = set()
    if isinstance(videos, dict):
        for video in videos:
            for kind in ("segmentation", "visualisations"):
                written |= {f"{video}/{kind}/{p.name}" for p in (folder / video / kind).glob("*.png")}
        written |= {PROVENANCE_FILE, *SCORE_FILES}
    try:
        written |= {str(name) for name in json.loads((folder / LEGACY_SCORES_MANIFEST).read_text())}
    except (OSError, ValueError, TypeError):
        pass
    return written


class OutputFolder:
    """with OutputFolder(path, inputs) as out: out.claim(names) before the work; write into out.staging (the same
    layout); out.commit(replaced) moves it all into place. Only files in the ledger are ever replaced or removed."""

    def __init__(self, path: Path, inputs: dict[str, Path] | None = None, tool: str = "run_inference.py"):
        self.path, self.inputs, self.tool = Path(path), inputs or {}, tool
        self.staging = self.path / f".staging-{os.getpid()}"
        self.written, self.lock, self.created = {}, None, False

    def __enter__(self):
        check_apart(self.path, self.inputs)
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self.lock = files.lock_file(self.path / LOCK)
        except files.LockedError as error:
            raise OutputError(
                f"another {self.tool} run (pid {error.pid}) is writing to {self.path}: wait for it to finish, or "
                "choose another output folder"
            ) from None
        for leftover in self.path.glob(".staging-*"):  # a killed run's
            pid = leftover.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not files.process_is_running(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)
        files.remove_partial_files(self.path)
        try:
            self.written = {str(k): v for k, v in json.loads((self.path / LEDGER).read_text()).items()}
        except (OSError, ValueError, TypeError, AttributeError):
            self.written = dict.fromkeys(legacy_ledger(self.path))
        self.staging.mkdir()
        return self

    def __exit__(self, *error):
        shutil.rmtree(self.staging, ignore_errors=True)
        self.lock.close()
        if self.created and not self.written:  # a run that failed before writing anything leaves no folder
            shutil.rmtree(self.path, ignore_errors=True)

    def ours(self, relative: str) -> bool:
        """Absent, or written by this project and unchanged since (same size and time; None: the write was begun)."""
        path = self.path / relative
        if not path.exists():
            return True
        if relative not in self.written:
            return False
        recorded = self.written[relative]
        return recorded is None or recorded == stamp(path)

    def claim(self, relatives, instead: str = "choose another output folder") -> None:
        """Refuse, before any work, to write over a file this project did not write."""
        for relative in relatives:
            if not self.ours(relative):
                raise OutputError(
                    f"{self.path / relative} exists and was not written by {self.tool}: move it away, or {instead}"
                )

    def write_json(self, relative: str, data) -> None:
        """A JSON file written straight into the folder, atomically, and recorded as this project's."""
        self.record([relative], begun=True)
        files.write_json_atomically(self.path / relative, data)
        self.record([relative])

    def record(self, relatives, begun: bool = False) -> None:
        """Files written into the folder; begun: about to be written (atomically, each by its own name)."""
        for relative in relatives:
            path = self.path / relative
            self.written[relative] = None if begun or not path.exists() else stamp(path)
        files.write_json_atomically(self.path / LEDGER, dict(sorted(self.written.items())))

    def commit(self, replaced=(), last=(PROVENANCE_FILE,)) -> None:
        """Move every staged file into place, the names in last after the others; remove this project's files under
        the prefixes replaced that were not staged again (an earlier run's frames)."""
        staged = sorted(p.relative_to(self.staging).as_posix() for p in self.staging.rglob("*") if p.is_file())
        self.claim(staged)  # again: the user may have put a file there meanwhile
        stale = {r for r in self.written if r.startswith(tuple(replaced)) and r not in staged and self.ours(r)}
        self.record(staged, begun=True)  # first: from here on a kill leaves only files the ledger calls ours
        for relative in sorted(staged, key=lambda r: r in last):
            (self.path / relative).parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.staging / relative, self.path / relative)
        for relative in stale:
            (self.path / relative).unlink(missing_ok=True)
            del self.written[relative]
        self.record(staged)
