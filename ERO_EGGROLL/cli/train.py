"""Evolve Qwen2.5-VL on ARC-1 with EGGROLL on one GPU (or the CPU, for the embedded tiny model).

    python ERO_EGGROLL/arc_evolution_single_gpu.py --config configs/default.yaml
    python ERO_EGGROLL/arc_evolution_single_gpu.py --resume checkpoints/default [--set evolution.epochs=12]
    python ERO_EGGROLL/arc_evolution_single_gpu.py --resume checkpoints/default/epoch_0003   # back to an earlier epoch

The loop, as in the paper (run/loop.py): for each epoch, for each member in turn: perturb, evaluate,
restore; then one fused update; then evaluate the new mean model, log, checkpoint. This script reads the
config, checks what can be checked before the model loads, owns the run's folders and exports the result.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

from ERO_EGGROLL.arc.tasks import load_tasks
from ERO_EGGROLL.cli.common import add_config_arguments, command, config_of
from ERO_EGGROLL.config import EMBEDDED_MODEL_DIR, Config, config_from_dict
from ERO_EGGROLL.core.tensor_classes import ParamClass
from ERO_EGGROLL.evaluation.calibration import resolve_sigma
from ERO_EGGROLL.evaluation.evaluator import EvalResult, results_table, write_table
from ERO_EGGROLL.evaluation.prepared import prepare, questions_for
from ERO_EGGROLL.io.disk import writing
from ERO_EGGROLL.io.progress import summary
from ERO_EGGROLL.memory.check import preflight
from ERO_EGGROLL.memory.measure import measured_peak_rss_bytes
from ERO_EGGROLL.model.export import export_model
from ERO_EGGROLL.model.loading import check_checkpoint_dir, load_model
from ERO_EGGROLL.model.qwen import classify_model
from ERO_EGGROLL.run.loggers import check_available as check_loggers
from ERO_EGGROLL.run.loop import EvolutionResult, EvolutionTarget, LoadedModel, evolve
from ERO_EGGROLL.run.record import base_evolvable
from ERO_EGGROLL.run.resume import disk_bytes
from ERO_EGGROLL.run.stop_signals import RunInterrupted, StopFlag
from ERO_EGGROLL.storage.checkpoints import (
    ASIDE_PREFIX,
    EPOCH_DIR,
    CheckpointError,
    RunState,
    assign_weights,
    latest_dir,
    read_state,
    run_started,
)
from ERO_EGGROLL.storage.identity import base_weights_digest
from ERO_EGGROLL.storage.model_card import model_card
from ERO_EGGROLL.storage.run_folder import RunLock, claim_run_folders


def ensure_model(cfg: Config) -> None:
    """Build the embedded tiny model when the config points at it and it is missing."""
    path = cfg.resolve_path(cfg.model.path)
    if cfg.model.path == EMBEDDED_MODEL_DIR and not (path / "config.json").is_file():
        from ERO_EGGROLL.model.tiny import build_tiny_model

        print(f"building the embedded tiny Qwen2.5-VL into {path} (once, about two minutes on a CPU)")
        build_tiny_model(path)


def export_best_model(cfg: Config, model, target: EvolutionTarget, evolved: EvolutionResult) -> None:
    """<checkpoint folder>/best_model: the base model's folder with the best weights and a model card (export.py),
    published atomically."""

    def card(report):
        return model_card(
            cfg,
            [t.id for t in target.tasks],
            evolved.history,
            evolved.best_epoch,
            evolved.best_result,
            target.ckpt_dir,
            target.run_dir / "fitness_curve.png",
            report,
            evolved.elite,
        )

    export_model(
        model,
        cfg.resolve_path(cfg.model.path),
        target.ckpt_dir / "best_model",
        card,
        owner=str(target.ckpt_dir.resolve()),
    )


def run(cfg: Config, resume: Path | None, overwrite: bool, stop: StopFlag) -> Path:
    """Tasks first (data errors cost no model time), the memory preflight, then, holding the run's lock, the rest."""
    check_loggers(cfg.run.loggers, cfg.run_dir)
    tasks = load_tasks(cfg.data.source, cfg.data.split, cfg.data.task_ids)
    questions_for(tasks, cfg, "fitness")  # a task that cannot give its questions (train_loo, one pair) is refused here
    ensure_model(cfg)
    check_checkpoint_dir(
        cfg.resolve_path(cfg.model.path)
    )  # a run needs the weights: say where to put them before predicting memory
    if cfg.run.memory_check:
        preflight(cfg, tasks)  # before any weights are loaded: a run that cannot fit is refused here
    with contextlib.ExitStack() as locks:  # both folders: another run may share the results folder only
        for folder in dict.fromkeys([cfg.checkpoint_path.resolve(), cfg.run_dir.resolve()]):
            locks.enter_context(RunLock(folder))
        return run_locked(cfg, tasks, resume, overwrite, stop)


