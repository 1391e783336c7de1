"""How far the members (and one update) move the model, measured on the run's own fitness questions.

Per member: the mean per-token KL(base || member) of the next-token distributions, teacher-forced on the
reference answer (`likelihood.answer_token_log_probs`, the pass that scores answer_logprob); the member's
fitness; and under a generated fitness whether its greedy answers differ from the base's and whether they
still parse as grids. Over the members: their fitness spread against the evaluation's own noise, and their
mean fitness against the base's. The verdict ("no signal", "ok", "collapse") and the suggested sigma come
from these figures alone (docs/calibration.md), so the rehearsal, calibration and a run judge alike.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ERO_EGGROLL.arc.fitness import parse_grid
from ERO_EGGROLL.config import Config
from ERO_EGGROLL.core.perturber import Perturber
from ERO_EGGROLL.core.settings import MAX_EPOCH
from ERO_EGGROLL.evaluation.evaluator import LIKELIHOOD_FITNESS, EvalResult, evaluate, evaluate_members
from ERO_EGGROLL.evaluation.likelihood import answer_token_log_probs
from ERO_EGGROLL.evaluation.prepared import PreparedQuestion, pad_id_of

# Noise of epochs no run reaches (a run's epochs count from 0): calibration's members (counting down from
# CALIBRATION_EPOCH) and the fresh members that check its choice (down from CHECK_EPOCH) never share a key with a run's.
CALIBRATION_EPOCH, CHECK_EPOCH = MAX_EPOCH, MAX_EPOCH - 100_000
MEASURE_STREAM = 9  # the stream of sampled decoding in a measurement (population.py's are 0..3)
NOISE_FLOOR = 1e-6  # float32's resolution of a fitness near 1: a smaller spread is no spread
SIGNAL = 3.0  # a spread within this many times the evaluation's noise is no signal
UNPARSED = 0.5  # collapse: this share more of the members' answers than of the base's no longer parse as grids
DROP = 0.5  # collapse: the members' mean fitness below the base's by this share of the base's (|log-prob|, score)


def generated(cfg: Config) -> bool:
    """Whether the fitness reads a generated answer (every fitness but the teacher-forced answer_logprob)."""
    return cfg.evaluation.fitness != LIKELIHOOD_FITNESS


@dataclass
class Reference:
    """The base model's side of every comparison: its next-token distributions, fitness and answers."""

    log_probs: list[tuple[torch.Tensor, torch.Tensor]]  # per batch of questions: (log_probs, in_answer)
    fitness: float
    answers: list[str] | None  # greedy answers under a generated fitness
    noise: float  # the evaluation's own noise: how much the same model's fitness moves between two evaluations


def _teacher_forced(model, processor, prepared: Sequence[PreparedQuestion], cfg: Config):
    pad_id, bs = pad_id_of(processor.tokenizer), cfg.evaluation.batch_size
    with torch.no_grad():
        for start in range(0, len(prepared), bs):
            log_probs, _, in_answer = answer_token_log_probs(model, prepared[start : start + bs], pad_id, 1)
            yield log_probs, in_answer


def _texts(result: EvalResult) -> list[str]:
    return [a.text or "" for a in result.answers]


def reference_of(model, processor, prepared: Sequence[PreparedQuestion], cfg: Config) -> Reference:
    """The model as it is now (the base) measured once. Its noise: the fitness of two replicas of it in one call
    against its own (sampled decoding draws other tokens; greedy decoding differs in the last bits at most)."""
    base = evaluate(model, processor, prepared, cfg, (MEASURE_STREAM, 0))
    twins = evaluate_members(model, processor, prepared, cfg, 2, (MEASURE_STREAM, 1))
    noise = max(NOISE_FLOOR, *(abs(t.fitness - base.fitness) for t in twins))
    return Reference(
        list(_teacher_forced(model, processor, prepared, cfg)),
        base.fitness,
        _texts(base) if generated(cfg) else None,
        noise,
    )


