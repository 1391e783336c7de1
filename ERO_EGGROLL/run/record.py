"""Runs measured in kilobytes: a run's weights rebuilt from the base model and its run record, never stored by default.

Every member is a pure function of keys, so the weights after epoch t are determined by the base
weights, the config and the fitness history. The run record (each checkpoint's state.json: the
history, the best/guard bookkeeping, the per-epoch weight digests and each tensor's sigma from the
base weights) is all that `run.checkpoint: replay` saves; `rebuild` replays it through the one
epoch step, from the base weights or the nearest weight snapshot, and checks the digest it reaches.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from ERO_EGGROLL.config import Config, config_from_dict
from ERO_EGGROLL.core.digest import combined_digest, tensor_digests
from ERO_EGGROLL.core.perturber import Perturber
from ERO_EGGROLL.model.export import saved_tensors
from ERO_EGGROLL.model.loading import load_model, load_model_from_dir, resolve_device, resolve_dtype
from ERO_EGGROLL.model.qwen import run_perturber
from ERO_EGGROLL.run.epoch_step import EpochStep
from ERO_EGGROLL.storage.checkpoints import (
    WEIGHTS_FILE,
    CheckpointError,
    RunState,
    assign_weights,
    epoch_dirs,
    epoch_number,
    load_checkpoint,
)
from ERO_EGGROLL.storage.identity import IdentityError, base_weights_digest
from ERO_EGGROLL.storage.identity import hint as identity_hint
from ERO_EGGROLL.storage.record_check import Elite, check_record


def record_weights(state: RunState, perturber: Perturber) -> None:
    """Append the digest of the weights after epoch `state.epoch` to the record (index = epoch)."""
    state.tensor_digests = tensor_digests(perturber.evolvable_state())
    del state.weight_digests[state.epoch :]  # a rewound run records its epoch afresh
    state.weight_digests.append(combined_digest(state.tensor_digests))


def check_sigma(perturber: Perturber, state: RunState, where: str) -> None:
    """The noise scales must be the base weights' ones recorded by the run, never ones computed from evolved weights."""
    if not state.sigma:
        state.sigma = dict(perturber.plan.sigma)
        return
    different = [n for n, s in perturber.plan.sigma.items() if state.sigma.get(n) != s]
    if different or state.sigma.keys() != perturber.plan.sigma.keys():
        raise CheckpointError(
            f"{where}: the sigma of {different[0] if different else 'some tensor'} differs from the run record's "
            "(computed from other base weights?); resume and replay need the run's base model"
        )


