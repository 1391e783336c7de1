"""The settings of EGGROLL itself, for any torch module: what `Perturber` and its parts read.

A run config's `evolution` section extends this with the run's own fields (epochs, mode); the core
never sees those.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from dataclasses import dataclass
from typing import Any, Literal

from ERO_EGGROLL.core.errors import ConfigError

OptimizerName = Literal["sgd", "adam", "adamw", "clipup"]


@dataclass
class EvolutionSettings:
    population_size: int = 32
    rank: int = 2
    sigma: float = 0.01
    # relative: sigma x std(W) per tensor; signed_mean: sigma x |mean(W)| per tensor (ERO's std.json read as means)
    sigma_mode: Literal["absolute", "relative", "signed_mean"] = "absolute"
    noise_reuse: int = 1
    group_size: int = 0
    prng_impl: Literal["philox4x32", "philox2x32", "threefry2x32"] = "philox4x32"
    strategy: Literal["forward", "inplace"] = "forward"
    optimizer: OptimizerName = "sgd"  # clipup: momentum 0.9, max speed 2 x lr
    lr: float = 1.0
    lr_decay: float = 1.0  # multiplied into lr after every epoch
    sigma_decay: float = 1.0
    weight_decay: float = 0.0  # adamw only
    max_update_norm: float | None = None  # global-norm clip of the update direction
    stochastic_rounding: bool = False  # unbiased rounding of bf16 weight updates (fp16 rounds to nearest)
    fitness_shaping: Literal["zscore", "centered_rank", "raw"] = "zscore"  # hyperscalees.shape_fitness
    sigma_lr: float = 0.0  # > 0: each tensor's sigma adapts to the members' fitness (core/sigma_adapt.py)
    # ERO's search beside EGGROLL's (core/ero_search.py): the update, the noise's rank, and ERO's selection options
    search: Literal["eggroll", "ero"] = (
        "eggroll"  # eggroll: the ES update; ero: the mean moves to the average of the elites
    )
    noise: Literal["lowrank", "full"] = "lowrank"  # full: every LORA tensor gets dense full-rank noise (ERO's sampling)
    antithetic: bool = True  # members 2k, 2k+1 share noise of opposite signs; false: every member its own draw (ERO)
    elites: int = 4  # ero: round-robin groups, each keeping its best member (ERO: 4 GPU workers)
    elite_ties: Literal["later", "earlier"] = (
        "later"  # ero: which of two equal scores in a group is kept (ERO: the later)
    )
    reset_after: int = (
        0  # ero: after this many epochs without a new best elite, back to the BASE weights (ERO: 3; 0: never)
    )
    reseed_step: int = 1919810  # ero: the noise seed moves by this much at every reset (ERO's constant)
    clamp: float | None = None  # clamp the mean to [-clamp, clamp] after each update (ERO: 10; null: never)


# Settings that only steer the steps still to come, so a saved Perturber state (state_dict) stays meaningful when one
# of them changes: load_state_dict(state, settings="mine") continues with this Perturber's values. Every other
# setting decides what the saved state means (its moments' tensors, ERO's counters, which noise the epochs drew) and
# must match. A new field is of that second kind until it is listed here.
ADJUSTABLE_SETTINGS = (
    "sigma",
    "lr",
    "lr_decay",
    "sigma_decay",
    "weight_decay",
    "max_update_norm",
    "stochastic_rounding",
    "fitness_shaping",
    "group_size",
    "sigma_lr",
    "elite_ties",
    "clamp",
    "strategy",
)


def settings_dict(evo: EvolutionSettings) -> dict[str, Any]:
    """The core's settings as plain values (a run's EvolutionConfig holds more: its own fields are left out)."""
    return {f.name: getattr(evo, f.name) for f in dataclasses.fields(EvolutionSettings)}


# Perturber.for_module's defaults for any module, beside the dataclass's (which the run config inherits, tuned for
# Qwen2.5-VL on ARC). Chosen by scripts/bench/bench_vs_evotorch.py (docs/comparisons-generic.md): Adam, lr 0.002, sigma
# 0.002, rank 1, population 64. With search='ero' the step is the move to the elites' average: lr 1.0 and SGD, and
# every member its own draw (two elites of one antithetic pair would cancel).
FOR_MODULE_DEFAULTS: dict[str, Any] = {
    "population_size": 64,
    "sigma": 0.002,
    "lr": 0.002,
    "rank": 1,
    "optimizer": "adam",
}
ERO_SEARCH_DEFAULTS: dict[str, Any] = {"lr": 1.0, "optimizer": "sgd", "antithetic": False}


def for_module_settings(options: dict[str, Any]) -> EvolutionSettings:
    """EvolutionSettings from a for_module caller's `options` (None: the default), over FOR_MODULE_DEFAULTS, or
    ERO_SEARCH_DEFAULTS with search='ero'; unchecked (check_settings names the caller)."""
    given = {k: v for k, v in options.items() if v is not None or k not in FOR_MODULE_DEFAULTS}
    search = ERO_SEARCH_DEFAULTS if given.get("search") == "ero" else {}
    return EvolutionSettings(**{**FOR_MODULE_DEFAULTS, **search, **given})


def literal_choices(section: type) -> dict[str, tuple[Any, ...]]:
    """The allowed values of a dataclass's Literal fields (a YAML loader checks them too; code callers need this)."""
    hints = typing.get_type_hints(section)
    return {
        f.name: typing.get_args(hints[f.name])
        for f in dataclasses.fields(section)
        if typing.get_origin(hints[f.name]) is Literal
    }


