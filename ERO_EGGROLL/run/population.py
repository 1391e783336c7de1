"""Scoring a population: every member's fitness in member order, one at a time or K members per generate call.

Also the mean model's evaluation (fitness and test questions), and the integer streams that name
each evaluation so that sampled decoding is seeded per (seed, stream, question).
"""

from __future__ import annotations

from ERO_EGGROLL.config import Config
from ERO_EGGROLL.core.perturber import Perturber
from ERO_EGGROLL.evaluation.evaluator import evaluate, evaluate_members
from ERO_EGGROLL.io.progress import bar
from ERO_EGGROLL.memory.check import auto_members_per_batch
from ERO_EGGROLL.run.stop_signals import StopFlag

# Streams of integers that name each evaluation, so that sampled decoding is seeded per (seed, stream, question).
MEMBER_STREAM, MEAN_MODEL_STREAM, MEAN_MODEL_TEST_STREAM, BEST_MODEL_STREAM = 0, 1, 2, 3


def evaluate_mean_model(model, processor, fitness_questions, test_questions, cfg: Config, epoch: int) -> dict:
    """The mean model after `epoch` updates (0: the base model): its fitness, and on the test questions (held out
    under fitness_source 'train_loo') every metric whatever the fitness: answer log-prob and the greedy answer's
    scores."""
    same = test_questions is fitness_questions
    result = evaluate(model, processor, fitness_questions, cfg, (MEAN_MODEL_STREAM, epoch), report=same)
    test = (
        result
        if same
        else evaluate(model, processor, test_questions, cfg, (MEAN_MODEL_TEST_STREAM, epoch), report=True)
    )
    return {
        "mean_model_fitness": result.fitness,
        "mean_model_test_score": test.fitness,
        "mean_model_exact": test.mean("exact"),
        "mean_model_cell_accuracy": test.mean("cell_accuracy"),
        "mean_model_char_similarity": test.mean("char_similarity"),
        "mean_model_answer_logprob": test.mean("answer_logprob"),
        "answers": [a.text for a in test.answers],
    }


def members_per_batch(cfg: Config, model, perturber: Perturber, prepared) -> int:
    requested = cfg.evaluation.members_per_batch
    if isinstance(requested, int):
        k = requested
    else:  # 'auto'
        p = next(model.parameters())
        k = auto_members_per_batch(
            cfg, model.config.to_dict(), perturber.specs, prepared, p.device, str(p.dtype).removeprefix("torch.")
        )
        print(f"evaluation.members_per_batch auto: {k} member(s) per generate call")
    k = min(k, cfg.evolution.population_size)
    if k > 1:
        perturber.check_batchable()  # before the base model's evaluation, not at the first population batch
    return k


def member_batches(population_size: int, k: int) -> list[list[int]]:
    """Which members share a generate call: [0, k), [k, 2k), ... fixed by the config, never by who evaluates them."""
    return [list(range(first, min(first + k, population_size))) for first in range(0, population_size, k)]


def evaluate_batch(
    perturber: Perturber, model, processor, prepared, cfg: Config, epoch: int, ids: list[int]
) -> list[float]:
    """The fitness of the members `ids` (one batch of member_batches): alone, or as rows of one generate call."""
    if len(ids) == 1:
        with perturber.member(epoch, ids[0]):
            return [evaluate(model, processor, prepared, cfg, (MEMBER_STREAM, epoch, ids[0])).fitness]
    # greedy decoding only (config validation), so the stream of the first member is enough
    with perturber.members(epoch, ids):
        return [
            r.fitness
            for r in evaluate_members(model, processor, prepared, cfg, len(ids), (MEMBER_STREAM, epoch, ids[0]))
        ]


class MemberProgress:
    """The member bar of one epoch, shared by every loop that gathers fitness: one place for what it shows."""

    def __init__(self, epoch: int, population_size: int, stop: StopFlag):
        self.bar = bar(total=population_size, desc=f"epoch {epoch + 1} members", unit="member", leave=False)
        self.best, self.stop = float("-inf"), stop

    def gathered(self, values: list[float]) -> None:
        """A batch's fitness arrived: show it, then stop here (between batches) if a signal asked to."""
        self.best = max(self.best, *values)
        self.bar.update(len(values))
        self.bar.set_postfix(fitness=f"{values[-1]:.3f}", best=f"{self.best:.3f}")
        self.stop.check()

    def close(self) -> None:
        self.bar.close()


def evaluate_population(
    perturber: Perturber, model, processor, prepared, cfg: Config, epoch: int, k: int, stop: StopFlag
) -> list[float]:
    """Every member's fitness: one at a time (k = 1, the reference), or k members per generate call."""
    fitness: list[float] = []
    progress = MemberProgress(epoch, cfg.evolution.population_size, stop)
    for ids in member_batches(cfg.evolution.population_size, k):
        values = evaluate_batch(perturber, model, processor, prepared, cfg, epoch, ids)
        fitness += values
        progress.gathered(values)
    progress.close()
    return fitness
