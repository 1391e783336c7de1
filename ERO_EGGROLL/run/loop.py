"""One evolution: epoch 0 (the base model), then for each epoch the population's fitness, the epoch step, the
mean model's evaluation, metrics and a checkpoint; resume is exact or refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ERO_EGGROLL.arc.tasks import ArcTask
from ERO_EGGROLL.config import Config
from ERO_EGGROLL.core.ero_search import ERO_FIELDS
from ERO_EGGROLL.core.perturber import Perturber
from ERO_EGGROLL.core.tensor_classes import ParamSpec
from ERO_EGGROLL.evaluation.evaluator import EvalResult, evaluate, prepare, questions_for, resolved_decoding
from ERO_EGGROLL.evaluation.likelihood import update_with_gradient_cosine
from ERO_EGGROLL.io.progress import bar, summary
from ERO_EGGROLL.memory.measure import measured_peak_rss_bytes, peak_memory_scope, reset_peak_memory
from ERO_EGGROLL.model.qwen import run_perturber
from ERO_EGGROLL.run.distributed import WorkerPool
from ERO_EGGROLL.run.epoch_step import EpochStep
from ERO_EGGROLL.run.loggers import Loggers
from ERO_EGGROLL.run.population import BEST_MODEL_STREAM, evaluate_mean_model, evaluate_population, members_per_batch
from ERO_EGGROLL.run.record import ClonedBest, ReplayedBest, check_sigma, record_weights
from ERO_EGGROLL.run.resume import disk_bytes, resume
from ERO_EGGROLL.run.stop_signals import StopFlag
from ERO_EGGROLL.storage.checkpoints import RunState, run_started, save_checkpoint
from ERO_EGGROLL.storage.identity import identity_of
from ERO_EGGROLL.storage.metrics import plot_fitness, rewrite_metrics, write_resolved_config
from ERO_EGGROLL.storage.record_check import is_finished


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return measured_peak_rss_bytes() / 2**20


@dataclass
class Evolution:
    """One evolution's parts, built once: the model and its perturber, the prepared questions, the run state and its
    epoch step, and where things go. The methods are the loop's steps, in the order `evolve` calls them."""

    cfg: Config
    model: torch.nn.Module
    processor: Any
    run_dir: Path
    ckpt_dir: Path
    perturber: Perturber
    fitness_q: list
    test_q: list
    k: int
    state: RunState
    best: ClonedBest | ReplayedBest
    step: EpochStep
    loggers: Loggers  # each opens at its first row
    workers: WorkerPool | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def replay_mode(self) -> bool:
        return self.cfg.run.checkpoint == "replay"

    def base_model_epoch(self) -> None:
        """Epoch 0: the base model's evaluation and the first checkpoint."""
        cfg, start = self.cfg, time.perf_counter()
        row = {
            "epoch": 0,
            "decoding": resolved_decoding(cfg),
            "max_new_tokens_rule": cfg.evaluation.max_new_tokens_rule,
            **evaluate_mean_model(self.model, self.processor, self.fitness_q, self.test_q, cfg, 0),
        }
        row.update(
            seconds=time.perf_counter() - start,
            peak_memory_mb=peak_memory_mb(self.device),
            peak_memory_scope=peak_memory_scope(self.device),
            new_best=True,
            rolled_back=False,
        )
        self.state.history.append(row)
        self.step.begin(row["mean_model_fitness"])
        if self.workers:
            row["workers"] = self.workers.advance(row, self.perturber.evolvable_state())
        record_weights(self.state, self.perturber)
        save_checkpoint(
            self.ckpt_dir,
            self.perturber.evolvable_state(),
            {},
            self.state,
            keep=True,
            best=not self.replay_mode,
            store_tensors=not self.replay_mode,
        )
        self.loggers.log(row)
        print(
            f"epoch 0 (base model): fitness {row['mean_model_fitness']:.4f}  test {row['mean_model_test_score']:.4f}  "
            f"answer log-prob {row['mean_model_answer_logprob']:.4f}"
        )

    def epoch(self, epoch: int, stop: StopFlag) -> dict:
        """Epoch `epoch` + 1: every member's fitness, the epoch step (update, best, guard), the mean model's
        evaluation."""
        cfg, evo, start = self.cfg, self.cfg.evolution, time.perf_counter()
        reset_peak_memory(self.device)
        fitness = (
            self.workers.evaluate(epoch, stop)
            if self.workers
            else evaluate_population(
                self.perturber, self.model, self.processor, self.fitness_q, cfg, epoch, self.k, stop
            )
        )
        update = lambda: self.step.update(fitness, epoch)  # noqa: E731
        stats = (
            update_with_gradient_cosine(update, self.perturber, self.model, self.processor, self.fitness_q, cfg)
            if evo.log_gradient_cosine
            else update()
        )
        row = {
            "epoch": epoch + 1,
            "fitness": fitness,
            "member_mean": sum(fitness) / len(fitness),
            "member_max": max(fitness),
            "member_min": min(fitness),
            **evaluate_mean_model(self.model, self.processor, self.fitness_q, self.test_q, cfg, epoch + 1),
            **{key: stats[key] for key in UPDATE_FIELDS},
            **({key: stats[key] for key in ERO_FIELDS} if evo.search == "ero" else {}),
            **({"gradient_cosine": stats["gradient_cosine"]} if "gradient_cosine" in stats else {}),
        }
        decision = self.step.conclude(epoch + 1, row["mean_model_fitness"])
        row.update(
            new_best=decision.new_best,
            rolled_back=decision.rolled_back,
            seconds=time.perf_counter() - start,
            peak_memory_mb=peak_memory_mb(self.device),
        )
        self.state.history.append(row)
        if self.workers:  # every worker applies the same step and must then hold the driver's weights bit for bit
            row.update(
                workers=self.workers.advance(row, self.perturber.evolvable_state()), seconds=time.perf_counter() - start
            )
        self.state.finished = is_finished(self.state, evo, cfg.run.target_fitness)
        return row

    def save(self, row: dict) -> Path:
        """The epoch's record (and, when due, its tensors), metrics and loggers; returns the checkpoint folder."""
        cfg, state = self.cfg, self.state
        record_weights(state, self.perturber)
        snapshot = not self.replay_mode or (cfg.run.snapshot_every and state.epoch % cfg.run.snapshot_every == 0)
        keep = state.epoch % cfg.run.save_every == 0 or state.finished or bool(snapshot)
        saved = save_checkpoint(
            self.ckpt_dir,
            self.perturber.evolvable_state(),
            self.perturber.optimizer.state_tensors(),
            state,
            keep=keep,
            best=row["new_best"] and not self.replay_mode,
            store_tensors=bool(snapshot),
        )
        rewrite_metrics(self.run_dir, state.history)
        self.loggers.log(row)
        return saved

    def close(self) -> None:
        """Hooks, Ray workers and loggers are released however the loop ends (a signal, an error)."""
        self.perturber.remove_hooks()
        if self.workers:
            self.workers.close()
        self.loggers.close()


