"""ERO's search (core/ero_search.py) against an independent plain-torch reference on small tensors: its sampling scale
rules, round-robin elites and their tie rule, the elites' average as materialised weights, the clamp, reset-to-base."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ERO_EGGROLL import Perturber
from ERO_EGGROLL.core.ero_search import round_robin_elites

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small nets; the thread count is restored after


def net() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    with torch.no_grad():
        m[1].bias.uniform_(-1, 1)  # no constant tensor: every one has a non-zero mean and std
        m[1].weight.uniform_(0.5, 1.5)
    return m


def reference_elites(fitness: list[float], groups: int) -> list[int]:
    """ERO's workers: member i goes to worker i mod G; a worker replaces its best on a score >= it; rank by score."""
    best: dict[int, int] = {}
    for i, f in enumerate(fitness):
        w = i % groups
        if w not in best or f >= fitness[best[w]]:
            best[w] = i
    return sorted(best.values(), key=lambda i: -fitness[i])


def test_round_robin_elites_and_the_later_tie():
    rng = np.random.default_rng(0)
    for _ in range(50):
        f = rng.integers(0, 4, size=12).astype(float).tolist()  # many ties
        got = round_robin_elites(f, 4)
        assert sorted(got) == sorted(reference_elites(f, 4)) and [f[i] for i in got] == sorted(
            (f[i] for i in got), reverse=True
        )
    assert round_robin_elites([1, 0, 1, 0], 2) == [2, 3]  # the later equal member replaces the earlier one
    assert round_robin_elites([1, 0, 1, 0], 2, ties="earlier") == [0, 1]


@pytest.mark.parametrize("rule", ["signed_mean", "relative"])
def test_full_rank_sampling_follows_the_scale_rule(rule):
    """A member is mean + s_t eps_t with s_t = scale x |mean(W)| (or std(W)) and eps_t standard normal, per tensor."""
    m = net()
    base = {n: p.detach().clone() for n, p in m.named_parameters()}
    p = Perturber.for_module(
        m, population_size=4, sigma=0.15, lr=1.0, noise="full", sigma_mode=rule, strategy="inplace"
    )
    draws = {n: [] for n in base}
    for member in range(4):
        with p.member(0, member):
            for n, w in m.named_parameters():
                draws[n].append(w.detach() - base[n])
    for d in draws.values():  # antithetic pairs by default (up to the rounding of w + eps)
        torch.testing.assert_close(d[0], -d[1], rtol=0, atol=1e-6)
    p = Perturber.for_module(m, population_size=4, sigma=0.15, lr=1.0, noise="full", sigma_mode=rule, antithetic=False)
    assert not torch.equal(
        p.member_noise(0, 0)[1]["0.weight"], -p.member_noise(0, 1)[1]["0.weight"]
    )  # ERO: independent draws
    for n, w in base.items():
        s = 0.15 * (abs(float(w.double().mean())) if rule == "signed_mean" else float(w.double().std()))
        assert p.plan.sigma[n] == pytest.approx(s, rel=1e-12)
        eps = torch.cat([d.flatten() for d in draws[n]]) / s
        assert eps.numel() < 8 or abs(float(eps.std()) - 1) < 0.5  # dense noise of unit scale, every element perturbed
        assert bool((eps != 0).all())


@pytest.mark.parametrize("noise, antithetic", [("lowrank", True), ("full", False)])
def test_new_mean_is_the_average_of_the_materialised_elites(noise, antithetic):
    m = net()
    n_members, groups = 8, 4
    p = Perturber.for_module(
        m,
        population_size=n_members,
        sigma=0.3,
        lr=1.0,
        rank=2,
        noise=noise,
        search="ero",
        elites=groups,
        strategy="inplace",
        sigma_mode="relative",
        antithetic=antithetic,
    )
    members = []
    for i in range(n_members):
        with p.member(0, i):
            members.append({n: w.detach().clone() for n, w in m.named_parameters()})
    fitness = [0.3, 0.9, 0.1, 0.4, 0.5, 0.2, 0.7, 0.4]
    elites = reference_elites(fitness, groups)
    p.update(fitness, 0)
    for n, w in m.named_parameters():
        expected = torch.stack([members[i][n] for i in elites]).mean(0)
        torch.testing.assert_close(w.detach(), expected, rtol=0, atol=2e-6)


