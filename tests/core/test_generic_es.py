"""The ES-library features of the generic core: fitness shaping, ClipUp, an adaptive per-tensor sigma, exact resume."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

import hyperscalees as hs
from ERO_EGGROLL import Perturber
from ERO_EGGROLL.core.errors import ConfigError, EggrollError
from ERO_EGGROLL.core.es_optimizer import EsOptimizer
from ERO_EGGROLL.core.perturber import PerturberUsageError
from ERO_EGGROLL.core.sigma_adapt import log_sigma_step, noise_magnitudes


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _fitness(perturber: Perturber, net: torch.nn.Module, epoch: int) -> list[float]:
    g = torch.Generator().manual_seed(epoch)
    x = torch.randn(16, 3, generator=g)
    y = x.sum(dim=1, keepdim=True).sin()
    out = []
    for i in range(perturber.evo.population_size):
        with perturber.member(epoch, i), torch.no_grad():
            out.append(-float(torch.nn.functional.mse_loss(net(x), y)))
    return out


def _run(perturber: Perturber, net: torch.nn.Module, epochs: range) -> None:
    for epoch in epochs:
        perturber.update(_fitness(perturber, net, epoch), epoch)


OPTIONS = {"population_size": 8, "sigma": 0.1, "lr": 0.02, "rank": 2, "sigma_mode": "relative", "sigma_lr": 0.3}


@pytest.mark.parametrize("optimizer", ["adam", "clipup"])
def test_state_dict_resume_is_bit_identical(optimizer):
    straight = _net()
    p = Perturber.for_module(straight, optimizer=optimizer, **OPTIONS)
    _run(p, straight, range(4))

    first = _net()
    p1 = Perturber.for_module(first, optimizer=optimizer, **OPTIONS)
    _run(p1, first, range(2))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "es": p1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = _net(seed=1)  # other initial weights: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    p2 = Perturber.for_module(resumed, optimizer=optimizer, **OPTIONS)
    p2.load_state_dict(saved["es"])
    _run(p2, resumed, range(2, 4))

    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert p.plan.sigma == p2.plan.sigma
    p3 = Perturber.for_module(_net(), optimizer=optimizer, **OPTIONS)
    p3.load_state_dict(saved["es"])
    with pytest.raises(PerturberUsageError, match="applied twice"):  # the resumed loop knows epoch 1 was applied
        p3.update([0.0] * 8, 1)


def test_load_state_dict_refuses_another_module():
    state = Perturber.for_module(_net(), optimizer="adam", **OPTIONS).state_dict()
    other = torch.nn.Sequential(torch.nn.Linear(3, 9), torch.nn.Tanh(), torch.nn.Linear(9, 1))
    with pytest.raises(ConfigError, match="another module"):
        Perturber.for_module(other, optimizer="adam", **OPTIONS).load_state_dict(state)


def _reference_centered_ranks(f: list[float]) -> list[float]:
    """Rank = members scoring lower, plus half of the other members scoring the same; then onto [-0.5, 0.5]."""
    n = len(f)
    ranks = [sum(fj < fi for fj in f) + (sum(fj == fi for fj in f) - 1) / 2 for fi in f]
    return [r / (n - 1) - 0.5 for r in ranks]


def test_fitness_shaping_rules():
    f = [3.0, -1.0, 2.0, 2.0, 10.0, 0.5, 0.5, 7.0]
    np.testing.assert_allclose(hs.shape_fitness(f, "centered_rank"), _reference_centered_ranks(f), atol=1e-7)
    np.testing.assert_allclose(
        hs.shape_fitness(f, "centered_rank", 4),
        _reference_centered_ranks(f[:4]) + _reference_centered_ranks(f[4:]),
        atol=1e-7,
    )
    np.testing.assert_array_equal(hs.shape_fitness(f, "zscore", 2), hs.normalize_fitness(f, 2))
    np.testing.assert_array_equal(hs.shape_fitness(f, "raw"), np.float32(f))
    with pytest.raises(ValueError, match="not finite"):
        hs.shape_fitness([1.0, float("nan")], "centered_rank")


@pytest.mark.parametrize("shaping", ["centered_rank", "zscore"])
def test_equal_fitness_moves_nothing(shaping):
    """Tied members share their rank: all-equal scores weigh every member 0, so the SGD step is exactly zero
    (docs/troubleshooting.md), whatever the member order."""
    assert hs.shape_fitness([2.0, 2.0, 0.0, 5.0], "centered_rank").tolist() == [0.0, 0.0, -0.5, 0.5]
    net = _net()
    before = [t.detach().clone() for t in net.parameters()]
    p = Perturber.for_module(net, population_size=8, sigma=0.1, lr=0.5, optimizer="sgd", fitness_shaping=shaping)
    stats = p.update([0.25] * 8, 0)
    assert stats["normalized_fitness"] == [0.0] * 8 and stats["update_norm"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_clipup_follows_its_formula():
    lr, opt = 0.1, EsOptimizer("clipup", 0.1)
    g = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[0.0, 4.0]])}
    v = {k: torch.zeros_like(t) for k, t in g.items()}
    for step in range(3):
        scale = [1.0, 10.0, 0.5][step]
        norm = math.sqrt(sum(float((t * scale).pow(2).sum()) for t in g.values()))
        speed = math.sqrt(sum(opt.clipup_velocity(k, t * scale, norm) for k, t in g.items()))
        got = {k: opt.clipup_change(k, speed, torch.empty_like(t)) for k, t in g.items()}
        v = {k: 0.9 * v[k] + lr * g[k] * scale / norm for k in g}
        total = math.sqrt(sum(float(t.pow(2).sum()) for t in v.values()))
        if total > 2 * lr:
            v = {k: t * (2 * lr / total) for k, t in v.items()}
        for k in g:
            torch.testing.assert_close(got[k], v[k])
    assert math.isclose(
        math.sqrt(sum(float(t.pow(2).sum()) for t in v.values())), 2 * lr, rel_tol=1e-6
    )  # clipped by now


@pytest.mark.parametrize("antithetic", [True, False])
def test_noise_magnitudes_match_the_members_noise(antithetic):
    """Without antithetic pairs member i draws keyed member 2i: the magnitudes must be those of the noise it gets."""
    net = _net()
    p = Perturber.for_module(net, population_size=8, sigma=0.05, lr=0.01, rank=2, antithetic=antithetic)
    for name in ("0.weight", "0.bias"):
        q = noise_magnitudes(p.plan, name, epoch=3, population=8)
        expected = []
        for member in range(8):
            lora, full = p.member_noise(3, member)
            e = lora[name][0] @ lora[name][1].T if name in lora else full[name]
            expected.append(float(e.double().pow(2).sum()) / (0.05**2 * e.numel()))
        np.testing.assert_allclose(q, expected, rtol=1e-5)
        if antithetic:
            np.testing.assert_array_equal(q[0::2], q[1::2])  # antithetic pairs share a magnitude


def test_sigma_grows_where_larger_noise_scores_better():
    net = _net()
    p = Perturber.for_module(net, population_size=16, sigma=0.05, lr=0.01, sigma_lr=0.5)
    fixed = Perturber.for_module(_net(), population_size=16, sigma=0.05, lr=0.01)
    q = noise_magnitudes(p.plan, "0.weight", epoch=0, population=16)
    assert log_sigma_step(q, q) == pytest.approx(1.0)
    assert log_sigma_step(np.ones(16), q) == 0.0
    before = dict(p.plan.sigma)
    p.update(q, 0)  # fitness = the noise magnitude of 0.weight
    fixed.update(q, 0)
    assert p.plan.sigma["0.weight"] == pytest.approx(0.05 * math.exp(0.5))
    assert all(math.isclose(fixed.plan.sigma[n], before[n]) for n in before)


def test_a_run_config_refuses_an_adaptive_sigma():
    """Run checkpoints and replay do not record adapted sigmas, so a run must keep sigma fixed."""
    from ERO_EGGROLL.config import ROOT, load_config

    with pytest.raises(ConfigError, match="sigma_lr must be 0 in a run"):
        load_config(ROOT / "configs" / "default.yaml", ["evolution.sigma_lr=0.1"])


def test_a_resumed_ero_search_resets_to_the_original_base_not_to_the_weights_it_was_built_on():
    """ERO's reset-to-base after a resume: the Perturber is built on the evolved weights, its base comes from the
    state_dict. Fitness [1, 0, 0, 0] sets the best elite; then all zeros is worse, so reset_after=1 resets."""
    options = {"population_size": 4, "sigma": 0.1, "search": "ero", "elites": 2, "reset_after": 1}
    net = _net()
    original = {k: v.clone() for k, v in net.state_dict().items()}
    p = Perturber.for_module(net, **options)
    p.update([1.0, 0.0, 0.0, 0.0], 0)
    saved = {"net": {k: v.clone() for k, v in net.state_dict().items()}, "es": p.state_dict()}
    assert any(not torch.equal(saved["net"][k], original[k]) for k in original)  # the mean moved
    resumed = _net(seed=1)
    resumed.load_state_dict(saved["net"])
    p2 = Perturber.for_module(resumed, **options)
    p2.load_state_dict(saved["es"])
    stats = p2.update([0.0, 0.0, 0.0, 0.0], 1)
    assert stats["reset_to_base"]
    assert all(torch.equal(resumed.state_dict()[k], original[k]) for k in original)


def test_a_state_of_other_settings_or_nan_fitness_is_refused():
    ero = Perturber.for_module(_net(), population_size=4, sigma=0.1, search="ero", elites=2)
    with pytest.raises(ConfigError, match=r"made with other settings \(search 'ero' there, 'eggroll' here"):
        Perturber.for_module(_net(), population_size=4, sigma=0.1, optimizer="sgd").load_state_dict(ero.state_dict())
    with pytest.raises(EggrollError, match=r"fitness: fitness of member\(s\) \[0\] is not finite"):
        ero.update([float("nan"), 0.0, 0.0, 0.0], 0)
