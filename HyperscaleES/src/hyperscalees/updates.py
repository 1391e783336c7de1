"""The EGGROLL update: regenerate every member's factors from keys and contract them once.

Both functions return the ASCENT direction Delta (what plain SGD adds, times the learning
rate). The population's (N, m, n) perturbations are never formed.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from .noise import (
    _check_matrix_shape,
    _check_rank_sigma,
    full_noise_pure,
    lowrank_scale,
    population_lowrank_factors_pure,
)


def _as_fitness(fitness) -> jax.Array:
    f = jnp.asarray(fitness, dtype=jnp.float32)
    if f.ndim != 1 or f.shape[0] < 1:
        raise ValueError(f"fitness must be a non-empty 1-D array, got shape {f.shape}")
    return f


@partial(jax.jit, static_argnames=("shape", "rank", "noise_reuse"))
def _lowrank_update(key, fitness, epoch, scale, *, shape, rank, noise_reuse):
    members = jnp.arange(fitness.shape[0], dtype=jnp.int32)
    a_scaled, b = population_lowrank_factors_pure(
        key, epoch, members, scale, shape=shape, rank=rank, noise_reuse=noise_reuse
    )
    weighted = fitness[:, None, None] * a_scaled
    return jnp.einsum("nir,njr->ij", weighted, b) / math.sqrt(fitness.shape[0])


def lowrank_update(key, shape, fitness, *, epoch, rank: int, sigma, noise_reuse: int = 1) -> jax.Array:
    """Delta W = (1/sqrt(N)) sum_i f_i s_i (sigma/sqrt(r)) A_i B_i^T as ONE contraction (float32, (m, n))."""
    shape = _check_matrix_shape(shape)
    _check_rank_sigma(rank, sigma)
    return _lowrank_update(
        key, _as_fitness(fitness), epoch, lowrank_scale(sigma, rank), shape=shape, rank=rank, noise_reuse=noise_reuse
    )


@partial(jax.jit, static_argnames=("shape", "rank", "noise_reuse"))
def _lowrank_update_sq_norm(key, fitness, epoch, scale, *, shape, rank, noise_reuse):
    # antithetic pair k shares B and has A negated: its two terms fold into (f_2k - f_2k+1) A_2k B_2k^T,
    # so tied pairs contribute exactly 0 instead of a float32 cancellation residue
    firsts = jnp.arange(0, fitness.shape[0], 2, dtype=jnp.int32)
    a_scaled, b = population_lowrank_factors_pure(
        key, epoch, firsts, scale, shape=shape, rank=rank, noise_reuse=noise_reuse
    )
    weighted = (fitness[0::2] - fitness[1::2])[:, None, None] * a_scaled  # (N/2, m, r)
    highest = jax.lax.Precision.HIGHEST
    gram_a = jnp.einsum("nir,pis->nrps", weighted, weighted, precision=highest)  # A'^T A', (N r / 2)^2 entries
    gram_b = jnp.einsum("njr,pjs->nrps", b, b, precision=highest)
    return jnp.sum(gram_a * gram_b) / fitness.shape[0]


def lowrank_update_sq_norm(key, shape, fitness, *, epoch, rank: int, sigma, noise_reuse: int = 1) -> jax.Array:
    """||Delta W||_F^2 of `lowrank_update` from the factors alone: trace((A'^T A')(B'^T B')) / N.

    Never forms an (m, n) buffer, so a global-norm clip can know the norm of every tensor's update
    before applying any of them; costs O((N r)^2 (m + n) / 4), cheaper than the dense contraction while
    N r / 2 < m n / (m + n). Non-negative (a float32 residue below zero is clamped). N must be even.
    """
    shape = _check_matrix_shape(shape)
    _check_rank_sigma(rank, sigma)
    if len(fitness) % 2:
        raise ValueError(f"the population must be even (antithetic pairs), got {len(fitness)} fitness values")
    sq = _lowrank_update_sq_norm(
        key, _as_fitness(fitness), epoch, lowrank_scale(sigma, rank), shape=shape, rank=rank, noise_reuse=noise_reuse
    )
    return jnp.maximum(sq, 0.0)


@partial(jax.jit, static_argnames=("shape", "noise_reuse"))
def _full_update(key, fitness, epoch, sigma, *, shape, noise_reuse):
    def add_member(i, acc):
        return acc + fitness[i] * full_noise_pure(key, epoch, i, sigma, shape=shape, noise_reuse=noise_reuse)

    total = jax.lax.fori_loop(0, fitness.shape[0], add_member, jnp.zeros(shape, jnp.float32))
    return total / math.sqrt(fitness.shape[0])


def full_update(key, shape, fitness, *, epoch, sigma, noise_reuse: int = 1) -> jax.Array:
    """Delta w = sqrt(N) * mean_i(f_i eps_i), accumulated member by member (O(size) memory)."""
    _check_rank_sigma(1, sigma)
    shape = tuple(int(d) for d in shape)
    return _full_update(key, _as_fitness(fitness), epoch, jnp.float32(sigma), shape=shape, noise_reuse=noise_reuse)
