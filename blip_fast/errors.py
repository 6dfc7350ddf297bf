"""User errors: the exception type, the argparse types that catch bad values at parse time, and the top-level handler.

A mistake in what the user asked for (a path that is not there, an option out of range, a model of the wrong kind,
an output folder that would overwrite data) is reported as one line ``PROG: error: ...`` on stderr with exit
status 2, before any work where possible. Bugs keep their traceback. ``--debug`` or ``BLIP_FAST_DEBUG=1`` shows the
traceback of a user error too.

Library code raises :class:`UserError` (or an exception class deriving from it) for such mistakes; the command
lines build their parsers with :class:`ArgumentParser` and run through :func:`run_main`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: Exit status of a user error (argparse's own).
EXIT_USER_ERROR = 2
#: Exit status of a run that finished but failed its own checks (e.g. CapFilt's ``--max-error-rate``).
EXIT_FAILED = 1
DEBUG_ENV = "BLIP_FAST_DEBUG"


#: The exit status of a command stopped by SIGTERM (128 + 15, as a shell reports a process killed by it).
EXIT_TERMINATED = 143


class Terminated(BaseException):
    """SIGTERM arrived (raised by :func:`blip_fast.launch.sigterm_raises`): like Ctrl-C, it unwinds the stack, so
    every ``finally`` stops the child processes it started, and no half-written file is left."""


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit status 2, no traceback."""


class ProcessFailed(Exception):
    """A child process (a demo seed, a training stage) failed; its own output, shown above or in the log named,
    says why: one line, status 1, no traceback of this process, which only waited on it."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (directly, or as part of a model folder) is not there."""


class InvalidInputError(UserError, ValueError):
    """A value or a file's content that cannot be used as given."""


