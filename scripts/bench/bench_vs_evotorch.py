"""EGGROLL's Perturber.for_module against EvoTorch's PGPE on the same networks, objective and population.

    pip install -r requirements-bench.txt        # EvoTorch 0.6.1, only for this benchmark
    python scripts/bench/bench_vs_evotorch.py          # four tasks, 3 seeds; speed and memory at 1M, 5M, 18M; long
    python scripts/bench/bench_vs_evotorch.py --quick  # four tasks, one seed; speed at 1M and 5M

Tasks (population 64, every method starting from the same weights, both scoring the same data each generation):
  mlp-1m, mlp-5m  an MLP 256 -> H -> H -> 16 (tanh, H 1024 / 2048) regresses a fixed random teacher on a fixed
                  batch of 32; the loss is that batch's MSE (the task for_module's defaults were chosen on)
  cnn             scripts/examples/cnn_bars.py's CNN tells four kinds of bars apart, a fresh batch of 128 images
                  per generation; the loss is the cross-entropy on its held-out batch
  cartpole        an MLP policy 4 -> 32 -> 32 -> 1 pushes a cart (force 10 tanh(out)) to keep its pole up for
                  100 steps of 0.02 s from 16 fresh start states per generation; the loss is the mean cost
                  (1 - cos angle + 0.01 position^2) per step over 64 held-out start states
Loss is always the unperturbed network's (PGPE's center) after each generation. Ours runs with for_module's defaults
(--ours-grid: also each of a few changes to them); PGPE runs a small declared grid of its own settings per task, over
the same seeds and generations, and its best setting (lowest mean final loss) is the yardstick. "time to PGPE's best"
is our wall-clock until the loss first reaches that mean (ours may run longer than the equal-evaluation budget to get
there). Speed and peak memory come from a fresh process per method (peak resident memory growth once both libraries
are imported and the network and data built); learning runs share this process. One torch thread.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cnn_bars  # noqa: E402
from bench_common import bench_output, save_plot, write_results  # noqa: E402

import ERO_EGGROLL  # noqa: E402,F401  (before JAX: GPU memory on demand)
from ERO_EGGROLL import Perturber  # noqa: E402

INSTALL = "EvoTorch is a benchmark-only dependency: pip install -r requirements-bench.txt (evotorch==0.6.1)"
POPULATION, BATCH = 64, 32

# Ours: for_module's defaults (Adam lr 0.002, sigma 0.002, rank 1, z-score fitness), frozen for every task;
# --ours-grid adds each change to them beside the defaults (how the defaults were chosen, on the MLPs).
OURS_DEFAULTS = {"label": "defaults"}
OURS_GRID = [
    OURS_DEFAULTS,
    {"label": "adam lr 0.003", "lr": 0.003},
    {"label": "centered ranks", "fitness_shaping": "centered_rank"},
    {"label": "adaptive sigma (sigma_lr 0.1)", "sigma_lr": 0.1},
    {"label": "clipup lr 1.0", "optimizer": "clipup", "lr": 1.0},
    {"label": "rank 4", "rank": 4},
]
# PGPE's declared grids (stdev_learning_rate 0.1 and centered ranks throughout, its usual values).
PGPE_MLP_GRID = [  # its usual Adam lr 0.01 with stdev 0.02 diverged here (0.084 -> 0.302 in 10 generations at 1M)
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
PGPE_SMALL_GRID = [  # the small networks (CNN, policy): its usual setting, the MLP grid's Adam, ClipUp (lr = speed / 2)
    {"label": "adam 0.01 stdev 0.02", "optimizer": "adam", "center_learning_rate": 0.01, "stdev_init": 0.02},
    {"label": "adam 0.003 stdev 0.01", "optimizer": "adam", "center_learning_rate": 0.003, "stdev_init": 0.01},
    {
        "label": "clipup 0.15 stdev 0.02",
        "optimizer": "clipup",
        "center_learning_rate": 0.15,
        "stdev_init": 0.02,
        "optimizer_config": {"max_speed": 0.3},
    },
]


@dataclass(frozen=True)
class Task:
    """A network to evolve and how it is scored. `losses(net, data, k)`: k losses, one per block of k equal row
    blocks of the batch (member-major, as Perturber.members lays members out; k = 1 for one network);
    `batch(generation)` is the data every member of a generation is scored on, `held_out` what the reported loss
    is measured on."""

    name: str
    summary: str
    make_net: Callable[[], nn.Module]  # the initial weights, the same at every call
    batch: Callable[[int], Any]
    held_out: Any
    losses: Callable[[nn.Module, Any, int], torch.Tensor]
    gens: int  # generations of the equal-evaluation comparison
    pgpe_grid: list[dict] = field(repr=False)

    def loss(self, net: nn.Module, data: Any = None) -> float:
        """One network's loss on `data` (default the held-out data)."""
        with torch.no_grad():
            return float(self.losses(net, self.held_out if data is None else data, 1)[0])


def mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(256, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 16))


def seeded(make: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return make()


def regression_losses(net: nn.Module, data: tuple[torch.Tensor, torch.Tensor], k: int) -> torch.Tensor:
    x, y = data
    return (net(x.repeat(k, 1)).view(k, *y.shape) - y).pow(2).mean(dim=(1, 2))


def regression_task(name: str, width: int) -> Task:
    """The student MLP at its initial weights and a fixed random teacher's batch (the data never changes)."""
    torch.manual_seed(1234)
    teacher = nn.Sequential(nn.Linear(256, 64), nn.Tanh(), nn.Linear(64, 16))
    x = torch.randn(BATCH, 256)
    with torch.no_grad():
        data = (x, teacher(x))
    return Task(
        name,
        f"MLP regression, fixed batch of {BATCH}",
        lambda: seeded(lambda: mlp(width)),
        lambda gen: data,
        data,
        regression_losses,
        gens=10,
        pgpe_grid=PGPE_MLP_GRID,
    )


def classification_losses(net: nn.Module, data: tuple[torch.Tensor, torch.Tensor], k: int) -> torch.Tensor:
    images, labels = data
    logits = net(images.repeat(k, *([1] * (images.dim() - 1))))
    return nn.functional.cross_entropy(logits, labels.repeat(k), reduction="none").view(k, -1).mean(dim=1)


def cnn_task() -> Task:
    """cnn_bars' network and batches; BatchNorm in eval mode (its running statistics), as the example runs it."""
    return Task(
        "cnn",
        "CNN classifier (cnn_bars), fresh batch of 128 per generation",
        lambda: seeded(cnn_bars.make_net).eval(),
        cnn_bars.make_batch,
        cnn_bars.make_batch(-1),
        classification_losses,
        gens=50,
        pgpe_grid=PGPE_SMALL_GRID,
    )


# Cart-pole (Barto, Sutton & Anderson's dynamics, explicit Euler): gravity, cart and pole mass, half pole length,
# force scale, time step; a continuous force and no termination, so the cost is smooth in the policy.
GRAVITY, CART_MASS, POLE_MASS, HALF_POLE, FORCE, DT, HORIZON = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02, 100


def cartpole_starts(count: int, seed: int) -> torch.Tensor:
    """Start states (position, velocity, angle, angular velocity): the pole up to 0.3 rad off upright."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(count, 4, generator=g) * 2 - 1) * torch.tensor([0.2, 0.2, 0.3, 0.2])


def cartpole_losses(policy: nn.Module, starts: torch.Tensor, k: int) -> torch.Tensor:
    """Each block's mean cost per step over its start states, every block starting from the same states."""
    x, v, angle, spin = starts.repeat(k, 1).unbind(1)
    total_mass, pole_moment = CART_MASS + POLE_MASS, POLE_MASS * HALF_POLE
    cost = torch.zeros_like(x)
    for _ in range(HORIZON):
        push = FORCE * torch.tanh(policy(torch.stack((x, v, angle, spin), dim=1))).squeeze(1)
        sin, cos = torch.sin(angle), torch.cos(angle)
        common = (push + pole_moment * spin * spin * sin) / total_mass
        spin_acc = (GRAVITY * sin - cos * common) / (HALF_POLE * (4 / 3 - POLE_MASS * cos * cos / total_mass))
        x, v = x + DT * v, v + DT * (common - pole_moment * spin_acc * cos / total_mass)
        angle, spin = angle + DT * spin, spin + DT * spin_acc
        cost += 1 - torch.cos(angle) + 0.01 * x * x
    return (cost / HORIZON).view(k, -1).mean(dim=1)


def cartpole_task() -> Task:
    def policy() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))

    return Task(
        "cartpole",
        f"cart-pole policy, {HORIZON} steps from 16 fresh start states per generation",
        lambda: seeded(policy),
        lambda gen: cartpole_starts(16, 30_000 + gen),
        cartpole_starts(64, 29_999),
        cartpole_losses,
        gens=30,
        pgpe_grid=PGPE_SMALL_GRID,
    )


