"""ERO's table in miniature: EGGROLL and ERO's search on ERO's own tasks, scored by ERO's metric, on a CPU model.

The model is the small embedded Qwen2.5-VL (`python scripts/build_tiny_model.py --size small`, pretrained on ARC-1
training tasks with grids up to 16 a side). The tasks are fixed by one rule, stated before any run: ERO's 15 tasks
whose grids all fit 16 a side (11 of them). Each task is searched on its own from the base model, as ERO does, under
two protocols:
- ERO's: fitness = char similarity of the greedy answer on the task's own test output (two demonstrations);
- held out: fitness = char similarity on the leave-one-out training pairs; the test output is only scored.
Searches, at equal member evaluations: EGGROLL (ES update, low-rank noise, `evolution.sigma: auto`), and ERO's search
(configs/ero.yaml's protocol, full-rank noise) under both readings of its scale file (per-tensor std; signed mean).
Beside them: the base model, and the answer that copies the test input (much of ERO's base score is what copying
earns). The notes say why a search did not move: the members' KL from the base, the share of members whose fitness
equals the base's (the same greedy answers), and the members' fitness spread per epoch.

    python scripts/bench/ero_miniature.py --quick     (the rule's first task, 1 seed, 2 epochs of 4 members)
    python scripts/bench/ero_miniature.py             (11 tasks, 3 seeds; docs/comparisons.md's table)
        -> the tables on stdout, results/bench/ero_miniature[_quick].json
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_common import write_results  # noqa: E402
from eggroll_vs_ero import ERO, mean_sd  # noqa: E402

from ERO_EGGROLL.arc.fitness import canonical_text, cell_accuracy, char_similarity, exact  # noqa: E402
from ERO_EGGROLL.arc.tasks import ERO_TASK_IDS, ArcTask, load_tasks  # noqa: E402
from ERO_EGGROLL.config import Config, load_config  # noqa: E402
from ERO_EGGROLL.evaluation.calibration import resolve_sigma  # noqa: E402
from ERO_EGGROLL.evaluation.divergence import members_kl, reference_of  # noqa: E402
from ERO_EGGROLL.evaluation.evaluator import EvalResult, evaluate, prepare, questions_for  # noqa: E402
from ERO_EGGROLL.model.loading import load_model_from_dir  # noqa: E402
from ERO_EGGROLL.model.qwen import run_perturber  # noqa: E402
from ERO_EGGROLL.model.tiny import MODEL_DIRS, SIZES  # noqa: E402
from ERO_EGGROLL.run.population import evaluate_population, members_per_batch  # noqa: E402
from ERO_EGGROLL.run.stop_signals import StopFlag  # noqa: E402

SEARCHES: dict[str, list[str]] = {
    "EGGROLL": ["evolution.sigma=auto", "evolution.sigma_mode=relative"],
    "ERO (std reading)": [f"evolution.{k}={v}" for k, v in ERO.items()]
    + ["evolution.noise=full", "evolution.sigma_mode=relative", "evaluation.members_per_batch=1"],
    "ERO (mean reading)": [f"evolution.{k}={v}" for k, v in ERO.items()]
    + ["evolution.noise=full", "evolution.sigma_mode=signed_mean", "evaluation.members_per_batch=1"],
}
PROTOCOLS = {"ERO's (fitness on the test output)": "test", "held out (fitness on leave-one-out pairs)": "train_loo"}
KL_MEMBERS = 2  # members of epoch 0 whose KL from the base is measured, on each task's first seed


def fitting_tasks(max_side: int) -> list[ArcTask]:
    """The rule: ERO's tasks, in ERO's order, whose every grid fits `max_side` a side (the model's pretraining)."""
    return [
        t
        for t in load_tasks(ids=list(ERO_TASK_IDS))
        if all(max(len(g), len(g[0])) <= max_side for p in t.train + t.test for g in (p.input, p.output))
    ]


def bench_config(model_dir: Path, task: ArcTask, source: str, search: list[str], seed: int, args) -> Config:
    """configs/default.yaml, on one task, with a generated fitness (ERO's char similarity) and one search's settings.
    The token budget reads only the demonstrations (never the target), under both protocols alike."""
    return load_config(
        ROOT / "configs" / "default.yaml",
        [
            f"model.path={model_dir}",
            f"data.task_ids=[{task.id}]",
            f"data.fitness_source={source}",
            "evaluation.fitness=char_similarity",
            "evaluation.max_new_tokens_rule=demonstrations",
            f"evaluation.max_new_tokens_factor={args.token_factor}",
            f"evaluation.members_per_batch={args.population}",
            f"evolution.population_size={args.population}",
            f"evolution.calibration.budget_epochs={args.calibration_epochs}",
            f"seed={seed}",
            *search,
        ],
    )


def scores(result: EvalResult) -> dict[str, float]:
    return {name: result.mean(name) for name in ("char_similarity", "cell_accuracy", "exact")}


def copy_scores(task: ArcTask) -> dict[str, float]:
    """The answer that copies each test input, scored like a model's answer."""
    texts = [(canonical_text(p.input), p.answer) for p in task.test]
    return {
        name: statistics.fmean(metric(text, target) for text, target in texts)
        for name, metric in (("char_similarity", char_similarity), ("cell_accuracy", cell_accuracy), ("exact", exact))
    }


def right_size(result: EvalResult, task: ArcTask) -> float:
    """Share of the answers that parse as a grid of the target's size."""
    from ERO_EGGROLL.arc.fitness import parse_grid

    sizes = [
        ((g := parse_grid(a.text or "")) is not None and (len(g), len(g[0])) == (len(p.answer), len(p.answer[0])))
        for a, p in zip(result.answers, task.test)
    ]
    return statistics.fmean(sizes)


def search_task(model, processor, task: ArcTask, source: str, name: str, seed: int, args, model_dir: Path) -> dict:
    """One search on one task from the base model: epochs of the population, then the mean model's test answer."""
    cfg = bench_config(model_dir, task, source, SEARCHES[name], seed, args)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    fitness_q = prepare(questions_for([task], cfg, "fitness"), processor, cfg)
    test_q = prepare(questions_for([task], cfg, "test"), processor, cfg)
    cpu, wall = time.process_time(), time.perf_counter()
    calibration = None
    if cfg.evolution.sigma == "auto":
        cfg, calibration = resolve_sigma(model, processor, fitness_q, cfg)
    perturber = run_perturber(model, cfg)
    try:
        k = members_per_batch(cfg, model, perturber, fitness_q)
        base_fitness = evaluate(model, processor, fitness_q, cfg).fitness
        kl = None
        if seed == 0:
            reference = reference_of(model, processor, fitness_q, cfg)
            kl = members_kl(perturber, model, processor, fitness_q, cfg, reference, range(KL_MEMBERS), 0)
        epochs = []
        for epoch in range(args.epochs):
            fitness = evaluate_population(perturber, model, processor, fitness_q, cfg, epoch, k, StopFlag())
            epochs.append(
                {
                    "spread": statistics.pstdev(fitness),
                    "at_base": sum(f == base_fitness for f in fitness) / len(fitness),
                    "best": max(fitness),
                }
            )
            perturber.update(fitness, epoch)
        after = evaluate(model, processor, test_q, cfg, report=True)
    finally:
        perturber.remove_hooks()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base[n])
    return {
        "task": task.id,
        "protocol": source,
        "search": name,
        "seed": seed,
        "sigma": float(cfg.evolution.sigma),
        "kl": kl,
        "epochs": epochs,
        "after": scores(after),
        "after_right_size": right_size(after, task),
        "member_evaluations": args.population * args.epochs,
        "calibration_evaluations": calibration.member_evaluations if calibration else 0,
        "cpu_seconds": time.process_time() - cpu,
        "wall_seconds": time.perf_counter() - wall,
    }


