"""EGGROLL's Perturber.for_module against EvoTorch's PGPE on the same networks, objective and population.

    pip install -r requirements-bench.txt        # EvoTorch 0.6.1, only for this benchmark
    python scripts/bench/bench_vs_evotorch.py          # 1M, 5M (learning) and 18M (speed, memory); long
    python scripts/bench/bench_vs_evotorch.py --quick  # 1M and 5M, one seed

Task: an MLP 256 -> H -> H -> 16 (tanh) regresses a fixed random teacher on a fixed batch of 32,
population 64, every method starting from the same weights. Speed and peak memory come from a fresh
process per method (peak resident memory growth once both libraries are imported and the network
and data built); learning runs share this process. Loss is the MSE of the unperturbed network (PGPE's center)
after each generation. Each method runs a small declared grid of its own settings over the seeds;
"time to PGPE's best" is our wall-clock until the loss first reaches the best PGPE setting's mean
final loss (ours may run longer than the equal-evaluation budget to get there). One torch thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ERO_EGGROLL  # noqa: E402,F401  (before JAX: GPU memory on demand)
from ERO_EGGROLL import Perturber  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
INSTALL = "EvoTorch is a benchmark-only dependency: pip install -r requirements-bench.txt (evotorch==0.6.1)"
WIDTHS = {"1m": 1024, "5m": 2048, "18m": 4096}
POPULATION, BATCH = 64, 32

# The declared grids: each method's own settings, the same number of generations and seeds for all.
OURS_GRID = [  # each change beside for_module's defaults (Adam lr 0.002, sigma 0.002, rank 1, z-score fitness)
    {"label": "defaults"},
    {"label": "adam lr 0.003", "lr": 0.003},
    {"label": "centered ranks", "fitness_shaping": "centered_rank"},
    {"label": "adaptive sigma (sigma_lr 0.1)", "sigma_lr": 0.1},
    {"label": "clipup lr 1.0", "optimizer": "clipup", "lr": 1.0},
    {"label": "rank 4", "rank": 4},
]
PGPE_GRID = [  # its usual Adam lr 0.01 with stdev 0.02 diverged here (0.084 -> 0.302 in 10 generations at 1M)
    {"label": "adam 0.003 stdev 0.01", "optimizer": "adam", "center_learning_rate": 0.003, "stdev_init": 0.01},
    {"label": "adam 0.005 stdev 0.01", "optimizer": "adam", "center_learning_rate": 0.005, "stdev_init": 0.01},
    {
        "label": "clipup 1.5 stdev 0.01",
        "optimizer": "clipup",
        "center_learning_rate": 1.5,
        "stdev_init": 0.01,
        "optimizer_config": {"max_speed": 3.0},
    },
]


def mlp(width: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(256, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, 16),
    )


def task(width: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The student at its initial weights (the same for every method and seed) and the teacher's batch."""
    torch.manual_seed(1234)
    teacher = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.Tanh(), torch.nn.Linear(64, 16))
    x = torch.randn(BATCH, 256)
    with torch.no_grad():
        y = teacher(x)
    torch.manual_seed(0)
    return mlp(width), x, y


def mse(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(net(x), y))


def ours_options(setting: dict) -> dict:
    """for_module's keyword arguments for a grid entry (what it leaves out keeps for_module's default)."""
    return {k: v for k, v in setting.items() if k != "label"}


def run_ours(
    width: int, gens: int, seed: int, setting: dict, rows: bool = True, on_gen: Callable | None = None
) -> list[tuple[float, float]]:
    """[(wall seconds, loss)] after each generation; members as batch rows (rows) or one at a time."""
    net, x, y = task(width)
    p = Perturber.for_module(net, population_size=POPULATION, seed=seed, **ours_options(setting))
    xs = x.repeat(POPULATION, 1)
    curve, start = [], time.perf_counter()
    for gen in range(gens):
        if rows:
            with p.members(gen, range(POPULATION)), torch.no_grad():
                out = net(xs).view(POPULATION, BATCH, -1)
            fitness = (-(out - y).pow(2).mean(dim=(1, 2))).tolist()
        else:
            fitness = []
            for i in range(POPULATION):
                with p.member(gen, i), torch.no_grad():
                    fitness.append(-float(torch.nn.functional.mse_loss(net(x), y)))
        p.update(fitness, gen)
        curve.append((time.perf_counter() - start, mse(net, x, y)))
        if on_gen:
            on_gen()
    p.remove_hooks()
    return curve