def run_locked(cfg: Config, tasks, resume: Path | None, overwrite: bool, stop: StopFlag) -> Path:
    """The run folders (claimed, or resumed), the model, and each evolution: only one process gets here per run."""
    run_dir, ckpt_dir = cfg.run_dir, cfg.checkpoint_path
    if resume is None:
        claim_run_folders(ckpt_dir, run_dir, move_earlier=overwrite or cfg.run.if_exists == "move_aside")
    model, processor = load_model(cfg)
    if cfg.evolution.sigma == "auto":
        cfg = calibrated_config(cfg, model, processor, tasks, resume)
    loaded = LoadedModel(model, processor, classify_model(model, cfg), base_weights_digest(cfg))
    print(
        f"{cfg.run.name}: {len(tasks)} task(s), population {cfg.evolution.population_size}, rank {cfg.evolution.rank}, "
        f"{cfg.evolution.epochs} epochs, {cfg.evolution.mode} mode, {cfg.data.input_mode} input, device "
        f"{next(model.parameters()).device}"
    )

    def resume_from(folder: Path) -> Path | None:  # an epoch_NNNN/ given to --resume, or the folder's newest checkpoint
        if resume is None:
            return None
        return resume if resume.parent.resolve() == folder.resolve() else folder

    if cfg.evolution.mode == "joint":
        target = EvolutionTarget(tasks, run_dir, ckpt_dir, resume_from(ckpt_dir))
        out = evolve(cfg, loaded, target, stop)
        best_result = out.best_result
        if cfg.run.export_best == "all":
            export_best_model(cfg, model, target, out)
    else:
        evolvable = [s.name for s in loaded.specs if s.cls is not ParamClass.FROZEN]
        answers, per_task = [], {}
        for i, task in enumerate(tasks):
            if i:  # each task starts from the base weights, read again from the model's files (no copy held in RAM)
                assign_weights(
                    model, base_evolvable(model, cfg.resolve_path(cfg.model.path), evolvable), "base weights"
                )
            target = EvolutionTarget([task], run_dir / task.id, ckpt_dir / task.id, resume_from(ckpt_dir / task.id))
            out = evolve(cfg, loaded, target, stop)
            if cfg.run.export_best == "all":
                export_best_model(cfg, model, target, out)
            result = out.best_result
            summary(
                f"task {task.id}: best epoch {out.best_epoch}, test score {result.fitness:.4f}, "
                f"cells {result.metric('cell_accuracy')[task.id]:.4f}, exact {result.metric('exact')[task.id]:.4f}"
            )
            per_task.update(result.per_task)
            answers += result.answers
        best_result = EvalResult(per_task, answers)
    with writing(run_dir / "final_table.md"):
        csv_path, md_path = write_table(results_table([t.id for t in tasks], best_result), run_dir / "final_table")
    print(f"\nbest model per task ({md_path}):\n{md_path.read_text()}")
    print(
        f"results: {run_dir}\ncheckpoints: {ckpt_dir} ({disk_bytes(ckpt_dir)} bytes on disk, best_model/ included; "
        f"run.checkpoint: {cfg.run.checkpoint}); host RAM peak {measured_peak_rss_bytes() / 2**20:.0f} MiB"
    )
    return run_dir


