"""Checkpoints that survive crashes: atomic, pickle-free, resumable, and small.

Layout of checkpoints/<run>/:
    epoch_0003/            evolvable.safetensors, optimizer.safetensors, state.json
    best/                  the best mean model so far (same files)
    LATEST                 the name of the newest complete epoch directory
    moved_aside-<time>/    epochs (and best/, best_model/) set aside by resuming from an earlier epoch
A directory is written under a temporary name and renamed when complete; LATEST is replaced
atomically afterwards; best/ is a symlink swapped atomically (disk.publish_dir). A crash at any
point leaves the previous checkpoint intact and loadable. Each safetensors header holds every
tensor's byte hash (digest.tensor_digest), checked whenever it is read.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ERO_EGGROLL.core.digest import tensor_digest
from ERO_EGGROLL.core.errors import EggrollError
from ERO_EGGROLL.io.disk import fsync_dir, move_aside, publish_dir, staged_dir, writing

STATE_FILE, WEIGHTS_FILE, OPTIMIZER_FILE, LATEST = (
    "state.json",
    "evolvable.safetensors",
    "optimizer.safetensors",
    "LATEST",
)
CHECKPOINT_FILES = (STATE_FILE, WEIGHTS_FILE, OPTIMIZER_FILE)
KEEP_MARK = ".keep"  # epoch directories with it survive pruning (save_every, the last, the first)
EPOCH_DIR = re.compile(r"epoch_(\d{4,})")


def epoch_number(epoch_dir: Path) -> int:
    """NNNN of an epoch_NNNN/ directory."""
    return int(epoch_dir.name.removeprefix("epoch_"))


class CheckpointError(EggrollError):
    """A checkpoint that cannot be written or read, with the path and what to do."""


@dataclass
class RunState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    epoch: int = 0  # completed epochs
    identity: dict = field(default_factory=dict)  # storage/identity.identity_of: what decides the numbers
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # per epoch: fitness, new_best, rolled_back
    best_fitness: float = float("-inf")
    best_epoch: int = -1
    epochs_since_best: int = 0
    optimizer_step: int = 0
    finished: bool = False
    # the run record (run/record.py): digest of the evolvable weights after each epoch (index = epoch), the
    # newest epoch's per-tensor digests, and each tensor's sigma as computed from the BASE weights
    weight_digests: list[str] = field(default_factory=list)
    tensor_digests: dict[str, str] = field(default_factory=dict)
    sigma: dict[str, float] = field(default_factory=dict)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _str_map(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) for k in v)


# every field of state.json and what it must hold: a value of another type is refused on load, naming the field
STATE_TYPES = {
    "epoch": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "identity": (_str_map, "an object"),
    "config": (_str_map, "an object"),
    "history": (lambda v: isinstance(v, list) and all(_str_map(row) for row in v), "a list of objects"),
    "best_fitness": (_is_number, "a number"),
    "best_epoch": (lambda v: _is_int(v) and v >= -1, "an integer >= -1"),
    "epochs_since_best": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "optimizer_step": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "finished": (lambda v: isinstance(v, bool), "true or false"),
    "weight_digests": (lambda v: isinstance(v, list) and all(isinstance(d, str) for d in v), "a list of strings"),
    "tensor_digests": (lambda v: _str_map(v) and all(isinstance(d, str) for d in v.values()), "an object of strings"),
    "sigma": (
        # 0 is a real sigma: signed_mean gives it to a tensor whose mean is exactly 0 (ERO does not move it)
        lambda v: _str_map(v) and all(_is_number(x) and math.isfinite(x) and x >= 0 for x in v.values()),
        "an object of numbers >= 0",
    ),
}


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors with each tensor's byte hash in the header, checked when it is read back."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    # no tensors: no metadata (safetensors writes a broken header for an empty file with empty metadata)
    save_file(tensors, path, metadata={name: tensor_digest(t) for name, t in tensors.items()} or None)


def _write_checkpoint_files(
    folder: Path,
    target: Path,
    weights: dict[str, torch.Tensor],
    optimizer: dict[str, torch.Tensor],
    state: RunState,
    keep: bool = False,
) -> None:
    """A complete, fsynced checkpoint in `folder`, the staging folder that becomes `target` once complete."""
    with writing(target):
        _save_tensors(weights, folder / WEIGHTS_FILE)
        _save_tensors(optimizer, folder / OPTIMIZER_FILE)
        (folder / STATE_FILE).write_text(json.dumps(state.__dict__, indent=1))
        if keep:
            (folder / KEEP_MARK).touch()  # exempt from pruning, decided before the directory becomes visible
        for f in folder.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())


def _non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    return next(
        (name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None
    )


def save_checkpoint(
    run_ckpt_dir: Path, weights, optimizer, state: RunState, *, keep: bool, best: bool, store_tensors: bool = True
) -> Path:
    """Write epoch_<n>/ (and best/), point LATEST at it, prune unkept epoch directories.

    Weights that are not finite are never saved: the run stops with the previous checkpoint intact. Without
    `store_tensors` (run.checkpoint: replay) the tensor files hold no tensors: the state is the run record."""
    name = f"epoch_{state.epoch:04d}"
    bad = _non_finite(weights)
    if bad:
        raise CheckpointError(
            f"epoch {state.epoch}: tensor {bad} is not finite (inf or NaN) after the update, so it was not saved; "
            f"{read_latest_name(run_ckpt_dir) or 'the previous checkpoint'} is intact. Lower evolution.lr or "
            "evolution.sigma (or set evolution.max_update_norm) and start again"
        )
    target = run_ckpt_dir / name
    if not store_tensors:
        weights, optimizer = {}, {}
    with staged_dir(target) as staging:
        _write_checkpoint_files(staging, target, weights, optimizer, state, keep)
        with writing(target):
            if target.exists():  # never overwrite a saved epoch: keep the earlier one beside it
                print(f"note: {target} already existed; moved it to {move_aside(target)}", file=sys.stderr)
            staging.rename(target)
            fsync_dir(run_ckpt_dir)
    if best:
        with staged_dir(run_ckpt_dir / "best") as staging:
            _write_checkpoint_files(staging, run_ckpt_dir / "best", weights, optimizer, state)
            publish_dir(staging, run_ckpt_dir / "best")
    previous = read_latest_name(run_ckpt_dir)
    write_latest(run_ckpt_dir, name)
    if previous and EPOCH_DIR.fullmatch(previous) and previous != name and not _kept(run_ckpt_dir / previous):
        shutil.rmtree(run_ckpt_dir / previous, ignore_errors=True)
    return target


def write_latest(run_ckpt_dir: Path, name: str) -> None:
    """Point LATEST at `name`, atomically."""
    pointer = run_ckpt_dir / f".{LATEST}.tmp"
    with writing(run_ckpt_dir / LATEST):
        pointer.write_text(name)
        os.replace(pointer, run_ckpt_dir / LATEST)


def _kept(path: Path) -> bool:
    return (path / KEEP_MARK).exists()


def read_latest_name(run_ckpt_dir: Path) -> str | None:
    pointer = Path(run_ckpt_dir) / LATEST
    try:
        return pointer.read_text().strip() if pointer.is_file() else None
    except (OSError, UnicodeDecodeError):
        return "<unreadable>"


def epoch_dirs(run_ckpt_dir: Path) -> list[Path]:
    """Complete epoch_NNNN/ directories (every file present), oldest first."""
    found = [p for p in Path(run_ckpt_dir).glob("epoch_*") if EPOCH_DIR.fullmatch(p.name) and p.is_dir()]
    return sorted((p for p in found if all((p / f).is_file() for f in CHECKPOINT_FILES)), key=epoch_number)


def latest_dir(run_ckpt_dir: Path) -> tuple[Path, str | None]:
    """The newest complete checkpoint of a run folder, and what was wrong with LATEST when it had to be rebuilt."""
    name = read_latest_name(run_ckpt_dir)
    if name and EPOCH_DIR.fullmatch(name) and all((run_ckpt_dir / name / f).is_file() for f in CHECKPOINT_FILES):
        return run_ckpt_dir / name, None
    complete = epoch_dirs(run_ckpt_dir)
    problem = "missing" if name is None else f"damaged ({name[:40]!r} is not a complete epoch_NNNN/ directory)"
    if not complete:
        if name is None and not any(Path(run_ckpt_dir).glob("epoch_*")):
            raise CheckpointError(
                f"{run_ckpt_dir} holds no checkpoint (no LATEST file, no epoch_NNNN/); give the run's "
                "checkpoints/<run> folder"
            )
        raise CheckpointError(
            f"{run_ckpt_dir}: LATEST is {problem} and no complete epoch_NNNN/ directory is left to resume from; "
            "start the run again (--overwrite moves this one aside)"
        )
    return complete[-1], f"LATEST in {run_ckpt_dir} is {problem}; the newest complete checkpoint is {complete[-1].name}"


def repair_latest(run_ckpt_dir: Path) -> None:
    """Before resuming: rebuild a missing or damaged LATEST from the newest complete epoch (never a silent restart)."""
    newest, problem = latest_dir(run_ckpt_dir)
    if problem:
        write_latest(run_ckpt_dir, newest.name)
        print(f"note: {problem}; LATEST rebuilt to point at it", file=sys.stderr)


def _fallback(checkpoint: Path) -> str:
    """Where to go back to when `checkpoint` is damaged: the newest complete epoch before it."""
    match = EPOCH_DIR.fullmatch(checkpoint.name)
    limit = int(match.group(1)) if match else math.inf
    earlier = [p for p in epoch_dirs(checkpoint.parent) if epoch_number(p) < limit]
    if earlier:
        return f"resume from the earlier checkpoint with --resume {earlier[-1]}"
    return "no earlier epoch is kept: start the run again (--overwrite moves this one aside)"


def _load_tensors(path: Path, checkpoint: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(path, "pt") as f:
            digests = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(
            f"{path}: the safetensors file is corrupt or truncated ({str(err).splitlines()[0]}); "
            f"{_fallback(checkpoint)}"
        ) from None
    for name, tensor in tensors.items():
        if digests.get(name) != tensor_digest(tensor):
            raise CheckpointError(
                f"{path}: tensor {name} does not match the hash saved with it (its bytes changed on disk: "
                f"corrupt); {_fallback(checkpoint)}"
            )
    return tensors


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], RunState]:
    """(weights, optimizer tensors, state) from a checkpoint directory or a run's checkpoint folder (via LATEST).

    Every tensor's bytes are checked against the hash saved with it."""
    path = checkpoint_dir(path)
    return _load_tensors(path / WEIGHTS_FILE, path), _load_tensors(path / OPTIMIZER_FILE, path), read_state(path)


