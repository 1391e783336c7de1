"""The generic Perturber (`for_module`) is as safe as the run: nested members, tied weights, frozen tensors, argument
types and ranges, and an epoch updated twice are refused in one line, and the model is left as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ERO_EGGROLL.core.errors import EggrollError
from ERO_EGGROLL.core.perturber import Perturber
from ERO_EGGROLL.core.tensor_classes import ParamClass

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small nets; the thread count is restored after


def make(net: nn.Module, **options) -> Perturber:
    return Perturber.for_module(net, **{"population_size": 4, "rank": 1, "sigma": 0.3, "lr": 0.1, **options})


def net() -> nn.Module:
    torch.manual_seed(0)
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
