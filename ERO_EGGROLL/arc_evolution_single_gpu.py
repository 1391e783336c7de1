"""Evolve Qwen2.5-VL on ARC-1 with EGGROLL on one GPU (or the CPU, for the embedded tiny model).

    python ERO_EGGROLL/arc_evolution_single_gpu.py --config configs/default.yaml
    python ERO_EGGROLL/arc_evolution_single_gpu.py --resume checkpoints/default [--set evolution.epochs=12]
    python ERO_EGGROLL/arc_evolution_single_gpu.py --resume checkpoints/default/epoch_0003   # go back to an earlier epoch

The loop, as in the paper: for each epoch, for each member in turn: perturb, evaluate, restore;
then one fused update; then evaluate the new mean model, log, checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from ERO_EGGROLL.arc_evaluator import (
    EvalResult, EvaluationError, evaluate, evaluate_members, prepare, questions_for, resolved_decoding, results_table, write_table,
)
from ERO_EGGROLL.answer_likelihood import update_with_gradient_cosine
from ERO_EGGROLL.arc_task import ArcDataError, load_tasks
from ERO_EGGROLL.checkpointing import (EPOCH_DIR, LATEST, CheckpointError, RunState, assign_weights, best_weights_for, latest_dir,
                                       load_checkpoint, read_state, repair_latest, rewind, save_checkpoint)
from ERO_EGGROLL.config import EMBEDDED_MODEL_DIR, Config, ConfigError, config_from_dict, load_config
from ERO_EGGROLL.disk import WriteError, publish_dir, writing
from ERO_EGGROLL.memory import auto_members_per_batch, measured_peak_rss_bytes, peak_memory_scope, preflight, reset_peak_memory
from ERO_EGGROLL.model_loading import ModelLoadError, check_checkpoint_dir, load_model
from ERO_EGGROLL.perturbation import Perturber
from ERO_EGGROLL.qwen_param_mapper import ParamClass, ParamSpec, classify_model
from ERO_EGGROLL.run_folder import RunFolderError, RunLock, claim_run_folders
from ERO_EGGROLL.run_identity import IdentityError, base_weights_digest, check_identity, identity_of
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
    """The mean model after `epoch` updates (0: the base model): its fitness, and on the test questions (held out
    under fitness_source 'train_loo') every metric whatever the fitness: answer log-prob and the greedy answer's scores."""
    same = test_questions is fitness_questions
    result = evaluate(model, processor, fitness_questions, cfg, (MEAN_MODEL_STREAM, epoch), report=same)
    test = result if same else evaluate(model, processor, test_questions, cfg, (MEAN_MODEL_TEST_STREAM, epoch), report=True)
    return {"mean_model_fitness": result.fitness, "mean_model_test_score": test.fitness,
            "mean_model_exact": test.mean("exact"), "mean_model_cell_accuracy": test.mean("cell_accuracy"),
            "mean_model_char_similarity": test.mean("char_similarity"), "mean_model_answer_logprob": test.mean("answer_logprob"),
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


def check_evolvable(model, specs: list[ParamSpec], cfg: Config) -> None:
    """Refuse a classification that evolves nothing, or LORA on a tensor the forward strategy cannot perturb."""
    if all(s.cls is ParamClass.FROZEN for s in specs):
        raise ConfigError("params: every tensor is FROZEN (params.overrides, freeze_vision, freeze_nonlora), so nothing would "
                          "evolve; make some tensors LORA or FULL")
    if cfg.evolution.strategy == "forward":
        modules = dict(model.named_modules())
        for spec in specs:
            module = modules.get(spec.name.removesuffix(".weight"))
            if spec.cls is ParamClass.LORA and not (isinstance(module, torch.nn.Linear) and spec.name.endswith(".weight")):
                raise ConfigError(f"params.overrides makes {spec.name} LORA, but evolution.strategy 'forward' adds low-rank noise "
                                  f"only to nn.Linear weights (it belongs to a {type(module).__name__}); use strategy: inplace, "
                                  "or make it FULL or FROZEN")


def _started(ckpt_dir: Path) -> bool:
    return (ckpt_dir / LATEST).exists() or any(ckpt_dir.glob("epoch_*"))


def evolve(cfg: Config, model, processor, tasks, run_dir: Path, ckpt_dir: Path, stop: StopFlag, resume_from: Path | None,
           specs: list[ParamSpec], base_weights: str) -> dict:
    """One evolution (all tasks jointly, or one task in per_task mode). Returns the best model's test result row data.

    `resume_from`: None (a new run), the run's checkpoint folder (continue from its newest checkpoint), or one of its
    epoch_NNNN/ directories (go back there; later epochs are moved aside). Resume is exact or refused."""
    evo = cfg.evolution
    param = next(model.parameters())
    device = param.device
    perturber = Perturber(model, cfg, specs)
    fitness_q = prepare(questions_for(tasks, cfg, "fitness"), processor, cfg)
    test_q = fitness_q if cfg.data.fitness_source == "test" else prepare(questions_for(tasks, cfg, "test"), processor, cfg)
    k = members_per_batch(cfg, model, perturber, fitness_q)
    identity = identity_of(cfg, specs, device_type=device.type, dtype=param.dtype, members_per_batch=k, base_weights=base_weights)
    state, best_weights = RunState(identity=identity, config=cfg.to_dict()), None
    if resume_from is not None and (cfg.evolution.mode == "joint" or _started(ckpt_dir)):  # per_task: a task not reached yet starts afresh
        if resume_from == ckpt_dir:
            repair_latest(ckpt_dir)
        weights, optimizer_tensors, state = load_checkpoint(resume_from)
        check_identity(state.identity, identity, str(resume_from), "resume")
        if resume_from != ckpt_dir:
            rewind(ckpt_dir, resume_from)
        if evo.epochs < state.epoch:
            raise ConfigError(f"evolution.epochs {evo.epochs} is less than the {state.epoch} epochs {ckpt_dir} already ran; "
                              f"to go back, resume from {ckpt_dir}/epoch_{evo.epochs:04d}")
        state.config = cfg.to_dict()  # e.g. more epochs: later resumes and replays see the config in force
        state.finished = state.epoch == evo.epochs or state.history[-1]["mean_model_fitness"] >= cfg.run.target_fitness
        assign_weights(model, weights, str(ckpt_dir), expected=perturber.evolvable_state())
        perturber.optimizer.load_state(state.optimizer_step, optimizer_tensors)
        best_weights = best_weights_for(ckpt_dir, state)
        print(f"resumed {ckpt_dir} after epoch {state.epoch}")
    write_resolved_config(run_dir, cfg.to_dict())
    if state.finished:
        print(f"{ckpt_dir}: already finished")
    if not state.history:  # epoch 0: the base model
        start = time.perf_counter()
        row = {"epoch": 0, "decoding": resolved_decoding(cfg), "max_new_tokens_rule": cfg.evaluation.max_new_tokens_rule,
               **evaluate_mean_model(model, processor, fitness_q, test_q, cfg, 0)}
        row.update(seconds=time.perf_counter() - start, peak_memory_mb=peak_memory_mb(device), peak_memory_scope=peak_memory_scope(device),
                   new_best=True, rolled_back=False)
        state.history.append(row)
        state.best_fitness, state.best_epoch = row["mean_model_fitness"], 0
        best_weights = {k: v.detach().cpu().clone() for k, v in perturber.evolvable_state().items()}
        save_checkpoint(ckpt_dir, perturber.evolvable_state(), {}, state, keep=True, best=True)
        print(f"epoch 0 (base model): fitness {row['mean_model_fitness']:.4f}  test {row['mean_model_test_score']:.4f}  "
              f"answer log-prob {row['mean_model_answer_logprob']:.4f}")
    epochs = tqdm(range(state.epoch, evo.epochs), desc=f"{cfg.run.name} epochs", unit="epoch", initial=state.epoch, total=evo.epochs)
    for epoch in epochs:
        if state.finished:
            break
        start = time.perf_counter()
        reset_peak_memory(device)
        fitness = evaluate_population(perturber, model, processor, fitness_q, cfg, epoch, k, stop)
        stats = (update_with_gradient_cosine(perturber, model, processor, fitness, fitness_q, cfg, epoch)
                 if evo.log_gradient_cosine else perturber.update(fitness, epoch))
        row = {"epoch": epoch + 1, "fitness": fitness, "member_mean": sum(fitness) / len(fitness),
               "member_max": max(fitness), "member_min": min(fitness),
               **evaluate_mean_model(model, processor, fitness_q, test_q, cfg, epoch + 1),
               "lr": stats["lr"], "sigma_scale": stats["sigma_scale"], "update_norm": stats["update_norm"],
               "fraction_changed": stats["fraction_changed"], "lost_update_fraction": stats["lost_update_fraction"],
               **({"gradient_cosine": stats["gradient_cosine"]} if "gradient_cosine" in stats else {})}
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
                   f"cells {row['mean_model_cell_accuracy']:.4f}  answer log-prob {row['mean_model_answer_logprob']:.4f}  "
                   f"|dW| {row['update_norm']:.3g}  {row['seconds']:.1f}s"
                   + ("  (new best)" if row["new_best"] else "") + ("  (rolled back to best)" if row["rolled_back"] else ""))
        epochs.set_postfix(fitness=f"{row['mean_model_fitness']:.3f}", best=f"{state.best_fitness:.3f}")
        stop.check()
        if state.finished and state.epoch < evo.epochs:
            tqdm.write(f"target fitness {cfg.run.target_fitness} reached: stopping early")
    perturber.remove_hooks()
    rewrite_metrics(run_dir, state.history)
    plot_fitness(run_dir, state.history, f"{cfg.run.name}: {', '.join(t.id for t in tasks)}")
    assign_weights(model, best_weights, "best weights")
    best_test = evaluate(model, processor, test_q, cfg, (BEST_MODEL_STREAM,), report=True)
    return {"best_epoch": state.best_epoch, "best_result": best_test}


