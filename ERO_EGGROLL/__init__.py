"""ERO_EGGROLL: EGGROLL low-rank evolution strategies for any PyTorch model, and Qwen2.5-VL on ARC-1 with it.

    from ERO_EGGROLL import Perturber            # the generic core (ERO_EGGROLL.core), all of its names

Layers, each importing only from those below it (checked by import-linter, see pyproject.toml):
cli > run > storage > memory > evaluation > model > arc > config > io > core.

Importing the package first makes JAX allocate GPU memory on demand: by default JAX grabs 75% of
the GPU when it starts, and torch, which holds the model on the same GPU, then runs out of memory.
Every entry point imports this package before JAX; a user's own setting of the variable wins.
The core's names are loaded on first use, so `import ERO_EGGROLL` alone stays cheap.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

if TYPE_CHECKING:
    from ERO_EGGROLL.core import (
        ConfigError,
        EggrollError,
        EvolutionSettings,
        FitnessSummary,
        Generation,
        ParamClass,
        Perturber,
        StaleGeneration,
        UpdateStats,
        declare_norm,
        declare_row_rule,
    )

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


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ERO_EGGROLL import core

        return getattr(core, name)
    raise AttributeError(f"module 'ERO_EGGROLL' has no attribute {name!r}")
