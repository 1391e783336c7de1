"""Semantics of EGGROLL member noise (docs/design.md, 'EGGROLL semantics')."""

import hashlib
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hyperscalees as hs

SHAPE = (6, 9)
RANK = 2
SIGMA = 0.3


@pytest.fixture(params=["philox4x32", "threefry2x32"])
def key(request):
    return hs.param_key(hs.make_key(7, request.param), 11)


def factors(key, member, epoch=0, noise_reuse=1, shape=SHAPE, rank=RANK):
    a, b = hs.lowrank_factors(key, shape, epoch=epoch, member=member, rank=rank, sigma=SIGMA, noise_reuse=noise_reuse)
    return np.asarray(a), np.asarray(b)


def test_shapes_and_dtype(key):
    a, b = factors(key, 0)
    assert a.shape == (SHAPE[0], RANK) and b.shape == (SHAPE[1], RANK)
    assert a.dtype == np.float32 and b.dtype == np.float32


def test_matches_the_reference_formula(key):
    """Z = normal(fold_in(fold_in(k_W, e), p), (m+n, r)); B = Z[:n]; A = Z[n:]; A_scaled = s sigma/sqrt(r) A."""
    epoch, member = 3, 5
    z = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, epoch), member // 2), (SHAPE[0] + SHAPE[1], RANK))
    a, b = factors(key, member, epoch=epoch)
    np.testing.assert_array_equal(b, np.asarray(z[: SHAPE[1]]))
    np.testing.assert_allclose(a, -SIGMA / math.sqrt(RANK) * np.asarray(z[SHAPE[1] :]), rtol=1e-6)


def official_factors(key, shape, *, epoch, member, rank, sigma, noise_reuse=1):
    """The official HyperscaleES formulas (noiser/eggroll.py), re-derived one float32 operation at a time.

    true_epoch = 0 if R == 0 else epoch // R; Z = normal(fold_in(fold_in(k, true_epoch), member // 2), (m+n, r));
    B = Z[:n]; scale = float32(sigma) / sqrt(float32(r)); signed = scale if member is even else -scale;
    A_scaled = Z[n:] * signed.
    """
    m, n = shape
    true_epoch = 0 if noise_reuse == 0 else epoch // noise_reuse
    z = np.asarray(
        jax.random.normal(
            jax.random.fold_in(jax.random.fold_in(key, true_epoch), member // 2), (m + n, rank), jnp.float32
        )
    )
    scale = np.float32(sigma) / np.sqrt(np.float32(rank))
    signed = scale if member % 2 == 0 else -scale
    return z[n:] * signed, z[:n]


def official_full_noise(key, shape, *, epoch, member, sigma, noise_reuse=1):
    """Official FULL noise: normal(the same member key, shape) * (sigma if member is even else -sigma)."""
    true_epoch = 0 if noise_reuse == 0 else epoch // noise_reuse
    z = np.asarray(
        jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, true_epoch), member // 2), shape, jnp.float32)
    )
    signed = np.float32(sigma) if member % 2 == 0 else -np.float32(sigma)
    return z * signed


# Ranks and sigmas where x * rsqrt(r) (XLA's rewrite of x / sqrt(r)), or a product fused into the
# normal transform, differs from the float32 operations above in the last bit.
OFFICIAL_CASES = [(rank, sigma) for rank in (1, 2, 3, 7) for sigma in (0.3, 0.01, 0.02, 0.5, 1e-3, 0.123)]


def test_threefry_factors_and_full_noise_are_bit_identical_to_the_official_formulas():
    key = hs.param_key(hs.make_key(7, "threefry2x32"), 11)
    shape = (64, 48)
    for rank, sigma in OFFICIAL_CASES:
        for member in (0, 7):
            kw = dict(epoch=5, member=member, sigma=sigma, noise_reuse=2)
            a, b = hs.lowrank_factors(key, shape, rank=rank, **kw)
            ref_a, ref_b = official_factors(key, shape, rank=rank, **kw)
            assert np.asarray(a).tobytes() == ref_a.tobytes(), (rank, sigma, member)
            assert np.asarray(b).tobytes() == ref_b.tobytes()
            assert (
                np.asarray(hs.full_noise(key, (33, 5), **kw)).tobytes()
                == official_full_noise(key, (33, 5), **kw).tobytes()
            )
            assert (
                np.asarray(hs.fullrank_noise(key, shape, **kw)).tobytes()
                == official_full_noise(key, shape, **kw).tobytes()
            )


