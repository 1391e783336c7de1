"""EGGROLL against ERO's own search in the same harness: {ES update, ERO's elite average} x {low-rank, full-rank noise}.

On the embedded tiny model, every combination gets the same fitness (answer log-prob on the leave-one-out training
pairs of configs/default.yaml's tasks), the same data split and the same number of member evaluations; the measure is
the held-out test answer log-prob of the mean model, with ERO's character similarity of the greedy test output beside
it. ERO's search runs with ERO's protocol (configs/ero.yaml: scale 0.15, 4 round-robin elites, reset to base after 3,
independent draws, the same noise every epoch until a reset, clamp 10), under both readings of its scale file
(signed per-tensor mean, per-tensor std). The same four combinations then train the MLP of scripts/examples.

    python scripts/bench/eggroll_vs_ero.py --quick          (one seed, a few epochs, under 3 minutes on 2 cores)
    python scripts/bench/eggroll_vs_ero.py                  (3 seeds; docs/comparisons.md's table)
        -> a table on stdout, results/bench/eggroll_vs_ero[_quick].png and .json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts" / "examples"))

import torch  # noqa: E402
from bench_common import bench_output, save_plot, write_results  # noqa: E402
from mlp_regression import make_batch  # noqa: E402

from ERO_EGGROLL.arc.tasks import load_tasks  # noqa: E402
from ERO_EGGROLL.config import load_config  # noqa: E402
from ERO_EGGROLL.core.perturber import Perturber  # noqa: E402
from ERO_EGGROLL.evaluation.evaluator import evaluate, evaluate_members  # noqa: E402
from ERO_EGGROLL.evaluation.prepared import prepare, questions_for  # noqa: E402
from ERO_EGGROLL.model.loading import load_model_from_dir  # noqa: E402
from ERO_EGGROLL.model.qwen import run_perturber  # noqa: E402
from ERO_EGGROLL.run.population import evaluate_mean_model  # noqa: E402

# ERO's protocol beside its noise (configs/ero.yaml), and EGGROLL's defaults (configs/default.yaml)
ERO = {
    "search": "ero",
    "antithetic": False,
    "elites": 4,
    "reset_after": 3,
    "clamp": 10.0,
    "noise_reuse": 0,
    "lr": 1.0,
    "sigma": 0.15,
}
COMBOS: dict[str, dict] = {
    "EGGROLL (ES update, low-rank)": {"sigma_mode": "relative"},
    "ES update, full-rank (OpenES)": {"noise": "full", "sigma_mode": "relative"},
    "ERO's selection, low-rank (the project's plan)": {**ERO, "noise": "lowrank", "sigma_mode": "relative"},
    "ERO (full-rank, std reading)": {**ERO, "noise": "full", "sigma_mode": "relative"},
    "ERO (full-rank, mean reading)": {**ERO, "noise": "full", "sigma_mode": "signed_mean"},
}


def member_bytes(perturber: Perturber) -> int:
    """Bytes one member holds beyond the model: its noise, plus the restore copy of every tensor noised in place
    (dense noise is added into the weight and the exact mean restored from a copy)."""
    lora, full = perturber.member_noise(0, 0)
    noise = sum(t.numel() * t.element_size() for pair in lora.values() for t in pair) + sum(
        t.numel() * t.element_size() for t in full.values()
    )
    return noise + sum(perturber.params[n].numel() * perturber.params[n].element_size() for n in full)


def run_tiny(
    name: str, options: dict, seed: int, epochs: int, population: int, model, processor, train, held_out
) -> dict:
    sets = [f"evolution.{k}={v}" for k, v in options.items()] + [
        f"seed={seed}",
        f"evolution.population_size={population}",
    ]
    cfg = load_config(ROOT / "configs" / "default.yaml", sets)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    perturber = run_perturber(model, cfg)
    k = (
        1 if cfg.evolution.noise == "full" else min(16, population)
    )  # dense noise is applied in place, one member at a time
    try:
        start_row = evaluate_mean_model(model, processor, train, held_out, cfg, 0)
        curve, seconds, best = [start_row["mean_model_answer_logprob"]], [], -float("inf")
        for epoch in range(epochs):
            start = time.perf_counter()
            fitness: list[float] = []
            for first in range(0, population, k):
                if k == 1:
                    with perturber.member(epoch, first):
                        fitness.append(evaluate(model, processor, train, cfg).fitness)
                else:
                    with perturber.members(epoch, range(first, first + k)):
                        fitness += [r.fitness for r in evaluate_members(model, processor, train, cfg, k)]
            perturber.update(fitness, epoch)
            seconds.append(time.perf_counter() - start)
            best = max(best, *fitness)  # ERO's best model is its best member so far; the same figure for every search
            curve.append(evaluate(model, processor, held_out, cfg).fitness)
        end_row = evaluate_mean_model(model, processor, train, held_out, cfg, epochs)
        return {
            "combo": name,
            "seed": seed,
            "curve": curve,
            "held_out_gain": curve[-1] - curve[0],
            "best_member": best,
            "char_similarity_gain": end_row["mean_model_char_similarity"] - start_row["mean_model_char_similarity"],
            "seconds_per_epoch": statistics.mean(seconds),
            "member_bytes": member_bytes(perturber),
        }
    finally:
        perturber.remove_hooks()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base[n])


def run_mlp(name: str, options: dict, seed: int, epochs: int) -> dict:
    """The same combination on the MLP regression example (fitness: minus the MSE of the epoch's batch)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
    )
    eggroll = (
        options.get("search", "eggroll") == "eggroll"
    )  # EGGROLL: the example's settings; ERO: its protocol, std reading
    opts = {
        **options,
        **({"sigma": 0.05, "sigma_mode": "absolute", "lr": 0.03, "optimizer": "adam"} if eggroll else {}),
    }
    perturber = Perturber.for_module(net, population_size=32, rank=2, seed=seed, **opts)
    x_out, y_out = make_batch(-1)
    mse = torch.nn.functional.mse_loss
    with torch.no_grad():
        before = float(mse(net(x_out), y_out))
    start = time.perf_counter()
    for epoch in range(epochs):
        x, y = make_batch(epoch)
        fitness = []
        for i in range(32):
            with perturber.member(epoch, i), torch.no_grad():
                fitness.append(-float(mse(net(x), y)))
        perturber.update(fitness, epoch)
    with torch.no_grad():
        after = float(mse(net(x_out), y_out))
    return {
        "combo": name,
        "seed": seed,
        "mse_before": before,
        "mse_after": after,
        "seconds_per_epoch": (time.perf_counter() - start) / epochs,
    }


