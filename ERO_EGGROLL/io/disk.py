"""Writing to disk without losing what is already there.

* every write goes through `writing(path)`: a failure (disk full, read-only folder, no permission)
  becomes one WriteError line that names the path and says the previous checkpoint is intact;
* a directory that is replaced (best/, best_model/) is published with `publish_dir`: a symlink
  swapped atomically by rename, so a reader sees the old or the new version, never neither;
* nothing saved is deleted to make room: `move_aside` renames it with a time stamp.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError

from ERO_EGGROLL.core.errors import EggrollError


class WriteError(EggrollError):
    """A write that failed; what was saved before it is untouched."""


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an OSError (or safetensors' own I/O error) inside the block into one WriteError line naming `path`."""
    try:
        yield
    except (OSError, SafetensorError) as err:
        reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
        raise WriteError(f"could not write {path}: {reason} (disk full, read-only folder or no permission?); "
                         "the previous checkpoint is intact: free space or fix permissions, then --resume") from None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(staging: Path, target: Path, previous_to: Path | None = None) -> None:
    """Make the complete directory `staging` visible as `target` in one atomic step.

    `target` is a symlink to a hidden version directory beside it; the new symlink replaces the old
    one with os.replace (atomic), then the previous version is deleted, or moved to `previous_to`.
    A target that is still a plain directory (an older layout) is first moved aside as a version.
    Versions orphaned by a crash before an earlier swap are removed. The run lock makes this the only writer.
    """
    version = target.with_name(f".{target.name}.v{time.time_ns()}")
    with writing(target):
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp made it private; the published directory gets the usual permissions
        staging.rename(version)
        previous = target.resolve() if target.is_symlink() else None
        if target.exists() and not target.is_symlink():
            previous = target.rename(target.with_name(f".{target.name}.v{time.time_ns()}-old"))
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
        for orphan in target.parent.glob(f".{target.name}.v*"):  # left by a crash before a swap: never visible, never needed
            if orphan != version:
                shutil.rmtree(orphan, ignore_errors=True)


def move_aside(path: Path, into: Path | None = None) -> Path:
    """Rename `path` to `<path>.old-<UTC time>` (or into the folder `into`), never deleting anything; return the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = (into / path.name) if into is not None else path.with_name(f"{path.name}.old-{stamp}")
    n = 1
    while dest.exists() or dest.is_symlink():
        n += 1
        dest = dest.with_name(f"{dest.name.split('~')[0]}~{n}")
    with writing(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():  # a published directory: move the version it points at, under the visible name
            target = path.resolve()
            target.rename(dest)
            path.unlink()
        else:
            path.rename(dest)
    return dest