TASKS: dict[str, Callable[[], Task]] = {
    "mlp-1m": lambda: regression_task("mlp-1m", 1024),
    "mlp-5m": lambda: regression_task("mlp-5m", 2048),
    "mlp-18m": lambda: regression_task("mlp-18m", 4096),  # speed and memory only by default
    "cnn": cnn_task,
    "cartpole": cartpole_task,
}


@functools.cache
def get_task(name: str) -> Task:
    return TASKS[name]()


def ours_options(setting: dict) -> dict:
    """for_module's keyword arguments for a grid entry (what it leaves out keeps for_module's default)."""
    return {k: v for k, v in setting.items() if k != "label"}


def run_ours(
    task: Task,
    gens: int,
    seed: int,
    setting: dict,
    rows: bool = True,
    on_gen: Callable | None = None,
    population: int = POPULATION,
) -> list[tuple[float, float]]:
    """[(wall seconds, loss)] after each generation; members as batch rows (rows) or one at a time."""
    net = task.make_net()
    curve, start = [], time.perf_counter()
    with Perturber.for_module(
        net, population_size=population, seed=seed, objective="min", **ours_options(setting)
    ) as es:
        for gen in range(gens):
            data, generation = task.batch(gen), es.ask()
            if rows:
                with generation.members(range(population)), torch.no_grad():
                    losses = task.losses(net, data, population).tolist()
            else:
                losses = []
                for i in range(population):
                    with generation.member(i):
                        losses.append(task.loss(net, data))
            es.tell(generation, losses)
            curve.append((time.perf_counter() - start, task.loss(net)))
            if on_gen:
                on_gen()
    return curve


def run_pgpe(
    task: Task, gens: int, seed: int, setting: dict, on_gen: Callable | None = None, population: int = POPULATION
) -> list[tuple[float, float]]:
    """EvoTorch's PGPE over the flat parameter vector through NEProblem, centered at the same initial weights."""
    from evotorch.algorithms import PGPE
    from evotorch.neuroevolution import NEProblem

    logging.getLogger("evotorch").setLevel(logging.WARNING)  # its INFO lines for every problem built

    scored_on: list = [None]  # the generation's data, set before each step
    problem = NEProblem(
        "min", task.make_net, lambda candidate: task.loss(candidate, scored_on[0]), seed=seed, device="cpu"
    )
    searcher = PGPE(
        problem,
        popsize=population,
        stdev_learning_rate=0.1,
        ranking_method="centered",
        center_init=nn.utils.parameters_to_vector(task.make_net().parameters()).detach(),
        **ours_options(setting),
    )
    # EvoTorch's step() updates from the previous step's population, then samples and scores the next one: after the
    # first step (scoring alone), the center after step g + 2 has seen g + 1 generations' evaluations, as ours has
    # after g + 1 tell()s. The last step's scoring is spent on no update.
    curve, start = [], time.perf_counter()
    scored_on[0] = task.batch(0)
    searcher.step()
    for gen in range(gens):
        scored_on[0] = task.batch(gen + 1)
        searcher.step()
        curve.append((time.perf_counter() - start, task.loss(problem.parameterize_net(searcher.status["center"]))))
        if on_gen:
            on_gen()
    return curve


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def speed_child(method: str, name: str, gens: int) -> None:
    """One method in this fresh process: seconds per generation after the first, and peak memory growth (MB)."""
    import evotorch.algorithms  # noqa: F401  (both libraries imported before the baseline; JAX's first use counts as ours)

    task = get_task(name)
    task.make_net()  # the network and the data are resident before the baseline is taken
    base = rss_kb("VmRSS")
    stamps: list[float] = []
    tick = lambda: stamps.append(time.perf_counter())  # noqa: E731
    if method == "pgpe":
        run_pgpe(task, gens, 0, task.pgpe_grid[0], on_gen=tick)
    else:
        run_ours(task, gens, 0, OURS_DEFAULTS, rows=method == "ours-rows", on_gen=tick)
    per_gen = [b - a for a, b in zip(stamps, stamps[1:])]
    print(json.dumps({"s_per_gen": statistics.median(per_gen), "peak_mb": (rss_kb("VmHWM") - base) / 1024}))


def speed(method: str, name: str, gens: int) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", method, name, str(gens)], capture_output=True, text=True
    )
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def first_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, loss in curve if loss <= target), None)