def base_evolvable(model: torch.nn.Module, base_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The base values of the evolvable tensors `names`, read from the base model's safetensors files (only those
    tensors).

    Exact: the same bytes and dtype conversion as loading the model. The file names are the model's names as its
    checkpoint stores them (export.saved_tensors reverts transformers' renaming; matched by storage)."""
    params = dict(model.named_parameters())
    stored_as = {t.data_ptr(): name for name, t in saved_tensors(model).items()}
    wanted = {stored_as[params[n].data_ptr()]: n for n in names}
    out: dict[str, torch.Tensor] = {}
    for path in sorted(Path(base_dir).glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for key in wanted.keys() & set(f.keys()):
                p = params[wanted[key]]
                out[wanted[key]] = f.get_tensor(key).to(dtype=p.dtype, device=p.device)
    missing = sorted(set(names) - out.keys())
    if missing:
        raise CheckpointError(
            f"{base_dir}: the base weights of {missing[0]} (and {len(missing) - 1} more) are not in its safetensors "
            "files"
        )
    return out


def nearest_snapshot(ckpt_dir: Path | None, epoch: int) -> Path | None:
    """The newest epoch directory at or before `epoch` that holds weights (a snapshot, or any full checkpoint)."""
    if ckpt_dir is None:
        return None
    with_weights = [p for p in epoch_dirs(ckpt_dir) if epoch_number(p) <= epoch and _holds_tensors(p / WEIGHTS_FILE)]
    return with_weights[-1] if with_weights else None


def _holds_tensors(path: Path) -> bool:
    with safe_open(path, framework="pt") as f:
        return bool(list(f.keys()))


class ClonedBest:
    """run.checkpoint: full: the best epoch's evolvable tensors as host clones (today's behaviour, one copy of them in
    RAM)."""

    def __init__(self, weights: dict[str, torch.Tensor] | None = None):
        self.weights = weights

    def keep(self, perturber: Perturber, state: RunState) -> None:
        self.weights = {k: v.detach().cpu().clone() for k, v in perturber.evolvable_state().items()}

    def restore(self, perturber: Perturber, state: RunState) -> None:
        if self.weights is None:  # the epoch step keeps the base model's weights at epoch 0, before any restore
            raise CheckpointError("no best weights were kept before they were restored")
        assign_weights(perturber.model, self.weights, "best weights")


class ReplayedBest:
    """run.checkpoint: replay: only the best epoch's number is kept; its weights are rebuilt by replay when needed
    (the guard, the final evaluation, the export), from the base weights or the nearest snapshot, with a separate
    optimizer state so that the live one carries on (ERO's guard)."""

    def __init__(self, base_dir: Path, ckpt_dir: Path | None, patience: int):
        self.base_dir, self.ckpt_dir, self.patience = base_dir, ckpt_dir, patience

    def keep(self, perturber: Perturber, state: RunState) -> None:
        """Nothing to hold: state.best_epoch and the record's digests say which weights are the best."""

    def restore(self, perturber: Perturber, state: RunState) -> None:
        epoch = state.best_epoch
        recorded = state.weight_digests[epoch] if epoch < len(state.weight_digests) else None  # else rebuild says why
        if recorded is not None and combined_digest(tensor_digests(perturber.evolvable_state())) == recorded:
            return  # the weights already are the best epoch's (e.g. the last epoch was the best)
        rebuild(perturber.with_fresh_optimizer(), state, epoch, self)


def rebuild(
    perturber: Perturber,
    state: RunState,
    upto: int,
    best: ReplayedBest,
    evaluated: Callable[[int], None] | None = None,
) -> RunState:
    """Set the perturber's weights (and optimizer state) to those after epoch `upto` of `state`'s record.

    Starts from the nearest snapshot at or before `upto` (else the base weights read from disk), replays the
    later epochs through the epoch step, refuses decisions (and update statistics) that disagree with the record and
    checks the digest of the rebuilt weights after every epoch. Returns the replayed bookkeeping (best epoch, guard
    counter, optimizer step) at `upto`. `evaluated(epoch)`: called with each replayed epoch's mean model as the
    training evaluated it (replay --check --full)."""
    if upto >= len(state.weight_digests):
        raise CheckpointError(
            f"epoch {upto}: the run record holds no weight digest for it (written by an older version?)"
        )
    record = RunState(
        history=state.history[: upto + 1], weight_digests=state.weight_digests[: upto + 1], sigma=state.sigma
    )
    snapshot = nearest_snapshot(best.ckpt_dir, upto)
    if snapshot is None:
        assign_weights(
            perturber.model, base_evolvable(perturber.model, best.base_dir, list(perturber.params)), "base weights"
        )
        perturber.optimizer.load_state(0, {})  # a fresh optimizer: step 0, no moments
        start = 0
    else:
        weights, optimizer, saved = load_checkpoint(snapshot)
        if saved.weight_digests[: saved.epoch + 1] != state.weight_digests[: saved.epoch + 1]:
            raise CheckpointError(
                f"{snapshot}: this snapshot belongs to another line of epochs than the run record; move it aside"
            )
        assign_weights(perturber.model, weights, str(snapshot), expected=perturber.params)
        perturber.optimizer.load_state(saved.optimizer_step, optimizer)
        record.epoch, record.best_fitness, record.best_epoch = saved.epoch, saved.best_fitness, saved.best_epoch
        record.epochs_since_best, record.optimizer_step, start = (
            saved.epochs_since_best,
            saved.optimizer_step,
            saved.epoch + 1,
        )
    step = EpochStep(perturber, record, best.patience, best)
    for row in state.history[start : upto + 1]:
        step.apply(row, evaluated)
        epoch = row["epoch"]  # every epoch's weights against its digest, not only the last one's
        if combined_digest(tensor_digests(perturber.evolvable_state())) != state.weight_digests[epoch]:
            raise CheckpointError(
                f"epoch {epoch}: the weights rebuilt by replay do not match the run record's checksum "
                f"(weight_digests[{epoch}]; the record's fitness, digests or config were altered, or the base model, "
                "libraries or hardware differ); resume from a snapshot before it, or start the run again"
            )
    return record


def elite_into(perturber: Perturber, state: RunState, elite: Elite, base_dir: Path, patience: int) -> None:
    """Give the model ERO's best elite `elite`: the mean model of the epoch before it, rebuilt by replay (checked
    against the record's digests), plus that member's noise from its keys. No copy of it is ever stored."""
    view = perturber.with_fresh_optimizer()  # its own noise plan: ERO's reseeds in this replay move only the view's
    rebuild(view, state, elite.epoch - 1, ReplayedBest(base_dir, None, patience))
    assign_weights(perturber.model, view.member_weights(elite.epoch - 1, elite.member), "ERO's best elite")


def replay_into(model: torch.nn.Module, state: RunState, base_dir: Path) -> None:
    """Give `model` (the base model) the weights at the end of the run record `state`, replayed with the run's own
    config."""
    cfg = config_from_dict(state.config, "the run record's config")
    perturber = run_perturber(model, cfg)
    try:
        check_sigma(perturber, state, "replay")
        rebuild(perturber, state, state.epoch, ReplayedBest(base_dir, None, cfg.run.degeneration_patience))
    finally:
        perturber.remove_hooks()


def load_evaluated_model(cfg: Config, checkpoint: str | None):
    """The model to evaluate: the base model, an exported model directory, or base + a run checkpoint."""
    if checkpoint is None:
        return load_model(cfg)
    path = Path(checkpoint)
    if (path / "config.json").is_file():
        device = resolve_device(cfg.model.device)
        return load_model_from_dir(path, dtype=resolve_dtype(cfg.model.dtype, device), device=device)
    weights, _, state = load_checkpoint(path)
    check_record(state, str(path))
    saved, current = state.identity.get("base_weights"), base_weights_digest(cfg)
    if saved != current:  # frozen tensors are not in the checkpoint: other base bytes give another model
        raise IdentityError(
            f"{checkpoint}: cannot evaluate exactly: base_weights differs (the run has {saved!r}, now "
            f"{current!r}); {identity_hint('base_weights', saved)}"
        )
    model, processor = load_model(cfg)
    if weights:
        assign_weights(model, weights, str(path))
    else:  # a run record (run.checkpoint: replay): its weights are rebuilt by replay from the base model
        replay_into(model, state, cfg.resolve_path(cfg.model.path))
    return model, processor
