"""Evolve Qwen2.5-VL on ARC-1 with EGGROLL on one GPU (or the CPU, for the embedded tiny model).

    python ERO_EGGROLL/arc_evolution_single_gpu.py --config configs/default.yaml
    python ERO_EGGROLL/arc_evolution_single_gpu.py --resume checkpoints/default

The loop, as in the paper: for each epoch, for each member in turn: perturb, evaluate, restore;
then one fused update; then evaluate the new mean model, log, checkpoint.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from ERO_EGGROLL.arc_evaluator import (
    EvalResult, EvaluationError, evaluate, evaluate_members, prepare, questions_for, resolved_decoding, results_table, write_table,
)
from ERO_EGGROLL.arc_task import ArcDataError, load_tasks
from ERO_EGGROLL.checkpointing import CheckpointError, RunState, assign_weights, load_checkpoint, save_checkpoint
from ERO_EGGROLL.config import EMBEDDED_MODEL_DIR, Config, ConfigError, config_from_dict, load_config
from ERO_EGGROLL.memory import auto_members_per_batch, measured_peak_rss_bytes, peak_memory_scope, preflight, reset_peak_memory
from ERO_EGGROLL.model_loading import ModelLoadError, load_model
from ERO_EGGROLL.perturbation import Perturber
from ERO_EGGROLL.run_logging import plot_fitness, rewrite_metrics, write_resolved_config


class RunInterrupted(Exception):
    """SIGINT/SIGTERM arrived; raised at the next safe point (never inside a checkpoint write)."""


class StopFlag:
    """Signal handlers only set this flag; the loop checks it between members and after checkpoints."""

    def __init__(self):
        self.signal_name: str | None = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def check(self) -> None:
        if self.signal_name:
            raise RunInterrupted(self.signal_name)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return measured_peak_rss_bytes() / 2**20


def ensure_model(cfg: Config) -> None:
    """Build the embedded tiny model when the config points at it and it is missing."""
    path = cfg.resolve_path(cfg.model.path)
    if cfg.model.path == EMBEDDED_MODEL_DIR and not (path / "config.json").is_file():
        from ERO_EGGROLL.tiny_model import build_tiny_model

        print(f"building the embedded tiny Qwen2.5-VL into {path} (once, about two minutes on a CPU)")
        build_tiny_model(path)


# Streams of integers that name each evaluation, so that sampled decoding is seeded per (seed, stream, question).
MEMBER_STREAM, MEAN_MODEL_STREAM, MEAN_MODEL_TEST_STREAM, BEST_MODEL_STREAM = 0, 1, 2, 3


def evaluate_mean_model(model, processor, fitness_questions, test_questions, cfg: Config, epoch: int) -> dict:
    """The mean model after `epoch` updates (0: the base model) on the fitness and the test questions."""
    result = evaluate(model, processor, fitness_questions, cfg, (MEAN_MODEL_STREAM, epoch))
    test = result if test_questions is fitness_questions else evaluate(model, processor, test_questions, cfg, (MEAN_MODEL_TEST_STREAM, epoch))
    mean = lambda per_task: sum(per_task.values()) / len(per_task)
    return {"mean_model_fitness": result.fitness, "mean_model_test_score": test.fitness,
            "mean_model_exact": mean(test.metric("exact")), "mean_model_cell_accuracy": mean(test.metric("cell_accuracy")),
            "answers": [a.text for a in test.answers]}


def members_per_batch(cfg: Config, model, perturber: Perturber, prepared) -> int:
    k = cfg.evaluation.members_per_batch
    if k == "auto":
        p = next(model.parameters())
        k = auto_members_per_batch(cfg, model.config.to_dict(), perturber.specs, prepared, p.device, str(p.dtype).removeprefix("torch."))
        print(f"evaluation.members_per_batch auto: {k} member(s) per generate call")
    return min(k, cfg.evolution.population_size)


def evaluate_population(perturber: Perturber, model, processor, prepared, cfg: Config, epoch: int, k: int, stop: StopFlag) -> list[float]:
    """Every member's fitness: one at a time (k = 1, the reference), or k members per generate call."""
    fitness: list[float] = []
    n = cfg.evolution.population_size
    bar = tqdm(total=n, desc=f"epoch {epoch + 1} members", unit="member", leave=False)
    for first in range(0, n, k):
        ids = list(range(first, min(first + k, n)))
        if len(ids) == 1:
            with perturber.member(epoch, ids[0]):
                fitness.append(evaluate(model, processor, prepared, cfg, (MEMBER_STREAM, epoch, ids[0])).fitness)
        else:  # greedy decoding only (config validation), so the stream of the first member is enough
            with perturber.members(epoch, ids):
                fitness += [r.fitness for r in evaluate_members(model, processor, prepared, cfg, len(ids), (MEMBER_STREAM, epoch, ids[0]))]
        bar.update(len(ids))
        bar.set_postfix(fitness=f"{fitness[-1]:.3f}", best=f"{max(fitness):.3f}")
        stop.check()
    bar.close()
    return fitness