def learning(task: Task, gens: int, seeds: int, ours_grid: list[dict], reach_factor: int) -> dict:
    """Every grid entry of both methods over the seeds: the curves ([(seconds, loss)] per seed)."""
    results: dict[str, dict[str, list]] = {"pgpe": {}, "ours": {}}
    for setting in task.pgpe_grid:
        results["pgpe"][setting["label"]] = [run_pgpe(task, gens, seed, setting) for seed in range(seeds)]
    for setting in ours_grid:
        results["ours"][setting["label"]] = [
            run_ours(task, gens * reach_factor, seed, setting) for seed in range(seeds)
        ]
    return results


def seconds_per_gen(curve: list[tuple[float, float]]) -> float:
    """The median wall time of a generation after the first (which pays JAX's compilation for ours)."""
    stamps = [t for t, _ in curve]
    return statistics.median([b - a for a, b in zip(stamps, stamps[1:])]) if len(stamps) > 1 else stamps[0]


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(task: Task, results: dict, gens: int) -> tuple[list[str], dict]:
    """The task's rows (every setting of both methods) and its line of the table over tasks."""
    finals = {
        (method, label): [c[gens - 1][1] for c in curves]
        for method, entries in results.items()
        for label, curves in entries.items()
    }
    best_label = min((label for m, label in finals if m == "pgpe"), key=lambda lb: statistics.mean(finals["pgpe", lb]))
    best_pgpe = statistics.mean(finals["pgpe", best_label])
    params = sum(p.numel() for p in task.make_net().parameters())
    start = task.loss(task.make_net())
    rows = [
        f"\n{task.name} ({task.summary}, {params:,} parameters): loss at start {start:.4f}; "
        f"after {gens} generations ({gens * POPULATION} evaluations), mean over seeds; PGPE's best {best_pgpe:.4f}",
        f"{'method':6} {'setting':34} {'loss':>8} {'± sd':>7} {'s/gen':>7} {'vs PGPE best':>12} "
        f"{'time to PGPE best':>18}",
    ]
    for (method, label), values in finals.items():
        curves = results[method][label]
        per_gen = statistics.mean(seconds_per_gen(c[:gens]) for c in curves)
        reach = [first_reach(c, best_pgpe) for c in curves]
        reached = [r for r in reach if r is not None]
        reach_text = (
            f"{statistics.median(reached):.1f} s"
            if len(reached) == len(reach)
            else f"{len(reached)}/{len(reach)} seeds"
        )
        mean, sd = mean_sd(values)
        rows.append(
            f"{method:6} {label:34} {mean:8.4f} {sd:7.4f} {per_gen:7.3f} {mean / best_pgpe - 1:+12.1%} {reach_text:>18}"
        )
    ours_mean, ours_sd = mean_sd(finals["ours", OURS_DEFAULTS["label"]])
    line = {
        "task": task.name,
        "evaluations": gens * POPULATION,
        "pgpe_best": best_label,
        "pgpe": mean_sd(finals["pgpe", best_label]),
        "ours": (ours_mean, ours_sd),
        "ratio": ours_mean / best_pgpe,
    }
    return rows, line


def table(lines: list[dict], seeds: int) -> list[str]:
    """One line per task: ours with its defaults against PGPE's best setting, at equal evaluations."""
    rows = [
        f"\nours (for_module's defaults) against PGPE's best setting, final loss, mean ± sd over {seeds} seed(s)",
        f"{'task':9} {'evals':>6} {'PGPE best setting':24} {'PGPE':>17} {'ours':>17} {'ours vs PGPE':>12} "
        f"{'within 10%':>10}",
    ]
    for ln in lines:
        cells = [f"{m:.4f} ± {s:.4f}" for m, s in (ln["pgpe"], ln["ours"])]
        rows.append(
            f"{ln['task']:9} {ln['evaluations']:6d} {ln['pgpe_best']:24} {cells[0]:>17} {cells[1]:>17} "
            f"{ln['ratio'] - 1:+12.1%} {'yes' if ln['ratio'] <= 1.1 else 'no':>10}"
        )
    within = sum(ln["ratio"] <= 1.1 for ln in lines)
    rows.append(f"within 10% of PGPE's best (or better) on {within} of {len(lines)} tasks")
    return rows


