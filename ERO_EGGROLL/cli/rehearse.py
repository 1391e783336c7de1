"""The rehearsal: before a long run, the run's own work done once on this device, measured beside the memory model.

    python -m ERO_EGGROLL.doctor --config configs/qwen2_5_vl_7b.yaml --rehearse
    python -m ERO_EGGROLL.cli.rehearse --config <yaml> [--set ...] [--random-layers L] [--json report.json]

It loads the model and evaluates the first batches of members exactly as the run does
(`run.population.evaluate_batch`: same strategy, members per batch, prompts, fitness, token budget), then runs
the streamed update twice on a throw-away Perturber; after each update the evolvable weights are put back from
a host copy and checked byte for byte. Nothing is written: the model folder and every run folder stay as they
were. Each phase's first call is measured (torch's CUDA peak, or VmHWM on the CPU; JAX's GPU pool beside it)
and its second call timed (the first compiles). `--random-layers L` replaces the weights by a random model with
the config's architecture and L decoder layers (the embedded model's tokenizer): a 7B-shaped rehearsal before
any download.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ERO_EGGROLL.arc.tasks import load_tasks
from ERO_EGGROLL.cli.common import command
from ERO_EGGROLL.config import EMBEDDED_MODEL_DIR, Config, load_config
from ERO_EGGROLL.core.digest import combined_digest, tensor_digests
from ERO_EGGROLL.core.errors import EggrollError
from ERO_EGGROLL.evaluation.evaluator import prepare, questions_for
from ERO_EGGROLL.io.disk import check_output
from ERO_EGGROLL.memory.check import advice_for, free_memory_bytes, workload_of
from ERO_EGGROLL.memory.measure import (
    current_rss_bytes,
    fix_mmap_threshold,
    jax_gpu_pool_bytes,
    phase_peak,
    phase_start,
)
from ERO_EGGROLL.memory.model import JAX_POOL, MemoryEstimate, estimate
from ERO_EGGROLL.model.loading import check_checkpoint_dir, load_model, load_processor, resolve_device, resolve_dtype
from ERO_EGGROLL.model.qwen import architecture_json, run_perturber
from ERO_EGGROLL.model.random_model import random_model_like
from ERO_EGGROLL.run.population import evaluate_batch, evaluate_mean_model, member_batches, members_per_batch

GIB = 2**30
MARGIN = 0.10  # a run whose measured peak leaves less than this fraction of the memory free is called tight
TOLERANCE = 0.20  # the memory model's target accuracy per phase (scripts/bench/bench_memory.py)
OVERHEAD = (
    256 * 2**20
)  # libraries' pages, JAX's compilation: what no formula of the shapes covers (tens of MiB, measured)


@dataclass(frozen=True)
class Phase:
    """One phase's bytes: what the memory model predicts and what the rehearsal measured."""

    name: str
    predicted: int
    measured: int
    component: str  # the memory model's largest part of this phase: what to change when it does not fit


