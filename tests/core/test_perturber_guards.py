"""The generic Perturber (`for_module`) is as safe as the run: nested members, tied weights, frozen tensors, argument
types and ranges, and an epoch updated twice are refused in one line, and the model is left as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ERO_EGGROLL.core.errors import EggrollError
from ERO_EGGROLL.core.noise_plan import StillTensorWarning
from ERO_EGGROLL.core.perturber import Perturber
from ERO_EGGROLL.core.tensor_classes import ParamClass

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small nets; the thread count is restored after


def make(net: nn.Module, **options) -> Perturber:
    return Perturber.for_module(net, **{"population_size": 4, "rank": 1, "sigma": 0.3, "lr": 0.1, **options})


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.state_dict().items()}


@pytest.mark.parametrize("strategy", ["inplace", "forward"])
def test_nested_member_blocks_are_refused_and_the_model_restored(strategy):
    model = net()
    before, x = weights(model), torch.randn(2, 3)
    plain = model(x)
    p = make(model, strategy=strategy)
    with pytest.raises(EggrollError, match="a member block inside another member block"):
        with p.member(0, 0), p.member(0, 1):
            pass
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert torch.equal(model(x), plain)  # no hook left active either (forward: the LayerNorm's noise)


def test_a_tied_weight_is_noised_everywhere_or_refused_by_name():
    """An embedding tied to the output layer: `inplace` noises the one tensor both use; `forward` is refused by name."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(10, 6), nn.Linear(6, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.embed(ids))

    torch.manual_seed(0)
    model, ids = Tied(), torch.arange(5).unsqueeze(0)
    with pytest.raises(EggrollError, match=r"embed.weight is shared by embed.weight, head.weight \(tied weights\)"):
        make(model, strategy="forward")
    assert not model.embed._forward_hooks and not model.head._forward_hooks
    p = make(model, strategy="inplace")
    lora, _ = p.member_noise(0, 1)
    a, b = lora["embed.weight"]
    perturbed = model.embed.weight.detach() + a @ b.T
    with torch.no_grad(), p.member(0, 1):
        out = model(ids)
    torch.testing.assert_close(out, nn.functional.embedding(ids, perturbed) @ perturbed.T)


def test_requires_grad_false_is_frozen_unless_classified():
    model = net()
    model[0].weight.requires_grad_(False)
    assert "0.weight" not in make(model).params
    assert "0.weight" in make(model, classify=lambda name, t: ParamClass.LORA if name == "0.weight" else None).params


@pytest.mark.parametrize(
    "options,message",
    [
        ({"sigma": float("inf")}, "sigma must be a finite number"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"population_size": "4"}, "population_size must be an integer, got '4'"),
        ({"seed": -1}, r"seed must be an integer in 0..4294967295, got -1"),
        ({"seed": 2**32}, r"seed must be an integer in 0..4294967295"),
    ],
)
def test_settings_are_type_and_range_checked(options, message):
    with pytest.raises(EggrollError, match=message):
        make(net(), **options)


