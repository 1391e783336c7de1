"""Rebuild a run's evolved weights from the base model, its config and its fitness history.

All noise is regenerated from keys, so a run's whole history is a few kilobytes:

    python -m ERO_EGGROLL.replay checkpoints/<run> [--check]

`--check` compares the rebuilt tensors with the checkpoint bit for bit (a run record without tensors,
`run.checkpoint: replay`: with its digest), after the replay has compared every epoch's weights, update
statistics and decisions with the record; `--check --full` also evaluates every epoch's mean model again
and compares its recorded scores. `--export DIR` writes the best model (the best epoch's, or the elite an
ERO-search run stopped on) as the standard exported folder, made on demand from the base model and the record.
`--export-adapter DIR [--rank K]` writes the best epoch's change from the base model as a PEFT LoRA adapter
(io/adapter.py: rank K, or the rank that keeps 99% of each change's energy), printing each tensor's truncation
error and the adapter's fitness beside the full change's.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ERO_EGGROLL.arc.tasks import ERO_TASK_IDS, load_tasks
from ERO_EGGROLL.cli.common import command
from ERO_EGGROLL.config import Config, config_from_dict
from ERO_EGGROLL.core.digest import tensor_digests
from ERO_EGGROLL.core.perturber import Perturber
from ERO_EGGROLL.evaluation.evaluator import evaluate
from ERO_EGGROLL.evaluation.prepared import prepare, questions_for
from ERO_EGGROLL.io.adapter import earlier_adapter, export_lora_adapter
from ERO_EGGROLL.io.disk import NOTHING_ELSE_CHANGED, OutputError, check_output, write_files
from ERO_EGGROLL.model.export import earlier_export, export_model, export_owner
from ERO_EGGROLL.model.loading import load_model
from ERO_EGGROLL.model.qwen import classify_model, run_perturber
from ERO_EGGROLL.run.population import evaluate_mean_model
from ERO_EGGROLL.run.record import ReplayedBest, check_sigma, elite_into, rebuild
from ERO_EGGROLL.storage.checkpoints import EPOCH_DIR, CheckpointError, RunState, load_checkpoint
from ERO_EGGROLL.storage.identity import base_weights_digest, check_identity, identity_of
from ERO_EGGROLL.storage.model_card import model_card
from ERO_EGGROLL.storage.record_check import check_record, stopped_elite


def replay_weights(
    perturber: Perturber,
    state: RunState,
    base_dir: Path,
    upto: int,
    patience: int,
    evaluated: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Set the weights to those after epoch `upto`, replayed from the base weights through the training's own epoch step
    (run/record.rebuild; never from a snapshot, so that --check proves the replay); return the evolvable tensors.

    The step's decisions (new best, degeneration-guard rollback) are recomputed from the recorded mean-model
    fitness and must equal the recorded ones, and the rebuilt weights must match the record's digest."""
    rebuild(perturber, state, upto, ReplayedBest(base_dir, None, patience), evaluated)
    return {k: v.detach().clone() for k, v in perturber.evolvable_state().items()}


SCORES = (
    "mean_model_fitness",
    "mean_model_test_score",
    "mean_model_exact",
    "mean_model_cell_accuracy",
    "mean_model_char_similarity",
    "mean_model_answer_logprob",
    "answers",
)  # what run/population.evaluate_mean_model gives a metrics row


def run_folder(given: Path) -> Path:
    """The run (or per_task task) folder of a checkpoint argument: itself, or the folder of an epoch_NNNN/."""
    return given.parent if EPOCH_DIR.fullmatch(given.name) else given


def scores_compared(model, processor, cfg: Config, state: RunState, folder: Path) -> Callable[[int], None]:
    """replay --check --full: a callback that evaluates a replayed epoch's mean model on the questions the record's
    config names (in per_task mode, the task its folder is named after) and refuses a score that differs."""
    tasks = load_tasks(cfg.data.source, cfg.data.split, cfg.data.task_ids)
    if cfg.evolution.mode == "per_task":
        tasks = [t for t in tasks if t.id == folder.name]
        if not tasks:
            raise CheckpointError(
                f"{folder}: --full needs the task of a per_task run: give its checkpoints/<run>/<task> folder"
            )
    fitness_q = prepare(questions_for(tasks, cfg, "fitness"), processor, cfg)
    test_q = (
        fitness_q if cfg.data.fitness_source == "test" else prepare(questions_for(tasks, cfg, "test"), processor, cfg)
    )

    def compare(epoch: int) -> None:
        row = state.history[epoch]
        again = evaluate_mean_model(model, processor, fitness_q, test_q, cfg, epoch)
        for name in SCORES:
            if row.get(name) != again[name]:
                raise CheckpointError(
                    f"epoch {epoch}: {name} is {row.get(name)!r:.60}, the mean model scores {again[name]!r:.60} "
                    "when evaluated again (edited, or another model, library or hardware?)"
                )

    return compare