@dataclass
class Rehearsal:
    """What the rehearsal found; `report()` prints it, `asdict` writes it as JSON."""

    device: str
    dtype: str
    model: str
    members_per_batch: int
    phases: list[Phase]
    capacity: int  # bytes free for the run before it loaded anything
    where: str
    seconds: dict[str, float] = field(default_factory=dict)
    projection: dict[str, float] = field(default_factory=dict)

    @property
    def measured_peak(self) -> int:
        """Resident + the larger phase (+ JAX's GPU pool), as the memory model adds them."""
        held = {p.name: p.measured for p in self.phases}
        return held["resident"] + max(held["evaluation"], held["update"]) + held.get("JAX GPU pool", 0)

    def verdict(self) -> tuple[bool, str]:
        """(fits, one line): the margin left at the measured peak, or which part to change."""
        peak, cap = self.measured_peak, self.capacity
        margin = cap - peak
        if peak <= cap * (1 - MARGIN):
            return (
                True,
                f"FITS with a margin of {margin / GIB:.2f} GiB ({margin / cap:.0%} of the {cap / GIB:.2f} GiB free "
                f"on {self.where})",
            )
        resident = next(p for p in self.phases if p.name == "resident")
        larger = max((p for p in self.phases if p.name in ("evaluation", "update")), key=lambda p: p.measured)
        culprit = (
            resident if resident.measured > cap else larger
        )  # the weights alone do not fit, or the larger phase is to shrink
        change = f"{culprit.name} takes {culprit.measured / GIB:.2f} GiB: {advice_for(culprit.component)}"
        if peak <= cap:
            return (
                True,
                f"TIGHT: {margin / GIB:.2f} GiB ({margin / cap:.0%}) left of the {cap / GIB:.2f} GiB free on "
                f"{self.where}; {change}",
            )
        return (
            False,
            f"DOES NOT FIT: the measured peak {peak / GIB:.2f} GiB exceeds the {cap / GIB:.2f} GiB free on "
            f"{self.where}; {change}",
        )

    def report(self) -> str:
        peaks = (
            "torch CUDA allocator, JAX GPU pool" if self.device.startswith("cuda") else "VmHWM growth of this process"
        )
        lines = [
            f"rehearsal on {self.device} ({self.dtype}), {self.model}, {self.members_per_batch} member(s) per "
            "generate call",
            f"peaks: {peaks}; MiB = 2**20 bytes",
            "| phase | predicted MiB | measured MiB | measured / predicted |",
            "|---|---|---|---|",
        ]
        for p in self.phases:
            ratio = f"{p.measured / p.predicted:.2f}" if p.predicted else "n/a"
            lines.append(f"| {p.name} | {p.predicted / 2**20:.0f} | {p.measured / 2**20:.0f} | {ratio} |")
        off = [p.name for p in self.phases if abs(p.measured - p.predicted) > max(TOLERANCE * p.predicted, OVERHEAD)]
        if off:
            lines.append(
                f"the memory model is off by more than {TOLERANCE:.0%} (and {OVERHEAD / 2**20:.0f} MiB) for: "
                f"{', '.join(off)} (trust the measured figure)"
            )
        s, pr = self.seconds, self.projection
        lines += [
            f"seconds per member {s['member']:.2f} (first batch {s['first_batch']:.1f} s with compilation); per update "
            f"{s['update']:.2f} (first {s['first_update']:.1f} s); mean-model evaluation {s['mean_model']:.1f} s",
            f"projected: {_duration(pr['epoch_seconds'])} per epoch (all tasks), {_duration(pr['run_seconds'])} per "
            f"run ({pr['epochs']:.0f} epochs; one process; checkpoints not counted)",
            f"VERDICT: {self.verdict()[1]}",
        ]
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    return (
        f"{seconds:.0f} s"
        if seconds < 120
        else f"{seconds / 60:.1f} min"
        if seconds < 7200
        else f"{seconds / 3600:.1f} h"
    )


def _model(cfg: Config, random_layers: int | None):
    """(model, processor, what it is): the config's checkpoint, or a random model of its architecture with fewer
    layers."""
    if random_layers is None:
        path = cfg.resolve_path(cfg.model.path)
        check_checkpoint_dir(path)
        model, processor = load_model(cfg)
        return model, processor, str(path)
    if random_layers < 1:
        raise EggrollError(f"--random-layers {random_layers}: give at least one decoder layer")
    device = resolve_device(cfg.model.device)
    arch = json.loads(architecture_json(cfg).read_text())
    tiny = cfg.resolve_path(EMBEDDED_MODEL_DIR)
    model = random_model_like(tiny, arch, random_layers, resolve_dtype(cfg.model.dtype, device), device=device)
    return (
        model,
        load_processor(tiny),
        f"random model shaped like {architecture_json(cfg)} with {random_layers} decoder layer(s)",
    )


def _restore(params: Mapping[str, torch.Tensor], saved: dict[str, torch.Tensor], digest: str) -> None:
    """Put the evolvable weights back from the host copy and prove it byte for byte."""
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    if combined_digest(tensor_digests(dict(params))) != digest:
        raise EggrollError(
            "the rehearsal could not restore the weights exactly (digest differs): do not reuse this process's model"
        )


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _predicted(est: MemoryEstimate) -> list[tuple[str, int, str]]:
    """(phase, predicted bytes, largest component) in the order the rehearsal measures them."""
    resident = {k: v for k, v in est.resident.items() if k != JAX_POOL}
    rows = [
        ("resident", sum(resident.values()), max(resident, key=lambda k: resident[k])),
        ("evaluation", est.evaluation_total, max(est.evaluation, key=lambda k: est.evaluation[k])),
        ("update", est.update_total, max(est.update, key=lambda k: est.update[k], default="update")),
    ]
    return rows + ([("JAX GPU pool", est.resident[JAX_POOL], "update")] if JAX_POOL in est.resident else [])


