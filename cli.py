"""What the entry scripts share: a parser whose errors are one line, settings from a YAML/JSON file, range checks,
the one-line error at exit, and the autocast precision."""

import argparse
import math
import sys

import torch
import yaml

import progress_bars
from hub import redact_tokens

NO_DATA_HINT = "see 'Data preparation' in README.md, or try the built-in demo first: bash scripts/demo.sh"
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class OneLineErrorParser(argparse.ArgumentParser):
    """A bad argument is one line (not the whole usage block): the error and where to look."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {redact_tokens(message)} (see --help)\n")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_ranges(parser, args, at_least_one=(), non_negative=(), named=flag) -> None:
    """Refuse (parser.error) a value below 1, or a negative or NaN one; None (not given) passes. named(name): how the
    message names the setting (its flag, and the file it came from)."""
    for name in at_least_one:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"{named(name)} must be at least 1")
    for name in non_negative:
        if getattr(args, name) is not None and not getattr(args, name) >= 0:  # "not >=": NaN is refused too
            parser.error(f"{named(name)} must not be negative")


class SettingsLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: a settings file needs none, and nested aliases can expand to any size."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("aliases (*name) are not allowed in a settings file")
        return super().compose_node(parent, index)


def read_settings(parser: argparse.ArgumentParser, path: str) -> dict:
    """A YAML/JSON file of settings named as the flags without '--' (lora_rank: 8), each a value or a list of values;
    a switch takes true or false."""
    try:
        with open(path, encoding="utf-8") as f:
            settings = yaml.load(f, Loader=SettingsLoader)  # JSON is YAML
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        parser.error(f"cannot read --config {path}: {first_line(error)}")
    if not isinstance(settings, dict):
        parser.error(f"--config {path} must hold settings as 'name: value' lines")
    defaults, checked = vars(parser.parse_args([])), {}
    for key, value in settings.items():
        name = str(key).replace("-", "_")
        if name not in defaults or name == "config":
            parser.error(
                f"--config {path}: unknown setting {key!r} (settings are the flags without '--', e.g. lora_rank)"
            )
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str | int | float | bool) for v in values):
            parser.error(f"--config {path}: {key} must be a value or a list of values, got {value!r}")
        if isinstance(defaults[name], bool) and not isinstance(value, bool):
            parser.error(f"--config {path}: {key} is a switch: write true or false, not {value!r}")
        checked[name] = value
    check_values(
        parser, path, checked, switches={name for name, default in defaults.items() if isinstance(default, bool)}
    )
    return checked


def check_values(parser, path: str, settings: dict, switches: set) -> None:
    """Each setting of a file parsed alone, as argparse parses its flag: a bad value names the file and the key
    (parsed with the command line, argparse would name only the flag)."""
    parser.exit_on_error = False  # argparse then raises ArgumentError instead of printing
    try:
        for name, value in settings.items():
            try:
                parser.parse_known_args(settings_as_flags({name: value}, switches))
            except argparse.ArgumentError as error:
                parser.error(f"--config {path}: {name}: {error.message}")
    finally:
        parser.exit_on_error = True


def settings_as_flags(settings: dict, switches: set) -> list[str]:
    """Settings as command-line tokens, so that argparse checks them as it checks flags."""
    tokens = []
    for name, value in settings.items():
        if name in switches:
            tokens.append(flag(name) if value else "--no-" + flag(name)[2:])
        else:
            tokens += [flag(name), *map(str, value if isinstance(value, list) else [value])]
    return tokens


def given_settings(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The settings argv gives itself (argparse leaves a setting it has no value for as the namespace holds it)."""
    defaults = vars(parser.parse_args([]))
    unset = object()
    parsed, _ = parser.parse_known_args(argv, argparse.Namespace(**dict.fromkeys(defaults, unset)))
    return {name for name, value in vars(parsed).items() if value is not unset}


