"""Stopping a run cleanly: SIGINT/SIGTERM only set a flag, and the loop stops at its next safe point."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


class RunInterrupted(Exception):
    """SIGINT/SIGTERM arrived; raised at the next safe point (never inside a checkpoint write)."""


class StopFlag:
    """Signal handlers only set this flag; the loop checks it between members and after checkpoints."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        """The handlers for the run's duration; the caller's come back after it (a notebook or a test that runs the
        training command in its own process keeps its Ctrl-C)."""
        earlier = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in earlier.items():
                signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def check(self) -> None:
        if self.signal_name:
            raise RunInterrupted(self.signal_name)