MAX_SEED = 2**32 - 1  # keys are made from a uint32 seed
MAX_EPOCH = 2**31 - 1  # epochs and members are folded into the keys as int32
INT_FIELDS = ("population_size", "rank", "noise_reuse", "group_size", "elites", "reset_after", "reseed_step")
REAL_FIELDS = ("sigma", "lr", "lr_decay", "sigma_decay", "weight_decay", "sigma_lr", "max_update_norm", "clamp")
OPTIONAL_FIELDS = ("max_update_norm", "clamp")  # None: off
BOOL_FIELDS = ("stochastic_rounding", "antithetic")  # 'no' is truthy to Python: only True or False are taken


def default_antithetic(search: str) -> bool:
    """Antithetic pairs unless the search is ERO's, which samples every member its own draw: two elites of one
    antithetic pair would cancel. A run config and `Perturber.for_module` both take this default."""
    return search != "ero"


def is_int(value: object) -> bool:
    """An integer, not a bool (True is 1 to Python, never a member or an epoch to a user)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def checked_int(value: Any, name: str, low: int, high: int) -> int:
    """`value` as an int when it is an integer in low..high, else one ConfigError line naming `name`."""
    if not is_int(value) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer in {low}..{high}, got {value!r}")
    return int(value)


def _type_problems(evo: EvolutionSettings, prefix: str) -> list[tuple[bool, str]]:
    """Every numeric setting of the right type and finite: the value checks compare numbers."""

    def real(v: object) -> bool:
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

    return (
        [
            (is_int(getattr(evo, key)), f"{prefix}{key} must be an integer, got {getattr(evo, key)!r}")
            for key in INT_FIELDS
        ]
        + [
            (
                real(getattr(evo, key)) or (key in OPTIONAL_FIELDS and getattr(evo, key) is None),
                f"{prefix}{key} must be a finite number{' or None' if key in OPTIONAL_FIELDS else ''}, "
                f"got {getattr(evo, key)!r}",
            )
            for key in REAL_FIELDS
        ]
        + [
            (isinstance(getattr(evo, key), bool), f"{prefix}{key} must be True or False, got {getattr(evo, key)!r}")
            for key in BOOL_FIELDS
        ]
    )


def settings_problems(evo: EvolutionSettings, prefix: str = "evolution.") -> list[tuple[bool, str]]:
    """(holds, message) for every check of the settings; `prefix` names them as the caller's users know them."""
    types = _type_problems(evo, prefix)
    if not all(ok for ok, _ in types):
        return types
    return [
        (
            evo.population_size >= 2 and evo.population_size % 2 == 0,
            f"{prefix}population_size must be even and >= 2 (members form antithetic pairs), got {evo.population_size}",
        ),
        (evo.rank >= 1, f"{prefix}rank must be >= 1, got {evo.rank}"),
        (evo.sigma > 0, f"{prefix}sigma must be > 0, got {evo.sigma}"),
        (evo.lr > 0, f"{prefix}lr must be > 0, got {evo.lr}"),
        (evo.noise_reuse >= 0, f"{prefix}noise_reuse must be >= 0 (0: same noise every epoch), got {evo.noise_reuse}"),
        (
            evo.group_size >= 0 and (evo.group_size == 0 or evo.population_size % evo.group_size == 0),
            f"{prefix}group_size {evo.group_size} must be 0 or divide {prefix}population_size {evo.population_size}",
        ),
        (
            0 < evo.lr_decay <= 1 and 0 < evo.sigma_decay <= 1,
            f"{prefix}lr_decay and {prefix}sigma_decay must be in (0, 1]",
        ),
        (evo.sigma_lr >= 0, f"{prefix}sigma_lr must be >= 0 (0: a fixed sigma), got {evo.sigma_lr}"),
        (
            evo.max_update_norm is None or evo.max_update_norm > 0,
            f"{prefix}max_update_norm must be > 0 or null, got {evo.max_update_norm}",
        ),
        (
            evo.elites >= 1 and (evo.search != "ero" or evo.elites <= evo.population_size),
            f"{prefix}elites must be >= 1 and at most {prefix}population_size, got {evo.elites}",
        ),
        (evo.reset_after >= 0, f"{prefix}reset_after must be >= 0 (0: never), got {evo.reset_after}"),
        (
            1 <= evo.reseed_step <= MAX_SEED,
            f"{prefix}reseed_step must be in 1..{MAX_SEED} (the noise seed moves by it at each of ERO's resets; 0 or a "
            f"multiple of 2**32 would draw the same noise again), got {evo.reseed_step}",
        ),
        (evo.clamp is None or evo.clamp > 0, f"{prefix}clamp must be > 0 or null, got {evo.clamp}"),
        (
            evo.search == "eggroll" or evo.optimizer == "sgd",
            f"{prefix}search: ero moves the mean to the elites' average (lr x the step); it needs optimizer: sgd, "
            f"got {evo.optimizer}",
        ),
        *[
            (getattr(evo, key) in choices, f"{prefix}{key} must be one of {list(choices)}, got {getattr(evo, key)!r}")
            for key, choices in literal_choices(EvolutionSettings).items()
        ],
    ]


def check_settings(evo: EvolutionSettings, where: str) -> None:
    """Raise the first failed check as one line naming `where`."""
    for ok, message in settings_problems(evo):
        if not ok:
            raise ConfigError(f"{where}: {message}")
