"""One evolution: epoch 0 (the base model), then for each epoch the population's fitness, the epoch step, the
mean model's evaluation, metrics and a checkpoint; resume is exact or refused.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ERO_EGGROLL.config import Config
from ERO_EGGROLL.core.ero_search import ERO_FIELDS
from ERO_EGGROLL.core.tensor_classes import ParamSpec
from ERO_EGGROLL.evaluation.evaluator import evaluate, prepare, questions_for, resolved_decoding
from ERO_EGGROLL.evaluation.likelihood import update_with_gradient_cosine
from ERO_EGGROLL.io.progress import bar, summary
from ERO_EGGROLL.memory.measure import measured_peak_rss_bytes, peak_memory_scope, reset_peak_memory
from ERO_EGGROLL.model.qwen import run_perturber
from ERO_EGGROLL.run.distributed import WorkerPool
from ERO_EGGROLL.run.epoch_step import EpochStep, stop_score
from ERO_EGGROLL.run.loggers import Loggers
from ERO_EGGROLL.run.population import BEST_MODEL_STREAM, evaluate_mean_model, evaluate_population, members_per_batch
from ERO_EGGROLL.run.record import ClonedBest, ReplayedBest, check_sigma, record_weights
from ERO_EGGROLL.run.resume import disk_bytes, resume
from ERO_EGGROLL.run.stop_signals import StopFlag
from ERO_EGGROLL.storage.checkpoints import RunState, run_started, save_checkpoint
from ERO_EGGROLL.storage.identity import identity_of
from ERO_EGGROLL.storage.metrics import plot_fitness, rewrite_metrics, write_resolved_config


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return measured_peak_rss_bytes() / 2**20


def evolve(cfg: Config, model, processor, tasks, run_dir: Path, ckpt_dir: Path, stop: StopFlag, resume_from: Path | None,
           specs: list[ParamSpec], base_weights: str) -> dict:
    """One evolution (all tasks jointly, or one task in per_task mode). Returns the best model's test result row data.

    `resume_from`: None (a new run), the run's checkpoint folder (continue from its newest checkpoint), or one of its
    epoch_NNNN/ directories (go back there; later epochs are moved aside). Resume is exact or refused."""
    evo = cfg.evolution
    param = next(model.parameters())
    device = param.device
    perturber = run_perturber(model, cfg, specs)
    fitness_q = prepare(questions_for(tasks, cfg, "fitness"), processor, cfg)
    test_q = fitness_q if cfg.data.fitness_source == "test" else prepare(questions_for(tasks, cfg, "test"), processor, cfg)
    k = members_per_batch(cfg, model, perturber, fitness_q)
    identity = identity_of(cfg, specs, device_type=device.type, dtype=param.dtype, members_per_batch=k, base_weights=base_weights)
    state = RunState(identity=identity, config=cfg.to_dict())
    replay_mode = cfg.run.checkpoint == "replay"
    best = ReplayedBest(cfg.resolve_path(cfg.model.path), ckpt_dir, cfg.run.degeneration_patience) if replay_mode else ClonedBest()
    if resume_from is not None and (cfg.evolution.mode == "joint" or run_started(ckpt_dir)):  # per_task: a task not reached yet starts afresh
        state = resume(cfg, perturber, identity, ckpt_dir, resume_from, best)
    check_sigma(perturber, state, str(ckpt_dir))
    step = EpochStep(perturber, state, cfg.run.degeneration_patience, best)
    workers = loggers = None
    try:  # hooks, Ray workers and loggers are released however the loop ends (a signal, an error)
        if cfg.distributed.workers > 1 and not state.finished:  # Ray actors evaluate the members (distributed.py)
            workers = WorkerPool(cfg, [t.id for t in tasks], k, identity, state.history, perturber.evolvable_state())
        write_resolved_config(run_dir, cfg.to_dict())
        loggers = Loggers(cfg.run.loggers, run_dir, cfg.to_dict(), cfg.run.name if run_dir == cfg.run_dir else f"{cfg.run.name}/{run_dir.name}")
        if state.finished:
            print(f"{ckpt_dir}: already finished")
        if not state.history:  # epoch 0: the base model
            start = time.perf_counter()
            row = {"epoch": 0, "decoding": resolved_decoding(cfg), "max_new_tokens_rule": cfg.evaluation.max_new_tokens_rule,
                   **evaluate_mean_model(model, processor, fitness_q, test_q, cfg, 0)}
            row.update(seconds=time.perf_counter() - start, peak_memory_mb=peak_memory_mb(device), peak_memory_scope=peak_memory_scope(device),
                       new_best=True, rolled_back=False)
            state.history.append(row)
            step.begin(row["mean_model_fitness"])
            if workers:
                row["workers"] = workers.advance(row, perturber.evolvable_state())
            record_weights(state, perturber)
            save_checkpoint(ckpt_dir, perturber.evolvable_state(), {}, state, keep=True, best=not replay_mode, store_tensors=not replay_mode)
            loggers.log(row)
            print(f"epoch 0 (base model): fitness {row['mean_model_fitness']:.4f}  test {row['mean_model_test_score']:.4f}  "
                  f"answer log-prob {row['mean_model_answer_logprob']:.4f}")
        epochs = bar(range(state.epoch, evo.epochs), desc=f"{cfg.run.name} epochs", unit="epoch", initial=state.epoch, total=evo.epochs)
        for epoch in epochs:
            if state.finished:
                break
            start = time.perf_counter()
            reset_peak_memory(device)
            fitness = workers.evaluate(epoch, stop) if workers else evaluate_population(perturber, model, processor, fitness_q, cfg, epoch, k, stop)
            stats = (update_with_gradient_cosine(lambda: step.update(fitness, epoch), perturber, model, processor, fitness_q, cfg)
                     if evo.log_gradient_cosine else step.update(fitness, epoch))
            row = {"epoch": epoch + 1, "fitness": fitness, "member_mean": sum(fitness) / len(fitness),
                   "member_max": max(fitness), "member_min": min(fitness),
                   **evaluate_mean_model(model, processor, fitness_q, test_q, cfg, epoch + 1),
                   "lr": stats["lr"], "sigma_scale": stats["sigma_scale"], "update_norm": stats["update_norm"],
                   "fraction_changed": stats["fraction_changed"], "lost_update_fraction": stats["lost_update_fraction"],
                   **({k: stats[k] for k in ERO_FIELDS} if evo.search == "ero" else {}),
                   **({"gradient_cosine": stats["gradient_cosine"]} if "gradient_cosine" in stats else {})}
            decision = step.conclude(epoch + 1, row["mean_model_fitness"])
            row.update(new_best=decision.new_best, rolled_back=decision.rolled_back, seconds=time.perf_counter() - start,
                       peak_memory_mb=peak_memory_mb(device))
            state.history.append(row)
            if workers:  # every worker applies the same step and must then hold the driver's weights bit for bit
                row.update(workers=workers.advance(row, perturber.evolvable_state()), seconds=time.perf_counter() - start)
            reached = stop_score(evo.search, stats, row["mean_model_fitness"]) >= cfg.run.target_fitness
            state.finished = state.epoch == evo.epochs or reached
            record_weights(state, perturber)
            snapshot = not replay_mode or (cfg.run.snapshot_every and state.epoch % cfg.run.snapshot_every == 0)
            keep = state.epoch % cfg.run.save_every == 0 or state.finished or bool(snapshot)
            saved = save_checkpoint(ckpt_dir, perturber.evolvable_state(), perturber.optimizer.state_tensors(), state, keep=keep,
                                    best=row["new_best"] and not replay_mode, store_tensors=bool(snapshot))
            rewrite_metrics(run_dir, state.history)
            loggers.log(row)
            summary(f"epoch {epoch + 1}/{evo.epochs}: members {row['member_mean']:.4f} [{row['member_min']:.4f}, {row['member_max']:.4f}]  "
                    f"mean model {row['mean_model_fitness']:.4f}  test {row['mean_model_test_score']:.4f}  "
                    f"cells {row['mean_model_cell_accuracy']:.4f}  answer log-prob {row['mean_model_answer_logprob']:.4f}  "
                    f"|direction| {row['update_norm']:.3g}  {row['seconds']:.1f}s  "
                    f"checkpoint {disk_bytes(saved)} B  host peak {measured_peak_rss_bytes() / 2**20:.0f} MiB"
                    + ("  (new best)" if row["new_best"] else "") + ("  (rolled back to best)" if row["rolled_back"] else ""))
            epochs.set_postfix(fitness=f"{row['mean_model_fitness']:.3f}", best=f"{state.best_fitness:.3f}")
            stop.check()
            if state.finished and state.epoch < evo.epochs:
                summary(f"target fitness {cfg.run.target_fitness} reached: stopping early")
    finally:
        perturber.remove_hooks()
        if workers:
            workers.close()
        if loggers:
            loggers.close()
    rewrite_metrics(run_dir, state.history)
    plot_fitness(run_dir, state.history, f"{cfg.run.name}: {', '.join(t.id for t in tasks)}")
    best.restore(perturber, state)  # the best epoch's weights, for the final evaluation and the export
    best_test = evaluate(model, processor, test_q, cfg, (BEST_MODEL_STREAM,), report=True)
    return {"best_epoch": state.best_epoch, "best_result": best_test, "history": state.history}
