"""Fitness shaping: raw scores -> zero-mean, unit-scale weights for the update."""

from __future__ import annotations

import numpy as np

VARIANCE_EPS = 1e-5


def normalize_fitness(raw, group_size: int = 0) -> np.ndarray:
    """(f - mean) / sqrt(var + 1e-5) over the population, or per group of `group_size`
    consecutive members (each group's own mean, the GLOBAL variance). Computed in float64 on
    the host so the result is the same on every device; returned as float32.
    """
    f = np.asarray(raw, dtype=np.float64)
    if f.ndim != 1 or f.size == 0:
        raise ValueError(f"fitness must be a non-empty 1-D array, got shape {f.shape}")
    bad = np.flatnonzero(~np.isfinite(f))
    if bad.size:
        raise ValueError(
            f"fitness of member(s) {bad.tolist()} is not finite ({f[bad].tolist()}); "
            "a fitness function must return finite numbers"
        )
    scale = np.sqrt(f.var() + VARIANCE_EPS)
    if group_size == 0:
        centred = f - f.mean()
    else:
        if group_size < 0 or f.size % group_size:
            raise ValueError(f"group_size {group_size} must be positive and divide the population {f.size}")
        groups = f.reshape(-1, group_size)
        centred = (groups - groups.mean(axis=1, keepdims=True)).ravel()
    return (centred / scale).astype(np.float32)
