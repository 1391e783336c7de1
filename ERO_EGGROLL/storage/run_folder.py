"""A run folder belongs to one run: ownership of checkpoints/<run> and results/<run>, and a lock.

* A new run refuses folders that already hold a run, unless told to move that run aside
  (`--overwrite`, or `run.if_exists: move_aside` as in configs/default.yaml): it is renamed, never deleted.
* One process at a time writes a run: `RunLock` creates `.<run>.lock` beside the checkpoint folder and
  beside the results folder (outside them, so moving a folder aside does not move its lock) holding the
  owner's pid and host; a new run takes both before it moves anything, so it never moves a live run's folders,
  nor a folder holding another live run's lock at any depth (a run nested in it, `run.name=a/b` inside `a`).
  A lock whose process is gone on this host is reported and taken over.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from ERO_EGGROLL.core.errors import EggrollError
from ERO_EGGROLL.io.disk import move_aside, writing


class RunFolderError(EggrollError):
    """The run's folders belong to another run or another process."""


def _holds_something(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def claim_run_folders(ckpt_dir: Path, run_dir: Path, *, move_earlier: bool) -> list[Path]:
    """Before a new (not resumed) run: refuse folders holding an earlier run, or move them aside; return where they
    went."""
    occupied = [p for p in dict.fromkeys([ckpt_dir, run_dir]) if _holds_something(p)]
    if occupied and not move_earlier:
        raise RunFolderError(
            f"{occupied[0]} already holds a run; continue it with --resume {ckpt_dir}, pick another run.name "
            "(--set run.name=...), or pass --overwrite to move the earlier run aside (nothing is deleted)"
        )
    for path in occupied:
        live = live_lock_inside(path)
        if live is not None:
            raise RunFolderError(
                f"{path} holds the lock {live} of a run that is still being written (a run nested in it, "
                "run.name=<this>/<other>?); it is never moved while that run goes on: wait for it, or pick another "
                "run.name"
            )
    moved = []
    for path in occupied:
        moved.append(move_aside(path))
        print(f"moved the earlier run aside: {path} -> {moved[-1]}")
    return moved


def live_lock_inside(folder: Path) -> Path | None:
    """A RunLock file at any depth under `folder` whose process may still run (on another host, alive here, or
    unreadable: unknown counts as live); None when there is none. Moving `folder` would pull that run's files away."""
    for root, _, files in os.walk(folder):
        for name in files:
            if not (name.startswith(".") and name.endswith(".lock")):
                continue
            lock = Path(root) / name
            try:
                holder = json.loads(lock.read_text())
                pid, host = int(holder["pid"]), str(holder["host"])
            except FileNotFoundError:
                continue  # released meanwhile
            except (ValueError, KeyError, TypeError, OSError):
                return lock
            if host != socket.gethostname() or _alive(pid):
                return lock
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


class RunLock:
    """`with RunLock(ckpt_dir):` only one process writes the run; the lock is removed on the way out."""

    def __init__(self, ckpt_dir: Path):
        ckpt_dir = Path(ckpt_dir).resolve()  # one lock however the folder is spelled (a symlink to a live run included)
        self.path = ckpt_dir.with_name(f".{ckpt_dir.name}.lock")
        self.owner = {"pid": os.getpid(), "host": socket.gethostname()}

    def __enter__(self) -> RunLock:
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with writing(self.path), os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            return self
        raise RunFolderError(f"{self.path}: another process took the run's lock at the same moment; try again")

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (ValueError, KeyError, TypeError, OSError):
            raise RunFolderError(
                f"{self.path} is unreadable, so whether another process writes this run is unknown; "
                "delete the lock file if no run is going on"
            ) from None
        if host != self.owner["host"] or _alive(pid):
            raise RunFolderError(
                f"run {self.path.name[1:-5]!r} is being written by process {pid} on {host} (lock {self.path}); "
                "wait for it to finish or pick another run.name; delete the lock only if that process is gone"
            )
        print(
            f"note: stale lock {self.path} from process {pid} on {host}, which is no longer running (a crash?); "
            "taking it over",
            file=sys.stderr,
        )
        self.path.unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        try:
            if json.loads(self.path.read_text()) == self.owner:
                self.path.unlink()
        except (OSError, ValueError):
            pass  # not ours any more, or already gone: nothing to release