def plot(all_results: dict, gens: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(all_results), figsize=(5.5 * len(all_results), 8), squeeze=False)
    for col, (name, results) in enumerate(all_results.items()):
        for method, entries in results.items():
            for label, curves in entries.items():
                steps = range(len(curves[0]))
                losses = [statistics.mean(c[g][1] for c in curves) for g in steps]
                walls = [statistics.mean(c[g][0] for c in curves) for g in steps]
                evals = [(g + 1) * POPULATION for g in steps]
                style = "-" if method == "ours" else "--"
                axes[0][col].plot(evals[: gens[name]], losses[: gens[name]], style, label=f"{method}: {label}")
                axes[1][col].plot(walls, losses, style, label=f"{method}: {label}")
        axes[0][col].set(title=f"{name}: loss vs evaluations", xlabel="evaluations", ylabel="loss", yscale="log")
        axes[1][col].set(title=f"{name}: loss vs wall-clock", xlabel="seconds", ylabel="loss", yscale="log")
        axes[0][col].legend(fontsize=7)
    save_plot(fig, out, dpi=90)
    print(f"wrote {out}")


def names(text: str) -> list[str]:
    """Task names from a comma-separated list; an unknown one exits with the choices."""
    chosen = [s for s in text.split(",") if s]
    for name in chosen:
        if name not in TASKS:
            sys.exit(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, speed at 1M and 5M only, ours to 2x the evals")
    parser.add_argument("--gens", type=int, help="generations of every task's comparison (default: each task's own)")
    parser.add_argument("--seeds", type=int, help="seeds per setting (default 3; quick 1)")
    parser.add_argument(
        "--tasks", help="tasks to compare learning on, comma-separated, '' for none (default: all but mlp-18m)"
    )
    parser.add_argument("--ours-grid", action="store_true", help="ours also with each change to its defaults")
    parser.add_argument(
        "--speed", help="tasks to time, comma-separated, '' for none (default mlp-1m,mlp-5m,mlp-18m; quick: no 18m)"
    )
    parser.add_argument("--speed-gens", type=int, default=3, help="generations per speed run (the first is not timed)")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "TASK", "GENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        speed_child(args.child[0], args.child[1], int(args.child[2]))
        return
    if (args.gens is not None and args.gens < 1) or (args.seeds is not None and args.seeds < 1):
        sys.exit("--gens and --seeds must be at least 1")
    try:
        import evotorch  # noqa: F401
    except ImportError:
        sys.exit(INSTALL)
    seeds = args.seeds or (1 if args.quick else 3)
    learn = names("mlp-1m,mlp-5m,cnn,cartpole" if args.tasks is None else args.tasks)
    timed = names(("mlp-1m,mlp-5m" if args.quick else "mlp-1m,mlp-5m,mlp-18m") if args.speed is None else args.speed)
    print(f"torch threads 1, population {POPULATION}, seeds {seeds}, pid {os.getpid()}")
    if timed:
        print(
            f"\n{'task':9} {'ours, one member':>18} {'ours, batch rows':>18} {'EvoTorch PGPE':>18} {'speedup':>8} "
            f"{'memory':>7}"
        )
    for name in timed:
        got = {m: speed(m, name, args.speed_gens) for m in ("ours-member", "ours-rows", "pgpe")}
        cells = [
            f"{g['s_per_gen']:.3f} s {g['peak_mb']:+6.0f} MB" if "error" not in g else g["error"][:18]
            for g in got.values()
        ]
        ok = all("error" not in g for g in got.values())
        ratio = f"{got['pgpe']['s_per_gen'] / got['ours-rows']['s_per_gen']:7.1f}x" if ok else "-"
        memory = f"{got['pgpe']['peak_mb'] / max(got['ours-rows']['peak_mb'], 1):6.1f}x" if ok else "-"
        print(f"{name:9} {cells[0]:>18} {cells[1]:>18} {cells[2]:>18} {ratio:>8} {memory:>7}", flush=True)
    all_results, gens, lines = {}, {}, []
    for name in learn:
        task = get_task(name)
        gens[name] = args.gens or task.gens
        all_results[name] = learning(
            task, gens[name], seeds, OURS_GRID if args.ours_grid else [OURS_DEFAULTS], 2 if args.quick else 3
        )
        rows, line = summarize(task, all_results[name], gens[name])
        lines.append(line)
        print("\n".join(rows), flush=True)
    if lines:
        print("\n".join(table(lines, seeds)))
        write_results("bench_vs_evotorch", {"seeds": seeds, "table": lines, "curves": all_results}, args.quick)
        plot(all_results, gens, bench_output("bench_vs_evotorch", ".png", args.quick))


if __name__ == "__main__":
    main()