def evolve(cfg: Config, model, processor, tasks, run_dir: Path, ckpt_dir: Path, stop: StopFlag, resume: bool) -> dict:
    """One evolution (all tasks jointly, or one task in per_task mode). Returns the best model's test result row data."""
    evo = cfg.evolution
    device = next(model.parameters()).device
    perturber = Perturber(model, cfg)
    fitness_q = prepare(questions_for(tasks, cfg, "fitness"), processor, cfg)
    test_q = fitness_q if cfg.data.fitness_source == "test" else prepare(questions_for(tasks, cfg, "test"), processor, cfg)
    state, best_weights = RunState(replay_hash=cfg.replay_hash(), config=cfg.to_dict()), None
    if resume and (ckpt_dir / "LATEST").is_file():
        weights, optimizer_tensors, state = load_checkpoint(ckpt_dir)
        if state.replay_hash != cfg.replay_hash():
            raise CheckpointError(f"{ckpt_dir}: the config changed something a resumed run must keep (only evolution.epochs and "
                                  "evaluation.members_per_batch may change); resume with the saved config.yaml")
        state.config = cfg.to_dict()  # e.g. more epochs: later resumes and replays see the config in force
        assign_weights(model, weights, str(ckpt_dir))
        perturber.optimizer.load_state(state.optimizer_step, optimizer_tensors)
        best_weights = load_checkpoint(ckpt_dir / "best")[0]
        print(f"resumed {ckpt_dir} after epoch {state.epoch}")
    write_resolved_config(run_dir, cfg.to_dict())
    if state.finished:
        print(f"{ckpt_dir}: already finished")
    if not state.history:  # epoch 0: the base model
        start = time.perf_counter()
        row = {"epoch": 0, "decoding": resolved_decoding(cfg), **evaluate_mean_model(model, processor, fitness_q, test_q, cfg, 0)}
        row.update(seconds=time.perf_counter() - start, peak_memory_mb=peak_memory_mb(device), peak_memory_scope=peak_memory_scope(device),
                   new_best=True, rolled_back=False)
        state.history.append(row)
        state.best_fitness, state.best_epoch = row["mean_model_fitness"], 0
        best_weights = {k: v.detach().cpu().clone() for k, v in perturber.evolvable_state().items()}
        save_checkpoint(ckpt_dir, perturber.evolvable_state(), {}, state, keep=True, best=True)
        print(f"epoch 0 (base model): fitness {row['mean_model_fitness']:.4f}  test {row['mean_model_test_score']:.4f}")
    k = members_per_batch(cfg, model, perturber, fitness_q)
    epochs = tqdm(range(state.epoch, evo.epochs), desc=f"{cfg.run.name} epochs", unit="epoch", initial=state.epoch, total=evo.epochs)
    for epoch in epochs:
        if state.finished:
            break
        start = time.perf_counter()
        reset_peak_memory(device)
        fitness = evaluate_population(perturber, model, processor, fitness_q, cfg, epoch, k, stop)
        stats = perturber.update(fitness, epoch)
        row = {"epoch": epoch + 1, "fitness": fitness, "member_mean": sum(fitness) / len(fitness),
               "member_max": max(fitness), "member_min": min(fitness),
               **evaluate_mean_model(model, processor, fitness_q, test_q, cfg, epoch + 1),
               "lr": stats["lr"], "sigma_scale": stats["sigma_scale"], "update_norm": stats["update_norm"],
               "fraction_changed": stats["fraction_changed"], "lost_update_fraction": stats["lost_update_fraction"]}
        row["new_best"] = row["mean_model_fitness"] > state.best_fitness
        row["rolled_back"] = False
        if row["new_best"]:
            state.best_fitness, state.best_epoch, state.epochs_since_best = row["mean_model_fitness"], epoch + 1, 0
            best_weights = {k: v.detach().cpu().clone() for k, v in perturber.evolvable_state().items()}
        else:
            state.epochs_since_best += 1
            if cfg.run.degeneration_patience and state.epochs_since_best >= cfg.run.degeneration_patience:
                assign_weights(model, best_weights, "best weights")  # ERO's degeneration guard
                state.epochs_since_best, row["rolled_back"] = 0, True
        row.update(seconds=time.perf_counter() - start, peak_memory_mb=peak_memory_mb(device))
        state.history.append(row)
        state.epoch, state.optimizer_step = epoch + 1, perturber.optimizer.step_count
        state.finished = state.epoch == evo.epochs or row["mean_model_fitness"] >= cfg.run.target_fitness
        keep = state.epoch % cfg.run.save_every == 0 or state.finished
        save_checkpoint(ckpt_dir, perturber.evolvable_state(), perturber.optimizer.state_tensors(), state, keep=keep, best=row["new_best"])
        rewrite_metrics(run_dir, state.history)
        tqdm.write(f"epoch {epoch + 1}/{evo.epochs}: members {row['member_mean']:.4f} [{row['member_min']:.4f}, {row['member_max']:.4f}]  "
                   f"mean model {row['mean_model_fitness']:.4f}  test {row['mean_model_test_score']:.4f}  "
                   f"cells {row['mean_model_cell_accuracy']:.4f}  |dW| {row['update_norm']:.3g}  {row['seconds']:.1f}s"
                   + ("  (new best)" if row["new_best"] else "") + ("  (rolled back to best)" if row["rolled_back"] else ""))
        epochs.set_postfix(fitness=f"{row['mean_model_fitness']:.3f}", best=f"{state.best_fitness:.3f}")
        stop.check()
        if state.finished and state.epoch < evo.epochs:
            tqdm.write(f"target fitness {cfg.run.target_fitness} reached: stopping early")
    perturber.remove_hooks()
    rewrite_metrics(run_dir, state.history)
    plot_fitness(run_dir, state.history, f"{cfg.run.name}: {', '.join(t.id for t in tasks)}")
    assign_weights(model, best_weights, "best weights")
    best_test = evaluate(model, processor, test_q, cfg, (BEST_MODEL_STREAM,))
    return {"best_epoch": state.best_epoch, "best_result": best_test}


