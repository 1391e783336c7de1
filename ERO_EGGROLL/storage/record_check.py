"""A run record is checked, not trusted: every fact in it that can be recomputed is recomputed and compared.

state.json's fields are type-checked when read (checkpoints.read_state); here the history is checked against
the run's own config: one row per epoch, the population's fitness values finite and in the metric's range,
and the best epoch, best fitness, guard counter, each row's new_best/rolled_back and `finished` recomputed
from the mean model's fitness exactly as the epoch step decides them. Resume, replay and the evaluator call
`check_record` before they use a record, so an edited one is refused, naming the field and the epoch.
"""

from __future__ import annotations

import math
from typing import NoReturn

from typing_extensions import TypeIs

from ERO_EGGROLL.config import EvaluationConfig, EvolutionConfig, config_from_dict
from ERO_EGGROLL.core.ero_search import stop_score
from ERO_EGGROLL.evaluation.divergence import bad_signal_run
from ERO_EGGROLL.evaluation.evaluator import fitness_range
from ERO_EGGROLL.storage.checkpoints import CheckpointError, RunState


def _number(value: object) -> TypeIs[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_finished(state: RunState, evolution: EvolutionConfig, target_fitness: float) -> bool:
    """Whether a run is done: all epochs ran, or an epoch (never the base model's evaluation) reached the target by
    the search's stop rule. The loop, resume and the record check decide it here, alike."""
    reached = stop_score(evolution.search, state.history[-1]) >= target_fitness
    return state.epoch >= 1 and (state.epoch == evolution.epochs or reached or signal_stop(state, evolution))


def signal_stop(state: RunState, evolution: EvolutionConfig) -> bool:
    """evolution.signal_check.stop: the newest `patience` epochs all had no signal, or all collapsed (recomputed from
    the history, so the record check accepts the stop and refuses a forged one)."""
    check = evolution.signal_check
    if not check.stop or not check.patience:
        return False
    fitness = state.config.get("evaluation", {}).get("fitness", EvaluationConfig.fitness)  # the run's own config
    verdict, epochs = bad_signal_run(state.history, fitness)
    return verdict != "ok" and epochs >= check.patience


def check_record(state: RunState, where: str) -> None:
    """Raise CheckpointError naming the first field (and epoch) of `state` that disagrees with what its history
    gives."""

    def refuse(message: str) -> NoReturn:
        raise CheckpointError(
            f"{where}: the run record is inconsistent: {message} (edited or damaged?); resume from an "
            "earlier epoch_NNNN/ or start the run again"
        )

    cfg = config_from_dict(state.config, f"{where} (saved config)")
    low, high = fitness_range(cfg.evaluation.fitness)
    population, patience = cfg.evolution.population_size, cfg.run.degeneration_patience
    if len(state.history) != state.epoch + 1:
        refuse(f"epoch is {state.epoch} but the history holds {len(state.history)} row(s)")
    if len(state.weight_digests) != state.epoch + 1:
        refuse(f"epoch is {state.epoch} but weight_digests holds {len(state.weight_digests)} digest(s)")
    best_fitness, best_epoch, since = -math.inf, -1, 0
    new_best: bool
    rolled_back: bool
    for index, row in enumerate(state.history):
        if row.get("epoch") != index:
            refuse(f"history row {index} has epoch {row.get('epoch')!r}")
        mean = row.get("mean_model_fitness")
        if not _number(mean) or not low <= mean <= high:
            refuse(
                f"epoch {index}: mean_model_fitness {mean!r} is not a finite {cfg.evaluation.fitness} value in "
                f"[{low}, {high}]"
            )
        fitness = row.get("fitness")
        if index == 0:
            new_best, rolled_back = True, False
            if fitness:
                refuse("epoch 0 (the base model) records member fitness values")
        else:
            if not isinstance(fitness, list) or len(fitness) != population:
                count = len(fitness) if isinstance(fitness, list) else 0
                refuse(f"epoch {index}: fitness holds {count} value(s), the population is {population}")
            finite = sum(_number(f) and low <= f <= high for f in fitness)
            if finite != population:
                refuse(
                    f"epoch {index}: fitness holds {finite} finite {cfg.evaluation.fitness} value(s) in "
                    f"[{low}, {high}] of {population}"
                )
            new_best, rolled_back = mean > best_fitness, False
        if new_best:
            best_fitness, best_epoch, since = mean, index, 0
        else:
            since += 1
            if patience and since >= patience:
                rolled_back, since = True, 0
        for flag, decided in (("new_best", new_best), ("rolled_back", rolled_back)):
            if row.get(flag) is not decided:
                refuse(f"epoch {index}: {flag} is {row.get(flag)!r}, its fitness gives {decided}")
    for field, value in (("best_epoch", best_epoch), ("best_fitness", best_fitness), ("epochs_since_best", since)):
        if getattr(state, field) != value:
            refuse(f"{field} is {getattr(state, field)!r}, the history gives {value!r}")
    finished = is_finished(state, cfg.evolution, cfg.run.target_fitness)
    if state.finished != finished:
        refuse(
            f"finished is {state.finished}, epoch {state.epoch} of {cfg.evolution.epochs} with target fitness "
            f"{cfg.run.target_fitness} gives {finished}"
        )