def test_member_ids_epochs_and_updates_are_checked():
    model = net()
    before = weights(model)
    p = make(model, strategy="forward")
    for call, message in [
        (lambda: p.member(0, 1.5), "member 1.5 is not a member id"),
        (lambda: p.member(0, True), "member True is not a member id"),
        (lambda: p.member(0, 4), r"member 4 is not a member id: an integer in 0..3"),
        (lambda: p.member(-1, 0), r"epoch must be an integer in 0..2147483647, got -1"),
        (lambda: p.members(0, []), "at least one member id"),
        (lambda: p.members(2**40, [0]), "epoch must be an integer"),
        (lambda: p.update([1.0, 2.0, 3.0, 4.0], 2**40), "epoch must be an integer"),
    ]:
        with pytest.raises(EggrollError, match=message):
            with call():
                pass
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    with pytest.raises(EggrollError, match="update inside a member block"), p.member(0, 0):
        p.update([1.0, 2.0, 3.0, 4.0], 0)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    p.update([1.0, 2.0, 3.0, 4.0], 0)
    once = weights(model)
    with pytest.raises(EggrollError, match="update for epoch 0 after epoch 0 was applied"):
        p.update([1.0, 2.0, 3.0, 4.0], 0)
    assert all(torch.equal(once[n], t) for n, t in model.state_dict().items())
    p.update([1.0, 2.0, 3.0, 4.0], 0, again=True)  # asked for: applied
    assert not torch.equal(once["0.weight"], model[0].weight)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"antithetic": "no"}, "antithetic must be True or False, got 'no'"),
        ({"stochastic_rounding": 1}, "stochastic_rounding must be True or False, got 1"),
        ({"elites": "4", "search": "ero"}, "elites must be an integer, got '4'"),
        ({"sigma_lr": "0.1"}, "sigma_lr must be a finite number, got '0.1'"),
        ({"reseed_step": 0}, r"reseed_step must be in 1..4294967295 .*got 0"),
        ({"reseed_step": 2**40}, r"reseed_step must be in 1..4294967295"),
        ({"search": "ero", "reset_after": 1, "seed": 2**32 - 1}, r"reset number 1 would move the noise seed .*past"),
    ],
)
def test_booleans_and_ero_options_are_checked(options, message):
    """'no' is truthy to Python, so a bool option takes only True or False; ERO's options are typed, and its seed move
    stays inside the 32-bit seed range (seed 2**32-1 + 1919810 would draw seed 1919809's noise)."""
    with pytest.raises(EggrollError, match=message):
        make(net(), **options)
    with pytest.raises(EggrollError, match=r"again=...\) must be True or False, got 'no'"):
        make(net()).update([1.0, 2.0, 3.0, 4.0], 0, again="no")


def test_an_ero_reset_past_the_seed_range_is_refused_with_nothing_changed():
    """One reset fits below 2**32-1 here: the first happens, the second is refused before any weight or counter
    moves."""
    model = net()
    p = make(model, search="ero", elites=2, reset_after=1, seed=2**32 - 1 - 1919810)
    p.update([1.0, 0.0, 0.0, 0.0], 0)  # the best elite so far
    assert p.update([0.0] * 4, 1)["reset_to_base"] and p.plan.seed == 2**32 - 1
    before, state = weights(model), p.state_dict()
    with pytest.raises(EggrollError, match=r"reset number 2 would move the noise seed .* 1 reset\(s\) fit"):
        p.update([0.0] * 4, 2)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert p.optimizer.resets == 1 and p.optimizer.counter == state["optimizer"]["ero/counter_resets"][0]


def test_wrong_fitness_and_batchnorm_in_training_are_one_line_naming_what():
    p = make(net())
    with pytest.raises(EggrollError, match=r"fitness: got 3 value\(s\) for a population of 4"):
        p.update([1.0, 2.0, 3.0], 0)
    with pytest.raises(EggrollError, match=r"fitness: fitness of member\(s\) \[2\] is not finite"):
        p.update([1.0, 2.0, float("nan"), 4.0], 0)
    with pytest.raises(EggrollError, match=r"fitness: got 3 value\(s\)"):  # ERO's selection checks the same way
        make(net(), search="ero", elites=2).update([1.0, 2.0, 3.0], 0)
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(EggrollError, match=r"1 is a BatchNorm1d in training mode .*model.eval\(\)"):
        with make(bn).members(0, [0, 1]):
            bn(torch.randn(4, 3))
    bn.eval()
    with make(bn).members(0, [0, 1]):
        bn(torch.randn(4, 3))


