"""ask/tell beside member/update: the same steps, typed statistics, minimising, refused generations, hooks that leave
with the Perturber, and copies of a hooked module."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from ERO_EGGROLL.core import EggrollError, Perturber, StaleGeneration, UpdateStats
from ERO_EGGROLL.core.perturber import PerturberUsageError
from ERO_EGGROLL.core.settings import ERO_SEARCH_DEFAULTS, FOR_MODULE_DEFAULTS

X = torch.linspace(-1, 1, 24).reshape(8, 3)
Y = X.sum(dim=1, keepdim=True)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1))


def es(module: nn.Module, **options) -> Perturber:
    return Perturber.for_module(module, **{"population_size": 6, "sigma": 0.05, "lr": 0.05, **options})


def loss(module: nn.Module) -> float:
    with torch.no_grad():
        return float(nn.functional.mse_loss(module(X), Y))


def weights(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_ask_tell_takes_the_steps_member_update_takes(one_torch_thread):
    old_net, new_net = net(), net()
    old, new = es(old_net), es(new_net)
    for epoch in range(3):
        fitness = []
        for i in range(6):
            with old.member(epoch, i):
                fitness.append(-loss(old_net))
        old.update(fitness, epoch)
        gen = new.ask()
        assert gen.epoch == epoch
        told = []
        for i in range(6):
            with gen.member(i) as model:
                told.append(-loss(model))
        new.tell(gen, told)
    assert all(torch.equal(a, b) for a, b in zip(weights(old_net), weights(new_net)))
    with pytest.raises(PerturberUsageError, match="applied twice"):  # update() still knows the epochs tell applied
        new.update(told, 2)


def test_tell_returns_typed_statistics_and_calls_on_update(one_torch_thread):
    seen: list[UpdateStats] = []
    p = es(net(), on_update=seen.append)
    gen = p.ask()
    fitness = [0.5, -1.0, 2.0, 0.0, 1.5, -0.5]
    stats = p.tell(gen, fitness)
    assert seen == [stats]
    assert (stats.epoch, stats.lr, stats.sigma) == (0, 0.05, pytest.approx(0.05))
    f = np.array(fitness)
    assert (stats.fitness.mean, stats.fitness.std, stats.fitness.min, stats.fitness.max) == pytest.approx(
        (f.mean(), f.std(), -1.0, 2.0)
    )
    assert stats.update_norm == stats.details["update_norm"] > 0 and stats.seconds > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.lr = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        stats.details["lr"] = 1.0  # type: ignore[index]


def test_minimising_a_loss_is_maximising_its_negative(one_torch_thread):
    max_net, min_net = net(), net()
    maximise, minimise = es(max_net), es(min_net, objective="min")
    before = loss(min_net)
    for _ in range(5):
        gen_max, gen_min = maximise.ask(), minimise.ask()
        losses = []
        for i in range(6):
            with gen_min.member(i) as model:
                losses.append(loss(model))
        minimise.tell(gen_min, losses)
        maximise.tell(gen_max, [-v for v in losses])
    assert all(torch.equal(a, b) for a, b in zip(weights(max_net), weights(min_net)))
    assert loss(min_net) < before


@pytest.mark.parametrize(
    ("misuse", "message"),
    [
        ("told twice", "was told already"),
        ("replaced by a later ask", "is stale: a later ask"),
        ("another Perturber's", "asked of another Perturber"),
        ("member of a told generation", "was told already"),
    ],
)
def test_a_stale_or_foreign_generation_is_refused_in_one_line(misuse, message, one_torch_thread):
    p, other = es(net()), es(net())
    gen = p.ask()
    fitness = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    if misuse in ("told twice", "member of a told generation"):
        p.tell(gen, fitness)
    elif misuse == "replaced by a later ask":
        p.ask()
    else:
        p = other
    before = weights(p.model)
    with pytest.raises(StaleGeneration, match=message) as refused:
        if misuse == "member of a told generation":
            with gen.member(0):
                pass
        else:
            p.tell(gen, fitness)
    assert isinstance(refused.value, EggrollError) and "\n" not in str(refused.value)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(p.model)))


def test_an_unknown_objective_is_refused():
    with pytest.raises(EggrollError, match="objective must be one of"):
        es(net(), objective="maximise")


def test_a_perturber_as_a_context_manager_removes_its_hooks():
    module = net()
    with es(module) as p:
        assert any(m._forward_hooks for m in module.modules())
    assert not any(m._forward_hooks for m in module.modules())
    with pytest.raises(PerturberUsageError, match="hooks were removed"):  # a member would have no low-rank noise
        with p.ask().member(0):
            pass


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_hooked_module_copies_as_the_plain_module_and_is_refused_inside_a_member(how, one_torch_thread):
    def copied(module: nn.Module) -> nn.Module:
        return copy.deepcopy(module) if how == "deepcopy" else pickle.loads(pickle.dumps(module))

    module = net()
    p = es(module)
    twin = copied(module)
    plain = module(X).detach()
    with p.member(0, 1):
        assert not torch.equal(module(X), plain)  # the member's noise is on the original
        assert torch.equal(twin(X), plain)  # and not on the copy: it has no Perturber
        with pytest.raises(EggrollError, match="inside a member block"):
            copied(module)
    assert torch.equal(copied(module)(X), plain)


def test_for_module_defaults_live_in_settings():
    p = Perturber.for_module(net())
    assert {k: getattr(p.evo, k) for k in FOR_MODULE_DEFAULTS} == FOR_MODULE_DEFAULTS
    ero = Perturber.for_module(net(), search="ero")
    assert {k: getattr(ero.evo, k) for k in ERO_SEARCH_DEFAULTS} == ERO_SEARCH_DEFAULTS
