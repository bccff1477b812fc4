"""User errors of the model package, and the command-line wrapper that reports them.

A bad flag, file or record raises :class:`UserInputError` (a ``ValueError``) naming it; the
``python -m gavamoe.*`` commands print that one line and exit with status 2. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path


class UserInputError(ValueError):
    """Bad input from the user: a flag, a file, a record. The message names it."""


def finite_float(text: str) -> float:
    """A float flag's value: NaN and infinities are refused (every range check passes a NaN)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


class CliParser(argparse.ArgumentParser):
    """The commands' argument parser: a bad flag is one line, ``gavamoe.X: error: message``, and
    exit status 2, like every other user error (argparse would print the whole usage first; the
    prefix is ``run_cli``'s, without the ``python -m`` of the usage line); ``--help`` still prints
    it. A ``type=float`` flag, in the parser or a group of it, takes finite numbers only. Flags are
    taken only in full: argparse's abbreviations made ``fame.compare --seed 3`` mean ``--seeds 3``
    and ``--num-exp 2`` slip past compare's check to override a variant's ``--num-experts``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.register("type", float, finite_float)  # argparse looks a flag's type up here; groups share it

    def error(self, message: str):
        self.exit(2, f"{self.prog.removeprefix('python -m ')}: error: {message}\n")


def run_cli(prog: str, main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """``main(argv)``, with a user error printed as ``prog: error: message`` and exit status 2."""
    from .data.peter import RefusedPickleError

    try:
        return main(argv)
    except (UserInputError, RefusedPickleError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2


def flag_of(name: str) -> str:
    """The flag of a config field: ``weight_decay`` -> ``--weight-decay``."""
    return "--" + name.replace("_", "-")


def check_at_least_one(config, names: tuple[str, ...], flag: Callable[[str], str] = flag_of) -> None:
    """Each field ``names`` of ``config`` must be at least 1 (None, a field left to its default
    rule, passes); the error names the flag, ``flag(name)``."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < 1:
            raise UserInputError(f"{flag(name)} must be at least 1, got {value}")


# what check_ranges accepts: the range's words in the error -> the test
RANGES: dict[str, Callable[[float], bool]] = {
    "be positive": lambda v: v > 0,
    "be non-negative": lambda v: v >= 0,
    "lie in [0, 1]": lambda v: 0 <= v <= 1,
    "lie in [0, 1)": lambda v: 0 <= v < 1,
    "lie in (0, 1)": lambda v: 0 < v < 1,
    "lie in (0, 1]": lambda v: 0 < v <= 1,
}


def check_ranges(config, ranges: dict[str, str], flag: Callable[[str], str] = flag_of) -> None:
    """Each field of ``config`` (a dataclass, or the parsed flags) named in ``ranges`` must be in its
    range, a key of RANGES (None, a field left to its default rule, passes); the error names that
    one flag and its value: ``--lr must be positive, got 0.0``."""
    for name, words in ranges.items():
        value = getattr(config, name)
        if value is not None and not RANGES[words](value):
            raise UserInputError(f"{flag(name)} must {words}, got {value}")


def check_finite(config, flag: Callable[[str], str] = flag_of) -> None:
    """Every float field of the dataclass ``config`` must be finite: a NaN passes every range
    check after it and trains to NaN. The error names the flag, ``flag(name)``."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserInputError(f"{flag(f.name)} must be a finite number, got {value}")


def writable_out(path: Path, flag: str = "--out", folder: bool = True) -> Path:
    """Check, before any work, that the command can write its output, the folder ``path`` (with
    ``folder=False`` the file ``path``): that folder (the file's folder) is made now and must be
    writable; the file itself is not created. So a path that cannot be written is one line at
    once, not a traceback after the training whose results it was to keep."""
    where = path if folder else path.parent
    if folder and path.exists() and not path.is_dir():
        raise UserInputError(f"{flag} {path}: exists and is not a folder")
    if not folder and path.is_dir():
        raise UserInputError(f"{flag} {path}: is a folder; give a file's path")
    try:
        where.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (where, *where.parents) if p.exists() and not p.is_dir()), where)
        raise UserInputError(f"{flag} {path}: cannot write there ({blocker} is a file)") from None
    except OSError as error:
        raise UserInputError(f"{flag} {path}: cannot write there ({error.strerror})") from None
    if not os.access(path if not folder and path.exists() else where, os.W_OK):
        raise UserInputError(f"{flag} {path}: cannot write there (no write permission)")
    return path


def check_device(device: str, flag: str = "--device") -> None:
    """A device torch can parse and that exists here (``cuda`` on a machine with a GPU)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise UserInputError(f"{flag} {device}: not a device ({error})") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"{flag} {device}: this machine has no CUDA device (use --device cpu)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise UserInputError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def check_model_path(name: str | None, flag: str = "--base-model") -> None:
    """A name that is clearly a local path (absolute, ./, ../, ~, or more than one '/') must exist;
    'name' and 'org/name' may also be Hugging Face Hub models."""
    if name is None:
        return
    local = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
    if local and not Path(name).expanduser().exists():
        raise UserInputError(f"{flag} {name}: no such folder")