def mean_kl(model, processor, prepared: Sequence[PreparedQuestion], cfg: Config, reference: Reference) -> float:
    """Mean over the answers' tokens of KL(base || model) between the next-token distributions, teacher-forced."""
    total, tokens = 0.0, 0
    for (base_lp, in_answer), (lp, _) in zip(reference.log_probs, _teacher_forced(model, processor, prepared, cfg)):
        kl = (base_lp.exp() * (base_lp - lp)).sum(-1)  # (rows, positions)
        total += float((kl * in_answer).sum())
        tokens += int(in_answer.sum())
    return total / tokens


@dataclass(frozen=True)
class MemberFigures:
    """One member (or one mean model) against the base."""

    kl: float
    fitness: float
    differ: float | None = None  # share of its greedy answers that differ from the base's
    unparsed: float | None = None  # share of its greedy answers that do not parse as a grid


def figures_of(
    model, processor, prepared: Sequence[PreparedQuestion], cfg: Config, reference: Reference, stream: Sequence[int]
) -> MemberFigures:
    """The model as it is now (a member inside its block, or an updated mean model) measured against `reference`."""
    kl = mean_kl(model, processor, prepared, cfg, reference)
    result = evaluate(model, processor, prepared, cfg, stream)
    if reference.answers is None:
        return MemberFigures(kl, result.fitness)
    texts = _texts(result)
    return MemberFigures(
        kl,
        result.fitness,
        sum(t != b for t, b in zip(texts, reference.answers)) / len(texts),
        sum(parse_grid(t) is None for t in texts) / len(texts),
    )


def unparsed_share(texts: Iterable[str]) -> float:
    """Share of answers that do not parse as a grid."""
    texts = list(texts)
    return sum(parse_grid(t) is None for t in texts) / len(texts) if texts else 0.0


def verdict_of(
    spread: float,
    noise: float,
    mean_fitness: float,
    base_fitness: float,
    differ: float | None = None,
    unparsed: float | None = None,
    base_unparsed: float | None = None,
) -> str:
    """'collapse' (answers no longer grids, or the members' fitness far below the base's), 'no signal' (answers
    identical to the base's, or a fitness spread within the evaluation's noise) or 'ok'."""
    if (
        unparsed is not None and unparsed - (base_unparsed or 0.0) >= UNPARSED
    ) or base_fitness - mean_fitness > DROP * abs(base_fitness):
        return "collapse"
    if (differ is not None and differ == 0.0) or spread <= SIGNAL * noise:
        return "no signal"
    return "ok"


def epoch_signs(row: dict, base_row: dict, fitness_name: str) -> dict:
    """The cheap signs of one epoch, from what its metrics row already holds: the members' fitness spread, and under
    a generated fitness the share of members scoring exactly the base model's fitness (greedy: the same answers)
    and the share of the mean model's answers that are not grids; then the verdict they give."""
    fitness = row["fitness"]
    signs: dict = {"fitness_spread": statistics.pstdev(fitness)}
    differ = unparsed = base_unparsed = None
    if fitness_name != LIKELIHOOD_FITNESS:
        base = base_row["mean_model_fitness"]
        signs["members_at_base_fitness"] = sum(f == base for f in fitness) / len(fitness)
        signs["answers_unparsed"] = unparsed = unparsed_share(row.get("answers") or [])
        differ = 1.0 - signs["members_at_base_fitness"]
        base_unparsed = unparsed_share(base_row.get("answers") or [])
    signs["signal"] = verdict_of(
        signs["fitness_spread"],
        NOISE_FLOOR,
        statistics.fmean(fitness),
        base_row["mean_model_fitness"],
        differ,
        unparsed,
        base_unparsed,
    )
    return signs


