"""Checkpoints that survive crashes: atomic, pickle-free, resumable, and small.

Layout of checkpoints/<run>/:
    epoch_0003/            evolvable.safetensors, optimizer.safetensors, state.json
    best/                  the best mean model so far (same files)
    LATEST                 the name of the newest complete epoch directory
A directory is written under a temporary name and renamed when complete; LATEST is replaced
atomically afterwards. A crash at any point leaves the previous checkpoint intact and loadable.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

STATE_FILE, WEIGHTS_FILE, OPTIMIZER_FILE, LATEST = "state.json", "evolvable.safetensors", "optimizer.safetensors", "LATEST"
KEEP_MARK = ".keep"  # epoch directories with it survive pruning (save_every, the last, the first)
# Test-only fault injection: "NAME:SECONDS" sleeps inside the write of checkpoint directory NAME,
# after its tensors are written and before it is complete, so a test can kill -9 the process there.
SLOW_WRITE_ENV = "ERO_EGGROLL_FAULT_SLOW_WRITE"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read, with the path and what to do."""


@dataclass
class RunState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    epoch: int = 0  # completed epochs
    replay_hash: str = ""
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # per epoch: fitness, new_best, rolled_back
    best_fitness: float = float("-inf")
    best_epoch: int = -1
    epochs_since_best: int = 0
    optimizer_step: int = 0
    finished: bool = False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _slow_write_fault(name: str) -> None:
    spec = os.environ.get(SLOW_WRITE_ENV, "")
    if spec.partition(":")[0] == name:
        time.sleep(float(spec.partition(":")[2]))


def _write_dir(target: Path, weights: dict[str, torch.Tensor], optimizer: dict[str, torch.Tensor], state: RunState,
               keep: bool = False) -> None:
    """Write a checkpoint directory under a temporary name, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, staging / WEIGHTS_FILE)
        save_file({k: v.detach().cpu().contiguous() for k, v in optimizer.items()}, staging / OPTIMIZER_FILE)
        _slow_write_fault(target.name)
        (staging / STATE_FILE).write_text(json.dumps(state.__dict__, indent=1))
        if keep:
            (staging / KEEP_MARK).touch()  # exempt from pruning, decided before the directory becomes visible
        for f in staging.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(target)
        _fsync_dir(target.parent)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {target}: {err.strerror or err} "
                              "(disk full or read-only? the previous checkpoint is intact)") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_checkpoint(run_ckpt_dir: Path, weights, optimizer, state: RunState, *, keep: bool, best: bool) -> Path:
    """Write epoch_<n>/ (and best/), point LATEST at it, prune unkept epoch directories."""
    name = f"epoch_{state.epoch:04d}"
    target = run_ckpt_dir / name
    _write_dir(target, weights, optimizer, state, keep)
    if best:
        _write_dir(run_ckpt_dir / "best", weights, optimizer, state)
    pointer = run_ckpt_dir / f".{LATEST}.tmp"
    previous = read_latest_name(run_ckpt_dir)
    try:
        pointer.write_text(name)
        os.replace(pointer, run_ckpt_dir / LATEST)
    except OSError as err:
        raise CheckpointError(f"could not update {run_ckpt_dir / LATEST}: {err.strerror or err}") from None
    if previous and previous != name and not _kept(run_ckpt_dir / previous):
        shutil.rmtree(run_ckpt_dir / previous, ignore_errors=True)
    return target


def _kept(path: Path) -> bool:
    return (path / KEEP_MARK).exists()


def read_latest_name(run_ckpt_dir: Path) -> str | None:
    pointer = Path(run_ckpt_dir) / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], RunState]:
    """(weights, optimizer tensors, state) from a checkpoint directory or a run's checkpoint folder (via LATEST)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if (path / LATEST).is_file():
        path = path / read_latest_name(path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path} is not a checkpoint (no {STATE_FILE}; expected a run's checkpoint folder or an epoch_NNNN/ directory)")
    try:
        state = RunState(**json.loads((path / STATE_FILE).read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"{path / STATE_FILE} is corrupt: {err}") from None
    try:
        weights = load_file(path / WEIGHTS_FILE)
        optimizer = load_file(path / OPTIMIZER_FILE)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{path}: a safetensors file is corrupt or truncated ({err}); "
                              "resume from an earlier epoch_NNNN/ directory or start the run again") from None
    return weights, optimizer, state


def assign_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Copy saved tensors into the model's parameters, checking names, shapes and dtypes."""
    params = dict(model.named_parameters())
    for name, tensor in weights.items():
        if name not in params:
            raise CheckpointError(f"{where}: tensor {name} is not a parameter of this model (a checkpoint of another model?)")
        if params[name].shape != tensor.shape:
            raise CheckpointError(f"{where}: {name} has shape {tuple(tensor.shape)}, the model has {tuple(params[name].shape)}")
        with torch.no_grad():
            params[name].copy_(tensor.to(params[name].dtype))


def load_evaluated_model(cfg, checkpoint: str | None):
    """The model to evaluate: the base model, an exported model directory, or base + a run checkpoint."""
    from .model_loading import load_model, load_model_from_dir, resolve_device, resolve_dtype

    if checkpoint is None:
        return load_model(cfg)
    path = Path(checkpoint)
    if (path / "config.json").is_file():
        device = resolve_device(cfg.model.device)
        return load_model_from_dir(path, dtype=resolve_dtype(cfg.model.dtype, device), device=device)
    weights, _, _ = load_checkpoint(path)
    model, processor = load_model(cfg)
    assign_weights(model, weights, str(path))
    return model, processor
