"""Exact member perturbation and the fused update on the tiny Qwen2.5-VL."""

import copy

import numpy as np
import pytest
import torch
from conftest import small_config

import hyperscalees as hs
from ERO_EGGROLL.model.qwen import ParamClass, run_perturber

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11, 64, 128, 33, 2]])


@pytest.fixture
def model(tiny):
    return copy.deepcopy(tiny[0])


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bit_identical(model, before):
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def explicit_copy(model, perturber, epoch, member):
    """A copy whose weights were set to W + E_i explicitly (E_i = A_s B^T formed in full)."""
    lora, full = perturber.member_noise(epoch, member)
    other = copy.deepcopy(model)
    params = dict(other.named_parameters())
    with torch.no_grad():
        for name, (a, b) in lora.items():
            params[name].copy_((params[name].float() + a.float() @ b.float().T).to(params[name].dtype))
        for name, eps in full.items():
            params[name].copy_((params[name].float() + eps).to(params[name].dtype))
    return other


@pytest.mark.parametrize("strategy", ["forward", "inplace"])
def test_member_equals_explicit_w_plus_e(model, strategy):
    perturber = run_perturber(model, small_config(sigma=0.5, sigma_mode="relative", strategy=strategy))
    with perturber.member(3, 1):
        perturbed = logits(model)
    expected = logits(explicit_copy(model, perturber, 3, 1))
    assert (perturbed - logits(model)).abs().max() > 1e-2  # the noise does something
    torch.testing.assert_close(perturbed, expected, rtol=1e-4, atol=1e-4)


def test_inplace_equals_forward(model):
    fwd = run_perturber(model, small_config(sigma=0.5, sigma_mode="relative"))
    with fwd.member(0, 2):
        a = logits(model)
    fwd.remove_hooks()
    inp = run_perturber(model, small_config(sigma=0.5, sigma_mode="relative", strategy="inplace"))
    with inp.member(0, 2):
        b = logits(model)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy", ["forward", "inplace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_restore_is_bit_identical(model, strategy, dtype):
    model = model.to(dtype)
    before = snapshot(model)
    perturber = run_perturber(model, small_config(sigma=0.5, sigma_mode="relative", strategy=strategy))
    for member in range(4):
        with perturber.member(1, member):
            logits(model)
        assert_bit_identical(model, before)
    with pytest.raises(RuntimeError):
        with perturber.member(1, 0):
            raise RuntimeError("an evaluation failed mid-member")
    assert_bit_identical(model, before)


def test_frozen_tensors_never_change(model):
    before = snapshot(model)
    perturber = run_perturber(model, small_config(sigma=0.5, sigma_mode="relative", lr=0.5))
    frozen = [s.name for s in perturber.specs if s.cls is ParamClass.FROZEN]
    assert "lm_head.weight" in frozen and any(n.startswith("model.visual.") for n in frozen)
    with perturber.member(0, 0):
        logits(model)
    perturber.update([0.1, 0.9, 0.4, 0.3], epoch=0)
    params = dict(model.named_parameters())
    for name in frozen:
        assert torch.equal(params[name], before[name]), name
    assert not torch.equal(
        params["model.language_model.layers.0.mlp.up_proj.weight"],
        before["model.language_model.layers.0.mlp.up_proj.weight"],
    )


def test_sgd_update_equals_naive_loop(model):
    before = snapshot(model)
    cfg = small_config(population_size=6, sigma=0.3, sigma_mode="relative", lr=0.7)
    perturber = run_perturber(model, cfg)
    raw = [0.2, 0.5, 0.1, 0.9, 0.4, 0.4]
    perturber.update(raw, epoch=2)
    f = hs.normalize_fitness(raw)
    params = dict(model.named_parameters())
    for name in [
        "model.language_model.layers.1.self_attn.k_proj.weight",
        "model.language_model.layers.0.post_attention_layernorm.weight",
    ]:
        expected = before[name].double().clone()
        naive = torch.zeros_like(expected)
        lora = perturber.classes[name] is ParamClass.LORA
        for i in range(6):
            noise_lora, noise_full = perturber.member_noise(2, i)
            if lora:
                a, b = noise_lora[name]
                naive += f[i] * (a.double() @ b.double().T)
            else:
                naive += f[i] * noise_full[name].double()
        scale = 1 / np.sqrt(6) if lora else np.sqrt(6) / 6  # LORA: sum / sqrt(N); FULL: sqrt(N) * mean
        expected += 0.7 * scale * naive
        torch.testing.assert_close(params[name].double(), expected, rtol=1e-5, atol=1e-6)