def test_relative_sigma_leaves_an_all_zero_tensor_still_and_says_so():
    """A fresh LayerNorm bias is all zeros: relative sigma has nothing to scale by, so it gets sigma 0 (never noised,
    never moved) with a warning naming it, instead of refusing every net with a LayerNorm."""
    model = net()
    with pytest.warns(StillTensorWarning, match=r"1.bias a sigma of 0 \(all zeros"):
        p = make(model, sigma_mode="relative", sigma=0.1)
    assert p.plan.sigma["1.bias"] == 0.0 and p.plan.sigma["1.weight"] == pytest.approx(0.1)  # rms of ones
    with p.member(0, 1):
        assert torch.equal(model[1].bias, torch.zeros(4))
    before = weights(model)
    p.update([1.0, 2.0, 3.0, 4.0], 0)
    assert torch.equal(model[1].bias, torch.zeros(4)) and not torch.equal(before["0.weight"], model[0].weight)


def _saved(**options) -> tuple[dict, dict]:
    """(options, state after one update) of a small net, to tamper with."""
    options = {"optimizer": "adam", **options}
    p = make(net(), **options)
    p.update([1.0, 2.0, 3.0, 4.0], 0)
    return options, p.state_dict()


def _tampered(state: dict, path: tuple, value) -> dict:
    state = copy.deepcopy(state)
    node = state
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value(node[path[-1]]) if callable(value) else value
    return state


_DELETE = object()
_NAN = float("nan")


@pytest.mark.parametrize(
    "path,value,message",
    [
        (("step",), -1, r"state\['step'\] must be an integer in 0..2147483648, got -1"),
        (("step",), 1.5, r"state\['step'\] must be an integer"),
        (("last_update",), "0", r"state\['last_update'\] must be an integer"),
        (("optimizer", "adam_m/0.weight"), lambda t: t[:2], r"\['adam_m/0.weight'\] is float32 \(2, 3\), .* \(4, 3\)"),
        (("optimizer", "adam_m/0.weight"), lambda t: t.double(), r"is float64 \(4, 3\), this Perturber needs float32"),
        (
            ("optimizer", "adam_v/1.bias"),
            lambda t: t.fill_(_NAN),
            r"\['adam_v/1.bias'\] holds 4 value\(s\) that are not",
        ),
        (("optimizer", "adam_v/1.bias"), lambda t: t.fill_(-1.0), "second moment is never negative"),
        (("optimizer", "adam_m/0.weight"), _DELETE, r"state\['optimizer'\] must hold .*missing \['adam_m/0.weight'\]"),
        (("optimizer", "adam_m/0.weight"), [1.0], r"\['adam_m/0.weight'\] must be a tensor, got list"),
        (("sigmas", "0.weight"), 0.0, r"state\['sigmas'\]\['0.weight'\] must be a finite number > 0, got 0.0"),
        (("sigmas", "0.weight"), _NAN, r"state\['sigmas'\]\['0.weight'\] must be a finite number > 0, got nan"),
        (("sigmas", "0.weight"), 0.5, r"an absolute sigma that does not adapt .* edited or damaged"),
        (("sigmas", "extra.weight"), 0.3, r"state\['sigmas'\] must hold .*unexpected \['extra.weight'\]"),
        (("sigmas",), [0.3], r"state\['sigmas'\] must be a dict with string keys, got list"),
        (("fingerprint", "seed"), 7, "made with seed 7, this Perturber has seed 0"),
        (("fingerprint", "tensors", "0.weight"), ["FULL", [4, 3]], r"tensor 0.weight is \['FULL', \[4, 3\]\] there"),
        (("settings", "rank"), _DELETE, r"state\['settings'\] must hold .*missing \['rank'\]"),
        (("base",), {}, r"state\['base'\] holds base weights, but this Perturber never resets"),
        (("sigmas",), _DELETE, r"state must hold the fields .*missing \['sigmas'\]"),
    ],
)
def test_load_state_dict_refuses_a_tampered_state_and_changes_nothing(path, value, message):
    options, state = _saved()
    target = make(net(seed=1), **options)
    before = (target.optimizer.step_count, dict(target.plan.sigma), target._last_update)
    with pytest.raises(EggrollError, match=message):
        target.load_state_dict(_tampered(state, path, value))
    assert (target.optimizer.step_count, dict(target.plan.sigma), target._last_update) == before
    assert target.optimizer.moments == {}
    target.load_state_dict(state)  # the state itself loads
    assert target.optimizer.step_count == 1