def run_pgpe(
    width: int, gens: int, seed: int, setting: dict, on_gen: Callable | None = None
) -> list[tuple[float, float]]:
    """EvoTorch's PGPE over the flat parameter vector through NEProblem, centered at the same initial weights."""
    from evotorch.algorithms import PGPE
    from evotorch.neuroevolution import NEProblem

    net, x, y = task(width)
    problem = NEProblem("min", lambda: mlp(width), lambda candidate: mse(candidate, x, y), seed=seed, device="cpu")
    options = {k: v for k, v in setting.items() if k != "label"}
    searcher = PGPE(
        problem,
        popsize=POPULATION,
        stdev_learning_rate=0.1,
        ranking_method="centered",
        center_init=torch.nn.utils.parameters_to_vector(net.parameters()).detach(),
        **options,
    )
    curve, start = [], time.perf_counter()
    for _ in range(gens):
        searcher.step()
        center = problem.parameterize_net(searcher.status["center"])
        curve.append((time.perf_counter() - start, mse(center, x, y)))
        if on_gen:
            on_gen()
    return curve


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def speed_child(method: str, width: int, gens: int) -> None:
    """One method in this fresh process: seconds per generation after the first, and peak memory growth (MB)."""
    import evotorch.algorithms  # noqa: F401  (both libraries imported before the baseline; JAX's first use counts as ours)

    task(width)  # the network and the data are resident before the baseline is taken
    base = rss_kb("VmRSS")
    stamps: list[float] = []
    tick = lambda: stamps.append(time.perf_counter())  # noqa: E731
    if method == "pgpe":
        run_pgpe(width, gens, 0, PGPE_GRID[0], on_gen=tick)
    else:
        run_ours(width, gens, 0, OURS_GRID[0], rows=method == "ours-rows", on_gen=tick)
    per_gen = [b - a for a, b in zip(stamps, stamps[1:])]
    print(json.dumps({"s_per_gen": statistics.median(per_gen), "peak_mb": (rss_kb("VmHWM") - base) / 1024}))


def speed(method: str, width: int, gens: int) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", method, str(width), str(gens)], capture_output=True, text=True
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def first_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, loss in curve if loss <= target), None)


def learning(size: str, gens: int, seeds: int, reach_factor: int) -> dict:
    """Every grid entry of both methods over the seeds: curves, final loss at equal evaluations, time to PGPE's best."""
    width = WIDTHS[size]
    results = {"pgpe": {}, "ours": {}}
    for setting in PGPE_GRID:
        results["pgpe"][setting["label"]] = [run_pgpe(width, gens, seed, setting) for seed in range(seeds)]
    for setting in OURS_GRID:
        results["ours"][setting["label"]] = [
            run_ours(width, gens * reach_factor, seed, setting) for seed in range(seeds)
        ]
    return results


def summarize(size: str, results: dict, gens: int) -> tuple[list[str], dict]:
    start_loss = mse(*task(WIDTHS[size]))
    rows, finals = [], {}
    for method, entries in results.items():
        for label, curves in entries.items():
            finals[(method, label)] = [c[gens - 1][1] for c in curves]
    best_pgpe = min(statistics.mean(v) for (m, _), v in finals.items() if m == "pgpe")
    rows.append(
        f"\n{size}: MSE at start {start_loss:.4f}; after {gens} generations ({gens * POPULATION} evaluations), "
        f"mean over seeds; PGPE's best {best_pgpe:.4f}"
    )
    rows.append(
        f"{'method':6} {'setting':34} {'loss':>8} {'± sd':>7} {'s/gen':>7} {'vs PGPE best':>12} "
        f"{'time to PGPE best':>18}"
    )
    for (method, label), values in finals.items():
        curves = results[method][label]
        per_gen = statistics.mean(c[gens - 1][0] / gens for c in curves)
        reach = [first_reach(c, best_pgpe) for c in curves]
        reach_text = (
            f"{statistics.median(reach):.1f} s"
            if all(r is not None for r in reach)
            else f"{sum(r is not None for r in reach)}/{len(reach)} seeds"
        )
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(
            f"{method:6} {label:34} {statistics.mean(values):8.4f} {sd:7.4f} {per_gen:7.3f} "
            f"{statistics.mean(values) / best_pgpe - 1:+12.1%} {reach_text:>18}"
        )
    return rows, {"start": start_loss, "best_pgpe": best_pgpe}