def run_fitness(cfg: Config, processor) -> Callable[[nn.Module], float]:
    """The run's own fitness of a model (the questions the search scored members on), for the adapter's report."""
    tasks = load_tasks(cfg.data.source, cfg.data.split, cfg.data.task_ids)
    prepared = prepare(questions_for(tasks, cfg, "fitness"), processor, cfg)
    return lambda model: evaluate(model, processor, prepared, cfg).fitness


def card_task_ids(task_ids: str | list[str]) -> list[str]:
    """The run's tasks as its config names them (no data is read): a list, ERO's 15, or [] for the whole split."""
    if isinstance(task_ids, list):
        return task_ids
    return list(ERO_TASK_IDS) if task_ids == "ero" else []


OUT_KIND = "replay tensors"  # in the safetensors metadata of --out: a later --out may replace the file


def earlier_out(path: Path) -> bool:
    """Whether `path` is a tensors file that replay --out wrote."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file() or path.is_symlink():
        return False
    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("ero_eggroll_output") == OUT_KIND
    except (SafetensorError, OSError):
        return False


def save_out(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The rebuilt tensors, marked as replay's, written beside `path` and renamed over it (never half a file)."""
    from safetensors.torch import save_file

    cpu = {k: v.cpu().contiguous() for k, v in tensors.items()}
    write_files({path: lambda staging: save_file(cpu, staging, metadata={"ero_eggroll_output": OUT_KIND})})


def check_other_run(export: Path, run_folder: Path, replace_other_run: bool) -> None:
    """An export (or a run's best_model/) made for another run, or marked before marks named their run, is replaced
    only with --replace-other-run."""
    owner = export_owner(export)
    if owner is None or owner == str(run_folder) or replace_other_run:
        return
    made_for = f"run {owner}" if owner else "a run it does not name (marked by an older version)"
    raise OutputError(
        f"--export {export} holds the exported model of {made_for}, not of {run_folder}; give a new path, or pass "
        "--replace-other-run to replace it (the earlier one is kept aside)"
    )