def export_best_model(model, processor, out_dir: Path) -> None:
    """save_pretrained of the best weights into a fresh directory, then published atomically as `out_dir`."""
    with writing(out_dir):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        with writing(staging):
            model.save_pretrained(staging)
            processor.save_pretrained(staging)
        publish_dir(staging, out_dir)
    finally:
        if staging.exists():  # only when something failed before the rename
            shutil.rmtree(staging, ignore_errors=True)


def run(cfg: Config, resume: Path | None, overwrite: bool, stop: StopFlag) -> Path:
    """Tasks first (data errors cost no model time), the memory preflight, then, holding the run's lock, the rest."""
    tasks = load_tasks(cfg.data.source, cfg.data.split, cfg.data.task_ids)
    ensure_model(cfg)
    check_checkpoint_dir(cfg.resolve_path(cfg.model.path))  # a run needs the weights: say where to put them before predicting memory
    if cfg.run.memory_check:
        preflight(cfg, tasks)  # before any weights are loaded: a run that cannot fit is refused here
    with RunLock(cfg.checkpoint_path):
        return run_locked(cfg, tasks, resume, overwrite, stop)


def run_locked(cfg: Config, tasks, resume: Path | None, overwrite: bool, stop: StopFlag) -> Path:
    """The run folders (claimed, or resumed), the model, and each evolution: only one process gets here per run."""
    run_dir, ckpt_dir = cfg.run_dir, cfg.checkpoint_path
    if resume is None:
        claim_run_folders(ckpt_dir, run_dir, move_earlier=overwrite or cfg.run.if_exists == "move_aside")
    model, processor = load_model(cfg)
    specs = classify_model(model, cfg)
    check_evolvable(model, specs, cfg)
    base_weights = base_weights_digest(cfg)
    print(f"{cfg.run.name}: {len(tasks)} task(s), population {cfg.evolution.population_size}, rank {cfg.evolution.rank}, "
          f"{cfg.evolution.epochs} epochs, {cfg.evolution.mode} mode, {cfg.data.input_mode} input, device {next(model.parameters()).device}")

    def resume_from(folder: Path) -> Path | None:  # an epoch_NNNN/ given to --resume, or the folder's newest checkpoint
        if resume is None:
            return None
        return resume if resume.parent.resolve() == folder.resolve() else folder

    if cfg.evolution.mode == "joint":
        out = evolve(cfg, model, processor, tasks, run_dir, ckpt_dir, stop, resume_from(ckpt_dir), specs, base_weights)
        best_result = out["best_result"]
        export_best_model(model, processor, ckpt_dir / "best_model")
    else:
        base = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
        answers, per_task = [], {}
        for task in tasks:
            assign_weights(model, base, "base weights")
            out = evolve(cfg, model, processor, [task], run_dir / task.id, ckpt_dir / task.id, stop, resume_from(ckpt_dir / task.id),
                         specs, base_weights)
            export_best_model(model, processor, ckpt_dir / task.id / "best_model")
            per_task.update(out["best_result"].per_task)
            answers += out["best_result"].answers
        best_result = EvalResult(per_task, answers)
    with writing(run_dir / "final_table.md"):
        csv_path, md_path = write_table(results_table([t.id for t in tasks], best_result), run_dir / "final_table")
    print(f"\nbest model per task ({md_path}):\n{md_path.read_text()}")
    print(f"results: {run_dir}\ncheckpoints: {ckpt_dir}")
    return run_dir


