"""The update step: fitness in, weights moved one tensor at a time; an optimizer-like object with explicit state.

For each evolving tensor in turn: regenerate its factors from keys, contract them into the ascent
direction, let the optimizer (SGD, Adam, AdamW, ClipUp; lr schedule; global-norm clip) turn it into a
change, round it into the weight (stochastically for bf16, keyed per tensor), drop it. It never
holds every tensor's direction, so the peak extra memory is a few fp32 buffers of the largest
tensor whatever the model size. With `max_update_norm` or ClipUp, a first pass computes the global
norm from the factors alone; ClipUp then moves every velocity and, once the velocity's global norm
is known, applies them in a second pass. Fitness is shaped first (hyperscalees.shape_fitness); with
sigma_lr > 0 the sigmas adapt last (sigma_adapt), so this step's directions used this step's sigmas.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from ERO_EGGROLL.core.ero_search import EroSelection, reset_seed
from ERO_EGGROLL.core.es_optimizer import EsOptimizer, apply_change, clip_scale, rounding_generator
from ERO_EGGROLL.core.fitness import shaped_fitness
from ERO_EGGROLL.core.noise_plan import NoisePlan
from ERO_EGGROLL.core.settings import EvolutionSettings
from ERO_EGGROLL.core.sigma_adapt import adapted_sigmas


class StreamedUpdate:
    """The ES update of `params` along `plan`; its state is the optimizer's (step count, Adam moments)."""

    def __init__(
        self,
        plan: NoisePlan,
        params: dict[str, torch.nn.Parameter],
        evo: EvolutionSettings,
        seed: int,
        base: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """`base`: host copies of the base weights, which ERO's reset-to-base needs (search: ero, reset_after > 0)."""
        self.plan, self.params, self.evo, self.seed, self.base = plan, params, evo, seed, base
        self.optimizer = (
            EroSelection(evo, lambda resets: plan.reseed(reset_seed(seed, resets, evo.reseed_step)))
            if evo.search == "ero"
            else EsOptimizer(evo.optimizer, evo.lr, evo.weight_decay)
        )

    def lr_at(self, epoch: int) -> float:
        return self.evo.lr * self.evo.lr_decay**epoch

    def _rounding_generator(self, name: str, epoch: int, weight: torch.Tensor) -> torch.Generator | None:
        if not self.evo.stochastic_rounding or weight.dtype != torch.bfloat16:
            return None  # only bf16 is rounded stochastically
        return rounding_generator(self.seed, epoch, self.plan.specs[name].key_index, weight.device)

    def step(self, raw_fitness: ArrayLike, epoch: int) -> dict[str, Any]:
        """Shape fitness (normalized, or ERO's elite weights), move every evolving tensor, then adapt the sigmas
        (sigma_lr > 0); returns the update's statistics."""
        evo, plan = self.evo, self.plan
        ero: dict[str, Any] = {}
        if evo.search == "ero":
            assert isinstance(self.optimizer, EroSelection)  # made for search: ero in __init__
            fitness, ero = self.optimizer.select(raw_fitness)
            if fitness is None:
                return self._reset_to_base(epoch, ero)
        else:
            fitness = shaped_fitness(raw_fitness, evo)
        clipup = evo.optimizer == "clipup"  # ERO's search needs sgd (settings)
        norm, clip = None, 1.0  # without a global norm to know first, the norm is summed as the directions stream by
        if evo.max_update_norm is not None or clipup:
            norm = math.sqrt(sum(plan.direction_sq_norm(name, fitness, epoch) for name in self.params))
            clip = clip_scale(norm, evo.max_update_norm)
        self.optimizer.lr = self.lr_at(epoch)
        self.optimizer.begin_step()
        direction_sq = 0.0
        totals = _AppliedTotals()
        # one fp32 workspace of the largest tensor's size holds each tensor's change in turn: no large
        # buffer is allocated and freed per tensor (the allocator would keep the freed ones)
        largest = max((p.numel() for p in self.params.values()), default=0)
        workspace = torch.empty(largest, dtype=torch.float32, device=plan.device)
        changed_mask = torch.empty(largest, dtype=torch.bool, device=plan.device)
        speed_sq = 0.0
        with torch.no_grad():
            for name, w in self.params.items():
                direction = plan.direction(name, fitness, epoch)
                if norm is None:
                    direction_sq += float(torch.linalg.vector_norm(direction)) ** 2
                if clip != 1.0:
                    direction = direction * clip
                if clipup:  # the velocity moves now; the weights once its global norm is known
                    assert isinstance(self.optimizer, EsOptimizer) and norm is not None  # clipup: eggroll, norm known
                    speed_sq += self.optimizer.clipup_velocity(name, direction, norm * clip)
                    continue
                change = self.optimizer.change(name, direction, w, out=workspace[: w.numel()].view(w.shape))
                del direction  # frees the contraction's buffer before the change is applied
                self._apply(totals, name, epoch, w, change, changed_mask)
            for name, w in self.params.items() if clipup else ():
                assert isinstance(self.optimizer, EsOptimizer)  # clipup: search eggroll (settings)
                change = self.optimizer.clipup_change(
                    name, math.sqrt(speed_sq), out=workspace[: w.numel()].view(w.shape)
                )
                self._apply(totals, name, epoch, w, change, changed_mask)
        stats = {
            "update_norm": norm if norm is not None else math.sqrt(direction_sq),
            "clip_scale": clip,
            "lr": self.optimizer.lr,
            "sigma_scale": plan.sigma_scale(epoch),
            "normalized_fitness": fitness.tolist(),
        }
        stats.update({f"update_norm_{k}": math.sqrt(v) for k, v in totals.per_class.items()})
        stats["fraction_changed"] = totals.changed / max(totals.total, 1)
        stats["lost_update_fraction"] = totals.lost / totals.intended if totals.intended else 0.0
        if evo.sigma_lr > 0:
            plan.set_sigmas(adapted_sigmas(plan, fitness, epoch, evo.sigma_lr))
            stats["sigma_mean"] = float(np.mean(list(plan.sigma.values())))
        return {**stats, **ero}

    def _apply(
        self,
        totals: _AppliedTotals,
        name: str,
        epoch: int,
        w: torch.Tensor,
        change: torch.Tensor,
        changed_mask: torch.Tensor,
    ) -> None:
        """Round `change` into `w` (consuming it) and add what that did to the step's `totals`."""
        applied = apply_change(
            w, change, self._rounding_generator(name, epoch, w), changed_mask[: w.numel()].view(w.shape)
        )
        if self.evo.clamp is not None:  # ERO clamps each member; here the mean after its update (docs/comparisons.md)
            w.clamp_(-self.evo.clamp, self.evo.clamp)
        totals.per_class[self.plan.specs[name].cls.value] += applied.sq_norm
        totals.intended, totals.lost = totals.intended + applied.intended, totals.lost + applied.lost
        totals.changed, totals.total = totals.changed + applied.changed, totals.total + w.numel()

    def _reset_to_base(self, epoch: int, ero: dict[str, Any]) -> dict[str, Any]:
        """ERO's degeneration rule: the mean becomes the base weights again (the noise plan was already reseeded)."""
        if self.base is None:
            raise ValueError("ERO's reset to the base weights needs them: pass `base` (search: ero, reset_after > 0)")
        self.optimizer.begin_step()
        with torch.no_grad():
            for name, w in self.params.items():
                w.copy_(self.base[name])
        return {
            "update_norm": 0.0,
            "clip_scale": 1.0,
            "lr": self.optimizer.lr,
            "sigma_scale": self.plan.sigma_scale(epoch),
            "normalized_fitness": [0.0] * self.evo.population_size,
            "fraction_changed": 0.0,
            "lost_update_fraction": 0.0,
            **ero,
        }


@dataclass
class _AppliedTotals:
    """What one step's tensors did, summed for its statistics."""

    per_class: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    intended: float = 0.0
    lost: float = 0.0
    changed: int = 0
    total: int = 0
