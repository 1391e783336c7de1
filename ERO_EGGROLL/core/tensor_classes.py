"""What each tensor is to EGGROLL: FROZEN, LORA (low-rank noise) or FULL (dense noise), with a stable key.

`classify_module` gives the defaults for any torch module (`Perturber.for_module`): weights of
Linear, Conv1d/2d/3d and Embedding LORA (a conv kernel as the matrix (out_channels,
in_channels/groups x kernel size)), norm weights and every bias (`bias`, `*_bias`) FULL. A norm is recognised by its
type (NORM_TYPES, which `declare_norm` extends), never by an attribute name that a look-alike
module would share. Anything else is a clear error that names the tensor and how to classify it.
Qwen2.5-VL's name-based rules live in model/qwen.py.
"""

from __future__ import annotations

import enum
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ERO_EGGROLL.core.errors import ConfigError


class ParamClass(str, enum.Enum):
    FROZEN = "FROZEN"
    LORA = "LORA"
    FULL = "FULL"


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    cls: ParamClass
    key_index: int  # stable integer for hyperscalees.param_key: crc32 of the name

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """The 2-D view low-rank noise is drawn for: (first dim, product of the others)."""
        return self.shape[0], math.prod(self.shape[1:])


def key_index(name: str) -> int:
    """A process-independent integer per tensor name (Python's hash() is salted per process)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def make_specs(named: list[tuple[str, tuple[int, ...], ParamClass]]) -> list[ParamSpec]:
    """ParamSpecs with their key indices, refusing LORA below 2-D and two names on one noise key."""
    specs: list[ParamSpec] = []
    seen: dict[int, str] = {}
    for name, shape, cls in named:
        if cls is ParamClass.LORA and len(shape) < 2:
            raise ConfigError(
                f"{name} (shape {shape}) is classified LORA, but low-rank noise needs a tensor of 2 or more "
                "dimensions; make it FULL or FROZEN"
            )
        index = key_index(name)
        if index in seen:
            raise ConfigError(f"tensor names {seen[index]} and {name} collide on their noise key; rename one of them")
        seen[index] = name
        specs.append(ParamSpec(name, tuple(int(d) for d in shape), cls, index))
    return specs


def rank_problem(specs: list[ParamSpec], rank: int) -> str | None:
    """Why `rank` is more than any LORA matrix here can use (None: it is not). Rank-r noise on an m x n matrix has at
    most min(m, n) independent directions, so a larger rank only costs memory (factors of N members, per batch row
    projections): evolution.rank 100000 on a 7B passed a memory check that did not count it and was killed."""
    lora = [s for s in specs if s.cls is ParamClass.LORA]
    if not lora:
        return None
    widest = max(lora, key=lambda s: min(s.matrix_shape))
    limit = min(widest.matrix_shape)
    if rank <= limit:
        return None
    return (
        f"rank {rank} is more than any LORA matrix here can use: the widest, {widest.name} {widest.matrix_shape}, has "
        f"at most {limit} independent directions (min(m, n)); a larger rank adds none and costs memory; use a rank "
        f"of at most {limit}"
    )


CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LOW_RANK_TYPES = (nn.Linear, nn.Embedding, *CONV_TYPES)  # weights the forward strategy perturbs without touching them
NORM_TYPES: list[type] = [nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase]


def declare_norm(module_type: type) -> None:
    """Treat `module_type`'s weight as a norm weight (FULL by default)."""
    if module_type not in NORM_TYPES:
        NORM_TYPES.append(module_type)


def default_class(owner: nn.Module, attr: str, name: str, shape: tuple[int, ...]) -> ParamClass:
    if attr == "bias" or attr.endswith("_bias") or (attr == "weight" and isinstance(owner, tuple(NORM_TYPES))):
        return ParamClass.FULL
    if attr == "weight" and isinstance(owner, LOW_RANK_TYPES):
        return ParamClass.LORA
    raise ConfigError(
        f"{name} (a {type(owner).__name__}.{attr} of shape {tuple(shape)}) has no default EGGROLL class; "
        "pass classify=lambda name, tensor: ... returning ParamClass.FROZEN, LORA or FULL for it "
        "(or declare_norm(type) if it is a norm)"
    )


Classifier = Callable[[str, torch.Tensor], "ParamClass | str | None"]


def classify_module(module: nn.Module, classify: Classifier | None = None) -> list[ParamSpec]:
    """A ParamSpec per parameter of `module`: `classify(name, tensor)` first (None: the default), then the defaults."""
    owners = dict(module.named_modules())
    named = []
    for name, tensor in module.named_parameters():
        chosen = classify(name, tensor) if classify is not None else None
        if chosen is None:
            owner_name, _, attr = name.rpartition(".")
            chosen = default_class(owners[owner_name], attr, name, tuple(tensor.shape))
        named.append((name, tuple(tensor.shape), ParamClass(chosen)))
    return make_specs(named)
