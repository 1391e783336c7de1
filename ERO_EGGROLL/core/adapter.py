"""The evolved change as a LoRA adapter: best minus base per LORA matrix, truncated by SVD to rank k.

EGGROLL moves a LORA matrix by a sum of rank-r steps, so the total change is usually far below full rank: its
truncated SVD  dW ~= B A  (B = U_k S_k, A = V_k^T) is a LoRA with scaling 1. The default rank of each tensor is the
smallest that keeps `energy` of its change's squared singular values; every tensor reports its relative Frobenius
error ||dW - B A|| / ||dW||. FULL tensors (norms, biases) stay dense: the writer (io/adapter.py) saves them as PEFT's
modules to save, or as the biases of the LoRA layers. This module is torch only; writing the PEFT folder is io's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ERO_EGGROLL.core.errors import ConfigError
from ERO_EGGROLL.core.tensor_classes import ParamClass

DEFAULT_ENERGY = 0.99  # the share of each change's squared singular values the default rank keeps


@dataclass(frozen=True)
class TensorFit:
    """How well the rank-`rank` factors of one tensor's change fit it."""

    name: str
    shape: tuple[int, ...]
    rank: int
    energy_kept: float
    relative_error: float


@dataclass
class LoraChange:
    """The adapter's contents: {module: (A (k, in), B (out, k))}, the dense FULL tensors {name: best value}, the fit
    of every factored tensor, and the changed LORA tensors that are not a Linear weight (left out, by name)."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    full: dict[str, torch.Tensor] = field(default_factory=dict)
    fits: list[TensorFit] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)


def truncated(delta: torch.Tensor, rank: int | None, energy: float) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(A, B, energy kept, relative Frobenius error) of the rank-k SVD of `delta` (out, in): k = `rank` (capped at
    min(out, in)), or the smallest k that keeps `energy` of the squared singular values."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    power = s.square()
    total = float(power.sum())
    if rank is None:
        share = torch.cumsum(power, 0) / total
        rank = int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype)).item()) + 1
    k = max(1, min(rank, s.numel()))
    kept = float(power[:k].sum()) / total
    a, b = vh[:k], u[:, :k] * s[:k]
    error = float(torch.linalg.matrix_norm(delta.double() - b @ a)) / math.sqrt(total)
    return a.to(delta.dtype).contiguous(), b.to(delta.dtype).contiguous(), kept, error


def lora_change(
    model: nn.Module,
    base: Mapping[str, torch.Tensor],
    classes: Mapping[str, ParamClass],
    *,
    rank: int | None = None,
    energy: float = DEFAULT_ENERGY,
) -> LoraChange:
    """`model`'s evolved weights (the best, loaded) minus `base` (the weights before evolution, by parameter name) as
    LoRA factors per changed LORA Linear weight and dense values per changed FULL tensor; `classes` as
    Perturber.classes. Unchanged tensors are left out of the adapter."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"adapter rank must be an integer >= 1 (or None: keep {energy:.0%} of each change's energy)")
    if not 0 < energy <= 1:
        raise ConfigError(f"adapter energy must be in (0, 1], got {energy}")
    modules = dict(model.named_modules())
    change = LoraChange()
    for name, param in model.named_parameters():
        cls = classes.get(name, ParamClass.FROZEN)
        if cls is ParamClass.FROZEN:
            continue
        if name not in base:
            raise ConfigError(f"the base weights have no {name}; pass the weights the evolution started from")
        delta = param.detach().float() - base[name].to(param.device).float()
        if not bool(delta.any()):
            continue
        owner, _, attr = name.rpartition(".")
        if cls is ParamClass.FULL:
            change.full[name] = param.detach().clone()
        elif isinstance(modules.get(owner), nn.Linear) and attr == "weight":
            a, b, kept, error = truncated(delta, rank, energy)
            change.factors[owner] = (a.to(param.dtype), b.to(param.dtype))
            change.fits.append(TensorFit(name, tuple(param.shape), a.shape[0], kept, error))
        else:  # an Embedding or Conv LORA tensor: PEFT's layouts for those differ; named, never silently dropped
            change.left_out.append(name)
    return change


@contextlib.contextmanager
def applied(model: nn.Module, base: Mapping[str, torch.Tensor], change: LoraChange) -> Iterator[nn.Module]:
    """The model as the adapter makes it: base + B A for each factored weight, the FULL values, everything else as
    it is (the left-out tensors keep their evolved values); the evolved weights are back on exit."""
    params = dict(model.named_parameters())
    saved = {f"{m}.weight": params[f"{m}.weight"].detach().clone() for m in change.factors}
    saved |= {n: params[n].detach().clone() for n in change.full}
    try:
        with torch.no_grad():
            for module, (a, b) in change.factors.items():
                weight = params[f"{module}.weight"]
                weight.copy_((base[f"{module}.weight"].to(weight.device).float() + b.float() @ a.float()).to(weight))
            for name, value in change.full.items():
                params[name].copy_(value)
        yield model
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