def rehearse(cfg: Config, random_layers: int | None = None) -> Rehearsal:
    """Run the first member batches and one update as the run would; measure, time, project, restore."""
    tasks = load_tasks(cfg.data.source, cfg.data.split, cfg.data.task_ids)
    device = resolve_device(cfg.model.device)
    capacity, where = free_memory_bytes(device.type == "cuda")
    if device.type == "cpu":
        fix_mmap_threshold()
    base = phase_start(device)
    model, processor, what = _model(cfg, random_layers)
    perturber = run_perturber(model, cfg)
    try:
        resident = (torch.cuda.memory_allocated(device) if device.type == "cuda" else current_rss_bytes()) - base
        fitness_q = prepare(questions_for(tasks, cfg, "fitness"), processor, cfg)
        test_q = (
            fitness_q
            if cfg.data.fitness_source == "test"
            else prepare(questions_for(tasks, cfg, "test"), processor, cfg)
        )
        k = members_per_batch(cfg, model, perturber, fitness_q)
        param = next(iter(perturber.params.values()))
        dtype = str(param.dtype).removeprefix("torch.")
        rows = min(cfg.evaluation.batch_size, len(fitness_q))  # fewer questions than a batch: the calls have fewer rows
        est = estimate(
            cfg,
            model.config.to_dict(),
            perturber.specs,
            workload_of(fitness_q, rows),
            dtype,
            device.type == "cuda",
            members=k,
            jax_on_device=device.type == "cuda" and jax_gpu_pool_bytes() is not None,
        )
        batches = member_batches(cfg.evolution.population_size, k)

        def evaluate(ids):
            return evaluate_batch(perturber, model, processor, fitness_q, cfg, 0, ids)

        start = phase_start(device)
        first_batch = _timed(lambda: evaluate(batches[0]))
        evaluation = phase_peak(device) - start
        batch = _timed(lambda: evaluate(batches[min(1, len(batches) - 1)]))
        mean_model = _timed(lambda: evaluate_mean_model(model, processor, fitness_q, test_q, cfg, 0))
        saved = {name: p.detach().to("cpu", copy=True) for name, p in perturber.params.items()}
        digest = combined_digest(tensor_digests(saved))
        fitness = [float((7 * i) % 5) for i in range(cfg.evolution.population_size)]  # spread: every tensor moves
        start = phase_start(device)
        first_update = _timed(lambda: perturber.update(fitness, 0))
        update = phase_peak(device) - start
        _restore(perturber.params, saved, digest)
        # this Perturber and its optimizer state are thrown away
        second = _timed(lambda: perturber.update(fitness, 0, again=True))
        _restore(perturber.params, saved, digest)
    finally:
        perturber.remove_hooks()
    measured = {
        "resident": resident,
        "evaluation": evaluation,
        "update": update,
        "JAX GPU pool": jax_gpu_pool_bytes() or 0,
    }
    phases = [Phase(name, predicted, measured[name], component) for name, predicted, component in _predicted(est)]
    updates_per_epoch = len(tasks) if cfg.evolution.mode == "per_task" else 1
    epoch = len(batches) * batch + updates_per_epoch * second + mean_model
    return Rehearsal(
        str(device),
        dtype,
        what,
        k,
        phases,
        capacity,
        where,
        seconds={
            "member": batch / len(batches[min(1, len(batches) - 1)]),
            "first_batch": first_batch,
            "update": second,
            "first_update": first_update,
            "mean_model": mean_model,
        },
        projection={
            "epochs": cfg.evolution.epochs,
            "epoch_seconds": epoch,
            "run_seconds": cfg.evolution.epochs * epoch + mean_model,
        },
    )


JSON_KIND = "ero_eggroll rehearsal"  # in every report --json writes: a later --json may replace such a file


def _earlier_report(path: Path) -> bool:
    try:
        return path.is_file() and json.loads(path.read_text()).get("kind") == JSON_KIND
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False


def write_json(result: Rehearsal, path: Path) -> None:
    fits, line = result.verdict()
    report = {"kind": JSON_KIND, **asdict(result), "measured_peak": result.measured_peak, "fits": fits, "verdict": line}
    path.write_text(json.dumps(report, indent=2))


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Rehearse a run: one batch of members and one update, measured and projected."
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument(
        "--random-layers",
        type=int,
        metavar="L",
        help="a random model of the config's architecture with L decoder layers",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.json:  # checked before minutes of work: never over the model, a run, or a file of someone else's
            protected = [cfg.resolve_path(cfg.model.path), cfg.checkpoint_path, cfg.run_dir]
            check_output(args.json, "--json", _earlier_report, protected)
        result = rehearse(cfg, args.random_layers)
    except EggrollError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.report())
    if args.json:
        write_json(result, args.json)
    return 0 if result.verdict()[0] else 1


if __name__ == "__main__":
    raise SystemExit(main())
