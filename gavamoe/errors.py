"""User errors of the model package, and the command-line wrapper that reports them.

A bad flag, file or record raises :class:`UserInputError` (a ``ValueError``) naming it; the
``python -m gavamoe.*`` commands print that one line and exit with status 2. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


class UserInputError(ValueError):
    """Bad input from the user: a flag, a file, a record. The message names it."""


class CliParser(argparse.ArgumentParser):
    """The commands' argument parser: a bad flag is one line, ``prog: error: message``, and exit
    status 2, like every other user error (argparse would print the whole usage first);
    ``--help`` still prints it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def run_cli(prog: str, main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """``main(argv)``, with a user error printed as ``prog: error: message`` and exit status 2."""
    from .data.peter import RefusedPickleError

    try:
        return main(argv)
    except (UserInputError, RefusedPickleError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2


def check_at_least_one(config, names: tuple[str, ...],
                       flag: Callable[[str], str] = lambda name: "--" + name.replace("_", "-")) -> None:
    """Each field ``names`` of ``config`` must be at least 1 (None, a field left to its default
    rule, passes); the error names the flag, ``flag(name)``."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < 1:
            raise UserInputError(f"{flag(name)} must be at least 1, got {value}")


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
