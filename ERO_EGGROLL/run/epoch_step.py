"""The one epoch step: how a run's weights change, shared by training, replay and any multi-process driver.

An epoch's weight change is `update(fitness, epoch)` (the streamed ES update) followed by
`conclude(epoch, mean_model_fitness)`: the best-weights bookkeeping and ERO's degeneration guard
(after `patience` epochs without a new best, the weights go back to the best epoch's; the optimizer
state carries on). The decisions depend only on the mean model's fitness, so a replay that feeds the
recorded fitness values takes the same decisions, and checks them against the record.

Where the best weights come from is a strategy (run/record.py): host clones (`run.checkpoint: full`)
or a replay to the best epoch (`replay`), so training, replay and the guard share this one code path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ERO_EGGROLL.core.ero_search import ERO_FIELDS
from ERO_EGGROLL.core.perturber import Perturber
from ERO_EGGROLL.storage.checkpoints import CheckpointError, RunState


@dataclass(frozen=True)
class Decision:
    new_best: bool
    rolled_back: bool


UPDATE_FIELDS = ("lr", "sigma_scale", "update_norm", "fraction_changed", "lost_update_fraction")  # in a metrics row


class BestWeights(Protocol):
    """Keeps (or knows how to rebuild) the best epoch's weights."""

    def keep(self, perturber: Perturber, state: RunState) -> None: ...

    def restore(self, perturber: Perturber, state: RunState) -> None: ...


class EpochStep:
    """Moves `perturber`'s weights epoch by epoch and keeps `state`'s best/guard fields current."""

    def __init__(self, perturber: Perturber, state: RunState, patience: int, best: BestWeights):
        self.perturber, self.state, self.patience, self.best = perturber, state, patience, best

    def begin(self, base_fitness: float) -> None:
        """Epoch 0: the base model is the best so far."""
        self.state.best_fitness, self.state.best_epoch, self.state.epochs_since_best = base_fitness, 0, 0
        self.best.keep(self.perturber, self.state)

    def update(self, fitness, epoch: int) -> dict:
        """Move the weights by epoch `epoch`'s update (0-based); returns the update's statistics."""
        stats = self.perturber.update(
            fitness, epoch, again=True
        )  # the record orders the epochs; a rebuild replays them
        self.state.optimizer_step = self.perturber.optimizer.step_count
        return stats

    def conclude(self, epoch: int, mean_fitness: float) -> Decision:
        """After the update of epoch `epoch` (1-based, as in the history) and the mean model's evaluation:
        a new best is kept; `patience` epochs without one roll the weights back to the best."""
        state = self.state
        state.epoch = epoch
        if mean_fitness > state.best_fitness:
            state.best_fitness, state.best_epoch, state.epochs_since_best = mean_fitness, epoch, 0
            self.best.keep(self.perturber, state)
            return Decision(new_best=True, rolled_back=False)
        state.epochs_since_best += 1
        if self.patience and state.epochs_since_best >= self.patience:
            self.best.restore(self.perturber, state)  # ERO's degeneration guard
            state.epochs_since_best = 0
            return Decision(new_best=False, rolled_back=True)
        return Decision(new_best=False, rolled_back=False)

    def apply(self, row: dict, evaluated: Callable[[int], None] | None = None) -> None:
        """Apply one recorded epoch (a metrics row): epoch 0 begins, later rows update and conclude. The decisions are
        recomputed from the recorded mean-model fitness and must equal the recorded ones (else CheckpointError).

        `evaluated(epoch)` runs where the training evaluated the mean model: after the update, before the guard."""
        if not row.get("fitness"):
            self.begin(row["mean_model_fitness"])  # epoch 0: the base model
            if evaluated:
                evaluated(0)
            return
        stats = self.update(row["fitness"], row["epoch"] - 1)
        if evaluated:
            evaluated(row["epoch"])
        recorded = {k: row[k] for k in ERO_FIELDS if k in row}  # ERO's own decisions, where the row carries them
        replayed = {k: stats[k] for k in recorded}
        if replayed != recorded:
            raise CheckpointError(
                f"epoch {row['epoch']} of the saved history records ERO's {recorded}, but its fitness gives "
                f"{replayed}: the history was altered"
            )
        different = [k for k in UPDATE_FIELDS if k in row and row[k] != stats[k]]  # (a worker's rows carry none)
        if different:
            raise CheckpointError(
                f"epoch {row['epoch']}: the saved history records {different[0]} {row[different[0]]!r}, its replayed "
                f"update gives {stats[different[0]]!r}: the history was altered"
            )
        decision = self.conclude(row["epoch"], row["mean_model_fitness"])
        if (decision.new_best, decision.rolled_back) != (row["new_best"], row["rolled_back"]):
            raise CheckpointError(
                f"epoch {row['epoch']} of the saved history records new_best={row['new_best']}, "
                f"rolled_back={row['rolled_back']}, but its fitness gives {decision}: the history was altered"
            )