def check_apart(export: Path, out: Path) -> None:
    """--export and --out at one path (or one inside the other) would overwrite each other."""
    a, b = export.resolve(), out.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise OutputError(f"--export {export} and --out {out} are one path or one inside the other; give two apart")


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Rebuild a run's evolved weights from base model + config + fitness history."
    )
    parser.add_argument("checkpoint", help="a run's checkpoint folder (checkpoints/<run>) or an epoch_NNNN/ directory")
    parser.add_argument("--check", action="store_true", help="compare with the checkpoint's tensors bit for bit")
    parser.add_argument(
        "--full",
        action="store_true",
        help="with --check: also evaluate every epoch's mean model again and compare its recorded scores",
    )
    parser.add_argument("--out", help="write the rebuilt tensors to this safetensors file")
    parser.add_argument(
        "--export", metavar="DIR", help="write the best epoch's model as the standard exported folder (export.py)"
    )
    parser.add_argument(
        "--replace-other-run",
        action="store_true",
        help="--export may replace an export (or best_model/) of another run; the earlier one is kept aside",
    )
    parser.add_argument(
        "--export-adapter",
        metavar="DIR",
        help="write the best epoch's change from the base model as a PEFT LoRA adapter (truncated SVD)",
    )
    parser.add_argument(
        "--rank", type=int, help="--export-adapter's rank per tensor (default: keep 99%% of each change's energy)"
    )
    args = parser.parse_args(argv)
    if args.full and not args.check:
        parser.error("--full adds to --check: give --check --full")
    saved, _, state = load_checkpoint(Path(args.checkpoint))
    check_record(state, args.checkpoint)  # the best epoch and the history as checked, never as written
    cfg = config_from_dict(state.config, f"{args.checkpoint} (saved config)")
    given = Path(args.checkpoint).resolve()
    protected = [given, cfg.resolve_path(cfg.model.path), cfg.checkpoint_path, cfg.run_dir]
    protected += [given.parent] if EPOCH_DIR.fullmatch(given.name) else []
    folder = run_folder(given)
    if args.export is not None:
        check_other_run(Path(args.export), folder, args.replace_other_run)
        check_output(args.export, "--export", earlier_export, protected)
    if args.out is not None:
        check_output(args.out, "--out", earlier_out, protected)
    if args.export is not None and args.out is not None:
        check_apart(Path(args.export), Path(args.out))
    if args.export_adapter is not None:
        check_output(
            args.export_adapter, "--export-adapter", lambda path: earlier_adapter(path, str(folder)), protected
        )
    model, processor = load_model(cfg)
    param = next(model.parameters())
    # replay evaluates nothing, so the run's own members_per_batch stands
    current = identity_of(
        cfg,
        classify_model(model, cfg),
        device_type=param.device.type,
        dtype=param.dtype,
        members_per_batch=state.identity.get("evaluation.members_per_batch", 1),
        base_weights=base_weights_digest(cfg),
    )
    check_identity(state.identity, current, args.checkpoint, "replay")
    base_dir = cfg.resolve_path(cfg.model.path)
    perturber = run_perturber(model, cfg)  # sigma from the base weights: the model is the base model here
    check_sigma(perturber, state, args.checkpoint)
    base = {n: p.detach().clone() for n, p in perturber.params.items()} if args.export_adapter else {}
    evaluated = scores_compared(model, processor, cfg, state, folder) if args.full else None
    rebuilt = replay_weights(perturber, state, base_dir, state.epoch, cfg.run.degeneration_patience, evaluated)
    different = [n for n, d in tensor_digests(rebuilt).items() if state.tensor_digests.get(n, d) != d]
    if different:
        raise CheckpointError(
            f"{args.checkpoint}: epoch {state.epoch}: tensor_digests of {different[0]} is not the digest of its "
            "rebuilt weights (edited?)"
        )
    elite = stopped_elite(state, cfg)
    best = f"ERO's best elite (member {elite.member} of epoch {elite.epoch})" if elite else f"epoch {state.best_epoch}"
    if (args.export or args.export_adapter) and elite is not None:
        elite_into(perturber, state, elite, base_dir, cfg.run.degeneration_patience)
    elif (args.export or args.export_adapter) and state.best_epoch != state.epoch:
        replay_weights(perturber, state, base_dir, state.best_epoch, cfg.run.degeneration_patience)
    if args.export:
        export_model(
            model,
            base_dir,
            Path(args.export),
            lambda report: model_card(
                cfg,
                card_task_ids(cfg.data.task_ids),
                state.history,
                state.best_epoch,
                None,
                Path(args.checkpoint),
                None,
                report,
                elite,
            ),
            owner=str(folder),
            then=NOTHING_ELSE_CHANGED,
        )
        print(f"exported {best} (the best) to {args.export}")
    if args.export_adapter:
        report = export_lora_adapter(
            model,
            base,
            perturber.classes,
            Path(args.export_adapter),
            rank=args.rank,
            fitness=run_fitness(cfg, processor),
            base_name=str(base_dir),
            protected=protected,
            what="--export-adapter",
            owner=str(folder),
        )
        print("\n".join(report.lines()))
        print(f"exported the change of {best} (the best) as a LoRA adapter to {args.export_adapter}")
    updates = sum(1 for r in state.history if r.get("fitness"))
    print(f"replayed {updates} update(s) of {cfg.run.name} from {len(rebuilt)} evolvable tensors")
    if args.out:
        save_out(rebuilt, Path(args.out))
        print(f"wrote {args.out}")
    if args.full:
        print(f"every epoch's mean model scored again as recorded ({len(state.history)} evaluations)")
    if args.check and not saved:  # a run record: the rebuilt weights matched its digest (run/record.rebuild checked it)
        print(f"bit-identical to the run record's digest of epoch {state.epoch}")
    elif args.check:
        different = [n for n in saved if not torch.equal(saved[n], rebuilt[n].cpu())]
        if different:
            print(f"MISMATCH in {len(different)} tensor(s), e.g. {different[:3]}")
            return 1
        print("bit-identical to the checkpoint")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
