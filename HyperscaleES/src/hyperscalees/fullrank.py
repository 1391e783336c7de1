"""Full-rank ES (ERO / OpenES style), the baseline EGGROLL is measured against.

E_i = s_i sigma Z_i with Z_i ~ N(0, I) of the matrix's full (m, n) shape, keyed like EGGROLL's
noise so the two are comparable member for member.
"""

from __future__ import annotations

from .noise import full_noise
from .updates import full_update


def fullrank_noise(key, shape, *, epoch, member, sigma, noise_reuse: int = 1):
    """The dense (m, n) perturbation of one member."""
    if len(shape) != 2:
        raise ValueError(f"full-rank ES baseline perturbs matrices, got shape {tuple(shape)}")
    return full_noise(key, shape, epoch=epoch, member=member, sigma=sigma, noise_reuse=noise_reuse)


def fullrank_update(key, shape, fitness, *, epoch, sigma, noise_reuse: int = 1):
    """OpenES ascent direction sqrt(N) * mean_i(f_i E_i), same scaling as EGGROLL's FULL update."""
    if len(shape) != 2:
        raise ValueError(f"full-rank ES baseline updates matrices, got shape {tuple(shape)}")
    return full_update(key, shape, fitness, epoch=epoch, sigma=sigma, noise_reuse=noise_reuse)