def calibrated_config(cfg: Config, model, processor, tasks, resume: Path | None) -> Config:
    """`evolution.sigma: auto` resolved: a resumed run's recorded number (its config's evolution.sigma, never
    measured again), or a new run's calibration on its fitness questions (all tasks', per_task mode too)."""
    if resume is not None:
        recorded = _saved_state(resume).config.get("evolution", {}).get("sigma")
        if not isinstance(recorded, (int, float)) or isinstance(recorded, bool):
            raise CheckpointError(f"{resume}: the run record holds no calibrated evolution.sigma (got {recorded!r})")
        print(f"evolution.sigma auto: the run's calibrated sigma {recorded:.6g} (recorded, not measured again)")
        return cfg.with_sigma(recorded)
    prepared = prepare(questions_for(tasks, cfg, "fitness"), processor, cfg)
    return resolve_sigma(model, processor, prepared, cfg)[0]


def _saved_state(resume: Path) -> RunState:
    """The state to read a resumed run's config from: that checkpoint, the run's newest, or (per_task) its first
    task's."""
    if (resume / "state.json").is_file():
        return read_state(resume)
    if run_started(resume):
        return read_state(latest_dir(resume)[0])  # a damaged LATEST is reported (and rebuilt) by the resume itself
    tasks = sorted(p for p in resume.iterdir() if p.is_dir() and run_started(p)) if resume.is_dir() else []
    if not tasks:
        raise CheckpointError(
            f"{resume} holds no checkpoint (no LATEST file, no epoch_NNNN/); give the run's checkpoints/<run> folder"
        )
    return read_state(latest_dir(tasks[0])[0])


def _run_folder_of(resume: Path, cfg: Config) -> Path:
    """The run's checkpoint folder that --resume names: itself, or the run (or per_task task) folder of an
    epoch_NNNN/."""
    if not EPOCH_DIR.fullmatch(resume.name):
        return resume
    if resume.parent.name.startswith(ASIDE_PREFIX):  # resuming the run's newest checkpoint instead would be silent
        raise CheckpointError(
            f"--resume {resume}: that epoch was moved aside (in {resume.parent.name}/), out of the run's line of "
            f"epochs, so it cannot be resumed in place; move it back into {resume.parent.parent} yourself (and the "
            "epochs after it aside), or --resume an epoch_NNNN/ of the run folder"
        )
    return resume.parent if resume.parent.resolve() == cfg.checkpoint_path.resolve() else resume.parent.parent


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evolve Qwen2.5-VL on ARC-1 with EGGROLL.")
    add_config_arguments(parser, required=False)
    parser.add_argument(
        "--resume",
        metavar="CHECKPOINT_DIR",
        help="continue the run saved in checkpoints/<run>, or go back to one of its epoch_NNNN/ directories",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="a run with this name exists: move it aside (renamed, kept) and start afresh",
    )
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        parser.error("--overwrite starts afresh and --resume continues; give one of them")
    resume = Path(args.resume) if args.resume else None
    try:
        with StopFlag().installed() as stop:
            if args.config:
                cfg = config_of(args)
            elif resume:
                cfg = config_from_dict(_saved_state(resume).config, f"{resume} (saved config)", args.set)
            else:
                parser.error("give --config, or --resume with a run's checkpoint folder")
            if resume and _run_folder_of(resume, cfg).resolve() != cfg.checkpoint_path.resolve():
                raise CheckpointError(f"--resume {resume} is not this config's checkpoint folder {cfg.checkpoint_path}")
            run(cfg, resume=resume, overwrite=args.overwrite, stop=stop)
    except RunInterrupted as signal_name:
        print(
            f"\nstopped by {signal_name} after the last complete checkpoint; continue with:\n"
            f"  python ERO_EGGROLL/arc_evolution_single_gpu.py --resume {cfg.checkpoint_path}",
            file=sys.stderr,
        )
        return 130
    return 0