def test_batched_factor_paths_are_bit_identical_to_the_official_formulas():
    """vmap over members (the update's path) and over tensors (the forward pass's path) round the same way."""
    base = hs.make_key(3, "threefry2x32")
    keys = [hs.param_key(base, i) for i in (0, 5, 9)]
    sigmas, rank, shape = [0.3, 0.01, 0.123], 3, (20, 12)
    pa, pb = hs.population_lowrank_factors(keys[0], shape, epoch=1, members=range(6), rank=rank, sigma=sigmas[0])
    for i in range(6):
        ref_a, ref_b = official_factors(keys[0], shape, epoch=1, member=i, rank=rank, sigma=sigmas[0])
        assert np.asarray(pa[i]).tobytes() == ref_a.tobytes() and np.asarray(pb[i]).tobytes() == ref_b.tobytes()
    sa, _ = hs.stacked_lowrank_factors(jnp.stack(keys), shape, epoch=1, member=3, rank=rank, sigmas=sigmas)
    se = hs.stacked_full_noise(jnp.stack(keys), (7,), epoch=1, member=3, sigmas=sigmas)
    for k, (key, sigma) in enumerate(zip(keys, sigmas)):
        assert (
            np.asarray(sa[k]).tobytes()
            == official_factors(key, shape, epoch=1, member=3, rank=rank, sigma=sigma)[0].tobytes()
        )
        assert np.asarray(se[k]).tobytes() == official_full_noise(key, (7,), epoch=1, member=3, sigma=sigma).tobytes()


def test_antithetic_pairs(key):
    a0, b0 = factors(key, 4)
    a1, b1 = factors(key, 5)
    np.testing.assert_array_equal(a1, -a0)
    np.testing.assert_array_equal(b1, b0)
    a2, _ = factors(key, 6)
    assert not np.allclose(a2, a0)


def test_noise_reuse_zero_is_same_noise_every_epoch(key):
    for epoch in (1, 2, 17):
        np.testing.assert_array_equal(
            factors(key, 2, epoch=epoch, noise_reuse=0)[0], factors(key, 2, epoch=0, noise_reuse=0)[0]
        )


def test_noise_reuse_blocks_of_epochs(key):
    same = [factors(key, 2, epoch=e, noise_reuse=3)[0] for e in (0, 1, 2)]
    for a in same[1:]:
        np.testing.assert_array_equal(a, same[0])
    assert not np.allclose(factors(key, 2, epoch=3, noise_reuse=3)[0], same[0])
    # R == 1: fresh noise every epoch
    assert not np.allclose(factors(key, 2, epoch=1)[0], factors(key, 2, epoch=0)[0])


def test_member_perturbation_has_rank_at_most_r(key):
    a, b = factors(key, 0, shape=(20, 30), rank=3)
    assert np.linalg.matrix_rank(a @ b.T) == 3


def test_different_parameters_get_different_noise():
    base = hs.make_key(0)
    a0, _ = factors(hs.param_key(base, 0), 0)
    a1, _ = factors(hs.param_key(base, 1), 0)
    assert not np.allclose(a0, a1)


def test_vmap_over_members_equals_a_python_loop_bit_for_bit(key):
    members = np.arange(8)
    pa, pb = hs.population_lowrank_factors(key, SHAPE, epoch=2, members=members, rank=RANK, sigma=SIGMA)
    for i in members:
        a, b = factors(key, int(i), epoch=2)
        np.testing.assert_array_equal(np.asarray(pa[i]), a)
        np.testing.assert_array_equal(np.asarray(pb[i]), b)


