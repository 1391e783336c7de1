"""Fitness as the core takes it: one finite score per member, refused in one EggrollError line otherwise.

hyperscalees checks its own input with plain ValueErrors (it knows nothing of this application); the core calls
it through these functions, so a caller of `Perturber.update` gets one `EggrollError` that names the members.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

import hyperscalees as hs
from ERO_EGGROLL.core.errors import EggrollError
from ERO_EGGROLL.core.settings import EvolutionSettings


def checked_fitness(raw: ArrayLike, population_size: int) -> NDArray[np.float64]:
    """The scores as a float64 vector of one finite value per member, in member order."""
    try:
        f: NDArray[np.float64] = hs.fitness._checked(raw)
    except (ValueError, TypeError) as err:  # NaN or inf, not 1-D, not numbers (a CUDA tensor, a string)
        raise EggrollError(f"fitness: {err}") from None
    if f.size != population_size:
        raise EggrollError(
            f"fitness: got {f.size} value(s) for a population of {population_size}; pass one score per member, "
            "in member order"
        )
    return f


def shaped_fitness(raw: ArrayLike, evo: EvolutionSettings) -> NDArray[np.float32]:
    """The update's weights under evo.fitness_shaping (hyperscalees.shape_fitness), after checked_fitness."""
    shaped: NDArray[np.float32] = hs.shape_fitness(
        checked_fitness(raw, evo.population_size), evo.fitness_shaping, evo.group_size
    )
    return shaped
