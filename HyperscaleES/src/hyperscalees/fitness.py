"""Fitness shaping: raw scores -> the weights of the update. Each rule is a pure function of the scores.

zscore (the default, EGGROLL's): (f - mean) / std. centered_rank (OpenAI-ES, PGPE): each member's
rank mapped linearly onto [-0.5, 0.5] (tied members share their average rank), so one outlier cannot
dominate a step. raw: the scores as they are (antithetic pairs cancel any constant offset, up to
float32 rounding). zscore and centered_rank give all-equal scores weights of exactly 0.
"""

from __future__ import annotations

import numpy as np

VARIANCE_EPS = 1e-5


SHAPING_RULES = ("zscore", "centered_rank", "raw")


def _checked(raw) -> np.ndarray:
    """The scores as a float64 vector, refused with the members named when one is not finite."""
    f = np.asarray(raw, dtype=np.float64)
    if f.ndim != 1 or f.size == 0:
        raise ValueError(f"fitness must be a non-empty 1-D array, got shape {f.shape}")
    bad = np.flatnonzero(~np.isfinite(f))
    if bad.size:
        raise ValueError(
            f"fitness of member(s) {bad.tolist()} is not finite ({f[bad].tolist()}); "
            "a fitness function must return finite numbers"
        )
    return f


def _groups(f: np.ndarray, group_size: int) -> np.ndarray:
    """The scores as rows of `group_size` consecutive members (one row for group_size 0)."""
    if group_size == 0:
        return f.reshape(1, -1)
    if group_size < 0 or f.size % group_size:
        raise ValueError(f"group_size {group_size} must be positive and divide the population {f.size}")
    return f.reshape(-1, group_size)


def centered_ranks(raw, group_size: int = 0) -> np.ndarray:
    """Rank r in 0..n-1 mapped to r / (n - 1) - 0.5, within each group. Tied members share the average of their
    ranks, so equal scores get equal weights whatever the member order: all-equal scores give exactly 0 (no step)."""
    rows = _groups(_checked(raw), group_size)
    n = rows.shape[1]
    ordered = np.sort(rows, axis=1)
    below = np.stack([np.searchsorted(o, r, side="left") for o, r in zip(ordered, rows)])  # members scoring lower
    not_above = np.stack([np.searchsorted(o, r, side="right") for o, r in zip(ordered, rows)])
    ranks = (below + not_above - 1) / 2.0  # the average of the ranks below..not_above-1 that the ties share
    if n == 1:  # a group of one member has no rank among others: no weight
        return np.zeros(rows.size, dtype=np.float32)
    return (ranks / (n - 1) - 0.5).ravel().astype(np.float32)


def shape_fitness(raw, rule: str = "zscore", group_size: int = 0) -> np.ndarray:
    """The update's weights under `rule` (one of SHAPING_RULES), float32."""
    if rule == "zscore":
        return normalize_fitness(raw, group_size)
    if rule == "centered_rank":
        return centered_ranks(raw, group_size)
    if rule == "raw":
        return _checked(raw).astype(np.float32)
    raise ValueError(f"unknown fitness shaping {rule!r}; choose one of {list(SHAPING_RULES)}")


def normalize_fitness(raw, group_size: int = 0) -> np.ndarray:
    """(f - mean) / sqrt(var + 1e-5) over the population, or per group of `group_size`
    consecutive members (each group's own mean, the GLOBAL variance). Computed in float64 on
    the host so the result is the same on every device; returned as float32.
    """
    f = _checked(raw)
    scale = np.sqrt(f.var() + VARIANCE_EPS)
    groups = _groups(f, group_size)
    centred = (groups - groups.mean(axis=1, keepdims=True)).ravel()
    return (centred / scale).astype(np.float32)