UPDATE_FIELDS = ("lr", "sigma_scale", "update_norm", "fraction_changed", "lost_update_fraction")


def epoch_line(row: dict, epochs: int, saved: Path) -> str:
    """The one line a finished epoch prints."""
    return (
        f"epoch {row['epoch']}/{epochs}: members {row['member_mean']:.4f} [{row['member_min']:.4f}, "
        f"{row['member_max']:.4f}]  mean model {row['mean_model_fitness']:.4f}  test "
        f"{row['mean_model_test_score']:.4f}  cells {row['mean_model_cell_accuracy']:.4f}  answer log-prob "
        f"{row['mean_model_answer_logprob']:.4f}  |direction| {row['update_norm']:.3g}  {row['seconds']:.1f}s  "
        f"checkpoint {disk_bytes(saved)} B  host peak {measured_peak_rss_bytes() / 2**20:.0f} MiB"
        + ("  (new best)" if row["new_best"] else "")
        + ("  (rolled back to best)" if row["rolled_back"] else "")
    )


@dataclass(frozen=True)
class LoadedModel:
    """The model a run evolves, loaded once: weights, processor, tensor classes and the base weights' digest."""

    model: torch.nn.Module
    processor: Any
    specs: list[ParamSpec]
    base_weights: str  # storage/identity.base_weights_digest


@dataclass(frozen=True)
class EvolutionTarget:
    """What one evolution works on (all tasks jointly, or one task in per_task mode), and where it writes."""

    tasks: list[ArcTask]
    run_dir: Path
    ckpt_dir: Path
    resume_from: Path | None  # None, the run's checkpoint folder, or one of its epoch_NNNN/ directories


