"""EGGROLL on plain torch modules (`Perturber.for_module`): defaults, conv and embedding noise, norms, errors,
learning."""

from __future__ import annotations

import copy
import runpy
import weakref

import pytest
import torch
from torch import nn

from ERO_EGGROLL.config import ROOT, ConfigError
from ERO_EGGROLL.core.forward_rules import ROW_RULES, declare_row_rule
from ERO_EGGROLL.core.perturber import Perturber
from ERO_EGGROLL.core.tensor_classes import NORM_TYPES, ParamClass


def perturber(net: nn.Module, **options) -> Perturber:
    return Perturber.for_module(net, **{"population_size": 4, "rank": 2, "sigma": 0.3, "lr": 0.1, **options})


NETS = {
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 6, 5, stride=2, padding=2)), (4, 3, 17)),
    "conv2d grouped, dilated, reflect-padded": (
        lambda: nn.Sequential(nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, padding_mode="reflect")),
        (4, 4, 9, 9),
    ),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1))), (2, 2, 3, 6, 6)),
    "embedding": (lambda: nn.Sequential(nn.Embedding(20, 8)), None),
    "layer norm + linear": (lambda: nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8)), (4, 3, 5)),
    "batch norm (eval)": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), (4, 3, 6, 6)),
}


def alone_and_together(p: Perturber, net: nn.Module, x: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs of members 0..3 one at a time, and of the same four as blocks of one batch."""
    with torch.no_grad():
        alone = []
        for member in range(4):
            with p.member(epoch, member):
                alone.append(net(x))
        with p.members(epoch, range(4)):
            return torch.cat(alone), net(torch.cat([x] * 4))


def inputs(name: str, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 20, (4, 7), generator=g) if shape is None else torch.randn(shape, generator=g)


def test_defaults_classify_by_module_type():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Embedding(5, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    classes = {s.name: s.cls for s in perturber(net).specs}
    assert classes == {
        "0.weight": ParamClass.LORA,
        "0.bias": ParamClass.FULL,
        "1.weight": ParamClass.FULL,
        "1.bias": ParamClass.FULL,
        "2.weight": ParamClass.LORA,
        "3.weight": ParamClass.FULL,
        "3.bias": ParamClass.FULL,
        "4.weight": ParamClass.LORA,
        "4.bias": ParamClass.FULL,
    }


@pytest.mark.parametrize("name", NETS)
def test_forward_noise_equals_the_noise_in_place(name):
    """The forward strategy (thin convolutions, gathered embedding rows, per-row norms) gives the module's
    output with W + E_i in its weights."""
    make, shape = NETS[name]
    x = inputs(name, shape)
    torch.manual_seed(0)
    forward_net = make()
    inplace_net = copy.deepcopy(forward_net)
    forward, inplace = perturber(forward_net), perturber(inplace_net, strategy="inplace")
    for member in range(4):
        with forward.member(1, member), inplace.member(1, member), torch.no_grad():
            torch.testing.assert_close(forward_net(x), inplace_net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["forward", "inplace"])
@pytest.mark.parametrize("name", NETS)
def test_each_tensors_noise_changes_the_output(name, strategy):
    """Every evolving tensor alone (the rest FROZEN) moves the output: a conv kernel, an embedding, a norm's weight
    and bias each get their noise, in the forward pass as in place."""
    make, shape = NETS[name]
    x = inputs(name, shape)
    torch.manual_seed(0)
    net = make()
    with torch.no_grad():
        base = net(x)
    for tensor in dict(net.named_parameters()):
        only = perturber(
            net, strategy=strategy, classify=lambda n, _t, keep=tensor: None if n == keep else ParamClass.FROZEN
        )
        with only.member(1, 0), torch.no_grad():
            assert not torch.allclose(net(x), base, atol=1e-4), f"{tensor}: member 0's noise did not change the output"
        only.remove_hooks()
        with torch.no_grad():
            assert torch.equal(net(x), base)  # and it is gone afterwards


class SiblingProjections(nn.Module):
    """q_proj and k_proj (a declared shared-input group) called on different tensors, one of them changed in place."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(6, 5), nn.Linear(6, 5)

    def forward(self, x):
        q = self.q_proj(x)
        k_first = self.k_proj(x * 2)  # another tensor: the group's product must be recomputed
        y = x.clone()
        q_again = self.q_proj(y)
        y.mul_(3)  # the same tensor, changed in place: its product must be recomputed
        return torch.cat([q, k_first, q_again, self.k_proj(y)], dim=-1)


def test_shared_input_products_follow_the_actual_input():
    torch.manual_seed(0)
    net, x = SiblingProjections(), torch.randn(3, 6)
    inplace_net = copy.deepcopy(net)
    forward, inplace = perturber(net), perturber(inplace_net, strategy="inplace")
    for member in range(4):
        with forward.member(0, member), inplace.member(0, member), torch.no_grad():
            torch.testing.assert_close(net(x), inplace_net(x), rtol=1e-5, atol=1e-5)
    with forward.member(0, 1), torch.no_grad():  # the product does not keep its input alive
        y = torch.randn(3, 6)
        net.q_proj(y)
        alive = weakref.ref(y)
        del y
        assert alive() is None


class CrossProjections(nn.Module):
    """Declared siblings of different input widths (cross-attention style): they cannot share a product."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(6, 5), nn.Linear(4, 5)

    def forward(self, x):
        return torch.cat([self.q_proj(x), self.k_proj(x[..., :4])], dim=-1)


def test_siblings_of_other_widths_inference_mode_and_autocast():
    torch.manual_seed(0)
    net, x = CrossProjections(), torch.randn(3, 6)
    inplace_net = copy.deepcopy(net)
    forward, inplace = perturber(net), perturber(inplace_net, strategy="inplace")
    with forward.member(0, 2), inplace.member(0, 2):
        with torch.inference_mode():  # tensors without a version counter
            torch.testing.assert_close(net(x), inplace_net(x), rtol=1e-5, atol=1e-5)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # output bf16, factors fp32
            torch.testing.assert_close(net(x).float(), inplace_net(x).float(), rtol=0.05, atol=0.05)


def test_a_bias_read_without_calling_its_module_stays_in_place():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2)

    def biases_only(name, t):
        return ParamClass.FULL if name.endswith("bias") else ParamClass.FROZEN

    inplace_attention = copy.deepcopy(attention)
    forward = perturber(attention, classify=biases_only, sigma_mode="absolute")
    inplace = perturber(inplace_attention, classify=biases_only, sigma_mode="absolute", strategy="inplace")
    x = torch.randn(5, 1, 8)
    with forward.member(0, 1), inplace.member(0, 1), torch.no_grad():
        perturbed = attention(x, x, x)[0]
        torch.testing.assert_close(perturbed, inplace_attention(x, x, x)[0])
    assert not torch.allclose(perturbed, attention(x, x, x)[0])  # the out_proj bias noise did arrive
    with pytest.raises(
        ConfigError, match="FULL tensor (in_proj_bias|out_proj.bias) belongs to a module with no per-row rule"
    ):
        with forward.members(0, range(4)):
            pass


@pytest.mark.parametrize("name", NETS)
def test_members_as_batch_rows_equal_members_one_at_a_time(name):
    make, shape = NETS[name]
    x = inputs(name, shape)
    torch.manual_seed(0)
    net = make()
    alone, together = alone_and_together(perturber(net), net, x, 2)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_a_member_never_changes_the_model_batch_norm_statistics_included():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    p = perturber(net)
    with p.member(0, 1), torch.no_grad():
        net(torch.randn(4, 3, 6, 6))
        assert not torch.equal(net[1].running_mean, state["1.running_mean"])  # the member did move them
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_unknown_tensors_are_refused_by_name_with_the_fix():
    with pytest.raises(
        ConfigError,
        match=r"in_proj_weight \(a MultiheadAttention.in_proj_weight of shape \(24, 8\)\) has no "
        r"default EGGROLL class; pass classify=",
    ):
        perturber(nn.MultiheadAttention(8, 2))

    def full(name, tensor):
        return ParamClass.FULL if "proj_weight" in name else None

    with pytest.raises(
        ConfigError, match="out_proj.weight: MultiheadAttention uses its out_proj weight without calling out_proj"
    ):
        perturber(nn.MultiheadAttention(8, 2), classify=full)  # a hook there would silently add nothing
    p = perturber(nn.MultiheadAttention(8, 2), classify=full, strategy="inplace")
    assert p.classes["in_proj_weight"] is ParamClass.FULL and p.classes["out_proj.weight"] is ParamClass.LORA


def test_a_look_alike_norm_is_not_guessed_from_its_attributes():
    class OnePlusNorm(nn.Module):  # Gemma-style: scales by (1 + w), with the attribute names of an RMSNorm
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.zeros(6)), 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)

    net = nn.Sequential(nn.Linear(4, 6), OnePlusNorm())
    with pytest.raises(ConfigError, match="1.weight .*OnePlusNorm.weight.* no default EGGROLL class"):
        perturber(net)
    p = perturber(net, classify=lambda name, t: ParamClass.FULL if name == "1.weight" else None, sigma_mode="absolute")
    with (
        pytest.raises(ConfigError, match="FULL tensor 1.weight belongs to a module with no per-row rule"),
        p.members(0, range(4)),
    ):
        pass
    declare_row_rule(
        OnePlusNorm,
        lambda m, x, values: (
            x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon) * (1 + values["weight"])
        ),
    )
    try:
        alone, together = alone_and_together(
            perturber(net), net, torch.randn(2, 4), 0
        )  # a declared norm: FULL, batchable
        torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    finally:
        ROW_RULES.pop(OnePlusNorm)
        NORM_TYPES.remove(OnePlusNorm)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"strategy": "sideways"}, r"evolution.strategy must be one of \['forward', 'inplace'\], got 'sideways'"),
        ({"population_size": 3}, "population_size must be even"),
        ({"momentum": 0.9}, r"unknown option\(s\) \['momentum'\]"),
    ],
)
def test_bad_options_are_refused_clearly(options, message):
    with pytest.raises(ConfigError, match=message):
        perturber(nn.Linear(3, 2), **options)


def test_examples_mlp_and_cnn_learn_from_scratch():
    """The README's examples, shortened: the held-out loss falls clearly within a few dozen epochs."""
    examples = ROOT / "scripts" / "examples"  # run as the README runs them, not imported from the suite's path
    mlp_regression, cnn_bars = (runpy.run_path(str(examples / f"{name}.py")) for name in ("mlp_regression", "cnn_bars"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the examples do: nets this small run fastest on one thread
    try:
        mlp = mlp_regression["run"](epochs=20)
        cnn = cnn_bars["run"](epochs=30)
    finally:
        torch.set_num_threads(threads)
    assert mlp["after"] < 0.75 * mlp["before"], mlp
    assert cnn["after"] < 0.8 * cnn["before"] and cnn["accuracy_after"] > cnn["accuracy_before"] + 0.2, cnn


def test_member_noise_keeps_its_dtype_promise():
    """LORA factors in the weights' dtype (they enter the forward pass);
    FULL noise in float32 (added in fp32, rounded once)."""
    lora, full = perturber(nn.Linear(6, 4).to(torch.bfloat16)).member_noise(0, 1)
    assert {t.dtype for pair in lora.values() for t in pair} == {torch.bfloat16}
    assert {t.dtype for t in full.values()} == {torch.float32}


def test_an_unbatched_conv_input_gets_the_same_noise_as_a_batch_of_one():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1))
    p, x = perturber(net), torch.randn(3, 9)
    with p.member(0, 1), torch.no_grad():
        torch.testing.assert_close(net(x), net(x.unsqueeze(0)).squeeze(0))


def test_members_need_the_batch_in_the_first_dimension():
    p = perturber(nn.Linear(5, 3))
    with (
        pytest.raises(ValueError, match=r"4 members share this batch, but a module's input has shape \(6, 5\)"),
        p.members(0, range(4)),
    ):
        p.model(torch.randn(6, 5))
