"""hyperscalees: EGGROLL noise as pure functions of keys and integers (JAX, no torch).

Nothing is stored for the population: a member's noise is regenerated from
(parameter key, epoch, member) whenever it is needed, in the forward pass or in the update.
"""

from .fitness import SHAPING_RULES, centered_ranks, normalize_fitness, shape_fitness
from .fullrank import fullrank_noise, fullrank_update
from .keys import COUNTER_BASED_IMPLS, antithetic_sign, effective_epoch, make_key, member_key, param_key
from .noise import full_noise, lowrank_factors, population_lowrank_factors, stacked_full_noise, stacked_lowrank_factors
from .updates import full_update, lowrank_update, lowrank_update_sq_norm

__all__ = [
    "COUNTER_BASED_IMPLS",
    "SHAPING_RULES",
    "antithetic_sign",
    "centered_ranks",
    "effective_epoch",
    "full_noise",
    "full_update",
    "fullrank_noise",
    "fullrank_update",
    "lowrank_factors",
    "lowrank_update",
    "lowrank_update_sq_norm",
    "make_key",
    "member_key",
    "normalize_fitness",
    "param_key",
    "population_lowrank_factors",
    "shape_fitness",
    "stacked_full_noise",
    "stacked_lowrank_factors",
]
