"""EGGROLL for any torch module: low-rank member noise from counter-based keys, exact restore, a streamed update.

Imports torch, JAX and hyperscalees only: nothing of ARC, Qwen, YAML or run folders.
"""

from ERO_EGGROLL.core.ask_tell import FitnessSummary, Generation, StaleGeneration, UpdateStats
from ERO_EGGROLL.core.errors import ConfigError, EggrollError
from ERO_EGGROLL.core.forward_rules import declare_row_rule
from ERO_EGGROLL.core.perturber import Perturber
from ERO_EGGROLL.core.settings import EvolutionSettings
from ERO_EGGROLL.core.tensor_classes import ParamClass, declare_norm

__all__ = [
    "ConfigError",
    "EggrollError",
    "EvolutionSettings",
    "FitnessSummary",
    "Generation",
    "ParamClass",
    "Perturber",
    "StaleGeneration",
    "UpdateStats",
    "declare_norm",
    "declare_row_rule",
]