def export_best_model(model, processor, out_dir: Path) -> None:
    """save_pretrained of the best weights, so transformers loads the evolved model directly."""
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def run(cfg: Config, resume: bool, stop: StopFlag) -> Path:
    ensure_model(cfg)
    tasks = load_tasks(cfg.data.source, cfg.data.split, cfg.data.task_ids)
    if cfg.run.memory_check:
        preflight(cfg, tasks)  # before any weights are loaded: a run that cannot fit is refused here
    model, processor = load_model(cfg)
    run_dir, ckpt_dir = cfg.run_dir, cfg.checkpoint_path
    print(f"{cfg.run.name}: {len(tasks)} task(s), population {cfg.evolution.population_size}, rank {cfg.evolution.rank}, "
          f"{cfg.evolution.epochs} epochs, {cfg.evolution.mode} mode, {cfg.data.input_mode} input, device {next(model.parameters()).device}")
    if cfg.evolution.mode == "joint":
        out = evolve(cfg, model, processor, tasks, run_dir, ckpt_dir, stop, resume)
        best_result = out["best_result"]
        export_best_model(model, processor, ckpt_dir / "best_model")
    else:
        base = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
        answers, per_task = [], {}
        for task in tasks:
            assign_weights(model, base, "base weights")
            out = evolve(cfg, model, processor, [task], run_dir / task.id, ckpt_dir / task.id, stop, resume)
            export_best_model(model, processor, ckpt_dir / task.id / "best_model")
            per_task.update(out["best_result"].per_task)
            answers += out["best_result"].answers
        best_result = EvalResult(per_task, answers)
    csv_path, md_path = write_table(results_table([t.id for t in tasks], best_result), run_dir / "final_table")
    print(f"\nbest model per task ({md_path}):\n{md_path.read_text()}")
    print(f"results: {run_dir}\ncheckpoints: {ckpt_dir}")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evolve Qwen2.5-VL on ARC-1 with EGGROLL.")
    parser.add_argument("--config", help="YAML config (configs/default.yaml, smoke.yaml, qwen2_5_vl_7b.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    parser.add_argument("--resume", metavar="CHECKPOINT_DIR", help="continue the run saved in checkpoints/<run>")
    args = parser.parse_args(argv)
    stop = StopFlag()
    stop.install()
    try:
        if args.config:
            cfg = load_config(args.config, args.set)
        elif args.resume:
            _, _, state = load_checkpoint(_first_checkpoint(Path(args.resume)))
            cfg = config_from_dict(state.config, f"{args.resume} (saved config)")
        else:
            parser.error("give --config, or --resume with a run's checkpoint folder")
        if args.resume and cfg.checkpoint_path.resolve() != Path(args.resume).resolve():
            raise CheckpointError(f"--resume {args.resume} is not this config's checkpoint folder {cfg.checkpoint_path}")
        run(cfg, resume=bool(args.resume), stop=stop)
    except RunInterrupted as signal_name:
        print(f"\nstopped by {signal_name} after the last complete checkpoint; continue with:\n"
              f"  python ERO_EGGROLL/arc_evolution_single_gpu.py --resume {cfg.checkpoint_path}", file=sys.stderr)
        return 130
    except (ConfigError, ArcDataError, ModelLoadError, CheckpointError, EvaluationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _first_checkpoint(folder: Path) -> Path:
    """A run's checkpoint folder, or (per_task mode) its first task's folder, to read the saved config from."""
    if (folder / "LATEST").is_file():
        return folder
    subfolders = sorted(p for p in folder.glob("*/LATEST"))
    if not subfolders:
        raise CheckpointError(f"{folder} holds no checkpoint (no LATEST file); give the run's checkpoints/<run> folder")
    return subfolders[0].parent


if __name__ == "__main__":
    raise SystemExit(main())