@pytest.mark.parametrize(
    "path,value,message",
    [
        (("base", "0.weight"), lambda t: t[:, :2], r"state\['base'\]\['0.weight'\] is float32 \(4, 2\)"),
        (
            ("base", "1.weight"),
            lambda t: t.fill_(_NAN),
            r"state\['base'\]\['1.weight'\] holds 4 value\(s\) that are not",
        ),
        (("optimizer", "ero/best"), lambda t: t.fill_(_NAN), r"\['ero/best'\] holds 1 value\(s\) that are not finite"),
        (("optimizer", "ero/counter_resets"), lambda t: t.fill_(-1), r"\[-1, -1\] .* is no state that ERO"),
        (("optimizer", "ero/counter_resets"), lambda t: t.fill_(5), r"\[5, 5\] .* is no state that ERO"),
        (("optimizer", "ero/counter_resets"), lambda t: t.float(), r"is float32 \(2,\), this Perturber needs int64"),
    ],
)
def test_load_state_dict_refuses_tampered_ero_state(path, value, message):
    options = {"search": "ero", "elites": 2, "reset_after": 3, "optimizer": "sgd", "lr": 1.0}
    _, state = _saved(**options)
    with pytest.raises(EggrollError, match=message):
        make(net(seed=1), **options).load_state_dict(_tampered(state, path, value))


@pytest.mark.filterwarnings("ignore::ERO_EGGROLL.core.noise_plan.StillTensorWarning")  # the LayerNorm bias
def test_load_state_dict_refuses_changed_settings_unless_asked_to_keep_its_own():
    """sigma 0.3 saved, 0.1 asked for: refused naming it; settings='mine' scales the saved sigmas by 0.1 / 0.3 and
    keeps this Perturber's lr. A setting that decides what the state means (rank) is refused even then."""
    options, state = _saved(sigma_mode="relative")
    changed = make(net(seed=1), **{**options, "sigma": 0.1, "lr": 0.05})
    with pytest.raises(
        EggrollError,
        match=r"other settings \(sigma 0.3 there, 0.1 here, lr 0.1 there, 0.05 here\).*"
        "settings='mine'",
    ):
        changed.load_state_dict(state)
    changed.load_state_dict(state, settings="mine")
    assert changed.plan.sigma["0.weight"] == pytest.approx(state["sigmas"]["0.weight"] / 3)
    assert changed.evo.lr == 0.05 and changed.optimizer.step_count == 1
    with pytest.raises(EggrollError, match=r"rank 1 there, 2 here\); these decide what the saved state means"):
        make(net(seed=1), **{**options, "rank": 2}).load_state_dict(state, settings="mine")
    with pytest.raises(EggrollError, match="settings must be 'match' or 'mine', got 'state'"):
        changed.load_state_dict(state, settings="state")
    rebuilt = Perturber.for_module(net(), seed=state["fingerprint"]["seed"], **state["settings"])
    rebuilt.load_state_dict(state)  # the state's own settings rebuild its Perturber
    assert rebuilt.plan.sigma == state["sigmas"]


def test_a_rank_no_matrix_can_use_is_refused():
    """Rank-r noise on an m x n matrix has at most min(m, n) directions: the widest LORA matrix here is 4 x 3."""
    with pytest.raises(EggrollError, match=r"rank 4 is more than .* the widest, 0.weight \(4, 3\), has at most 3"):
        make(net(), rank=4)
    assert make(net(), rank=3).plan.rank == 3
    assert make(net(), rank=4, noise="full", search="ero", elites=2).plan.rank == 4  # no low-rank noise at all
