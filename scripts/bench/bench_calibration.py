"""Benchmark: does `evolution.sigma: auto` meet its target divergence across scale, and does it learn?

--sweep (the default part): random Qwen2.5-VL-architecture models with 1 decoder layer, from the tiny model's width
(hidden 128) to the 7B's (hidden 3584, intermediate 18944, 28 heads, 4 kv heads), plus the trained embedded tiny
model. For each: calibration (evaluation/calibration.py, absolute sigma, default.yaml's leave-one-out questions)
chooses sigma; then the median KL(base || member) is measured on the HELD-OUT test questions with fresh member
seeds at that sigma, and at the fixed absolute sigmas 0.01 and 0.001 beside it.

--learning: training runs of the tiny model, `sigma: auto` against configs/default.yaml's hand-tuned relative 0.5,
per seed (held-out answer log-prob gain after the run's epochs), and the same two arms under ERO's char-similarity
fitness on the test output (the members' share at the base's fitness, the fitness spread, the char-similarity curve).

    python scripts/bench/bench_calibration.py [--sweep] [--learning] [--seeds 0 1 2] [--quick]
        -> results/bench/calibration[_quick].json, results/bench/calibration_runs/<arm>_s<seed>/
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench_common import bench_output, write_results  # noqa: E402

from ERO_EGGROLL.arc.tasks import load_tasks  # noqa: E402
from ERO_EGGROLL.config import load_config  # noqa: E402
from ERO_EGGROLL.evaluation.calibration import calibrate, directions, kl_at  # noqa: E402
from ERO_EGGROLL.evaluation.divergence import CHECK_EPOCH, reference_of  # noqa: E402
from ERO_EGGROLL.evaluation.prepared import prepare, questions_for  # noqa: E402
from ERO_EGGROLL.model.loading import load_model_from_dir  # noqa: E402
from ERO_EGGROLL.model.random_model import TextShape, random_model  # noqa: E402

TINY = ROOT / "checkpoints" / "tiny-qwen2.5-vl"
# 1 decoder layer each; from hidden 512 on, the 7B's head width (128) and its intermediate/hidden ratio (18944/3584)
SHAPES = {
    "h128": TextShape(hidden=128, intermediate=384, layers=1, heads=4, kv_heads=2),
    "h512": TextShape(hidden=512, intermediate=2688, layers=1, heads=4, kv_heads=2),
    "h1792": TextShape(hidden=1792, intermediate=9472, layers=1, heads=14, kv_heads=2),
    "h3584": TextShape(hidden=3584, intermediate=18944, layers=1, heads=28, kv_heads=4),  # the 7B's width
}
MODELS = ["tiny", *SHAPES]  # tiny: the trained embedded model (2 layers, hidden 128); the others random, 1 layer
FIXED = (0.01, 0.001)
TOLERANCE = 0.25
SWEEP_SETTINGS = [
    "evolution.sigma=auto",
    "evolution.sigma_mode=absolute",  # one unit across models, so the fixed sigmas mean the same on each
    "evaluation.fitness=answer_logprob",
    "data.fitness_source=train_loo",
]
LEARNING_ARMS = {  # arm -> settings on top of configs/default.yaml
    "default": [],
    "auto": ["evolution.sigma=auto"],
    "char_default": ["evaluation.fitness=char_similarity", "data.fitness_source=test"],
    "char_auto": ["evaluation.fitness=char_similarity", "data.fitness_source=test", "evolution.sigma=auto"],
}


def sweep_row(name: str, model, processor, cfg, checks: int) -> dict:
    """Calibrate on the fitness questions, then measure fresh directions on the held-out ones."""
    tasks = load_tasks(cfg.data.source, cfg.data.split, cfg.data.task_ids)
    fitness_q = prepare(questions_for(tasks, cfg, "fitness"), processor, cfg)
    held_out = prepare(questions_for(tasks, cfg, "test"), processor, cfg)
    start = time.perf_counter()
    result = calibrate(model, processor, fitness_q, cfg)
    reference = reference_of(model, processor, held_out, cfg)
    fresh = directions(cfg.evolution.population_size, checks, CHECK_EPOCH)
    kl = {s: kl_at(model, processor, held_out, cfg, reference, s, fresh) for s in (result.sigma, *FIXED)}
    target = cfg.evolution.calibration.target_kl
    row = {
        "model": name,
        "text parameters": sum(p.numel() for n, p in model.named_parameters() if "visual" not in n),
        "calibrated sigma": result.sigma,
        "held-out KL at calibrated": kl[result.sigma],
        "ratio to target": kl[result.sigma] / target,
        "within 25%": abs(kl[result.sigma] / target - 1) <= TOLERANCE,
        **{f"held-out KL at {s}": kl[s] for s in FIXED},
        "calibration member evaluations": result.member_evaluations,
        "seconds": time.perf_counter() - start,
    }
    print(json.dumps(row), flush=True)
    return row


def sweep(args) -> list[dict]:
    cfg = load_config(
        ROOT / "configs" / "default.yaml",
        [*SWEEP_SETTINGS, f"evolution.population_size={args.population}", f"data.task_ids=[{','.join(args.tasks)}]"],
    )
    tiny, processor = load_model_from_dir(TINY)
    rows = []
    for name in args.models[:2] if args.quick else args.models:
        model = tiny if name == "tiny" else random_model(TINY, SHAPES[name])
        rows.append(
            sweep_row(
                "trained tiny (2 layers, h128)" if name == "tiny" else f"random {name}",
                model,
                processor,
                cfg,
                args.checks,
            )
        )
    target = cfg.evolution.calibration.target_kl
    print(
        f"\ntarget: median KL(base || member) {target} nats/token, within {TOLERANCE:.0%}, on the held-out questions, "
        f"{args.checks} fresh directions; absolute sigma\n"
        "| model | text params | calibrated sigma | held-out KL (ratio) | within 25% | KL at sigma 0.01 | "
        "KL at sigma 0.001 |\n|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['model']} | {r['text parameters'] / 1e6:.2f}M | {r['calibrated sigma']:.3g} | "
            f"{r['held-out KL at calibrated']:.4g} ({r['ratio to target']:.2f}) | {'yes' if r['within 25%'] else 'NO'}"
            f" | {r['held-out KL at 0.01']:.3g} | {r['held-out KL at 0.001']:.3g} |"
        )
    return rows


def run_arm(arm: str, seed: int, epochs: int, runs: Path) -> Path:
    """One training run (the project's own command), its run folder under `runs`; an existing one is reused."""
    name = f"{arm}_s{seed}"
    if not (runs / name / "final_table.md").exists():  # written when a run ends
        settings = [
            *LEARNING_ARMS[arm],
            f"seed={seed}",
            f"evolution.epochs={epochs}",
            f"run.name={name}",
            f"run.output_dir={runs}",
            f"run.checkpoint_dir={runs / 'checkpoints'}",
            "run.if_exists=move_aside",
        ]
        command = [sys.executable, str(ROOT / "ERO_EGGROLL" / "arc_evolution_single_gpu.py")]
        command += ["--config", str(ROOT / "configs" / "default.yaml")]
        command += [part for s in settings for part in ("--set", s)]
        print(" ".join(command), flush=True)
        subprocess.run(command, cwd=ROOT, check=True)
    return runs / name


def arm_figures(run_dir: Path) -> dict:
    """What a finished run's metrics rows say: the held-out gain, and the signal signs per epoch."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    base, epochs = rows[0], rows[1:]
    return {
        "run": run_dir.name,
        "sigma": yaml.safe_load((run_dir / "config.yaml").read_text())["evolution"]["sigma"],  # auto: the chosen one
        "epochs": len(epochs),
        "held-out answer log-prob": [r["mean_model_answer_logprob"] for r in rows],
        "gain": rows[-1]["mean_model_answer_logprob"] - base["mean_model_answer_logprob"],
        "char similarity": [r["mean_model_char_similarity"] for r in rows],
        "members_at_base_fitness": [r.get("members_at_base_fitness") for r in epochs],
        "fitness_spread": [r.get("fitness_spread") for r in epochs],
    }


def learning(args) -> list[dict]:
    runs = bench_output("calibration_runs", "", args.quick)
    results = []
    for seed in args.seeds:  # seed by seed, so an interrupted benchmark still compares the arms
        for arm in args.arms:
            epochs = args.char_epochs if arm.startswith("char") else args.epochs
            results.append({"arm": arm, "seed": seed, **arm_figures(run_arm(arm, seed, epochs, runs))})
            print(json.dumps(results[-1]), flush=True)
    print("\n| arm | seed | sigma | held-out answer log-prob gain |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['arm']} | {r['seed']} | {r['sigma']:.4g} | {r['gain']:+.4f} |")
    for arm in args.arms:
        gains = [r["gain"] for r in results if r["arm"] == arm]
        sd = statistics.stdev(gains) if len(gains) > 1 else float("nan")
        print(f"{arm}: gain {statistics.mean(gains):+.4f} +- {sd:.4f} over {len(gains)} seed(s)")
    char = [r for r in results if r["arm"].startswith("char")]
    if char:
        print("\n| arm | seed | epochs with members differing from the base (share at base < 1) | char similarity |")
        print("|---|---|---|---|")
    for r in char:
        differ = sum(1 for m in r["members_at_base_fitness"] if m is not None and m < 1)
        curve = " ".join(f"{c:.4f}" for c in r["char similarity"])
        print(f"| {r['arm']} | {r['seed']} | {differ} of {r['epochs']} | {curve} |")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="the calibration sweep across widths (the default)")
    parser.add_argument("--learning", action="store_true", help="training runs: sigma auto against the default")
    parser.add_argument("--quick", action="store_true", help="sweep: the first two models only")
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS, help="sweep: which models")
    parser.add_argument("--tasks", nargs="+", default=["b1fc8b8e", "e6de6e8f"], help="sweep: the ARC tasks")
    parser.add_argument("--population", type=int, default=16, help="sweep: calibration's budget is 2x this")
    parser.add_argument("--checks", type=int, default=16, help="sweep: fresh directions on the held-out questions")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="learning: run seeds")
    parser.add_argument("--epochs", type=int, default=8, help="learning: epochs per run (default.yaml's 8)")
    parser.add_argument("--char-epochs", type=int, default=8, help="learning: epochs of the char-similarity arms")
    parser.add_argument("--arms", nargs="+", default=list(LEARNING_ARMS), choices=list(LEARNING_ARMS))
    args = parser.parse_args()
    if args.population < 4 or args.population % 2 or args.checks < 1 or min(args.epochs, args.char_epochs) < 1:
        print("error: --population must be an even number >= 4, --checks and --epochs >= 1", file=sys.stderr)
        return 2
    data: dict = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.sweep or not args.learning:
        data["sweep"] = sweep(args)
    if args.learning:
        data["learning"] = learning(args)
    write_results("calibration", data, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