def print_tables(tasks: list[ArcTask], base: dict, copy: dict, rows: list[dict], args) -> None:
    seeds = sorted({r["seed"] for r in rows})
    print(
        f"\nsmall Qwen2.5-VL ({args.model}), {len(tasks)} tasks, seeds {seeds}, {args.epochs} epochs x population "
        f"{args.population} = {args.epochs * args.population} member evaluations per task and search (EGGROLL's "
        f"sigma calibration spends its own, below); char similarity of the mean model's greedy test answer"
    )
    for protocol, source in PROTOCOLS.items():
        mine = [r for r in rows if r["protocol"] == source]
        if not mine:
            continue
        print(f"\n### {protocol}\n")
        print("| task | id | copy input | base | " + " | ".join(SEARCHES) + " |")
        print("|---|---|---|---|" + "---|" * len(SEARCHES))
        for i, t in enumerate(tasks, start=1):
            cells = []
            for name in SEARCHES:
                values = [r["after"]["char_similarity"] for r in mine if r["task"] == t.id and r["search"] == name]
                cells.append(mean_sd(values, ".4f") if values else "-")
            print(
                f"| T{i} | {t.id} | {copy[t.id]['char_similarity']:.4f} | {base[t.id]['char_similarity']:.4f} | "
                + " | ".join(cells)
                + " |"
            )
        print("\nmeans over tasks (± the spread of the seeds' means):\n")
        print("| model | char similarity | cell accuracy | exact | right size | member evals | CPU min |")
        print("|---|---|---|---|---|---|---|")
        for label, got in (("copy the input", copy), ("base model", base)):
            print(
                f"| {label} | {statistics.fmean(got[t.id]['char_similarity'] for t in tasks):.4f} | "
                f"{statistics.fmean(got[t.id]['cell_accuracy'] for t in tasks):.4f} | "
                f"{statistics.fmean(got[t.id]['exact'] for t in tasks):.4f} | "
                + (f"{statistics.fmean(base[t.id]['right_size'] for t in tasks):.2f}" if label == "base model" else "-")
                + " | - | - |"
            )
        for name in SEARCHES:
            runs = [r for r in mine if r["search"] == name]
            by_seed = [[r for r in runs if r["seed"] == s] for s in seeds]
            by_seed = [s for s in by_seed if s]

            def seed_means(key, runs_of=by_seed):
                return [statistics.fmean(r["after"][key] for r in s) for s in runs_of]

            print(
                f"| {name} | {mean_sd(seed_means('char_similarity'), '.4f')} | "
                f"{mean_sd(seed_means('cell_accuracy'), '.4f')} | {mean_sd(seed_means('exact'), '.4f')} | "
                f"{statistics.fmean(r['after_right_size'] for r in runs):.2f} | "
                f"{sum(r['member_evaluations'] for r in runs)} (+{sum(r['calibration_evaluations'] for r in runs)} "
                f"calibration) | {sum(r['cpu_seconds'] for r in runs) / 60:.1f} |"
            )
        print("\nwhy it moved or not (means over tasks and epochs):\n")
        print(
            "| search | sigma | members' KL from base (nats/token) | members at the base's fitness | fitness spread "
            "per epoch |"
        )
        print("|---|---|---|---|---|")
        for name in SEARCHES:
            runs = [r for r in mine if r["search"] == name]
            kls = [r["kl"] for r in runs if r["kl"] is not None]
            spread = [statistics.fmean(r["epochs"][e]["spread"] for r in runs) for e in range(args.epochs)]
            print(
                f"| {name} | {statistics.fmean(r['sigma'] for r in runs):.3g} | "
                f"{statistics.median(kls) if kls else float('nan'):.3g} | "
                f"{statistics.fmean(e['at_base'] for r in runs for e in r['epochs']):.0%} | "
                + ", ".join(f"{s:.3f}" for s in spread)
                + " |"
            )


