"""Progress bars that read well in a terminal and in a log file: redrawn in place on a terminal; where the bar's
stream is not a terminal (SLURM, nohup, | tee), a plain line at most every PLAIN_EVERY seconds and one at the end."""

import re
import sys

from tqdm import tqdm

PLAIN_EVERY = 30.0  # seconds between two lines of a bar written to a file
CURSOR_CODES = re.compile(r"\r|\x1b\[[0-9;]*[A-Za-z]")


class PlainLines:
    """The stream a bar writes to a file through: each redraw becomes one line, with no carriage return or cursor
    movement; blank redraws (a bar clearing itself) are dropped."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = CURSOR_CODES.sub("", text).strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar(iterable=None, **settings) -> tqdm:
    """tqdm(iterable, **settings), written as plain lines where its stream (stderr unless file=) is not a terminal.
    There a bar that clears itself at the end (leave=False) shows only once it has run PLAIN_EVERY seconds."""
    stream = settings.pop("file", None) or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        transient = settings.get("leave") is False
        settings.update(mininterval=PLAIN_EVERY, delay=PLAIN_EVERY if transient else 0, dynamic_ncols=False)
        stream = PlainLines(stream)
    return tqdm(iterable, file=stream, **settings)


def quiet_library_bars() -> None:
    """Where stderr is not a terminal, the libraries' own bars (transformers loading weights, hub downloads) are off:
    in a log file they are only redraws."""
    if not sys.stderr.isatty():
        import huggingface_hub.utils
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
