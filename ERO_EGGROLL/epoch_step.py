"""The one epoch step: how a run's weights change, shared by training, replay and any multi-process driver.

An epoch's weight change is `update(fitness, epoch)` (the streamed ES update) followed by
`conclude(epoch, mean_model_fitness)`: the best-weights bookkeeping and ERO's degeneration guard
(after `patience` epochs without a new best, the weights go back to the best epoch's; the optimizer
state carries on). The decisions depend only on the mean model's fitness, so a replay that feeds the
recorded fitness values takes the same decisions, and checks them against the record.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checkpointing import RunState, assign_weights
from .perturbation import Perturber


@dataclass(frozen=True)
class Decision:
    new_best: bool
    rolled_back: bool


class EpochStep:
    """Moves `perturber`'s weights epoch by epoch and keeps `state`'s best/guard fields current."""

    def __init__(self, perturber: Perturber, state: RunState, patience: int, best_weights: dict[str, torch.Tensor] | None = None):
        self.perturber, self.state, self.patience = perturber, state, patience
        self.best_weights = best_weights  # host copies of the best epoch's evolvable tensors

    def _keep_best(self) -> None:
        self.best_weights = {k: v.detach().cpu().clone() for k, v in self.perturber.evolvable_state().items()}

    def begin(self, base_fitness: float) -> None:
        """Epoch 0: the base model is the best so far."""
        self.state.best_fitness, self.state.best_epoch, self.state.epochs_since_best = base_fitness, 0, 0
        self._keep_best()

    def update(self, fitness, epoch: int) -> dict:
        """Move the weights by epoch `epoch`'s update (0-based); returns the update's statistics."""
        stats = self.perturber.update(fitness, epoch)
        self.state.optimizer_step = self.perturber.optimizer.step_count
        return stats

    def conclude(self, epoch: int, mean_fitness: float) -> Decision:
        """After the update of epoch `epoch` (1-based, as in the history) and the mean model's evaluation:
        a new best is kept; `patience` epochs without one roll the weights back to the best."""
        state = self.state
        state.epoch = epoch
        if mean_fitness > state.best_fitness:
            state.best_fitness, state.best_epoch, state.epochs_since_best = mean_fitness, epoch, 0
            self._keep_best()
            return Decision(new_best=True, rolled_back=False)
        state.epochs_since_best += 1
        if self.patience and state.epochs_since_best >= self.patience:
            assign_weights(self.perturber.model, self.best_weights, "best weights")  # ERO's degeneration guard
            state.epochs_since_best = 0
            return Decision(new_best=False, rolled_back=True)
        return Decision(new_best=False, rolled_back=False)