def _saved_state(resume: Path) -> RunState:
    """The state to read a resumed run's config from: that checkpoint, the run's newest, or (per_task) its first task's."""
    if (resume / "state.json").is_file():
        return read_state(resume)
    if _started(resume):
        return read_state(latest_dir(resume)[0])  # a damaged LATEST is reported (and rebuilt) by the resume itself
    tasks = sorted(p for p in resume.iterdir() if p.is_dir() and _started(p)) if resume.is_dir() else []
    if not tasks:
        raise CheckpointError(f"{resume} holds no checkpoint (no LATEST file, no epoch_NNNN/); give the run's checkpoints/<run> folder")
    return read_state(latest_dir(tasks[0])[0])


def _run_folder_of(resume: Path, cfg: Config) -> Path:
    """The run's checkpoint folder that --resume names: itself, or the run (or per_task task) folder of an epoch_NNNN/."""
    if not EPOCH_DIR.fullmatch(resume.name):
        return resume
    return resume.parent if resume.parent.resolve() == cfg.checkpoint_path.resolve() else resume.parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evolve Qwen2.5-VL on ARC-1 with EGGROLL.")
    parser.add_argument("--config", help="YAML config (configs/default.yaml, smoke.yaml, qwen2_5_vl_7b.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    parser.add_argument("--resume", metavar="CHECKPOINT_DIR",
                        help="continue the run saved in checkpoints/<run>, or go back to one of its epoch_NNNN/ directories")
    parser.add_argument("--overwrite", action="store_true",
                        help="a run with this name exists: move it aside (renamed, kept) and start afresh")
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        parser.error("--overwrite starts afresh and --resume continues; give one of them")
    stop = StopFlag()
    stop.install()
    resume = Path(args.resume) if args.resume else None
    try:
        if args.config:
            cfg = load_config(args.config, args.set)
        elif resume:
            cfg = config_from_dict(_saved_state(resume).config, f"{resume} (saved config)", args.set)
        else:
            parser.error("give --config, or --resume with a run's checkpoint folder")
        if resume and _run_folder_of(resume, cfg).resolve() != cfg.checkpoint_path.resolve():
            raise CheckpointError(f"--resume {resume} is not this config's checkpoint folder {cfg.checkpoint_path}")
        run(cfg, resume=resume, overwrite=args.overwrite, stop=stop)
    except RunInterrupted as signal_name:
        print(f"\nstopped by {signal_name} after the last complete checkpoint; continue with:\n"
              f"  python ERO_EGGROLL/arc_evolution_single_gpu.py --resume {cfg.checkpoint_path}", file=sys.stderr)
        return 130
    except (ConfigError, ArcDataError, ModelLoadError, CheckpointError, EvaluationError, IdentityError, WriteError,
            RunFolderError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
