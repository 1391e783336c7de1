"""Optimizers, clipping and rounding of the ES update."""

import math

import pytest
import torch

from ERO_EGGROLL.core.es_optimizer import EsOptimizer, apply_change, clip_scale, rounding_generator, stochastic_round


def test_sgd_adds_lr_times_direction():
    opt = EsOptimizer("sgd", lr=0.5)
    opt.begin_step()
    d = torch.tensor([1.0, -2.0])
    assert torch.equal(opt.change("w", d, torch.zeros(2)), torch.tensor([0.5, -1.0]))


def test_adam_receives_minus_direction_as_gradient():
    opt = EsOptimizer("adam", lr=0.1)
    d = torch.tensor([2.0, -4.0])
    opt.begin_step()
    first = opt.change("w", d, torch.zeros(2))
    # first Adam step: m_hat = g, v_hat = g^2 -> change = -lr * g / (|g| + eps) = lr * sign(d)
    torch.testing.assert_close(first, torch.tensor([0.1, -0.1]), rtol=1e-6, atol=1e-7)
    state = opt.state_tensors()
    restored = EsOptimizer("adam", lr=0.1)
    restored.load_state(opt.step_count, state)
    opt.begin_step(), restored.begin_step()
    assert torch.equal(opt.change("w", d, torch.zeros(2)), restored.change("w", d, torch.zeros(2)))


def test_adamw_decays_weights():
    opt = EsOptimizer("adamw", lr=0.1, weight_decay=0.5)
    opt.begin_step()
    change = opt.change("w", torch.zeros(1), torch.tensor([2.0]))
    torch.testing.assert_close(change, torch.tensor([-0.1]))  # -lr * wd * w


def test_global_norm_clip():
    assert clip_scale(5.0, max_norm=1.0) == pytest.approx(0.2)
    assert clip_scale(0.3, max_norm=1.0) == 1.0 and clip_scale(7.0, max_norm=None) == 1.0


def test_rounding_generators_are_keyed_by_integers_not_by_order():
    def draw(*key):
        return torch.randint(0, 1 << 16, (8,), generator=rounding_generator(*key, torch.device("cpu")))

    assert torch.equal(draw(3, 1, 7), draw(3, 1, 7))  # same (seed, epoch, tensor): same noise, whatever came before
    assert not torch.equal(draw(3, 1, 7), draw(3, 1, 8)) and not torch.equal(draw(3, 1, 7), draw(3, 2, 7))


def test_stochastic_rounding_is_unbiased():
    value = torch.full((200_000,), 1.0 + 2**-10)  # between two bf16 neighbours (spacing 2**-7)
    rounded = stochastic_round(value, torch.bfloat16, torch.Generator().manual_seed(0)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert rounded.mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)
    assert value.to(torch.bfloat16).float().mean().item() == 1.0  # nearest rounding loses it all


def test_small_bf16_updates_are_lost_by_nearest_rounding_and_kept_on_average_by_stochastic():
    weight = torch.ones(100_000, dtype=torch.bfloat16)
    change = torch.full((100_000,), 2**-10)
    nearest = apply_change(weight.clone(), change.clone(), None)
    assert nearest.lost / nearest.intended == pytest.approx(1.0) and nearest.changed == 0
    w = weight.clone()
    stochastic = apply_change(w, change, torch.Generator().manual_seed(1))
    assert (w.float() - 1.0).mean().item() == pytest.approx(2**-10, rel=0.05)
    assert stochastic.changed == int((w != weight).sum()) > 0


def test_fp32_weights_lose_nothing():
    w = torch.zeros(3)
    applied = apply_change(w, torch.tensor([1e-9, 2.0, -3.0]), None)
    assert applied.lost == 0.0 and applied.changed == 3 and applied.sq_norm == pytest.approx(13.0)
    assert math.isclose(w[1].item(), 2.0)


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="unknown optimizer"):
        EsOptimizer("lion", lr=1.0)