@dataclass(frozen=True)
class EvolutionResult:
    """How an evolution ended: its best epoch, that model's test evaluation, and the run's history."""

    best_epoch: int
    best_result: EvalResult
    history: list[dict]


def prepare_evolution(cfg: Config, loaded: LoadedModel, target: EvolutionTarget) -> Evolution:
    """The perturber, the questions, the run's identity and state (new, or resumed exactly), and its epoch step."""
    model, processor, specs, tasks = loaded.model, loaded.processor, loaded.specs, target.tasks
    run_dir, ckpt_dir, resume_from = target.run_dir, target.ckpt_dir, target.resume_from
    param = next(model.parameters())
    perturber = run_perturber(model, cfg, specs)
    fitness_q = prepare(questions_for(tasks, cfg, "fitness"), processor, cfg)
    test_q = (
        fitness_q if cfg.data.fitness_source == "test" else prepare(questions_for(tasks, cfg, "test"), processor, cfg)
    )
    k = members_per_batch(cfg, model, perturber, fitness_q)
    identity = identity_of(
        cfg,
        specs,
        device_type=param.device.type,
        dtype=param.dtype,
        members_per_batch=k,
        base_weights=loaded.base_weights,
    )
    state = RunState(identity=identity, config=cfg.to_dict())
    replay_mode = cfg.run.checkpoint == "replay"
    best = (
        ReplayedBest(cfg.resolve_path(cfg.model.path), ckpt_dir, cfg.run.degeneration_patience)
        if replay_mode
        else ClonedBest()
    )
    # per_task: a task not reached yet starts afresh
    if resume_from is not None and (cfg.evolution.mode == "joint" or run_started(ckpt_dir)):
        state = resume(cfg, perturber, identity, ckpt_dir, resume_from, best)
    check_sigma(perturber, state, str(ckpt_dir))
    step = EpochStep(perturber, state, cfg.run.degeneration_patience, best)
    name = cfg.run.name if run_dir == cfg.run_dir else f"{cfg.run.name}/{run_dir.name}"
    loggers = Loggers(cfg.run.loggers, run_dir, cfg.to_dict(), name)
    return Evolution(
        cfg, model, processor, run_dir, ckpt_dir, perturber, fitness_q, test_q, k, state, best, step, loggers
    )


def evolve(cfg: Config, loaded: LoadedModel, target: EvolutionTarget, stop: StopFlag) -> EvolutionResult:
    """One evolution (all tasks jointly, or one task in per_task mode), and its best model's test evaluation.

    `target.resume_from`: None (a new run), the run's checkpoint folder (continue from its newest checkpoint), or one
    of its epoch_NNNN/ directories (go back there; later epochs are moved aside). Resume is exact or refused."""
    run = prepare_evolution(cfg, loaded, target)
    state, epochs, tasks = run.state, cfg.evolution.epochs, target.tasks
    ckpt_dir, run_dir = target.ckpt_dir, target.run_dir
    try:
        if cfg.distributed.workers > 1 and not state.finished:  # Ray actors evaluate the members (distributed.py)
            run.workers = WorkerPool(
                cfg, [t.id for t in tasks], run.k, state.identity, state.history, run.perturber.evolvable_state()
            )
        write_resolved_config(run_dir, cfg.to_dict())
        if state.finished:
            print(f"{ckpt_dir}: already finished")
        if not state.history:
            run.base_model_epoch()
        progress = bar(
            range(state.epoch, epochs), desc=f"{cfg.run.name} epochs", unit="epoch", initial=state.epoch, total=epochs
        )
        for epoch in progress:
            if state.finished:
                break
            row = run.epoch(epoch, stop)
            summary(epoch_line(row, epochs, run.save(row)))
            progress.set_postfix(fitness=f"{row['mean_model_fitness']:.3f}", best=f"{state.best_fitness:.3f}")
            stop.check()
            if state.finished and state.epoch < epochs:
                summary(f"target fitness {cfg.run.target_fitness} reached: stopping early")
    finally:
        run.close()
    rewrite_metrics(run_dir, state.history)
    plot_fitness(run_dir, state.history, f"{cfg.run.name}: {', '.join(t.id for t in tasks)}")
    run.best.restore(run.perturber, state)  # the best epoch's weights, for the final evaluation and the export
    best_test = evaluate(loaded.model, loaded.processor, run.test_q, cfg, (BEST_MODEL_STREAM,), report=True)
    return EvolutionResult(state.best_epoch, best_test, state.history)
