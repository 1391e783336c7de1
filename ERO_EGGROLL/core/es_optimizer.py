"""Turning the ES ascent direction into weight changes: SGD (the official update), Adam, AdamW, ClipUp.

State is explicit tensors keyed by parameter name, so checkpoints hold it in safetensors.
Weights in bf16/fp16 lose updates smaller than half a step of their format; `stochastic_round`
keeps that loss unbiased, and `lost_update_fraction` measures it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ERO_EGGROLL.core.errors import ConfigError
from ERO_EGGROLL.core.saved_state import checked_tensor, refuse, same_keys

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
CLIPUP_MOMENTUM = 0.9
CLIPUP_SPEED_RATIO = 2.0  # max speed = 2 x step size, ClipUp's recommended setting (Toklu et al. 2020)


class EsOptimizer:
    """step(name, direction) -> the fp32 change to add to that weight. Adam(W) get -direction as gradient.

    ClipUp works on the whole parameter vector, so it takes two calls per tensor: `clipup_velocity`
    (needs the direction's global norm) while the directions stream by, then `clipup_change` once the
    velocity's global norm is known."""

    def __init__(self, kind: str, lr: float, weight_decay: float = 0.0):
        if kind not in ("sgd", "adam", "adamw", "clipup"):
            raise ConfigError(f"unknown optimizer {kind!r}; choose sgd, adam, adamw or clipup")
        self.kind, self.lr, self.weight_decay = kind, lr, weight_decay
        self.step_count = 0
        self.moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.velocity: dict[str, torch.Tensor] = {}

    def begin_step(self) -> None:
        self.step_count += 1

    def change(
        self, name: str, direction: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The fp32 change for one tensor at the current step (`direction` is the ascent direction).

        Written into `out` when given (a workspace reused tensor after tensor, so the update does not
        allocate and free a large buffer per tensor), else a new tensor; never `direction` itself, which
        may alias a JAX buffer. Adam's moments are updated in place, with the same operations in the
        same order as the textbook formulas, so no second copy of the state exists even for a moment."""
        if self.kind == "sgd":
            return self.lr * direction if out is None else torch.mul(direction, self.lr, out=out)
        grad = -direction
        if name not in self.moments:
            self.moments[name] = (torch.zeros_like(direction), torch.zeros_like(direction))
        m, v = self.moments[name]
        if m.device != direction.device:  # moments loaded from a checkpoint live on the CPU
            m, v = m.to(direction.device), v.to(direction.device)
            self.moments[name] = (m, v)
        b1, b2 = ADAM_BETAS
        m.mul_(b1).add_((1 - b1) * grad)
        v.mul_(b2).add_((1 - b2) * grad * grad)
        del grad
        denominator = (v / (1 - b2**self.step_count)).sqrt_().add_(ADAM_EPS)
        m_hat = m / (1 - b1**self.step_count) if out is None else torch.div(m, 1 - b1**self.step_count, out=out)
        change = m_hat.mul_(-self.lr).div_(denominator)
        if self.kind == "adamw" and self.weight_decay:
            change.sub_(self.lr * self.weight_decay * weight.float())
        return change

    def clipup_velocity(self, name: str, direction: torch.Tensor, direction_norm: float) -> float:
        """v <- momentum v + lr g / ||g|| for one tensor (g: the ascent direction, ||g|| over all tensors);
        returns ||v||^2 of this tensor, for the global speed limit."""
        v = self.velocity.get(name)
        if v is None:
            v = self.velocity[name] = torch.zeros_like(direction)
        elif v.device != direction.device:  # a velocity loaded from a checkpoint lives on the CPU
            v = self.velocity[name] = v.to(direction.device)
        v.mul_(CLIPUP_MOMENTUM).add_(direction, alpha=self.lr / max(direction_norm, 1e-30))
        return float(torch.linalg.vector_norm(v)) ** 2

    def clipup_change(self, name: str, speed: float, out: torch.Tensor) -> torch.Tensor:
        """Clip the velocity to max speed (2 x lr) given its global norm `speed`; the change is the velocity."""
        max_speed = CLIPUP_SPEED_RATIO * self.lr
        v = self.velocity[name]
        if speed > max_speed:
            v.mul_(max_speed / speed)
        return out.copy_(v)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The live moments and velocities (updated in place by the next step): save them before calling `change`
        again."""
        out = {}
        for name, (m, v) in self.moments.items():
            out[f"adam_m/{name}"], out[f"adam_v/{name}"] = m.contiguous(), v.contiguous()
        for name, v in self.velocity.items():
            out[f"velocity/{name}"] = v.contiguous()
        return out

    def expected_state(self, step_count: int, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The keys of state_tensors (each an fp32 tensor of its weight's shape) after `step_count` steps on tensors
        of `shapes`: every tensor's moments (Adam) or velocity (ClipUp) once a step ran, none before."""
        prefixes = {
            "sgd": (),
            "adam": ("adam_m/", "adam_v/"),
            "adamw": ("adam_m/", "adam_v/"),
            "clipup": ("velocity/",),
        }
        return {p + n: shape for p in prefixes[self.kind] for n, shape in shapes.items()} if step_count else {}

    def check_state(self, step_count: int, tensors: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Refuse saved optimizer tensors (StateError naming the key) that `load_state` could not continue from."""
        expected = self.expected_state(step_count, shapes)
        same_keys(tensors, set(expected), "state['optimizer']", f"the {self.kind} state after {step_count} step(s)")
        for key, shape in expected.items():
            field = f"state['optimizer'][{key!r}]"
            tensor = checked_tensor(tensors[key], field, shape, torch.float32)
            if key.startswith("adam_v/") and bool((tensor < 0).any()):
                raise refuse(f"{field} holds negative values; Adam's second moment is never negative")

    def load_state(self, step_count: int, tensors: dict[str, torch.Tensor]) -> None:
        self.step_count = step_count
        names = {key.split("/", 1)[1] for key in tensors if key.startswith("adam_m/")}
        self.moments = {n: (tensors[f"adam_m/{n}"].clone(), tensors[f"adam_v/{n}"].clone()) for n in names}
        self.velocity = {key.split("/", 1)[1]: t.clone() for key, t in tensors.items() if key.startswith("velocity/")}


def clip_scale(norm: float, max_norm: float | None) -> float:
    """The factor that brings a global L2 norm down to max_norm (1.0 when no clip applies)."""
    if max_norm is None or norm <= max_norm:
        return 1.0
    return max_norm / norm


def rounding_generator(seed: int, epoch: int, tensor_index: int, device: torch.device) -> torch.Generator:
    """The stochastic-rounding generator of one tensor at one epoch, keyed by integers alone.

    Drawn per tensor (not one generator consumed in tensor order), so the rounding of a tensor does
    not depend on which tensors were updated before it, nor on how the update is scheduled.
    """
    entropy = np.random.SeedSequence([seed, epoch, tensor_index]).generate_state(2, np.uint32)
    return torch.Generator(device=device).manual_seed(int(entropy[0]) << 31 | int(entropy[1]) >> 1)


def stochastic_round(values: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Unbiased rounding of fp32 `values` to bf16 (E[result] == values); other dtypes round to nearest."""
    if dtype != torch.bfloat16:
        return values.to(dtype)
    bits = values.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, generator=generator, device=bits.device)
    noise.add_(bits).bitwise_and_(~0xFFFF)
    return noise.view(torch.float32).to(torch.bfloat16)


@dataclass(frozen=True)
class Applied:
    """What applying one tensor's change did: for the update's statistics, computed without a copy of the weight."""

    intended: float  # sum of |change|
    lost: float  # sum of |stored value - fp32 target|: what rounding into the weight's dtype lost
    changed: int  # elements whose stored value changed
    sq_norm: float  # squared L2 norm of the change


def apply_change(
    weight: torch.Tensor,
    change: torch.Tensor,
    rounding_generator: torch.Generator | None,
    mask: torch.Tensor | None = None,
) -> Applied:
    """weight += change, computed in fp32 and rounded once into the weight's dtype.

    CONSUMES `change` (it becomes the fp32 target), so the temporary memory stays at a few buffers of
    the weight's size (the change, plus with stochastic rounding the int32 noise and the rounded
    result) whatever the model size; pass a tensor the caller owns. `mask`: an optional bool workspace
    of the weight's shape for counting changed elements.
    """
    intended = float(torch.linalg.vector_norm(change, ord=1))
    sq_norm = float(torch.linalg.vector_norm(change)) ** 2
    if weight.dtype == torch.float32:
        target = change.add_(weight)
        changed = int(torch.count_nonzero(torch.ne(target, weight, out=mask)))
        weight.copy_(target)
        return Applied(intended, 0.0, changed, sq_norm)
    target = change.add_(weight.float())
    rounded = (
        stochastic_round(target, weight.dtype, rounding_generator)
        if rounding_generator is not None
        else target.to(weight.dtype)
    )
    changed = int(torch.count_nonzero(torch.ne(rounded, weight, out=mask)))
    weight.copy_(rounded)
    lost = float(torch.linalg.vector_norm(target.neg_().add_(rounded), ord=1))  # stored - intended, elementwise
    return Applied(intended, lost, changed, sq_norm)
