"""`evolution.sigma: auto`: the sigma whose members diverge from the base by a declared amount, measured.

The quantity is the members' median per-token KL(base || member), teacher-forced on the fitness questions'
reference answers (divergence.mean_kl): it needs no generation, it grows smoothly with sigma (about as sigma
squared for small noise), and it means the same on a tiny model and on a 7B (docs/calibration.md). The median,
not the mean: one member's KL varies several-fold with its noise direction (heavy-tailed), and even the median
of 16 directions moved by up to +-30% between draws on the tiny model.

The search: probes of `calibration.members` directions (noise of epochs no run reaches) step sigma by
sqrt(target / KL) inside the bracket found so far (its geometric middle when a step leaves it) until a probe is
within 25% of the target; then all the budget left (`calibration.budget_epochs` epochs' member evaluations in
all) measures fresh directions at that sigma, and the last step scales it by sqrt(target / KL). The choice is
recorded in the run's config as the number `evolution.sigma`, so replay and resume use it without measuring again.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ERO_EGGROLL.config import Config
from ERO_EGGROLL.core.errors import EggrollError
from ERO_EGGROLL.evaluation.divergence import (
    CALIBRATION_EPOCH,
    CHECK_EPOCH,
    Reference,
    members_kl,
    reference_of,
    suggested_sigma,
)
from ERO_EGGROLL.evaluation.prepared import PreparedQuestion
from ERO_EGGROLL.model.qwen import run_perturber

COARSE = 0.25  # a probe within this share of the target ends the search; the final measurement refines it


class CalibrationError(EggrollError):
    """Calibration could not find a sigma that gives the target divergence within its budget."""


@dataclass(frozen=True)
class Calibration:
    """What calibration chose and what it spent; `probes` are the measured (sigma, median KL) points in order."""

    sigma: float
    kl: float
    target_kl: float
    probes: tuple[tuple[float, float], ...]
    member_evaluations: int
    seconds: float

    def line(self, population_size: int) -> str:
        probed, kl = self.probes[-1]
        return (
            f"calibration: sigma {self.sigma:.4g} for a median KL(base || member) of {self.target_kl:.3g} nats/token "
            f"({kl:.3g} measured at {probed:.4g}); spent {self.member_evaluations} member evaluations "
            f"({self.member_evaluations / population_size:.2f} epochs' worth, teacher-forced) in {self.seconds:.1f} s, "
            f"{len(self.probes)} probes"
        )

    def as_record(self) -> dict:
        return {
            "sigma": self.sigma,
            "kl": self.kl,
            "target_kl": self.target_kl,
            "probes": [list(p) for p in self.probes],
            "member_evaluations": self.member_evaluations,
        }


def directions(population_size: int, count: int, first_epoch: int) -> list[tuple[int, int]]:
    """`count` (epoch, member) pairs of distinct noise directions: the even member of each antithetic pair (its twin
    is the same direction negated, which diverges alike), over epochs first_epoch, first_epoch - 2, ..."""
    pairs = population_size // 2
    return [(first_epoch - 2 * (j // pairs), 2 * (j % pairs)) for j in range(count)]


def kl_at(
    model, processor, prepared, cfg: Config, reference: Reference, sigma: float, chosen: Sequence[tuple[int, int]]
) -> float:
    """The median KL of the (epoch, member) pairs `chosen` at `sigma` (a throw-away Perturber; the weights stay)."""
    perturber = run_perturber(model, cfg.with_sigma(sigma))
    try:
        return statistics.median(
            members_kl(perturber, model, processor, prepared, cfg, reference, [m], e) for e, m in chosen
        )
    finally:
        perturber.remove_hooks()


def calibrate(
    model, processor, prepared: Sequence[PreparedQuestion], cfg: Config, reference: Reference | None = None
) -> Calibration:
    """Search sigma (in `cfg.evolution.sigma_mode`'s units) for `calibration.target_kl` on `prepared`.

    Probes of `calibration.members` directions bring the KL within 25% of the target; one member's KL varies
    several-fold with its direction, so the rest of the budget then measures many directions at that sigma, and
    the last step scales sigma by sqrt(target / KL) (KL grows as sigma squared near the target)."""
    cal, evo = cfg.evolution.calibration, cfg.evolution
    start_time = time.perf_counter()
    reference = reference or reference_of(model, processor, prepared, cfg)
    budget = int(cal.budget_epochs * evo.population_size)
    probe = directions(evo.population_size, cal.members, CALIBRATION_EPOCH)
    sigma = cal.start or (0.1 if evo.sigma_mode == "relative" else 1e-3)
    low, high = 0.0, math.inf  # sigmas known to give less / more than the target
    probes: list[tuple[float, float]] = []
    spent = 0
    while spent + 2 * cal.members <= budget:  # room for this probe and a final measurement at least as large
        kl = kl_at(model, processor, prepared, cfg, reference, sigma, probe)
        probes.append((sigma, kl))
        spent += cal.members
        if kl > 0 and abs(math.log(kl / cal.target_kl)) <= math.log(1 + COARSE):
            break
        if kl < cal.target_kl:
            low = max(low, sigma)
        else:
            high = min(high, sigma)
        guess = suggested_sigma([(sigma, kl)], cal.target_kl)
        if not low < guess < high and low > 0 and high < math.inf:
            guess = math.sqrt(low * high)
        sigma = guess
    if not probes:
        raise CalibrationError(
            f"evolution.calibration: a budget of {cal.budget_epochs} epochs ({budget} member evaluations) is less "
            f"than two probes of {cal.members} members; raise calibration.budget_epochs or lower calibration.members"
        )
    sigma, kl = min(probes, key=lambda p: abs(math.log(max(p[1], 1e-300) / cal.target_kl)))
    if kl <= 0 or not math.isfinite(kl):
        raise CalibrationError(
            f"evolution.sigma auto: no probe moved the model (KL {kl} at sigma {sigma:.3g}); are any tensors "
            "evolvable (params.overrides)? Or set evolution.sigma to a number"
        )
    final = directions(evo.population_size, budget - spent, CALIBRATION_EPOCH - 1)  # directions no probe used
    kl = kl_at(model, processor, prepared, cfg, reference, sigma, final)
    probes.append((sigma, kl))
    chosen = suggested_sigma([(sigma, kl)], cal.target_kl)
    return Calibration(chosen, kl, cal.target_kl, tuple(probes), spent + len(final), time.perf_counter() - start_time)


def check_kl(model, processor, prepared: Sequence[PreparedQuestion], cfg: Config, sigma: float, count: int) -> float:
    """The median KL at `sigma` of `count` fresh directions (noise no calibration used) on `prepared` (e.g. held-out
    questions)."""
    reference = reference_of(model, processor, prepared, cfg)
    return kl_at(
        model, processor, prepared, cfg, reference, sigma, directions(cfg.evolution.population_size, count, CHECK_EPOCH)
    )


def resolve_sigma(model, processor, prepared: Sequence[PreparedQuestion], cfg: Config) -> tuple[Config, Calibration]:
    """`cfg` with `evolution.sigma: auto` replaced by the calibrated number (printed with what it cost)."""
    result = calibrate(model, processor, prepared, cfg)
    print(result.line(cfg.evolution.population_size))
    return cfg.with_sigma(result.sigma), result
