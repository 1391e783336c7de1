"""Per-member EGGROLL noise: low-rank factors for matrices, dense noise for the rest.

All draws are float32 whatever the parameter dtype; cast where the model runs in bf16.

Order of operations, as the official HyperscaleES: the LORA scale sigma / sqrt(r) is one float32
number, computed first; the antithetic sign is applied to that scale; the normal draw is then
multiplied by the signed scale (FULL: by the signed sigma). Two XLA rewrites would change the last
bit, so they are kept out: the scale is computed on the host with NumPy (XLA turns x / sqrt(r)
into an approximate x * rsqrt(r)), and the normal draw is materialised before the multiply
(an optimization barrier: fused into the normal transform, the product rounds differently).
With `threefry2x32` this makes A_scaled, B and FULL noise bit-identical to those formulas
evaluated one float32 operation at a time (HyperscaleES/tests/test_noise.py re-derives them).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .keys import antithetic_sign, member_key


def _check_matrix_shape(shape) -> tuple[int, int]:
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"low-rank noise needs a 2-D (m, n) shape, got {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def _check_rank_sigma(rank: int, sigma) -> None:
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not isinstance(sigma, jax.Array) and not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")


def lowrank_scale(sigma, rank: int) -> np.ndarray:
    """float32(sigma) / sqrt(float32(rank)), IEEE-rounded on the host (one value per sigma).

    `sigma` must be concrete (a number or an array of per-tensor sigmas), not a traced value.
    """
    return np.asarray(sigma, np.float32) / np.sqrt(np.float32(rank))


def _signed(member, value):
    """The antithetic sign applied to `value` (a select, as the official does, not a multiply by +-1)."""
    return jnp.where(antithetic_sign(member) > 0, value, -value)


def _normal(key, epoch, member, shape, noise_reuse):
    z = jax.random.normal(member_key(key, epoch=epoch, member=member, noise_reuse=noise_reuse), shape, jnp.float32)
    return jax.lax.optimization_barrier(z)


def lowrank_factors_pure(key, epoch, member, scale, *, shape, rank, noise_reuse):
    """Traceable core of `lowrank_factors` (for use inside other jitted code);
    `scale` is `lowrank_scale(sigma, rank)`."""
    m, n = shape
    z = _normal(key, epoch, member, (m + n, rank), noise_reuse)
    return z[n:] * _signed(member, scale), z[:n]


def lowrank_factors(key, shape, *, epoch, member, rank: int, sigma, noise_reuse: int = 1):
    """(A_scaled, B) of member `member`: E = A_scaled @ B.T = s_i sigma/sqrt(r) A B^T.

    A_scaled is (m, r), B is (n, r), both float32. The forward pass adds x @ B @ A_scaled.T.
    """
    shape = _check_matrix_shape(shape)
    _check_rank_sigma(rank, sigma)
    return _lowrank_factors_jit(
        key, epoch, member, lowrank_scale(sigma, rank), shape=shape, rank=rank, noise_reuse=noise_reuse
    )


def population_lowrank_factors_pure(key, epoch, members, scale, *, shape, rank, noise_reuse):
    """vmap of `lowrank_factors_pure` over a 1-D array of member indices."""
    one = partial(lowrank_factors_pure, shape=shape, rank=rank, noise_reuse=noise_reuse)
    return jax.vmap(one, in_axes=(None, None, 0, None))(key, epoch, members, scale)


def population_lowrank_factors(key, shape, *, epoch, members, rank: int, sigma, noise_reuse: int = 1):
    """Factors of several members at once: (N, m, r) and (N, n, r), bit-equal to a loop."""
    shape = _check_matrix_shape(shape)
    _check_rank_sigma(rank, sigma)
    members = jnp.asarray(members, dtype=jnp.int32)
    return _population_lowrank_factors_jit(
        key, epoch, members, lowrank_scale(sigma, rank), shape=shape, rank=rank, noise_reuse=noise_reuse
    )


def full_noise_pure(key, epoch, member, sigma, *, shape, noise_reuse):
    """Traceable core of `full_noise`."""
    return _normal(key, epoch, member, shape, noise_reuse) * _signed(member, sigma)


_lowrank_factors_jit = jax.jit(lowrank_factors_pure, static_argnames=("shape", "rank", "noise_reuse"))
_population_lowrank_factors_jit = jax.jit(
    population_lowrank_factors_pure, static_argnames=("shape", "rank", "noise_reuse")
)
_full_noise_jit = jax.jit(full_noise_pure, static_argnames=("shape", "noise_reuse"))


def full_noise(key, shape, *, epoch, member, sigma, noise_reuse: int = 1):
    """Dense noise s_i * sigma * normal(k_{W,e,p}, shape) for FULL-class tensors (float32)."""
    _check_rank_sigma(1, sigma)
    return _full_noise_jit(
        key, epoch, member, jnp.float32(sigma), shape=tuple(int(d) for d in shape), noise_reuse=noise_reuse
    )


def _stacked_lowrank_pure(keys, epoch, member, scales, *, shape, rank, noise_reuse):
    one = partial(lowrank_factors_pure, shape=shape, rank=rank, noise_reuse=noise_reuse)
    return jax.vmap(one, in_axes=(0, None, None, 0))(keys, epoch, member, scales)


def _stacked_full_pure(keys, epoch, member, sigmas, *, shape, noise_reuse):
    one = partial(full_noise_pure, shape=shape, noise_reuse=noise_reuse)
    return jax.vmap(one, in_axes=(0, None, None, 0))(keys, epoch, member, sigmas)


_stacked_lowrank_jit = jax.jit(_stacked_lowrank_pure, static_argnames=("shape", "rank", "noise_reuse"))
_stacked_full_jit = jax.jit(_stacked_full_pure, static_argnames=("shape", "noise_reuse"))


def stacked_lowrank_factors(keys, shape, *, epoch, member, rank: int, sigmas, noise_reuse: int = 1):
    """One member's factors for K same-shape tensors in ONE call: (K, m, r), (K, n, r).

    `keys` is a stacked array of K parameter keys, `sigmas` K per-tensor sigmas; row k equals
    `lowrank_factors(keys[k], ...)` bit for bit. This is how a model's hundreds of matrices
    get their noise in a handful of jitted calls (one per shape group).
    """
    shape = _check_matrix_shape(shape)
    _check_rank_sigma(rank, 1.0)
    return _stacked_lowrank_jit(
        keys, epoch, member, lowrank_scale(sigmas, rank), shape=shape, rank=rank, noise_reuse=noise_reuse
    )


def stacked_full_noise(keys, shape, *, epoch, member, sigmas, noise_reuse: int = 1):
    """One member's dense noise for K same-shape tensors in ONE call: (K, *shape)."""
    sigmas = jnp.asarray(sigmas, jnp.float32)
    return _stacked_full_jit(keys, epoch, member, sigmas, shape=tuple(int(d) for d in shape), noise_reuse=noise_reuse)