def test_clamp_bounds_the_mean_after_the_update():
    m = net()
    with torch.no_grad():
        m[0].weight[0, 0] = 9.99
    p = Perturber.for_module(m, population_size=4, sigma=5.0, lr=1.0, noise="full", search="ero", elites=2, clamp=10.0)
    before = m[0].weight.detach().clone()
    elite_noise = [p.member_noise(0, i)[1]["0.weight"] for i in reference_elites([0.0, 1.0, 2.0, 0.5], 2)]
    p.update([0.0, 1.0, 2.0, 0.5], 0)
    torch.testing.assert_close(
        m[0].weight.detach(), (before + torch.stack(elite_noise).mean(0)).clamp(-10, 10), rtol=0, atol=1e-5
    )
    assert float(m[0].weight.detach().abs().max()) <= 10.0


def test_reset_to_base_after_three_epochs_without_a_better_elite_moves_the_seed():
    m = net()
    base = {n: w.detach().clone() for n, w in m.named_parameters()}
    p = Perturber.for_module(
        m,
        population_size=4,
        sigma=0.3,
        lr=1.0,
        search="ero",
        elites=2,
        reset_after=3,
        noise_reuse=0,
        sigma_mode="relative",
    )
    noise_before = p.member_noise(0, 0)[1]["1.weight"]
    decided = [
        p.update(f, e) for e, f in enumerate([[1, 2, 3, 4], [0, 0, 0, 4], [0, 0, 0, 3.5], [0, 0, 0, 3], [0, 0, 0, 2]])
    ]
    assert [d["degeneration_counter"] for d in decided] == [0, 0, 1, 2, 0]  # 4 >= 4 is a new best (ERO's >=)
    assert [d["reset_to_base"] for d in decided] == [False, False, False, False, True]
    assert all(torch.equal(w.detach(), base[n]) for n, w in m.named_parameters())
    assert p.plan.seed == 1919810 and not torch.equal(p.member_noise(0, 0)[1]["1.weight"], noise_before)
    p.optimizer.load_state(0, {})  # a fresh start (replay from the base) is back on the first seed
    assert torch.equal(p.member_noise(0, 0)[1]["1.weight"], noise_before)


def test_ero_search_refuses_a_non_sgd_optimizer():
    from ERO_EGGROLL.core.errors import ConfigError

    with pytest.raises(ConfigError, match="search: ero"):
        Perturber.for_module(net(), population_size=4, sigma=0.1, lr=1.0, search="ero", optimizer="adam")
    defaults = Perturber.for_module(
        net(), population_size=4, sigma=0.1, search="ero"
    ).evo  # for_module's Adam is EGGROLL's
    assert (defaults.optimizer, defaults.lr, defaults.antithetic) == ("sgd", 1.0, False)


def test_early_stop_reads_the_best_elite_so_far_under_ero_and_the_mean_model_under_eggroll():
    from ERO_EGGROLL.core.ero_search import stop_score

    p = Perturber.for_module(net(), population_size=4, sigma=0.1, lr=1.0, search="ero", elites=2)
    stats = p.update([0.2, 1.0, 0.3, 0.1], 0)
    assert stop_score("ero", {**stats, "mean_model_fitness": 0.4}) == 1.0  # ERO's best model reached 1.0: the run stops
    assert (
        stop_score("ero", {**p.update([0.2, 0.1, 0.3, 0.1], 1), "mean_model_fitness": 0.4}) == 1.0
    )  # the best so far, not this epoch's
    assert stop_score("eggroll", {**stats, "mean_model_fitness": 0.4}) == 0.4


def test_replay_refuses_a_record_whose_ero_decisions_were_edited():
    """The epoch step replays ERO's selection from the recorded fitness and compares its decisions with the row's."""
    from ERO_EGGROLL.core.ero_search import ERO_FIELDS
    from ERO_EGGROLL.run.epoch_step import EpochStep
    from ERO_EGGROLL.run.record import ClonedBest
    from ERO_EGGROLL.storage.checkpoints import CheckpointError, RunState

    options = {"population_size": 4, "sigma": 0.1, "search": "ero", "elites": 2}
    fitness = [0.2, 1.0, 0.3, 0.1]
    stats = Perturber.for_module(net(), **options).update(fitness, 0)
    base = {"epoch": 0, "mean_model_fitness": 0.5, "new_best": True, "rolled_back": False}
    row = {
        "epoch": 1,
        "fitness": fitness,
        "mean_model_fitness": 0.6,
        "new_best": True,
        "rolled_back": False,
        **{k: stats[k] for k in ERO_FIELDS},
    }
    for edit, refused in (({}, False), ({"best_elite_so_far": 0.9}, True)):
        step = EpochStep(Perturber.for_module(net(), **options), RunState(), 0, ClonedBest())
        step.apply(base)
        if refused:
            with pytest.raises(CheckpointError, match="ERO's"):
                step.apply({**row, **edit})
        else:
            step.apply({**row, **edit})
