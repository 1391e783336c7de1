"""One typed config for a run: the schema (schema.py), read from YAML with `--set` overrides (loading.py), checked
before anything runs (validation.py).

    python -m ERO_EGGROLL.config --config configs/default.yaml [--set evolution.population_size=8]
"""

from ERO_EGGROLL.config.loading import config_from_dict, load_config
from ERO_EGGROLL.config.schema import (
    EMBEDDED_MODEL_DIR,
    ROOT,
    Config,
    DataConfig,
    DecodingConfig,
    DistributedConfig,
    EvaluationConfig,
    EvolutionConfig,
    ModelConfig,
    ParamsConfig,
    RunConfig,
    repo_path,
)
from ERO_EGGROLL.core.errors import ConfigError

__all__ = [
    "EMBEDDED_MODEL_DIR",
    "ROOT",
    "Config",
    "ConfigError",
    "DataConfig",
    "DecodingConfig",
    "DistributedConfig",
    "EvaluationConfig",
    "EvolutionConfig",
    "ModelConfig",
    "ParamsConfig",
    "RunConfig",
    "config_from_dict",
    "load_config",
    "repo_path",
]
