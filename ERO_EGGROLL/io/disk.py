"""Writing to disk without losing what is already there.

* every write goes through `writing(path)`: a failure (disk full, read-only folder, no permission)
  becomes one WriteError line that names the path and says the previous checkpoint is intact;
* a directory that is replaced (best/, best_model/) is published with `publish_dir`: a symlink
  swapped atomically by rename, so a reader sees the old or the new version, never neither;
* nothing saved is deleted to make room: `move_aside` renames it with a time stamp;
* a command's output (an export, `--out`) goes through `check_output` first: it writes only into a new
  path or over an earlier output of the same kind, never over anything else.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from safetensors import SafetensorError

from ERO_EGGROLL.core.errors import EggrollError

OUTPUT_MARK = ".ero_eggroll_output.json"  # in a folder a command wrote: {"kind": ...}; what marks it as safe to replace
CHECKPOINT_INTACT = "the previous checkpoint is intact: free space or fix permissions, then --resume"
NOTHING_ELSE_CHANGED = "nothing else was changed: free space or fix permissions, then run it again"


class WriteError(EggrollError):
    """A write that failed; what was saved before it is untouched."""


class OutputError(EggrollError):
    """An output path that would replace or destroy something the command did not write."""


@contextlib.contextmanager
def writing(path: Path, then: str = CHECKPOINT_INTACT) -> Iterator[None]:
    """Turn an OSError (or safetensors' own I/O error) inside the block into one WriteError line naming `path`;
    `then` says what is intact and what to do."""
    try:
        yield
    except (OSError, SafetensorError) as err:
        reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
        raise WriteError(
            f"could not write {path}: {reason} (disk full, read-only folder or no permission?); {then}"
        ) from None


@contextlib.contextmanager
def staged_dir(target: Path, then: str = CHECKPOINT_INTACT) -> Iterator[Path]:
    """A new hidden folder beside `target` to build it in, so that nobody ever sees it half written. The block
    publishes it (a rename); whatever is left of it afterwards, after a failure too, is removed: it was ours."""
    with writing(target, then):
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def write_files(writers: dict[Path, Callable[[Path], object]], then: str = NOTHING_ELSE_CHANGED) -> None:
    """Write each file (`writers[target](staging_path)`) beside its target under a hidden name, then rename them all
    into place; when any write or rename fails, the targets already renamed get their old files back, so the files
    are all new or all as before, and a failure is one WriteError line. What is left of the staging is removed."""
    staged = {target: target.with_name(f".{target.name}.tmp-{os.getpid()}") for target in writers}
    kept: dict[Path, Path] = {}  # target -> its old file, renamed aside until every new file is in place
    placed: list[Path] = []
    try:
        with writing(next(iter(writers)), then):
            for target, write in writers.items():
                target.parent.mkdir(parents=True, exist_ok=True)
                write(staged[target])
            try:
                for target in writers:
                    if target.exists():
                        old = target.with_name(f".{target.name}.old-{os.getpid()}")
                        os.replace(target, old)
                        kept[target] = old
                    os.replace(staged[target], target)
                    placed.append(target)
            except OSError:
                for target in placed:
                    target.unlink(missing_ok=True)
                for target, old in kept.items():
                    os.replace(old, target)
                raise
    finally:
        for path in [*staged.values(), *kept.values()]:
            path.unlink(missing_ok=True)


def mark_output(folder: Path, kind: str, owner: str) -> None:
    """Mark `folder` (being written by a command, complete but for this mark) as an output of `kind` made for
    `owner` (the run it holds, a resolved path), listing the entries written, so that a later command knows what it
    may replace and what a user added since."""
    entries = sorted(p.name for p in folder.iterdir()) + [OUTPUT_MARK]
    (folder / OUTPUT_MARK).write_text(json.dumps({"kind": kind, "owner": owner, "entries": entries}) + "\n")


def output_mark(path: Path, kind: str) -> dict | None:
    """The mark of `path` when it is a folder marked as an output of `kind` (a plain folder, or the symlink
    `publish_dir` made to a hidden version beside it); None otherwise. A mark written before marks named their owner
    has owner ''."""
    if path.is_symlink() and _own_version(path) is None:
        return None
    try:
        mark = json.loads((path / OUTPUT_MARK).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(mark, dict) or mark.get("kind") != kind:
        return None
    return {"owner": str(mark.get("owner") or ""), "entries": mark.get("entries")}


def added_entries(folder: Path, mark: dict) -> list[str]:
    """Entries of a marked output folder that its command did not write (a user's notes): all of them when the mark
    predates the list of entries, since what was written then is unknown."""
    entries = mark.get("entries")
    present = sorted(p.name for p in folder.iterdir())
    if not isinstance(entries, list):
        return [p for p in present if p != OUTPUT_MARK]
    return [p for p in present if p not in entries]


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(path: str | Path, what: str, earlier: Callable[[Path], bool], protected: Iterable[Path] = ()) -> Path:
    """The one rule for everything a command writes: `path` must be new, an empty plain folder, or an earlier output
    (`earlier(path)`); never a symlink, device or special file, '', '.', an ancestor of the current folder, or inside,
    equal to or an ancestor of a `protected` folder (the run's folder, the base model's). Raises OutputError naming
    the problem before any work is done; returns the path to write."""
    if str(path).strip() in ("", "."):
        raise OutputError(f"{what} {str(path)!r}: give a new path to write to (not '' or '.')")
    path = Path(path)
    if not path.is_symlink() and not path.exists():
        parent = path.parent.resolve()
        if parent.exists() and not parent.is_dir():
            raise OutputError(f"{what} {path}: {path.parent} is not a folder")
        if path.name in ("", ".", ".."):
            raise OutputError(f"{what} {path}: give a new path to write to")
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if _within(cwd, resolved):
        raise OutputError(f"{what} {path} is the current folder or one above it; give a new path to write to")
    for folder in protected:
        folder = Path(folder).resolve()
        if _within(resolved, folder) or _within(folder, resolved):
            raise OutputError(
                f"{what} {path} is, holds or lies inside {folder} (a run or base model folder, never written "
                "by this command); give a new path elsewhere"
            )
    if path.is_symlink() and not earlier(path):
        raise OutputError(
            f"{what} {path} is a symlink (to {os.readlink(path)}); nothing is written through it: give a new path"
        )
    if not path.exists():
        return path
    mode = path.lstat().st_mode
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise OutputError(f"{what} {path} is a device or special file; give a new path to write to")
    if earlier(path) or (stat.S_ISDIR(mode) and not any(path.iterdir())):
        return path
    kind = "folder" if path.is_dir() else "file"
    raise OutputError(
        f"{what} {path}: a {kind} that this command did not write is there; it is never replaced: "
        "give a new path, or move it away yourself"
    )


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _own_version(link: Path) -> Path | None:
    """The hidden version folder that `link` points at when publish_dir made the link, else None (a link of someone
    else's: never followed to move or delete what it points at)."""
    if not link.is_symlink():
        return None
    pointed = os.readlink(link)
    return link.parent / pointed if _version_name(link, pointed) else None


def _version_name(target: Path, name: str) -> bool:
    """Whether `name` is exactly what publish_dir names a version of `target`: `.NAME.v<time in ns>`, nothing else
    (a user's `.NAME.v2-mine` is not ours)."""
    return re.fullmatch(rf"\.{re.escape(target.name)}\.v\d{{19}}", name) is not None


def publish_dir(staging: Path, target: Path, previous_to: Path | None = None, then: str = CHECKPOINT_INTACT) -> None:
    """Make the complete directory `staging` visible as `target` in one atomic step.

    `target` is a symlink to a hidden version directory beside it; the new symlink replaces the old
    one with os.replace (atomic), then the previous version is deleted, or moved to `previous_to`.
    A plain folder or file at `target` (an older layout, or not ours) is moved aside, kept, never deleted.
    Versions orphaned by a crash before an earlier swap are removed. The run lock makes this the only writer.
    `then`: what a failure leaves intact (writing).
    """
    if target.is_symlink() and _own_version(target) is None:
        raise OutputError(
            f"{target} is a symlink to {os.readlink(target)} that this command did not make; nothing is written "
            "through it (what it points at stays as it is): remove the link, or give the run another name"
        )
    version = target.with_name(f".{target.name}.v{time.time_ns()}")
    with writing(target, then):
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp made it private; the published directory gets the usual permissions
        staging.rename(version)
        previous = _own_version(target)
        if target.exists() and not target.is_symlink():  # not ours (or an older layout): kept beside, never deleted
            move_aside(target)
        link = target.with_name(f".{target.name}.link-tmp")
        link.unlink(missing_ok=True)
        link.symlink_to(version.name)
        os.replace(link, target)
        fsync_dir(target.parent)
        if previous is not None and previous.exists():
            if previous_to is not None:
                previous_to.parent.mkdir(parents=True, exist_ok=True)
                previous.rename(previous_to)
            else:
                shutil.rmtree(previous, ignore_errors=True)
        for orphan in target.parent.iterdir():  # left by a crash before a swap: never visible, never needed
            if orphan != version and _version_name(target, orphan.name) and not orphan.is_symlink():
                shutil.rmtree(orphan, ignore_errors=True)


def aside_name(path: Path, into: Path | None = None) -> Path:
    """A free name to keep `path` under: `<path>.old-<UTC time>` (or `into`/NAME), with `~N` when that is taken."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = (into / path.name) if into is not None else path.with_name(f"{path.name}.old-{stamp}")
    n = 1
    while dest.exists() or dest.is_symlink():
        n += 1
        dest = dest.with_name(f"{dest.name.split('~')[0]}~{n}")
    return dest


def move_aside(path: Path, into: Path | None = None) -> Path:
    """Rename `path` to `<path>.old-<UTC time>` (or into the folder `into`), never deleting anything; return the new
    path."""
    dest = aside_name(path, into)
    with writing(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        version = _own_version(path)
        if version is not None:  # a published directory: move the version it points at, under the visible name
            version.rename(dest)
            path.unlink()
        else:  # a folder, a file, or someone else's link (moved as a link; what it points at stays)
            path.rename(dest)
    return dest