def test_es_update_points_along_the_true_gradient(model):
    """On a differentiable fitness (minus a cross-entropy), the update has a clearly positive cosine with -grad.

    An ES estimate from N members in d dimensions has a cosine of about sqrt(N / (N + d)) with the
    true gradient, so the test evolves one 64x128 matrix (d = 8192) with N = 1024 (expected ~0.33).
    """
    target = torch.tensor([[9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11, 12]])
    cfg = small_config(population_size=1024, sigma=0.01, sigma_mode="absolute", lr=1.0, freeze_nonlora=True)
    cfg.params.overrides = {
        "model.language_model.*": "FROZEN",
        "model.language_model.layers.1.self_attn.k_proj.weight": "LORA",
    }
    perturber = run_perturber(model, cfg)
    names = list(perturber.params)

    def fitness():
        with torch.no_grad():
            out = model(input_ids=IDS)
        return -torch.nn.functional.cross_entropy(out.logits[0].float(), target[0]).item()

    raw = []
    for i in range(cfg.evolution.population_size):
        with perturber.member(0, i):
            raw.append(fitness())
    before = snapshot(model)
    perturber.update(raw, epoch=0)
    es = torch.cat([(dict(model.named_parameters())[n] - before[n]).flatten() for n in names])
    perturber.remove_hooks()
    grad_model = copy.deepcopy(model)
    params = dict(grad_model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].copy_(before[n])
    for n in names:
        params[n].requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(grad_model(input_ids=IDS).logits[0].float(), target[0])
    loss.backward()
    true_ascent = torch.cat([-params[n].grad.flatten() for n in names])
    cosine = torch.nn.functional.cosine_similarity(es.double(), true_ascent.double(), dim=0).item()
    assert cosine > 0.2, cosine


@pytest.mark.parametrize("mode", ["relative", "signed_mean"])
def test_relative_sigma_does_not_depend_on_the_thread_count(mode):
    """A tensor's sigma is part of a run's record: torch's std of this tensor differs in its last bits between 1 and
    2 threads, so a resume (or a Ray worker) with another thread count would be refused as "other base weights"."""
    from ERO_EGGROLL.core.noise_plan import tensor_sigma
    from ERO_EGGROLL.core.settings import EvolutionSettings

    weight = torch.randn(512, 2048, generator=torch.Generator().manual_seed(0)) * 0.02 + 0.001
    evo, threads = EvolutionSettings(sigma=0.5, sigma_mode=mode), torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = tensor_sigma(weight, evo)
        torch.set_num_threads(1)
        assert tensor_sigma(weight, evo) == two
    finally:
        torch.set_num_threads(threads)


def test_the_run_seed_reaches_every_members_noise(model):
    """Same seed, same noise in any process; another seed, other noise for every tensor (a run's seed is its noise)."""
    noise = {}
    for seed in (0, 0, 1):
        cfg = small_config(sigma=0.5, sigma_mode="relative")
        cfg.seed = seed
        perturber = run_perturber(model, cfg)
        lora, full = perturber.member_noise(0, 1)
        perturber.remove_hooks()
        noise.setdefault(seed, []).append({**{n: a for n, (a, _) in lora.items()}, **full})
    first, again, other = noise[0][0], noise[0][1], noise[1][0]
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert all(not torch.equal(first[n], other[n]) for n in first)