def bad_signal_run(history: Sequence[dict], fitness_name: str) -> tuple[str, int]:
    """(verdict, epochs): the verdict of the newest epoch and for how many epochs in a row it has held."""
    if len(history) < 2:
        return "ok", 0
    verdicts = [epoch_signs(row, history[0], fitness_name)["signal"] for row in history[1:]]
    last, count = verdicts[-1], 0
    for v in reversed(verdicts):
        if v != last:
            break
        count += 1
    return last, count


@dataclass
class Divergence:
    """A set of members at one sigma against the base: the figures the verdict reads."""

    sigma: float
    members: list[MemberFigures]
    base_fitness: float
    noise: float
    base_unparsed: float | None = None
    step: MemberFigures | None = None  # one update's mean model against the base, when measured
    extra: dict = field(default_factory=dict)

    @property
    def kl(self) -> float:
        """The members' median KL: the quantity calibration targets (one member's varies several-fold)."""
        return statistics.median(m.kl for m in self.members)

    @property
    def spread(self) -> float:
        """The members' fitness standard deviation: what the z-scored update divides by."""
        return statistics.pstdev(m.fitness for m in self.members)

    @property
    def mean_fitness(self) -> float:
        return statistics.fmean(m.fitness for m in self.members)

    def share(self, name: str) -> float | None:
        values = [getattr(m, name) for m in self.members]
        return None if None in values else statistics.fmean(values)

    def verdict(self) -> str:
        return verdict_of(
            self.spread,
            self.noise,
            self.mean_fitness,
            self.base_fitness,
            self.share("differ"),
            self.share("unparsed"),
            self.base_unparsed,
        )

    def line(self) -> str:
        """One line of figures (the rehearsal's scan, calibration's probes)."""
        parts = [
            f"sigma {self.sigma:.4g}: median KL {self.kl:.3g} nats/token",
            f"spread {self.spread:.3g} (noise {self.noise:.2g})",
            f"members' mean fitness {self.mean_fitness:.4f} (base {self.base_fitness:.4f})",
        ]
        differ, unparsed = self.share("differ"), self.share("unparsed")
        if differ is not None and unparsed is not None:
            parts.append(f"answers differing from the base's {differ:.0%}, not a grid {unparsed:.0%}")
        return ", ".join(parts) + f": {self.verdict()}"


def measure(
    perturber: Perturber,
    model,
    processor,
    prepared: Sequence[PreparedQuestion],
    cfg: Config,
    reference: Reference,
    members: Sequence[int],
    epoch: int = CALIBRATION_EPOCH,
) -> Divergence:
    """Members `members` of `epoch` of `perturber` (its sigma) measured against the base, one at a time."""
    figures = []
    for m in members:
        with perturber.member(epoch, m):
            figures.append(figures_of(model, processor, prepared, cfg, reference, (MEASURE_STREAM, epoch, m)))
    return Divergence(
        float(perturber.evo.sigma),
        figures,
        reference.fitness,
        reference.noise,
        unparsed_share(reference.answers) if reference.answers is not None else None,
    )


def members_kl(
    perturber: Perturber,
    model,
    processor,
    prepared: Sequence[PreparedQuestion],
    cfg: Config,
    reference: Reference,
    members: Sequence[int],
    epoch: int = CALIBRATION_EPOCH,
) -> float:
    """The members' median KL alone (no fitness, no generation): what calibration searches on."""
    values = []
    for m in members:
        with perturber.member(epoch, m):
            values.append(mean_kl(model, processor, prepared, cfg, reference))
    return statistics.median(values)


def suggested_sigma(points: Sequence[tuple[float, float]], target_kl: float) -> float:
    """The sigma that gives `target_kl` by the measured (sigma, KL) points: KL grows as sigma squared for small noise,
    so each point suggests sigma x sqrt(target / KL); the nearest point's suggestion (in log KL) is taken."""
    usable = [(s, kl) for s, kl in points if kl > 0]
    if not usable:
        return max(s for s, _ in points) * 10
    s, kl = min(usable, key=lambda p: abs(math.log(p[1] / target_kl)))
    return s * math.sqrt(target_kl / kl)
