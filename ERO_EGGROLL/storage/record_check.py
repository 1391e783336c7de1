"""A run record is checked, not trusted: every fact in it that can be recomputed is recomputed and compared.

state.json's fields are type-checked when read (checkpoints.read_state); here the history is checked against
the run's own config: one row per epoch, the population's fitness values finite and in the metric's range,
the members' mean/max/min, ERO's decision fields present in every row, the best epoch, best fitness, guard
counter, optimizer step, each row's new_best/rolled_back and `finished` recomputed from the mean model's fitness
exactly as the epoch step decides them, the per-tensor digests against the last weight digest, and then the seal
of every field (storage/record_fields.py). Resume, replay and the evaluator call `check_record` before they use
a record, so an edited one is refused, naming the field and the epoch. What only replay can recompute (the
weights of every epoch, the update's statistics, ERO's selection) is checked by run/record.rebuild.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import NoReturn

from typing_extensions import TypeIs

from ERO_EGGROLL.config import Config, EvaluationConfig, EvolutionConfig, config_from_dict
from ERO_EGGROLL.core.digest import combined_digest
from ERO_EGGROLL.core.ero_search import ERO_FIELDS, stop_score
from ERO_EGGROLL.evaluation.divergence import bad_signal_run, epoch_signs
from ERO_EGGROLL.evaluation.evaluator import fitness_range
from ERO_EGGROLL.storage.checkpoints import CheckpointError, RunState
from ERO_EGGROLL.storage.record_fields import FULL, ROW_FIELDS, SEALED, broken_seal

UNSEALED_NOTE = (
    "{where}: a run record written before records were sealed: {fields} cannot be checked here "
    "(replay --check --full recomputes the mean model's scores), nor the optimizer state against the record"
)


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
            for column, value in (
                ("member_mean", sum(fitness) / len(fitness)),
                ("member_max", max(fitness)),
                ("member_min", min(fitness)),
            ):
                if column in row and row[column] != value:
                    refuse(f"epoch {index}: {column} is {row[column]!r}, its fitness gives {value!r}")
            for column, value in epoch_signs(row, state.history[0], cfg.evaluation.fitness).items():
                if column in row and row[column] != value:
                    refuse(f"epoch {index}: {column} is {row[column]!r}, its fitness and answers give {value!r}")
            missing = [f for f in ERO_FIELDS if f not in row] if cfg.evolution.search == "ero" else []
            if missing:
                refuse(f"epoch {index}: ERO's decision field {missing[0]} is missing (evolution.search: ero)")
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
    if state.optimizer_step != state.epoch:
        refuse(f"optimizer_step is {state.optimizer_step}, epoch {state.epoch} gives {state.epoch} (one step an epoch)")
    finished = is_finished(state, cfg.evolution, cfg.run.target_fitness)
    if state.finished != finished:
        refuse(
            f"finished is {state.finished}, epoch {state.epoch} of {cfg.evolution.epochs} with target fitness "
            f"{cfg.run.target_fitness} gives {finished}"
        )
    if state.tensor_digests and combined_digest(state.tensor_digests) != state.weight_digests[-1]:
        refuse(f"epoch {state.epoch}: tensor_digests do not give weight_digests[{state.epoch}]")
    if not state.seal:
        unchecked = [name for name, (kind, _) in ROW_FIELDS.items() if kind in (FULL, SEALED)]
        print("note: " + UNSEALED_NOTE.format(where=where, fields=", ".join(unchecked)), file=sys.stderr)
        return
    broken = broken_seal(state.__dict__)
    if broken:
        refuse(broken)


@dataclass(frozen=True)
class Elite:
    """ERO's best elite: member `member` of the population evaluated in epoch `epoch` (1-based, as the history), i.e.
    the mean model of epoch `epoch` - 1 plus that member's noise, regenerated from its keys."""

    epoch: int
    member: int
    fitness: float


def stopped_elite(state: RunState, cfg: Config) -> Elite | None:
    """The elite an ERO-search run stopped on (its best elite so far reached run.target_fitness), which is then the
    run's best model; None for any other run (its best model is the best mean model). Read from a checked record."""
    last = state.history[-1] if state.history else {}
    if cfg.evolution.search != "ero" or state.epoch < 1 or stop_score("ero", last) < cfg.run.target_fitness:
        return None
    best = last["best_elite_so_far"]
    row = next((r for r in reversed(state.history[1:]) if r["elite_best"] == best), None)  # a later equal one wins
    if row is None:
        raise CheckpointError(f"best_elite_so_far {best!r} is no epoch's elite_best (edited or damaged?)")
    member = row["elites"][0]  # the elites come best first
    if row["fitness"][member] != best:
        raise CheckpointError(
            f"epoch {row['epoch']}: ERO's best elite is member {member}, whose fitness {row['fitness'][member]!r} is "
            f"not its elite_best {best!r} (edited or damaged?)"
        )
    return Elite(row["epoch"], member, best)
