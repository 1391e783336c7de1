"""Resume: a run continues exactly where its record ends, or is refused.

`run.checkpoint: replay`: the weights (and Adam moments) after the saved epoch are rebuilt by replaying the
run record from the nearest snapshot (or the base weights) and checked against the record's digest.
`run.checkpoint: full`: the saved tensors are loaded as they are, and the best epoch's from best/.
"""

from __future__ import annotations

import os
from pathlib import Path

from ERO_EGGROLL.config import Config, ConfigError
from ERO_EGGROLL.core.ero_search import EroSelection
from ERO_EGGROLL.core.perturber import Perturber
from ERO_EGGROLL.run.record import ClonedBest, ReplayedBest, check_sigma, rebuild
from ERO_EGGROLL.storage.checkpoints import (
    CheckpointError,
    RunState,
    assign_weights,
    best_weights_for,
    load_checkpoint,
    repair_latest,
    rewind,
)
from ERO_EGGROLL.storage.identity import check_identity
from ERO_EGGROLL.storage.record_check import check_record, is_finished


def resume(
    cfg: Config,
    perturber: Perturber,
    identity: dict,
    ckpt_dir: Path,
    resume_from: Path,
    best: ClonedBest | ReplayedBest,
) -> RunState:
    """Load the run state of `resume_from` (the run folder or one of its epoch directories) and bring the model and the
    optimizer to the end of it; later epochs are moved aside when going back."""
    evo = cfg.evolution
    if resume_from == ckpt_dir:
        repair_latest(ckpt_dir)
    weights, optimizer_tensors, state = load_checkpoint(resume_from)
    check_record(state, str(resume_from))  # every check before anything moves (a rewind, the weights)
    check_identity(state.identity, identity, str(resume_from), "resume")
    if evo.epochs < state.epoch:
        raise ConfigError(
            f"evolution.epochs {evo.epochs} is less than the {state.epoch} epochs {ckpt_dir} already ran; "
            f"to go back, resume from {ckpt_dir}/epoch_{evo.epochs:04d}"
        )
    check_sigma(perturber, state, str(resume_from))  # the base weights' sigmas, before any weight moves
    if not isinstance(best, ReplayedBest) and not weights:
        raise CheckpointError(
            f"{resume_from} holds a run record without weights (saved with run.checkpoint: replay); "
            "resume it with --set run.checkpoint=replay"
        )
    if resume_from != ckpt_dir:
        rewind(ckpt_dir, resume_from)
    state.config = cfg.to_dict()  # e.g. more epochs: later resumes and replays see the config in force
    state.finished = is_finished(state, evo, cfg.run.target_fitness)
    if isinstance(best, ReplayedBest):
        rebuild(perturber, state, state.epoch, best)
    else:
        assign_weights(perturber.model, weights, str(ckpt_dir), expected=perturber.evolvable_state())
        perturber.optimizer.load_state(state.optimizer_step, optimizer_tensors)
        check_ero_state(perturber, state, str(resume_from))
        best.weights = best_weights_for(ckpt_dir, state)
    print(f"resumed {ckpt_dir} after epoch {state.epoch}")
    return state


def check_ero_state(perturber: Perturber, state: RunState, where: str) -> None:
    """run.checkpoint: full replays nothing, so ERO's last decisions in the record must be its saved selection state
    (earlier rows are checked by replay)."""
    selection, last = perturber.optimizer, state.history[-1]
    if not isinstance(selection, EroSelection) or state.epoch == 0:
        return
    for field, value in (("best_elite_so_far", selection.best), ("degeneration_counter", selection.counter)):
        if last.get(field) != value:
            raise CheckpointError(
                f"{where}: epoch {state.epoch}: {field} is {last.get(field)!r}, the saved ERO selection state gives "
                f"{value!r} (edited?)"
            )


def disk_bytes(path: Path) -> int:
    """Bytes of the files under `path` (symlinks, e.g. best/, not followed: they point at files counted elsewhere)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(
        os.path.getsize(os.path.join(root, f))
        for root, _, files in os.walk(path)
        for f in files
        if not os.path.islink(os.path.join(root, f))
    )