def plot(all_results: dict, gens: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(all_results), figsize=(6 * len(all_results), 8), squeeze=False)
    for col, (size, results) in enumerate(all_results.items()):
        for method, entries in results.items():
            for label, curves in entries.items():
                losses = [statistics.mean(c[g][1] for c in curves) for g in range(len(curves[0]))]
                walls = [statistics.mean(c[g][0] for c in curves) for g in range(len(curves[0]))]
                style = "-" if method == "ours" else "--"
                evals = [(g + 1) * POPULATION for g in range(len(losses))]
                axes[0][col].plot(evals[:gens], losses[:gens], style, label=f"{method}: {label}")
                axes[1][col].plot(walls, losses, style, label=f"{method}: {label}")
        axes[0][col].set(title=f"{size}: loss vs evaluations", xlabel="evaluations", ylabel="MSE", yscale="log")
        axes[1][col].set(title=f"{size}: loss vs wall-clock", xlabel="seconds", ylabel="MSE", yscale="log")
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, speed at 1M and 5M only, ours run to 2x the evaluations"
    )
    parser.add_argument("--gens", type=int, default=10, help="generations of the equal-evaluation comparison")
    parser.add_argument("--seeds", type=int, help="seeds per setting (default 3; quick 1)")
    parser.add_argument("--learn", help="sizes to compare learning on, comma-separated, '' for none (default 1m,5m)")
    parser.add_argument("--speed", help="sizes to time, comma-separated, '' for none (default 1m,5m,18m; quick 1m,5m)")
    parser.add_argument("--speed-gens", type=int, default=3, help="generations per speed run (the first is not timed)")
    parser.add_argument("--plot", type=Path, default=ROOT / "results" / "bench" / "bench_vs_evotorch.png")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "WIDTH", "GENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        speed_child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    try:
        import evotorch  # noqa: F401
    except ImportError:
        sys.exit(INSTALL)
    gens, seeds = args.gens, args.seeds or (1 if args.quick else 3)
    learn = [s for s in ("1m,5m" if args.learn is None else args.learn).split(",") if s]
    timed = [
        s for s in (("1m,5m" if args.quick else "1m,5m,18m") if args.speed is None else args.speed).split(",") if s
    ]
    for size in learn + timed:
        if size not in WIDTHS:
            sys.exit(f"unknown size {size!r}; choose from {', '.join(WIDTHS)}")
    print(f"torch threads 1, population {POPULATION}, batch {BATCH}, pid {os.getpid()}")
    print(
        f"\n{'params':>7} {'ours, one member':>18} {'ours, batch rows':>18} {'EvoTorch PGPE':>18} {'speedup':>8} "
        f"{'memory':>7}"
    )
    for size in timed:
        width = WIDTHS[size]
        n = sum(p.numel() for p in mlp(width).parameters())
        got = {m: speed(m, width, args.speed_gens) for m in ("ours-member", "ours-rows", "pgpe")}
        cells = [
            f"{g['s_per_gen']:.3f} s {g['peak_mb']:+6.0f} MB" if "error" not in g else g["error"][:18]
            for g in got.values()
        ]
        ok = all("error" not in g for g in got.values())
        ratio = f"{got['pgpe']['s_per_gen'] / got['ours-rows']['s_per_gen']:7.1f}x" if ok else "-"
        memory = f"{got['pgpe']['peak_mb'] / max(got['ours-rows']['peak_mb'], 1):6.1f}x" if ok else "-"
        print(f"{n / 1e6:6.1f}M {cells[0]:>18} {cells[1]:>18} {cells[2]:>18} {ratio:>8} {memory:>7}", flush=True)
    all_results = {}
    for size in learn:
        all_results[size] = learning(size, gens, seeds, reach_factor=2 if args.quick else 3)
        print("\n".join(summarize(size, all_results[size], gens)[0]), flush=True)
    if all_results:
        plot(all_results, gens, args.plot)


if __name__ == "__main__":
    main()