def parse_with_settings(parser, argv: list[str], groups=()) -> tuple[argparse.Namespace, dict[str, str]]:
    """argv over the settings of its --config FILE: a setting given on the command line wins over the file's, and so
    does it over the file's settings of its group (an alias, or a setting that overrides another). Returns the
    arguments and where each setting given came from ("the command line" or "--config FILE")."""
    given = given_settings(parser, argv)
    sources = dict.fromkeys(given, "the command line")
    config_file = parser.parse_known_args(argv)[0].config
    if not config_file:
        return parser.parse_args(argv), sources
    overridden = given | {name for group in groups if given & set(group) for name in group}
    settings = {n: v for n, v in read_settings(parser, config_file).items() if n not in overridden}
    sources.update(dict.fromkeys(settings, f"--config {config_file}"))
    switches = {name for name, default in vars(parser.parse_args([])).items() if isinstance(default, bool)}
    return parser.parse_args(settings_as_flags(settings, switches) + argv), sources


def finite_float(text: str) -> float:
    """A float type for argparse that refuses NaN and infinity."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def first_line(error: BaseException, limit: int = 120) -> str:
    """The first line of an error's message (its type's name if it has none), shortened to limit characters."""
    return ((str(error).strip().splitlines() or [type(error).__name__])[0])[:limit]


def one_line(error: BaseException) -> str:
    """The message of an error; a DataLoader worker re-raises with its traceback in the message: its last line."""
    message = (str(error).strip().splitlines() or [type(error).__name__])[-1]
    return message.split(": ", 1)[1] if message.startswith(("dataset.DataError", "DataError")) else message


LOWER_FOR_MEMORY = "lower --batch-size, the resolution or the number of --tta-scales"


def exit_code(work, args, expected: tuple, again: str = "run it again", lower: str = LOWER_FOR_MEMORY) -> int:
    """Run work(args): its exit code (0 for None), or one line on stderr and 1 for an expected error, a data loader
    worker that died or memory that ran out, 130 for Ctrl-C: never a traceback, never a token. again: how to go on;
    lower: what to change when memory ran out."""
    progress_bars.quiet_library_bars()
    try:
        return work(args) or 0
    except expected as error:
        print(f"error: {redact_tokens(one_line(error))}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"error: interrupted, with nothing half-written under a final name: {again} to go on", file=sys.stderr)
        return 130
    except (RuntimeError, MemoryError) as error:
        print(f"error: {resource_error(error, lower)}, then {again}", file=sys.stderr)
    return 1


def resource_error(error: BaseException, lower: str = LOWER_FOR_MEMORY) -> str:
    """What ran out, for memory errors and a data loader worker killed (often by the out-of-memory killer); any other
    error is raised again."""
    gpu = isinstance(error, torch.OutOfMemoryError)
    if gpu or isinstance(error, MemoryError) or "can't allocate memory" in str(error):
        return f"out of {'GPU' if gpu else 'main'} memory ({first_line(error, 80)}): {lower}"
    if "DataLoader worker" in str(error):
        return (
            f"a data loader worker died ({first_line(error)}), often killed by the system when memory runs out: "
            "lower --num-workers or --batch-size"
        )
    raise error


def precision_for(requested: str | None, device: torch.device, trained: str | None = None) -> str:
    """--precision; else fp32 on the CPU or for a model trained in fp32 (trained: inference's record of it); else the
    GPU's fast half precision: bf16 from Ampere (compute capability 8.0) on, fp16 before, where bf16 runs on slow
    paths (is_bf16_supported() says yes there too: it counts emulation) and fused attention takes no bf16."""
    if requested or device.type != "cuda" or trained == "fp32":
        return requested or "fp32"
    return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"


def use_tf32(enabled: bool) -> None:
    """TF32 for fp32 matrix products on Ampere or newer GPUs (several times faster; no effect elsewhere); convolutions
    already use it by torch's default."""
    torch.set_float32_matmul_precision("high" if enabled else "highest")


def autocast_for(precision: str, device: torch.device):
    """A function giving a fresh autocast context for precision (a no-op context for fp32)."""
    return lambda: torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")