# ---------------------------------------------------------------------------------------------------- argparse types
def _type(name: str, convert: Callable[[str], object]) -> Callable[[str], object]:
    """A parse-time type: ``convert`` raises ``UserError``/``ValueError`` with the reason; argparse prints it after
    ``argument --x:``. ``name`` is what ``--help`` and messages call the expected value."""

    def parse(text: str) -> object:
        try:
            return convert(text)
        except (UserError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = name
    return parse


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An integer ``>= minimum``: ``int_at_least(1)`` for counts and sizes."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise ValueError(f"must be >= {minimum}, got {value}")
        return value

    return _type(f"integer >= {minimum}", convert)


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def float_in(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """A finite float in the interval from ``low`` to ``high`` (each end closed unless ``*_open``)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if not math.isfinite(value) or below or above:
            raise ValueError(f"must lie in {interval}, got {text}")
        return value

    return _type(f"number in {interval}", convert)


def _existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise UserError(f"{text}: no such directory")
    if not path.is_dir():
        raise UserError(f"{text} is a file, not a directory")
    return path


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise UserError(f"{text}: no such file")
    if path.is_dir():
        raise UserError(f"{text} is a directory, not a file")
    return path


def _blocking_file(path: Path) -> Path | None:
    """The first existing non-directory among ``path``'s parents (a file where a folder would have to be)."""
    for parent in path.absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_output_dir(text: str) -> Path:
    """``text`` as a folder to write into; a :class:`UserError` when it, or a folder it would be made in, is a
    file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise UserError(f"{text} is a file; give a folder (new or empty) for the output")
    if (blocking := _blocking_file(path)) is not None:
        raise UserError(f"cannot create folder {text}: {blocking} is a file")
    return path


def _output_file(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise UserError(f"{text} is a directory; give a file name for the output")
    if (blocking := _blocking_file(path)) is not None:
        raise UserError(f"cannot write {text}: {blocking} is a file, not a directory")
    return path


def _model_dir(text: str) -> str:
    """An existing model folder, or a name that can be a Hugging Face Hub id (resolved when the model loads)."""
    from blip_fast.hub import looks_like_repo_id

    if os.path.exists(text) or not looks_like_repo_id(text):
        return str(_existing_dir(text))
    return text


def check_outputs_spare_inputs(outputs: dict[str, Path | None], inputs: Sequence[str | os.PathLike]) -> None:
    """Refuse an output file (``{flag: path}``) that is one of the run's input files, or another output: writing it
    would destroy the input (an evaluation's ``--results`` over its annotations, say) or the other output."""
    given = {os.path.realpath(path) for path in inputs}
    written: dict[str, str] = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        if os.path.realpath(path) in given:
            raise UserError(f"{flag} {path} is one of the input files; writing it would destroy it: give another name")
        other = written.setdefault(os.path.realpath(path), flag)
        if other != flag:
            raise UserError(f"{other} and {flag} name the same file {path}; one would replace the other: give each "
                            "its own name")


def is_kind(value: Any, *kinds: type) -> bool:
    """``isinstance(value, kinds)``, where a bool counts as a number only if ``bool`` is among ``kinds``: JSON's
    ``true`` must not pass for 1 (nor a typo'd ``"true"`` for a flag)."""
    return isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))


def json_type(value: Any) -> str:
    """How messages name a JSON value's type: null, boolean, number, string, list or object."""
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "list", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def read_json_object(path: str | os.PathLike, error: type[UserError] = InvalidInputError) -> dict[str, Any]:
    """The JSON object a file holds; ``error`` naming the file when it cannot be read, is no JSON or no object."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as problem:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise error(f"cannot read {path}: {type(problem).__name__}: {problem}") from None
    if not isinstance(values, dict):
        raise error(f"{path} holds a JSON {json_type(values)}, not an object")
    return values


def environment_int(name: str, default: int) -> int:
    """The integer in environment variable ``name`` (a launcher's ``RANK``, ``WORLD_SIZE``, ...), or ``default``."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise UserError(f"environment variable {name} must be an integer, got {text!r}") from None


def differences(there: Mapping[str, Any], here: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``"key: X there, Y here"`` for each (nested) key whose value differs: what an error refusing to resume a run
    with other settings names."""
    lines = []
    for key in sorted(set(there) | set(here)):
        old, new = there.get(key), here.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            lines += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            lines.append(f"{prefix}{key}: {json.dumps(old)} there, {json.dumps(new)} here")
    return lines


def check_replaceable(flag: str, path: Path | None, written_here: Callable[[Any], bool]) -> None:
    """Refuse an output file that exists and is not this command's (``written_here`` of its parsed JSON is false):
    a rerun may replace its own report, never another tool's json or a model's ``config.json``."""
    if path is None or not path.exists():
        return
    try:
        ours = written_here(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError):
        ours = False
    if not ours:
        raise UserError(f"{flag} {path} exists and is not a file this command wrote; writing it would destroy it: "
                        "give a new name (or delete it first)")


existing_dir = _type("existing directory", _existing_dir)
model_dir = _type("model folder or hub id", _model_dir)
existing_file = _type("existing file", _existing_file)
output_dir = _type("output folder", check_output_dir)
output_file = _type("output file", _output_file)


# ---------------------------------------------------------------------------------------------------- devices
def check_device(spec: str) -> str:
    """``spec`` if torch can run on it here ("auto" passes through); else a UserError saying why."""
    import torch

    if spec == "auto":
        return spec
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UserError(f"{spec!r} is not a device (expected auto, cpu, cuda, cuda:N, mps, ...)") from None
    if device.type == "cpu":
        return spec
    if device.type == "meta":
        raise UserError("the meta device holds no data; choose cpu or an accelerator")
    backend = getattr(torch, device.type, None)
    if device.type == "mps":
        backend = getattr(torch.backends, "mps", None)
    if backend is None or not backend.is_available():
        build = f" (torch {torch.__version__} is a CPU build)" if device.type == "cuda" and not torch.version.cuda else ""
        raise UserError(f"device {spec!r} is not available here{build}; use --device cpu or auto")
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise UserError(f"device {spec!r} does not exist: this machine has {count} {device.type} device(s)")
    return spec


def resolve_device(spec: str, local_rank: int | None = None):
    """A ``torch.device`` for ``spec``: "auto" is cuda (cuda:``local_rank`` under a launcher) when available,
    else cpu."""
    import torch

    check_device(spec)
    if spec != "auto":
        return torch.device(spec)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank) if local_rank is not None else torch.device("cuda")


device_spec = _type("device", check_device)


# ---------------------------------------------------------------------------------------------------- parser, handler
class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults in ``--help`` and one-line errors (``PROG: error: argument --x: ...``, exit 2).

    Subcommand parsers made with ``add_subparsers().add_parser`` are of this class too."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USER_ERROR)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", default=False,
                        help=f"show the traceback of user errors too (or set {DEBUG_ENV}=1)")


def debug_enabled(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def report(prog: str, error: BaseException) -> None:
    """Print ``error`` as a user error of ``prog``."""
    message = str(error) or type(error).__name__
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)


#: How long a rank that does not report waits before it reports its own error (:func:`report_delay`).
FOLLOWER_REPORT_DELAY_S = 10.0


def report_delay() -> float:
    """Under a launcher, each node's first rank reports a user error at once and the other ranks wait
    :data:`FOLLOWER_REPORT_DELAY_S`: every rank reads the same options and data, so they usually fail alike, and the
    first rank's exit makes the launcher stop the others. A rank that fails first must not win that race (the
    launcher would stop the reporting rank before its line is out), and one that fails alone still says why."""
    return FOLLOWER_REPORT_DELAY_S if os.environ.get("LOCAL_RANK", "0") != "0" else 0.0


def run_main(main: Callable[[Sequence[str]], int], argv: Sequence[str], prog: str,
             delay_s: float = 0.0) -> int:
    """``main(argv)``'s exit status, with user errors as one line and status 2. OS errors (permissions, a full
    disk) are one line too, status 1; Ctrl-C is status 130, SIGTERM (where :func:`blip_fast.launch.sigterm_raises`
    turned it into :class:`Terminated`) 143. ``delay_s`` > 0 (a rank that does not report, see
    :func:`report_delay`): an error's line comes after that wait, unless a signal ends the wait, and the
    interruption lines are left to the reporting rank (the signal reaches every rank)."""
    debug = debug_enabled(argv)
    try:
        return main(argv)
    except UserError as error:
        if debug:
            raise
        return _report_after(delay_s, prog, error, EXIT_USER_ERROR)
    except OSError as error:
        if debug:
            raise
        return _report_after(delay_s, prog, error, EXIT_FAILED, f"(set {DEBUG_ENV}=1 for the traceback)")
    except ProcessFailed as error:
        if debug:
            raise
        return _report_after(delay_s, prog, error, EXIT_FAILED)
    except KeyboardInterrupt:
        if not delay_s:
            print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        if not delay_s:
            print(f"{prog}: terminated", file=sys.stderr)
        return EXIT_TERMINATED


def _report_after(delay_s: float, prog: str, error: BaseException, status: int, *hints: str) -> int:
    """Report ``error`` after ``delay_s`` and return ``status``; a signal in the wait returns it unreported."""
    if delay_s:
        try:
            time.sleep(delay_s)
        except (KeyboardInterrupt, Terminated):
            return status
    report(prog, error)
    for hint in hints:
        print(f"{prog}: {hint}", file=sys.stderr)
    return status