def mean_sd(values: list[float], fmt: str) -> str:
    return (
        format(values[0], fmt)
        if len(values) == 1
        else f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt[1:] if fmt[0] == '+' else fmt}}"
    )


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in COMBOS:
        curves = [r["curve"] for r in rows if r["combo"] == name]
        mean = [statistics.mean(c[i] for c in curves) for i in range(len(curves[0]))]
        ax.plot(range(len(mean)), mean, "o-", markersize=3, label=name)
    ax.set_xlabel("epoch (same population and member evaluations for every search)")
    ax.set_ylabel("held-out answer log-prob (mean model)")
    ax.set_title("EGGROLL against ERO's search, tiny Qwen2.5-VL (CPU)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_plot(fig, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, 2 epochs of 16 members, a short MLP run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--mlp-epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, help="the figure (default results/bench/eggroll_vs_ero[_quick].png)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds, epochs, population, mlp_epochs = (
        (1, 2, 16, 15) if args.quick else (args.seeds, args.epochs, args.population, args.mlp_epochs)
    )
    cfg = load_config(ROOT / "configs" / "default.yaml")
    model, processor = load_model_from_dir(cfg.resolve_path(cfg.model.path))
    tasks = load_tasks(ids=cfg.data.task_ids)
    train = prepare(questions_for(tasks, cfg, "fitness"), processor, cfg)
    held_out = prepare(questions_for(tasks, cfg, "test"), processor, cfg)
    rows, mlp = [], []
    for seed in range(seeds):
        for name, options in COMBOS.items():
            rows.append(run_tiny(name, options, seed, epochs, population, model, processor, train, held_out))
            print({k: v for k, v in rows[-1].items() if k != "curve"}, flush=True)
            if (
                "mean reading" not in name
            ):  # a fresh MLP has no pretrained means to read: the std reading stands for ERO
                mlp.append(run_mlp(name, options, seed, mlp_epochs))
    print(
        f"\ntiny Qwen2.5-VL, tasks {cfg.data.task_ids}: {seeds} seed(s) x {epochs} epochs x population {population} "
        f"= {epochs * population} member evaluations per run; fitness answer log-prob on the train pairs "
        "(leave-one-out)\n"
    )
    print(
        "| search | held-out answer log-prob gain | char similarity gain (test output) | best member so far (train) "
        "| s / epoch | memory per member |"
    )
    print("|---|---|---|---|---|---|")
    for name in COMBOS:
        mine = [r for r in rows if r["combo"] == name]
        print(
            f"| {name} | {mean_sd([r['held_out_gain'] for r in mine], '+.4f')} | "
            f"{mean_sd([r['char_similarity_gain'] for r in mine], '+.4f')} | "
            f"{mean_sd([r['best_member'] for r in mine], '.4f')} | "
            f"{statistics.mean(r['seconds_per_epoch'] for r in mine):.1f} | {mine[0]['member_bytes'] / 2**20:.2f} MiB |"
        )
    print(
        f"\nMLP 4-64-64-1 regression (scripts/examples/mlp_regression.py), population 32, {mlp_epochs} epochs, "
        "held-out MSE:\n"
    )
    print("| search | MSE before | MSE after | s / epoch |")
    print("|---|---|---|---|")
    for name in COMBOS:
        mine = [r for r in mlp if r["combo"] == name]
        if mine:
            print(
                f"| {name} | {mean_sd([r['mse_before'] for r in mine], '.4f')} | "
                f"{mean_sd([r['mse_after'] for r in mine], '.4f')} | "
                f"{statistics.mean(r['seconds_per_epoch'] for r in mine):.2f} |"
            )
    out = args.out or bench_output("eggroll_vs_ero", ".png", args.quick)
    plot(rows, out)
    write_results("eggroll_vs_ero", {"tiny": rows, "mlp": mlp}, quick=args.quick)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
