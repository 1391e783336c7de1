"""Stopping a run cleanly: SIGINT/SIGTERM only set a flag, and the loop stops at its next safe point."""

from __future__ import annotations

import signal


class RunInterrupted(Exception):
    """SIGINT/SIGTERM arrived; raised at the next safe point (never inside a checkpoint write)."""


class StopFlag:
    """Signal handlers only set this flag; the loop checks it between members and after checkpoints."""

    def __init__(self):
        self.signal_name: str | None = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def check(self) -> None:
        if self.signal_name:
            raise RunInterrupted(self.signal_name)
