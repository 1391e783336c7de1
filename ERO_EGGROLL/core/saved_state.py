"""Checks on a saved Perturber state (`Perturber.state_dict()`), before any of it is loaded.

A state comes back from a file (torch.load), so each field is checked for what the code will do with it: a type,
a shape and dtype, finiteness, a range. Any refusal is one `StateError` line naming the field as
`state['optimizer']['adam_v/0.weight']`, never a TypeError, a KeyError or NaN weights later.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from ERO_EGGROLL.core.errors import ConfigError
from ERO_EGGROLL.core.settings import is_int

STATE_FIELDS = ("fingerprint", "settings", "step", "last_update", "optimizer", "sigmas", "base")


class StateError(ConfigError):
    """A saved Perturber state that cannot be loaded into this Perturber, naming the field."""


def refuse(message: str) -> StateError:
    return StateError(f"Perturber.load_state_dict: {message}")


def mapping(value: Any, field: str) -> Mapping[str, Any]:
    """`value` as a mapping with string keys, or the refusal naming `field`."""
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise refuse(f"{field} must be a dict with string keys, got {type(value).__name__}")
    return value


def same_keys(value: Mapping[str, Any], expected: set[str], field: str, what: str) -> None:
    """Exactly the keys `expected`: a missing one or one this Perturber does not have is named."""
    missing, extra = sorted(expected - set(value)), sorted(set(value) - expected)
    if missing or extra:
        raise refuse(
            f"{field} must hold {what}: "
            + "; ".join(
                p for p in (f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else "") if p
            )
        )


def checked_tensor(
    value: Any, field: str, shape: tuple[int, ...], dtype: torch.dtype, *, allow_minus_inf: bool = False
) -> torch.Tensor:
    """A tensor of `shape` and `dtype` whose values are all finite (-inf too when `allow_minus_inf`)."""
    if not isinstance(value, torch.Tensor):
        raise refuse(f"{field} must be a tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape) or value.dtype != dtype:
        raise refuse(
            f"{field} is {str(value.dtype).removeprefix('torch.')} {tuple(value.shape)}, this Perturber needs "
            f"{str(dtype).removeprefix('torch.')} {tuple(shape)}"
        )
    if value.is_floating_point():
        finite = torch.isfinite(value) | (value == -math.inf) if allow_minus_inf else torch.isfinite(value)
        if not bool(finite.all()):
            raise refuse(f"{field} holds {int((~finite).sum())} value(s) that are not finite (NaN or inf)")
    return value


def checked_int(value: Any, field: str, low: int, high: int) -> int:
    if not is_int(value) or not low <= int(value) <= high:
        raise refuse(f"{field} must be an integer in {low}..{high}, got {value!r:.60}")
    return int(value)


def checked_sigma(value: Any, field: str, allow_zero: bool) -> float:
    """A per-tensor sigma: a finite real > 0 (>= 0 where the sigma mode gives still tensors a sigma of 0)."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not real or not (value >= 0 if allow_zero else value > 0):
        raise refuse(f"{field} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r:.60}")
    return float(value)