def checkpoint_dir(path: Path) -> Path:
    """`path` itself when it is one checkpoint directory, else the newest complete one of the run folder `path`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if (path / STATE_FILE).is_file():
        return path
    if not (path / LATEST).exists() and not any(path.glob("epoch_*")):
        raise CheckpointError(
            f"{path} is not a checkpoint (no {STATE_FILE}; expected a run's checkpoint folder or an epoch_NNNN/ "
            "directory)"
        )
    path, problem = latest_dir(path)
    if problem:
        print(f"note: {problem}; reading that", file=sys.stderr)
    return path


def read_state(path: Path) -> RunState:
    """The run state of one checkpoint directory (no tensors read)."""
    try:
        data = json.loads((path / STATE_FILE).read_text())
        unknown = set(data) - {f.name for f in fields(RunState)}
        if unknown:
            raise CheckpointError(
                f"{path / STATE_FILE} has fields {sorted(unknown)} this version does not know "
                "(written by another version of ERO_EGGROLL?); start the run again"
            )
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        state = RunState(**data)
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError, OSError) as err:
        raise CheckpointError(f"{path / STATE_FILE} is corrupt ({err}); {_fallback(path)}") from None
    wrong = next(
        (
            f"{name} must be {what}, got {getattr(state, name)!r:.60}"
            for name, (ok, what) in STATE_TYPES.items()
            if not ok(getattr(state, name))
        ),
        None,
    )
    if wrong:
        raise CheckpointError(f"{path / STATE_FILE}: {wrong} (edited or damaged?); {_fallback(path)}")
    return state


def _aside_folder(run_ckpt_dir: Path) -> Path:
    """Where checkpoints that no longer belong to the run's line of epochs are kept."""
    return run_ckpt_dir / f"moved_aside-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def rewind(run_ckpt_dir: Path, epoch_dir: Path) -> Path | None:
    """Resume from an earlier epoch: move later epochs and best_model/ into moved_aside-<time>/, point LATEST at
    `epoch_dir`.

    Returns the folder they went to (None when there was nothing later). Nothing is deleted."""
    number = epoch_number(epoch_dir)
    later = [p for p in run_ckpt_dir.glob("epoch_*") if EPOCH_DIR.fullmatch(p.name) and epoch_number(p) > number]
    aside = _aside_folder(run_ckpt_dir)
    for path in sorted(later) + [p for p in [run_ckpt_dir / "best_model"] if p.exists() and later]:
        move_aside(path, into=aside)
    write_latest(run_ckpt_dir, epoch_dir.name)
    if later:
        print(
            f"resuming from {epoch_dir.name}: moved {', '.join(p.name for p in sorted(later))} aside into {aside}",
            file=sys.stderr,
        )
    return aside if later else None


