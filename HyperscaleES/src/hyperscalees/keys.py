"""Keys: every random number in a run is a pure function of (seed, parameter, epoch, member).

Only counter-based PRNG implementations are accepted, because they give the same bits under
vmap, jit and on every device; that is what lets noise be regenerated instead of stored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

COUNTER_BASED_IMPLS = ("philox4x32", "philox2x32", "threefry2x32")
NON_COUNTER_BASED_IMPLS = ("rbg", "unsafe_rbg")


def make_key(seed: int, impl: str = "philox4x32") -> jax.Array:
    """Typed JAX key for `seed` with a counter-based PRNG implementation."""
    if impl in NON_COUNTER_BASED_IMPLS:
        raise ValueError(
            f"PRNG implementation {impl!r} is not counter-based: its bits change under vmap and across devices, so "
            f"member noise could not be regenerated exactly. Use one of {', '.join(COUNTER_BASED_IMPLS)}."
        )
    if impl not in COUNTER_BASED_IMPLS:
        raise ValueError(f"Unknown PRNG implementation {impl!r}; choose one of {', '.join(COUNTER_BASED_IMPLS)}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return jax.random.key(seed, impl=impl)


def param_key(base_key: jax.Array, index: int) -> jax.Array:
    """The key k_W of the parameter tensor with stable integer `index`."""
    return jax.random.fold_in(base_key, index)


def effective_epoch(epoch, noise_reuse: int):
    """e = 0 if R == 0 (same noise every epoch) else epoch // R."""
    if noise_reuse < 0:
        raise ValueError(f"noise_reuse must be >= 0, got {noise_reuse}")
    return 0 if noise_reuse == 0 else epoch // noise_reuse


def antithetic_sign(member):
    """+1 for even members, -1 for odd ones: members (2k, 2k+1) form an antithetic pair."""
    return 1 - 2 * (jnp.asarray(member) % 2)


def member_key(key: jax.Array, *, epoch, member, noise_reuse: int = 1) -> jax.Array:
    """k_{W,e,p} = fold_in(fold_in(k_W, e), p) with p = member // 2 (shared by the pair)."""
    return jax.random.fold_in(jax.random.fold_in(key, effective_epoch(epoch, noise_reuse)), member // 2)
