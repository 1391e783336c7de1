"""ask/tell beside member/update, in the vocabulary of evosax, EvoTorch and optax users:

    gen = es.ask()                                   # the next generation; it knows its epoch
    with gen.member(i):  fitness[i] = ...            # or gen.members(ids) for several as batch rows
    stats = es.tell(gen, fitness)                    # UpdateStats; a stale or foreign generation is refused

A Generation is a ticket: only the latest one asked of its Perturber, and only once, can be told, so no bare epoch
integer has to be repeated by the caller and no step is applied twice or to the wrong noise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import ArrayLike
from torch import nn

from ERO_EGGROLL.core.errors import EggrollError

if TYPE_CHECKING:
    from ERO_EGGROLL.core.perturber import Perturber

Objective = Literal["max", "min"]
OBJECTIVES: tuple[Objective, ...] = ("max", "min")


class StaleGeneration(EggrollError):
    """tell() or a member of a generation that is not its Perturber's latest untold one."""


@dataclass(frozen=True)
class FitnessSummary:
    """The members' fitness as the caller gave it (losses under objective='min')."""

    mean: float
    std: float
    min: float
    max: float

    @classmethod
    def of(cls, fitness: ArrayLike) -> FitnessSummary:
        f = np.asarray(fitness, dtype=np.float64)
        return cls(float(f.mean()), float(f.std()), float(f.min()), float(f.max()))


@dataclass(frozen=True)
class UpdateStats:
    """What one tell() did: `sigma` is the mean over tensors of the sigma the generation's members were drawn with,
    `lr` the step's learning rate, `seconds` the update's wall time; `details` holds every other statistic of the
    update (per-class norms, clip scale, ERO's elites) as the streamed update reports them."""

    epoch: int
    update_norm: float
    fitness: FitnessSummary
    lr: float
    sigma: float
    seconds: float
    details: Mapping[str, Any]

    @classmethod
    def of(cls, epoch: int, fitness: ArrayLike, sigma: float, seconds: float, stats: Mapping[str, Any]) -> UpdateStats:
        return cls(
            epoch=epoch,
            update_norm=float(stats["update_norm"]),
            fitness=FitnessSummary.of(fitness),
            lr=float(stats["lr"]),
            sigma=sigma,
            seconds=seconds,
            details=MappingProxyType(dict(stats)),
        )


OnUpdate = Callable[[UpdateStats], None]


class Generation:
    """One epoch's population of a Perturber, from ask() to tell()."""

    def __init__(self, perturber: Perturber, epoch: int) -> None:
        self.perturber, self.epoch = perturber, epoch
        self.told = False

    @property
    def population_size(self) -> int:
        return self.perturber.evo.population_size

    def check_current(self, perturber: Perturber) -> None:
        """Refuse a generation of another Perturber, one already told, or one that a later ask() replaced."""
        if self.perturber is not perturber:
            raise StaleGeneration(
                f"generation of epoch {self.epoch} was asked of another Perturber; tell each Perturber its own"
            )
        if self.told:
            raise StaleGeneration(f"generation of epoch {self.epoch} was told already; ask() for the next one")
        if perturber.latest_generation is not self:
            raise StaleGeneration(
                f"generation of epoch {self.epoch} is stale: a later ask() replaced it; evaluate and tell the latest"
            )

    @contextlib.contextmanager
    def member(self, member: int) -> Iterator[nn.Module]:
        """The model as member `member` of this generation (Perturber.member)."""
        self.check_current(self.perturber)
        with self.perturber.member(self.epoch, member) as model:
            yield model

    @contextlib.contextmanager
    def members(self, member_ids: Iterable[int]) -> Iterator[nn.Module]:
        """Several members as blocks of batch rows (Perturber.members)."""
        self.check_current(self.perturber)
        with self.perturber.members(self.epoch, member_ids) as model:
            yield model

    def __repr__(self) -> str:
        return f"Generation(epoch={self.epoch}, population_size={self.population_size}, told={self.told})"
