"""Progress output that suits where it goes.

On a terminal: tqdm bars (they redraw one line in place). Anywhere else (a log file, CI, a pipe:
`sys.stderr.isatty()` is false), a bar's redraws would each become a line, so bars stay silent and
only the summary lines are written: one per epoch, one per task in per_task mode.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TextIO

from tqdm import tqdm


class SilentBar:
    """Takes a bar's calls (and iterates like one) but writes nothing: the summary lines report instead."""

    def __init__(self, iterable: Iterable | None = None):
        self.iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self.iterable if self.iterable is not None else ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass


def bar(
    iterable: Iterable | None = None,
    *,
    total: int,
    desc: str,
    unit: str,
    initial: int = 0,
    leave: bool = True,
    stream: TextIO | None = None,
) -> tqdm | SilentBar:
    """A tqdm bar (over `iterable`, if given) on `stream` (default stderr) when it is a terminal, else a silent
    stand-in."""
    stream = stream or sys.stderr
    if not stream.isatty():
        return SilentBar(iterable)
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, file=stream)


def summary(line: str, stream: TextIO | None = None) -> None:
    """One line of what happened (stdout by default), printed above any open bar rather than through it."""
    tqdm.write(line, file=stream or sys.stdout)
