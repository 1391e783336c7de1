"""The streamed update: same weights as the one-shot update it replaced, and memory that does not grow with the
model."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import small_config

import hyperscalees as hs
from ERO_EGGROLL.config import ROOT
from ERO_EGGROLL.core.es_optimizer import rounding_generator
from ERO_EGGROLL.core.perturber import Perturber
from ERO_EGGROLL.model.qwen import ParamClass, run_perturber

FITNESS = [[0.1, 0.9, 0.4, 0.3, 0.8, 0.2], [0.5, 0.1, 0.9, 0.9, 0.0, 0.3], [0.2, 0.2, 0.7, 0.1, 0.6, 0.4]]


class _ReferenceAdam:
    """The textbook out-of-place Adam/AdamW the project used before the moments were updated in place."""

    def __init__(self, kind: str, lr: float, weight_decay: float):
        self.kind, self.lr, self.weight_decay, self.step, self.moments = kind, lr, weight_decay, 0, {}

    def change(self, name, direction, weight):
        if self.kind == "sgd":
            return self.lr * direction
        grad = -direction
        m, v = self.moments.get(name, (torch.zeros_like(direction), torch.zeros_like(direction)))
        m = 0.9 * m + (1 - 0.9) * grad
        v = 0.999 * v + (1 - 0.999) * grad * grad
        self.moments[name] = (m, v)
        change = -self.lr * (m / (1 - 0.9**self.step)) / ((v / (1 - 0.999**self.step)).sqrt() + 1e-8)
        if self.kind == "adamw" and self.weight_decay:
            change = change - self.lr * self.weight_decay * weight.float()
        return change


def _reference_apply(weight: torch.Tensor, change: torch.Tensor, generator: torch.Generator | None) -> None:
    """weight += change in fp32, rounded once (stochastically for bf16 when a generator is given), out of place."""
    target = weight.float() + change
    if weight.dtype == torch.float32 or generator is None:
        weight.copy_(target.to(weight.dtype))
        return
    bits = target.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, generator=generator)
    weight.copy_(((bits + noise) & ~0xFFFF).view(torch.float32).to(torch.bfloat16))


def one_shot_update(perturber: Perturber, optimizer: _ReferenceAdam, raw_fitness, epoch: int) -> float:
    """The update as it was before streaming, kept as the reference: every tensor's direction first,
    the global norm over all of them, then the optimizer and rounding, all out of place. Returns the clip factor."""
    evo = perturber.evo
    fitness = hs.normalize_fitness(raw_fitness, evo.group_size)
    scale = evo.sigma_decay**epoch
    directions = {}
    for name, w in perturber.params.items():
        key, sigma = perturber.plan.keys[name], perturber.plan.sigma[name] * scale
        if perturber.classes[name] is ParamClass.LORA:
            delta = hs.lowrank_update(
                key, tuple(w.shape), fitness, epoch=epoch, rank=evo.rank, sigma=sigma, noise_reuse=evo.noise_reuse
            )
        else:
            delta = hs.full_update(key, tuple(w.shape), fitness, epoch=epoch, sigma=sigma, noise_reuse=evo.noise_reuse)
        directions[name] = torch.from_numpy(np.array(delta))
    norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in directions.values()))
    clip = 1.0 if evo.max_update_norm is None or norm <= evo.max_update_norm else evo.max_update_norm / norm
    optimizer.lr = evo.lr * evo.lr_decay**epoch
    optimizer.step += 1
    with torch.no_grad():
        for name, direction in directions.items():
            w = perturber.params[name]
            change = optimizer.change(name, direction * clip, w)
            sr = evo.stochastic_rounding and w.dtype == torch.bfloat16
            _reference_apply(
                w,
                change,
                rounding_generator(perturber.seed, epoch, perturber.plan.specs[name].key_index, w.device)
                if sr
                else None,
            )
    return clip


CASES = {
    "sgd fp32": ({"optimizer": "sgd", "lr": 0.5}, torch.float32),
    "adam fp32": ({"optimizer": "adam", "lr": 0.01}, torch.float32),
    "adamw fp32": ({"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.1}, torch.float32),
    "sgd bf16 stochastic rounding": ({"optimizer": "sgd", "lr": 0.5, "stochastic_rounding": True}, torch.bfloat16),
    "adam bf16 stochastic rounding": ({"optimizer": "adam", "lr": 0.01, "stochastic_rounding": True}, torch.bfloat16),
}


def _pair(tiny, options: dict, dtype: torch.dtype):
    cfg = small_config(population_size=6, sigma=0.5, sigma_mode="relative", lr_decay=0.9, sigma_decay=0.95, **options)
    streamed_model = copy.deepcopy(tiny[0]).to(dtype)
    reference_model = copy.deepcopy(streamed_model)
    reference = run_perturber(reference_model, cfg)
    return (
        run_perturber(streamed_model, cfg),
        reference,
        _ReferenceAdam(cfg.evolution.optimizer, cfg.evolution.lr, cfg.evolution.weight_decay),
    )


@pytest.mark.parametrize("case", CASES)
def test_streamed_update_is_bit_identical_to_the_one_shot_update(tiny, case):
    options, dtype = CASES[case]
    streamed, reference, optimizer = _pair(tiny, options, dtype)
    before = {n: p.clone() for n, p in streamed.params.items()}
    for epoch, fitness in enumerate(FITNESS):
        streamed.update(fitness, epoch)
        one_shot_update(reference, optimizer, fitness, epoch)
    assert any(not torch.equal(before[n], p) for n, p in streamed.params.items()), (
        "the update changed nothing: a vacuous comparison"
    )
    different = [n for n, p in streamed.params.items() if not torch.equal(p, reference.params[n])]
    assert not different, f"{len(different)} tensor(s) differ, e.g. {different[:3]}"


def test_clipped_streamed_update_matches_the_one_shot_update_up_to_the_clip_factor(tiny):
    """The streamed clip takes each LORA norm from the factors (fp32 Gram matrices); the reference sums the
    materialized directions in float64. The clip factors agree to ~1e-6 relative, so the weights agree to
    that relative precision, not bit for bit."""
    streamed, reference, optimizer = _pair(
        tiny, {"optimizer": "sgd", "lr": 0.5, "max_update_norm": 0.05}, torch.float32
    )
    for epoch, fitness in enumerate(FITNESS):
        stats = streamed.update(fitness, epoch)
        reference_clip = one_shot_update(reference, optimizer, fitness, epoch)
        assert reference_clip < 1.0  # the clip is active
        assert stats["clip_scale"] == pytest.approx(reference_clip, rel=1e-5)
    for name, p in streamed.params.items():
        torch.testing.assert_close(p, reference.params[name], rtol=1e-5, atol=1e-7)


_MEMORY_CHILD = """
import json
import torch
from ERO_EGGROLL.config import ROOT, load_config
from ERO_EGGROLL.memory.measure import measured_peak_rss_bytes, start_rss_measurement
from ERO_EGGROLL.model.qwen import run_perturber
from ERO_EGGROLL.model.random_model import TextShape, random_model

