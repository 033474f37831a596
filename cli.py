"""What the entry scripts share: a parser whose errors are one line, settings from a YAML/JSON file, range checks,
the one-line error at exit, and the autocast precision."""

import argparse
import sys

import torch
import yaml

from hub import redact_tokens

NO_DATA_HINT = "see 'Data preparation' in README.md, or try the built-in demo first: bash scripts/demo.sh"
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class OneLineErrorParser(argparse.ArgumentParser):
    """A bad argument is one line (not the whole usage block): the error and where to look."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {redact_tokens(message)} (see --help)\n")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_ranges(parser, args, at_least_one=(), non_negative=()) -> None:
    """Refuse (parser.error) a value below 1, or a negative or NaN one; None (not given) passes."""
    for name in at_least_one:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"{flag(name)} must be at least 1")
    for name in non_negative:
        if getattr(args, name) is not None and not getattr(args, name) >= 0:  # "not >=": NaN is refused too
            parser.error(f"{flag(name)} must not be negative")


def config_file_arguments(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """The settings of a YAML/JSON file as command-line tokens, so argparse checks them as it checks flags. A setting
    is a flag without '--'; true/false switch a flag that takes no value, a list gives a flag's values."""
    try:
        with open(path, encoding="utf-8") as f:
            settings = yaml.safe_load(f)  # JSON is YAML
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        parser.error(f"cannot read --config {path}: {first_line(error)}")
    if not isinstance(settings, dict):
        parser.error(f"--config {path} must hold settings as 'name: value' lines")
    defaults = vars(parser.parse_args([]))
    tokens = []
    for key, value in settings.items():
        name = str(key).replace("-", "_")
        if name not in defaults or name == "config":
            parser.error(
                f"--config {path}: unknown setting {key!r} (settings are the flags without '--', e.g. lora_rank)"
            )
        if defaults[name] is False:  # a switch (store_true)
            tokens += [flag(name)] if value else []
        elif value is not None:
            tokens += [flag(name), *map(str, value if isinstance(value, list) else [value])]
    return tokens


def first_line(error: BaseException, limit: int = 120) -> str:
    """The first line of an error's message (its type's name if it has none), shortened to limit characters."""
    return ((str(error).strip().splitlines() or [type(error).__name__])[0])[:limit]


def one_line(error: BaseException) -> str:
    """The message of an error; a DataLoader worker re-raises with its traceback in the message: its last line."""
    message = (str(error).strip().splitlines() or [type(error).__name__])[-1]
    return message.split(": ", 1)[1] if message.startswith(("dataset.DataError", "DataError")) else message


def exit_code(work, args, expected: tuple, then: str = "then run it again") -> int:
    """Run work(args): its exit code (0 for None), or 1 with one line on stderr for an expected error or a data loader
    worker that died (never a traceback, never a token); then: what to do after freeing memory."""
    try:
        return work(args) or 0
    except expected as error:
        print(f"error: {redact_tokens(one_line(error))}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        if "DataLoader worker" not in str(error):
            raise
        print(
            f"error: a data loader worker died ({first_line(error)}), often killed by the system when memory "
            f"runs out: lower --num-workers or --batch-size, {then}",
            file=sys.stderr,
        )
        return 1


def precision_for(requested: str | None, device: torch.device) -> str:
    """--precision, else bf16 on a GPU that has it, else fp32."""
    return requested or ("bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32")


def autocast_for(precision: str, device: torch.device):
    """A function giving a fresh autocast context for precision (a no-op context for fp32)."""
    return lambda: torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")