def test_full_noise_semantics(key):
    e0 = np.asarray(hs.full_noise(key, (4, 3), epoch=1, member=2, sigma=SIGMA))
    e1 = np.asarray(hs.full_noise(key, (4, 3), epoch=1, member=3, sigma=SIGMA))
    np.testing.assert_array_equal(e1, -e0)
    z = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, 1), 1), (4, 3))
    np.testing.assert_allclose(e0, SIGMA * np.asarray(z), rtol=1e-6)


_CHILD = """
import hashlib, numpy as np, hyperscalees as hs
k = hs.param_key(hs.make_key(123, "{impl}"), 4)
a, b = hs.lowrank_factors(k, (64, 48), epoch=9, member=3, rank=4, sigma=0.02)
e = hs.full_noise(k, (33,), epoch=9, member=3, sigma=0.02)
print(hashlib.sha256(np.asarray(a).tobytes() + np.asarray(b).tobytes() + np.asarray(e).tobytes()).hexdigest())
"""


@pytest.mark.parametrize("impl", ["philox4x32", "threefry2x32"])
def test_bit_identical_across_processes(impl):
    digests = {
        subprocess.run(
            [sys.executable, "-c", _CHILD.format(impl=impl)], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    }
    assert len(digests) == 1
    k = hs.param_key(hs.make_key(123, impl), 4)
    a, b = hs.lowrank_factors(k, (64, 48), epoch=9, member=3, rank=4, sigma=0.02)
    e = hs.full_noise(k, (33,), epoch=9, member=3, sigma=0.02)
    here = hashlib.sha256(np.asarray(a).tobytes() + np.asarray(b).tobytes() + np.asarray(e).tobytes()).hexdigest()
    assert digests == {here}


def test_philox_and_threefry_differ():
    a = factors(hs.make_key(0, "philox4x32"), 0)[0]
    b = factors(hs.make_key(0, "threefry2x32"), 0)[0]
    assert not np.allclose(a, b)


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg"])
def test_non_counter_based_impl_is_refused(impl):
    with pytest.raises(ValueError, match="not counter-based"):
        hs.make_key(0, impl)


def test_bad_arguments_are_refused(key):
    with pytest.raises(ValueError, match="unknown prng|Unknown PRNG"):
        hs.make_key(0, "mersenne")
    with pytest.raises(ValueError, match="rank"):
        hs.lowrank_factors(key, SHAPE, epoch=0, member=0, rank=0, sigma=SIGMA)
    with pytest.raises(ValueError, match="sigma"):
        hs.lowrank_factors(key, SHAPE, epoch=0, member=0, rank=1, sigma=-1.0)
    with pytest.raises(ValueError, match="2-D"):
        hs.lowrank_factors(key, (4,), epoch=0, member=0, rank=1, sigma=SIGMA)
    with pytest.raises(ValueError, match="noise_reuse"):
        hs.effective_epoch(3, -1)


def test_stacked_calls_equal_per_tensor_calls_bit_for_bit():
    base = hs.make_key(5)
    keys = [hs.param_key(base, i) for i in (3, 99, 1234)]
    sigmas = [0.1, 0.2, 0.05]
    sa, sb = hs.stacked_lowrank_factors(jnp.stack(keys), SHAPE, epoch=4, member=7, rank=RANK, sigmas=sigmas)
    se = hs.stacked_full_noise(jnp.stack(keys), (5,), epoch=4, member=7, sigmas=sigmas)
    for k, (key, sigma) in enumerate(zip(keys, sigmas)):
        a, b = hs.lowrank_factors(key, SHAPE, epoch=4, member=7, rank=RANK, sigma=sigma)
        np.testing.assert_array_equal(np.asarray(sa[k]), np.asarray(a))
        np.testing.assert_array_equal(np.asarray(sb[k]), np.asarray(b))
        np.testing.assert_array_equal(
            np.asarray(se[k]), np.asarray(hs.full_noise(key, (5,), epoch=4, member=7, sigma=sigma))
        )
