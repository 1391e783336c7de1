"""A sigma that adapts per tensor: one scalar per tensor, so the members' noise stays low-rank.

SNES-style on log sigma: a tensor whose larger perturbations scored better gets a larger sigma, and
a smaller one where they scored worse. Each member's noise magnitude q = ||E||^2 / (sigma^2 numel)
(mean 1) is regenerated from keys; the step is log sigma += sigma_lr x corr(shaped fitness, q) over
the population. The correlation lies in [-1, 1] whatever the fitness scale and the tensor size (the
plain SNES gradient for one shared sigma shrinks as 1/sqrt(numel)), so one sigma_lr suits every
tensor. Antithetic pairs share q, so only a pair's mean fitness counts, as in PGPE's symmetric
sampling. New sigmas are a pure function of (keys, epoch, shaped fitness, old sigmas): replays agree.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

import hyperscalees as hs
from ERO_EGGROLL.core.noise_plan import NoisePlan
from ERO_EGGROLL.core.tensor_classes import ParamClass


@functools.partial(jax.jit, static_argnames=("shape", "noise_reuse"))
def _full_magnitudes(
    key: jax.Array, epoch: int, members: jax.Array, *, shape: tuple[int, ...], noise_reuse: int
) -> jax.Array:
    def one(member: jax.Array) -> jax.Array:
        # hyperscalees.noise.full_noise_pure has no annotations (it is outside the core's typed scope)
        z: jax.Array = hs.noise.full_noise_pure(  # type: ignore[no-untyped-call]
            key, epoch, member, jnp.float32(1.0), shape=shape, noise_reuse=noise_reuse
        )
        return jnp.mean(z * z)

    return jax.vmap(one)(members)


def noise_magnitudes(plan: NoisePlan, name: str, epoch: int, population: int) -> np.ndarray:
    """q_i = ||E_i||^2 / (sigma^2 numel) for every member of one tensor, from keys alone (float64)."""
    # the keyed draws the members really get (without antithetic pairs, member i draws 2i)
    spec, members = plan.specs[name], np.array([plan.drawn_member(i) for i in range(population)])
    with plan._jax_placement():
        if spec.cls is ParamClass.LORA:
            a, b = hs.population_lowrank_factors(
                plan.keys[name],
                spec.matrix_shape,
                epoch=epoch,
                members=members,
                rank=plan.rank,
                sigma=1.0,
                noise_reuse=plan.noise_reuse,
            )
            # ||A B^T||_F^2 = sum((A^T A) * (B^T B)): r x r products instead of the (m, n) matrix
            sq = jnp.sum(jnp.einsum("nir,nis->nrs", a, a) * jnp.einsum("nir,nis->nrs", b, b), axis=(1, 2))
            q = sq / math.prod(spec.matrix_shape)
        else:
            q = _full_magnitudes(
                plan.keys[name], epoch, jnp.asarray(members), shape=tuple(spec.shape), noise_reuse=plan.noise_reuse
            )
    return np.asarray(q, dtype=np.float64)


def log_sigma_step(fitness: np.ndarray, magnitudes: np.ndarray) -> float:
    """corr(fitness, q) in [-1, 1]; 0 when either does not vary (e.g. all members scored the same)."""
    f = np.asarray(fitness, np.float64) - np.mean(fitness)
    q = magnitudes - magnitudes.mean()
    denominator = math.sqrt(float(f @ f) * float(q @ q))
    return float(f @ q) / denominator if denominator > 0 else 0.0


def adapted_sigmas(plan: NoisePlan, fitness: np.ndarray, epoch: int, sigma_lr: float) -> dict[str, float]:
    """Every tensor's next base sigma: sigma x exp(sigma_lr x corr(fitness, q))."""
    return {
        name: plan.sigma[name]
        * math.exp(sigma_lr * log_sigma_step(fitness, noise_magnitudes(plan, name, epoch, len(fitness))))
        for name in plan.specs
    }