_WORKER: dict = {}  # this process's model and tasks, loaded once


def _load_worker(model_dir: Path, task_count: int | None) -> None:
    torch.set_num_threads(1)
    _WORKER.update(
        model=load_model_from_dir(model_dir),
        tasks={t.id: t for t in fitting_tasks(SIZES["small"].max_side)[:task_count]},
    )


def _run_job(job_and_args: tuple) -> dict:
    (task_id, source, name, seed), args = job_and_args
    model, processor = _WORKER["model"]
    return search_task(model, processor, _WORKER["tasks"][task_id], source, name, seed, args, args.model)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the rule's first task, 1 seed, 2 epochs of 4 members")
    parser.add_argument("--model", type=Path, default=ROOT / MODEL_DIRS["small"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--tasks", type=int, help="only the first N tasks of the rule (default: all of them)")
    parser.add_argument("--protocols", choices=["both", "ero", "held_out"], default="both")
    parser.add_argument("--token-factor", type=float, default=1.25, help="max_new_tokens = factor x demonstrated size")
    parser.add_argument(
        "--calibration-epochs", type=float, help="EGGROLL's sigma calibration budget (default: 8 member evaluations)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="processes evaluating runs side by side (one thread each)")
    parser.add_argument("--base-only", action="store_true", help="the base model's answers and the copy baseline")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.population, args.tasks = 1, 2, 4, args.tasks or 1
    if not (args.model / "config.json").is_file():
        print(
            f"error: {args.model} holds no model; build it first: python scripts/build_tiny_model.py --size small",
            file=sys.stderr,
        )
        return 2
    args.calibration_epochs = args.calibration_epochs or 8 / args.population  # two probes of 4 directions at least
    torch.set_num_threads(1)
    model, processor = load_model_from_dir(args.model)
    tasks = fitting_tasks(SIZES["small"].max_side)[: args.tasks]
    sources = {"both": ["test", "train_loo"], "ero": ["test"], "held_out": ["train_loo"]}[args.protocols]
    copy = {t.id: copy_scores(t) for t in tasks}
    base = {}
    for t in tasks:
        cfg = bench_config(args.model, t, "test", [], 0, args)
        result = evaluate(model, processor, prepare(questions_for([t], cfg, "test"), processor, cfg), cfg, report=True)
        base[t.id] = {
            **scores(result),
            "right_size": right_size(result, t),
            "answers": [a.text for a in result.answers],
        }
        print(t.id, {k: v for k, v in base[t.id].items() if k != "answers"}, base[t.id]["answers"][0][:80], flush=True)
    jobs = [
        (t.id, source, name, seed)
        for seed in range(0 if args.base_only else args.seeds)
        for source in sources
        for t in tasks
        for name in SEARCHES
    ]
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        if args.jobs > 1:  # each process loads its own copy of the model; rows come back in the jobs' order
            pool = stack.enter_context(
                multiprocessing.get_context("spawn").Pool(args.jobs, _load_worker, (args.model, args.tasks))
            )
            results = pool.imap(_run_job, [(job, args) for job in jobs])
        else:
            _WORKER.update(model=(model, processor), tasks={t.id: t for t in tasks})
            results = map(_run_job, [(job, args) for job in jobs])
        for r in results:
            rows.append(r)
            print(
                f"seed {r['seed']} {r['protocol']} {r['task']} {r['search']}: char similarity "
                f"{r['after']['char_similarity']:.4f} (base {base[r['task']]['char_similarity']:.4f}) sigma "
                f"{r['sigma']:.3g} {r['wall_seconds']:.0f}s",
                flush=True,
            )
    print_tables(tasks, base, copy, rows, args)
    write_results(
        "ero_miniature",
        {"args": {k: str(v) for k, v in vars(args).items()}, "base": base, "copy": copy, "runs": rows},
        quick=args.quick,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
