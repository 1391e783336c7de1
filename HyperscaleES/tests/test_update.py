"""The fused update and fitness shaping (docs/design.md, 'EGGROLL semantics')."""

import math

import jax
import numpy as np
import pytest

import hyperscalees as hs

SHAPE = (12, 20)
SIGMA = 0.5


@pytest.fixture
def key():
    return hs.param_key(hs.make_key(3), 0)


def naive_lowrank_update(key, shape, fitness, *, epoch, rank, sigma):
    total = np.zeros(shape, np.float64)
    for i, f in enumerate(fitness):
        a, b = hs.lowrank_factors(key, shape, epoch=epoch, member=i, rank=rank, sigma=sigma)
        total += f * np.asarray(a, np.float64) @ np.asarray(b, np.float64).T
    return total / math.sqrt(len(fitness))


def test_lowrank_update_equals_naive_sum(key):
    fitness = hs.normalize_fitness(np.random.default_rng(0).normal(size=8))
    fused = np.asarray(hs.lowrank_update(key, SHAPE, fitness, epoch=4, rank=2, sigma=SIGMA))
    assert fused.dtype == np.float32 and fused.shape == SHAPE
    np.testing.assert_allclose(
        fused, naive_lowrank_update(key, SHAPE, fitness, epoch=4, rank=2, sigma=SIGMA), rtol=1e-5, atol=1e-6
    )


def test_update_rank_grows_with_population(key):
    rng = np.random.default_rng(1)
    ranks = []
    for n in (2, 4, 8, 16):
        # distinct values per antithetic pair so pairs do not cancel
        fitness = rng.normal(size=n).astype(np.float32)
        ranks.append(
            np.linalg.matrix_rank(np.asarray(hs.lowrank_update(key, SHAPE, fitness, epoch=0, rank=2, sigma=SIGMA)))
        )
    # pairs share factors, so N members span N/2 * r directions, capped by min(m, n)
    assert ranks == [min(n // 2 * 2, min(SHAPE)) for n in (2, 4, 8, 16)]


def test_equal_fitness_within_pairs_gives_zero_update(key):
    fitness = np.repeat(np.array([0.3, -1.2, 2.0], np.float32), 2)
    np.testing.assert_allclose(
        np.asarray(hs.lowrank_update(key, SHAPE, fitness, epoch=0, rank=2, sigma=SIGMA)), 0.0, atol=1e-6
    )
    np.testing.assert_allclose(np.asarray(hs.full_update(key, (7,), fitness, epoch=0, sigma=SIGMA)), 0.0, atol=1e-7)


def test_full_update_equals_sqrt_n_times_mean(key):
    fitness = hs.normalize_fitness([0.1, 0.9, 0.4, 0.2, 0.7, 0.0])
    eps = np.stack([np.asarray(hs.full_noise(key, (5,), epoch=2, member=i, sigma=SIGMA)) for i in range(6)])
    expected = math.sqrt(6) * np.mean(fitness[:, None] * eps, axis=0)
    np.testing.assert_allclose(
        np.asarray(hs.full_update(key, (5,), fitness, epoch=2, sigma=SIGMA)), expected, rtol=1e-5, atol=1e-7
    )


def test_fullrank_baseline_update_matches_its_noise(key):
    fitness = hs.normalize_fitness([1.0, 0.0, 0.5, 0.25])
    noise = [np.asarray(hs.fullrank_noise(key, SHAPE, epoch=0, member=i, sigma=SIGMA)) for i in range(4)]
    assert np.linalg.matrix_rank(noise[0]) == min(SHAPE)
    expected = math.sqrt(4) * np.mean([f * e for f, e in zip(fitness, noise)], axis=0)
    np.testing.assert_allclose(
        np.asarray(hs.fullrank_update(key, SHAPE, fitness, epoch=0, sigma=SIGMA)), expected, rtol=1e-5, atol=1e-7
    )


def test_lowrank_update_never_forms_the_population_of_matrices(key):
    """The compiled update's largest buffer is the (m, n) result, not (N, m, n)."""
    n_members, shape = 64, (300, 400)
    fitness = np.ones(n_members, np.float32)
    compiled = (
        jax.jit(lambda f: hs.lowrank_update(key, shape, f, epoch=0, rank=2, sigma=SIGMA)).lower(fitness).compile()
    )
    stats = compiled.memory_analysis()
    temp_bytes = stats.temp_size_in_bytes + stats.output_size_in_bytes
    assert temp_bytes < 4 * shape[0] * shape[1] * 4  # a few (m, n) float32 buffers at most
    assert temp_bytes < n_members * shape[0] * shape[1] * 4 / 8


def test_normalize_global():
    f = np.array([1.0, 2.0, 4.0, 9.0])
    expected = (f - f.mean()) / np.sqrt(f.var() + 1e-5)
    np.testing.assert_allclose(hs.normalize_fitness(f), expected, rtol=1e-6)


def test_normalize_groups_use_group_mean_and_global_variance():
    f = np.array([1.0, 3.0, 10.0, 14.0])
    expected = np.array([-1.0, 1.0, -2.0, 2.0]) / np.sqrt(f.var() + 1e-5)
    np.testing.assert_allclose(hs.normalize_fitness(f, group_size=2), expected, rtol=1e-6)


def test_constant_fitness_gives_zeros():
    out = hs.normalize_fitness([0.5] * 6)
    assert np.all(out == 0) and np.all(np.isfinite(out))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_fitness_is_refused_naming_the_member(bad):
    with pytest.raises(ValueError, match=r"member\(s\) \[2\]"):
        hs.normalize_fitness([0.1, 0.2, bad, 0.3])


def test_group_size_must_divide_population():
    with pytest.raises(ValueError, match="divide"):
        hs.normalize_fitness([0.0] * 6, group_size=4)


def test_lowrank_update_norm_from_factors_equals_the_norm_of_the_update(key):
    fitness = hs.normalize_fitness(np.random.default_rng(5).normal(size=16))
    shape = (40, 24)
    dense = np.asarray(hs.lowrank_update(key, shape, fitness, epoch=3, rank=3, sigma=SIGMA), np.float64)
    from_factors = float(hs.lowrank_update_sq_norm(key, shape, fitness, epoch=3, rank=3, sigma=SIGMA))
    np.testing.assert_allclose(from_factors, np.sum(dense**2), rtol=1e-5)


def test_lowrank_update_norm_is_exactly_zero_when_antithetic_pairs_tie(key):
    """Tied pairs cancel exactly in the update; the norm from factors must say 0, never a negative residue."""
    fitness = np.repeat(np.random.default_rng(7).normal(size=8).astype(np.float32), 2)
    for shape in ((40, 24), (17, 63), (128, 5)):
        assert float(hs.lowrank_update_sq_norm(key, shape, fitness, epoch=1, rank=2, sigma=SIGMA)) == 0.0