def best_weights_for(run_ckpt_dir: Path, state: RunState) -> dict[str, torch.Tensor]:
    """The best weights as of `state`: best/ when it belongs to state.best_epoch, else that epoch's directory.

    best/ can be newer than the state (resumed from an earlier epoch, or a crash between writing best/
    and LATEST); then it is republished from epoch_<best_epoch>/ and the newer one is moved aside."""
    best = run_ckpt_dir / "best"
    if best.exists() and read_state(best).epoch == state.best_epoch:
        return load_checkpoint(best)[0]
    source = run_ckpt_dir / f"epoch_{state.best_epoch:04d}"
    if not (source / STATE_FILE).is_file():
        raise CheckpointError(
            f"{run_ckpt_dir}: the best weights of epoch {state.best_epoch} are neither in best/ nor in {source.name}/ "
            "(not kept: run.save_every); resume from a later epoch or start the run again"
        )
    weights, optimizer, best_state = load_checkpoint(source)
    aside = _aside_folder(run_ckpt_dir) / "best" if best.exists() else None
    with staged_dir(best) as staging:
        _write_checkpoint_files(staging, best, weights, optimizer, best_state)
        publish_dir(staging, best, previous_to=aside)
    return weights


def assign_weights(
    model: torch.nn.Module, weights: dict[str, torch.Tensor], where: str, expected: Iterable[str] = ()
) -> None:
    """Copy saved tensors into the model's parameters: every `expected` name present, shapes and dtypes equal."""
    params = dict(model.named_parameters())
    missing = [name for name in expected if name not in weights]
    if missing:
        raise CheckpointError(
            f"{where}: {len(missing)} evolved tensor(s) missing, e.g. {missing[0]} (saved with other "
            "params settings, or damaged?)"
        )
    for name, tensor in weights.items():
        if name not in params:
            raise CheckpointError(
                f"{where}: tensor {name} is not a parameter of this model (a checkpoint of another model?)"
            )
        if params[name].shape != tensor.shape:
            raise CheckpointError(
                f"{where}: {name} has shape {tuple(tensor.shape)}, the model has {tuple(params[name].shape)}"
            )
        if params[name].dtype != tensor.dtype:
            raise CheckpointError(
                f"{where}: {name} is {str(tensor.dtype).removeprefix('torch.')}, the model is "
                f"{str(params[name].dtype).removeprefix('torch.')}; set model.dtype to the run's dtype"
            )
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)


def run_started(run_ckpt_dir: Path) -> bool:
    """Whether a run (or a per_task task) has saved anything in this folder."""
    return (run_ckpt_dir / LATEST).exists() or any(run_ckpt_dir.glob("epoch_*"))
