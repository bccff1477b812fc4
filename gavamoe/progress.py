"""Progress of long loops, on a terminal and off it.

On a terminal, ``Progress`` is a tqdm bar. Without one (under ``nohup``, into a log file, in CI)
tqdm stays silent, so a run of hours would say nothing until it ends; there ``Progress`` writes a
line on stderr instead, at most once every ``REPORT_SECONDS`` across all bars of the process:
``stage 2: 340/1200, loss=2.113, nll=2.087 (95 s)``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

REPORT_SECONDS = 60.0
_last_report = time.perf_counter()  # shared: many short bars in a row still give one line a minute


class Progress:
    """A tqdm bar (``iterable`` or ``total``, ``desc``, ``initial``, ``leave``) that, with no terminal,
    reports on stderr instead; ``quiet`` silences both (a process other than the main one)."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 initial: int = 0, leave: bool = True, quiet: bool = False):
        self._bar = tqdm(iterable, total=total, desc=desc, initial=initial, leave=leave,
                         disable=True if quiet else None, mininterval=0.5)
        self._log = not quiet and bool(self._bar.disable)
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.n = iterable, total, desc, initial
        self._postfix, self._started = "", time.perf_counter()

    def __iter__(self) -> Iterator:
        if not self._log:
            yield from self._bar
            return
        for item in self.iterable:
            yield item
            self.update()

    def update(self, n: int = 1) -> None:
        if not self._log:
            self._bar.update(n)
            return
        self.n += n
        global _last_report
        now = time.perf_counter()
        if now - _last_report >= REPORT_SECONDS:
            _last_report = now
            total = f"/{self.total}" if self.total is not None else ""
            postfix = f", {self._postfix}" if self._postfix else ""
            print(f"{self.desc}: {self.n}{total}{postfix} ({now - self._started:.0f} s)", file=sys.stderr, flush=True)

    def set_postfix(self, **values: str) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        self._bar.set_postfix(values)

    def close(self) -> None:
        self._bar.close()
