"""ERO's search as one more update rule: round-robin elites, their average, the best so far and reset-to-base.

ERO (MetaEvo/ERO) deals member i to worker i mod E, keeps each worker's best member (a later equal
score replaces it), and moves the mean to the plain average of the E elites. Elites are never stored
here: member i's weights are mean + noise_i, so the average of the elites is
mean + (1/E) sum_e noise_e, i.e. the ES update with weight sqrt(N)/E on each elite and 0 elsewhere
(the update contracts sum_i w_i noise_i / sqrt(N)), through the same streamed update as EGGROLL's.
ERO's degeneration rule is kept beside it: when the top elite's score is below the best so far for
`reset_after` epochs in a row, the mean goes back to the ORIGINAL base weights (a host copy taken
once) and the noise seed moves by `reseed_step`. This object takes the optimizer's place in the
streamed update, so its state (best, counter, resets) is saved, resumed and replayed like Adam's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from ERO_EGGROLL.core.errors import ConfigError
from ERO_EGGROLL.core.fitness import checked_fitness
from ERO_EGGROLL.core.saved_state import checked_tensor, refuse, same_keys
from ERO_EGGROLL.core.settings import MAX_SEED, EvolutionSettings

ERO_FIELDS = (
    "elites",
    "elite_best",
    "best_elite_so_far",
    "degeneration_counter",
    "reset_to_base",
)  # what `select` reports


def stop_score(search: str, row: dict[str, Any]) -> float:
    """What run.target_fitness is compared with in an epoch's metrics row: ERO stops on its best model, the best elite
    so
    far (a member; none yet in the base model's row); EGGROLL on the mean model."""
    score: float = row.get("best_elite_so_far", -math.inf) if search == "ero" else row["mean_model_fitness"]
    return score


def reset_seed(seed: int, resets: int, reseed_step: int) -> int:
    """The noise seed after `resets` of ERO's resets: seed + resets x reseed_step, as ERO moves it.

    Refused past 2**32-1: a key holds 32 bits, so the seed would wrap onto another seed's noise (seed 2**32-1 plus
    ERO's 1919810 draws exactly seed 1919809's), or onto the run's own earlier noise."""
    moved = seed + resets * reseed_step
    if moved > MAX_SEED:
        raise ConfigError(
            f"ERO's reset number {resets} would move the noise seed to {seed} + {resets} x reseed_step {reseed_step} = "
            f"{moved}, past {MAX_SEED}, where a key wraps onto another seed's noise; {resets - 1} reset(s) fit: use a "
            "smaller seed or reseed_step, or a larger reset_after"
        )
    return moved


def round_robin_elites(fitness: ArrayLike, elites: int, ties: str = "later") -> list[int]:
    """The best member of each group {i : i mod elites == g}, ranked by score (best first; equal scores by group).

    `ties`: 'later' keeps the later of two equal scores in a group (ERO), 'earlier' the first."""
    f = np.asarray(fitness, dtype=np.float64)
    kept = []
    for g in range(min(elites, f.size)):
        best = g
        for i in range(g + elites, f.size, elites):
            if f[i] > f[best] or (ties == "later" and f[i] == f[best]):
                best = i
        kept.append(best)
    return sorted(kept, key=lambda i: (-f[i], i % elites))


def elite_weights(elite_ids: list[int], population: int) -> NDArray[np.float32]:
    """Fitness-shaping weights whose ES update is the elites' average noise: sqrt(N)/E on each elite, 0 elsewhere."""
    w = np.zeros(population, dtype=np.float32)
    w[elite_ids] = np.float32(math.sqrt(population) / len(elite_ids))
    return w


class EroSelection:
    """ERO's selection in the optimizer's place: `select` turns raw fitness into elite weights (None: reset to base).

    `change` is lr x direction (lr 1: the mean becomes the elites' average, as ERO); state_tensors/load_state
    carry the best elite score, the degeneration counter and the number of resets through checkpoints."""

    kind = "ero"

    def __init__(self, evo: EvolutionSettings, reseed: Callable[[int], None]) -> None:
        """`reseed(resets)`: moves the noise plan to seed + resets x reseed_step (the plan belongs to the Perturber)."""
        self.evo, self.lr, self._reseed = evo, evo.lr, reseed
        self.step_count = 0
        self.best, self.counter, self.resets = -math.inf, 0, 0

    def begin_step(self) -> None:
        self.step_count += 1

    def select(self, raw_fitness: ArrayLike) -> tuple[NDArray[np.float32] | None, dict[str, Any]]:
        """The update weights of this epoch (None when ERO's rule resets the mean to the base) and what was decided."""
        evo = self.evo
        f = checked_fitness(raw_fitness, evo.population_size)  # a NaN would otherwise stay its group's elite
        ids = round_robin_elites(f, evo.elites, evo.elite_ties)
        top = float(f[ids[0]])
        best, counter = (top, 0) if top >= self.best else (self.best, self.counter + 1)
        reset = bool(evo.reset_after) and counter >= evo.reset_after
        if reset:
            self._reseed(self.resets + 1)  # a seed past the key range is refused before any state changes
            counter, self.resets = 0, self.resets + 1
        self.best, self.counter = best, counter
        info = {
            "elites": ids,
            "elite_best": top,
            "best_elite_so_far": self.best,
            "degeneration_counter": self.counter,
            "reset_to_base": reset,
        }
        return (None if reset else elite_weights(ids, f.size)), info

    def change(
        self, name: str, direction: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.lr * direction if out is None else torch.mul(direction, self.lr, out=out)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "ero/best": torch.tensor([self.best], dtype=torch.float64),
            "ero/counter_resets": torch.tensor([self.counter, self.resets], dtype=torch.int64),
        }

    def check_state(self, step_count: int, tensors: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Refuse saved selection state (StateError naming the key) that no run of these settings could reach: the
        best elite NaN or +inf (or -inf after a step), a counter or reset count below 0 or above the step count, a
        counter at or past reset_after. `shapes` (the evolving tensors) is the optimizers' common signature."""
        same_keys(tensors, {"ero/best", "ero/counter_resets"}, "state['optimizer']", "ERO's selection state")
        best = float(
            checked_tensor(
                tensors["ero/best"], "state['optimizer']['ero/best']", (1,), torch.float64, allow_minus_inf=True
            )[0]
        )
        field = "state['optimizer']['ero/counter_resets']"
        counter, resets = checked_tensor(tensors["ero/counter_resets"], field, (2,), torch.int64).tolist()
        limit = min(step_count, self.evo.reset_after - 1) if self.evo.reset_after else step_count
        if not (0 <= counter <= limit and 0 <= resets <= step_count) or (step_count > 0) == (best == -math.inf):
            raise refuse(
                f"{field} {[counter, resets]} with best elite {best} after {step_count} step(s) is no state that "
                f"ERO's selection reaches (reset_after {self.evo.reset_after}); the state was edited or damaged"
            )

    def load_state(self, step_count: int, tensors: dict[str, torch.Tensor]) -> None:
        """`tensors` as saved by state_tensors, or {} for a fresh start (epoch 0)."""
        best = float(tensors["ero/best"][0]) if "ero/best" in tensors else -math.inf
        counter_resets = tensors.get("ero/counter_resets")
        counter, resets = (int(counter_resets[0]), int(counter_resets[1])) if counter_resets is not None else (0, 0)
        self._reseed(resets)  # a seed past the key range is refused before any state changes
        self.step_count, self.best, self.counter, self.resets = step_count, best, counter, resets