cfg = load_config(
    ROOT / "configs" / "smoke.yaml",
    ["evolution.population_size=8", "evolution.sigma_mode=absolute", "evolution.sigma=0.02"],
)
fitness = [float((3 * i) % 5) for i in range(8)]

def update_growth(layers):
    model = random_model(ROOT / "checkpoints" / "tiny-qwen2.5-vl", TextShape(512, 2048, layers, 8, 8))
    perturber = run_perturber(model, cfg)
    start = start_rss_measurement()
    perturber.update(fitness, 1)
    growth = measured_peak_rss_bytes() - start
    perturber.remove_hooks()
    return growth, sum(p.numel() for p in perturber.params.values()) * 4

update_growth(1)  # JIT warm-up: compiles every tensor shape
two, _ = update_growth(2)
eight, eight_directions = update_growth(8)
print(json.dumps({"two": two, "eight": eight, "eight_directions": eight_directions}))
"""


def test_update_peak_memory_does_not_grow_with_the_number_of_tensors(tiny_model_dir):
    """2 vs 8 layers of the same shapes, fresh process, peak from VmHWM. The one-shot update held every
    direction (8 layers: 128 MB of fp32 directions; measured growth 66 MB for 2 layers, 166 MB for 8); the
    streamed one holds a few buffers of the largest tensor (4 MB here; measured 13-27 MB for either)."""
    done = subprocess.run([sys.executable, "-c", _MEMORY_CHILD], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    mb = {k: round(v / 2**20, 1) for k, v in out.items()}
    assert out["eight"] - out["two"] < 40 * 2**20, mb
    assert out["eight"] < 0.3 * out["eight_directions"], mb


def test_contraction_in_torch_matches_the_jax_contraction(tiny):
    """CUDA weights with a CPU-only jaxlib: only the factors cross to the device and torch contracts them.
    Forced here on the CPU: the same directions up to float32 summation order."""
    perturber = run_perturber(copy.deepcopy(tiny[0]), small_config(population_size=6, sigma=0.5, sigma_mode="relative"))
    fitness = hs.normalize_fitness(FITNESS[0])
    jax_side = {n: perturber.plan.direction(n, fitness, 2).clone() for n in perturber.lora_names}
    perturber.plan.contract_in_torch = True
    for name, expected in jax_side.items():
        torch.testing.assert_close(perturber.plan.direction(name, fitness, 2), expected, rtol=1e-5, atol=1e-7)


def test_clipped_update_with_tied_pairs_moves_nothing(tiny):
    """Every antithetic pair scoring alike cancels: the LORA norms from the factors are exactly 0 (a float32
    residue below zero used to crash the clip's sqrt); the dense contractions keep a rounding residue of ~1e-9."""
    streamed, _, _ = _pair(tiny, {"optimizer": "sgd", "lr": 0.5, "max_update_norm": 0.05}, torch.float32)
    fitness = hs.normalize_fitness([0.3, 0.3, 0.9, 0.9, 0.1, 0.1])
    assert all(streamed.plan.direction_sq_norm(n, fitness, 0) == 0.0 for n in streamed.lora_names)
    before = {n: p.clone() for n, p in streamed.params.items()}
    stats = streamed.update([0.3, 0.3, 0.9, 0.9, 0.1, 0.1], 0)
    assert stats["update_norm"] < 1e-6 and stats["clip_scale"] == 1.0
    assert max(float((before[n] - p).abs().max()) for n, p in streamed.params.items()) < 1e-6
