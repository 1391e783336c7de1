"""EGGROLL against backprop on the same tiny model, tensors, objective and number of forward passes.

The objective is the answer_logprob fitness (mean answer-token log-probability, teacher-forced) on
the leave-one-out training pairs of configs/default.yaml's tasks; the curve is the held-out answer
log-prob of the test questions, which neither method ever trains on. Both methods change only the
LORA-class tensors (the 2-D attention/MLP projections; `evolution.freeze_nonlora`) from the same
base weights. The budget counts forward passes over the training questions: an ES member costs one,
a backprop step one (plus its backward pass). EGGROLL runs budget / N epochs of population N; each
epoch also logs the cosine between its weight change and the true gradient at the weights before it.

    python scripts/bench/es_vs_backprop.py [--budget 128] [--populations 16 64] [--ranks 1 4]   (minutes on 2 cores)
    python scripts/bench/es_vs_backprop.py --budget 256 --populations 16 64 256                 (the README's table)
        -> results/bench/es_vs_backprop.png and .json, a table on stdout
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from bench_common import bench_output, save_plot, write_results  # noqa: E402

from ERO_EGGROLL.arc.tasks import load_tasks  # noqa: E402
from ERO_EGGROLL.config import Config, load_config  # noqa: E402
from ERO_EGGROLL.evaluation.evaluator import evaluate, evaluate_members  # noqa: E402
from ERO_EGGROLL.evaluation.likelihood import answer_logprob_objective, update_with_gradient_cosine  # noqa: E402
from ERO_EGGROLL.evaluation.prepared import prepare, questions_for  # noqa: E402
from ERO_EGGROLL.model.loading import load_model_from_dir  # noqa: E402
from ERO_EGGROLL.model.qwen import ParamClass, classify_model, run_perturber  # noqa: E402


def setup(overrides: list[str]):
    cfg = load_config(ROOT / "configs" / "default.yaml", ["evolution.freeze_nonlora=true", *overrides])
    model, processor = load_model_from_dir(cfg.resolve_path(cfg.model.path))
    tasks = load_tasks(ids=cfg.data.task_ids)
    train = prepare(questions_for(tasks, cfg, "fitness"), processor, cfg)
    held_out = prepare(questions_for(tasks, cfg, "test"), processor, cfg)
    return cfg, model, processor, train, held_out


def run_es(cfg: Config, model, processor, train, held_out, budget: int, members_per_call: int) -> dict:
    """EGGROLL for budget // N epochs through the Perturber facade; held-out log-prob and gradient cosine per epoch."""
    n = cfg.evolution.population_size
    perturber = run_perturber(model, cfg)
    curve = [(0, evaluate(model, processor, held_out, cfg).fitness)]
    cosines = []
    for epoch in range(budget // n):
        fitness: list[float] = []
        for first in range(0, n, members_per_call):
            with perturber.members(epoch, range(first, first + members_per_call)):
                fitness += [r.fitness for r in evaluate_members(model, processor, train, cfg, members_per_call)]
        cosines.append(
            update_with_gradient_cosine(
                lambda: perturber.update(fitness, epoch), perturber, model, processor, train, cfg
            )["gradient_cosine"]
        )
        curve.append(((epoch + 1) * n, evaluate(model, processor, held_out, cfg).fitness))
    perturber.remove_hooks()
    return {"curve": curve, "gradient_cosine": cosines}


def run_backprop(
    cfg: Config, model, processor, train, held_out, budget: int, optimizer: str, lr: float, every: int
) -> dict:
    """Plain gradient ascent on the same objective and LORA-class tensors: one forward + backward per step."""
    params = [dict(model.named_parameters())[s.name] for s in classify_model(model, cfg) if s.cls is ParamClass.LORA]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.Adam(params, lr=lr)
    curve = [(0, evaluate(model, processor, held_out, cfg).fitness)]
    try:
        for step in range(1, budget + 1):
            opt.zero_grad()
            with torch.enable_grad():
                (-answer_logprob_objective(model, processor, train, cfg)).backward()
            opt.step()
            if step % every == 0 or step == budget:
                curve.append((step, evaluate(model, processor, held_out, cfg).fitness))
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    return {"curve": curve}


def plot(results: list[dict], out: Path, budget: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        xs, ys = zip(*r["curve"])
        ax.plot(xs, ys, "o-" if r["method"].startswith("EGGROLL") else "-", markersize=3, label=r["method"])
    ax.set_xlabel("forward passes over the training questions (ES: members; backprop: steps)")
    ax.set_ylabel("held-out answer log-prob (mean per token)")
    ax.set_title(f"EGGROLL vs backprop, tiny Qwen2.5-VL, LORA-class tensors, budget {budget}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_plot(fig, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budget", type=int, default=128, help="forward passes per method (ES epochs = budget // population)"
    )
    parser.add_argument(
        "--populations", type=int, nargs="+", default=[16, 64], help="EGGROLL populations (each <= budget)"
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--es-lr", type=float, default=1.0)
    parser.add_argument("--sigma", type=float, default=0.5, help="relative sigma of EGGROLL")
    parser.add_argument("--sgd-lr", type=float, default=0.1)
    parser.add_argument("--adam-lr", type=float, default=1e-3)
    parser.add_argument("--members-per-call", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=16, help="backprop steps between held-out evaluations")
    parser.add_argument("--out", type=Path, help="the figure (default results/bench/es_vs_backprop.png)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if max(args.populations) > args.budget:
        parser.error(
            f"population {max(args.populations)} needs --budget >= {max(args.populations)} "
            "(one epoch costs one forward pass per member)"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    jobs = [("es", n, r) for n in args.populations for r in args.ranks] + [("sgd", 0, 0), ("adam", 0, 0)]
    for kind, n, r in jobs:
        common = [f"evolution.sigma={args.sigma}", f"evolution.lr={args.es_lr}"]
        if kind == "es":
            common += [f"evolution.population_size={n}", f"evolution.rank={r}"]
        cfg, model, processor, train, held_out = setup(common)  # fresh base weights for every method
        start = time.perf_counter()
        if kind == "es":
            out = run_es(cfg, model, processor, train, held_out, args.budget, min(args.members_per_call, n))
            method = f"EGGROLL N={n} r={r}"
        else:
            lr = args.sgd_lr if kind == "sgd" else args.adam_lr
            out = run_backprop(cfg, model, processor, train, held_out, args.budget, kind, lr, args.eval_every)
            method = f"backprop {'SGD' if kind == 'sgd' else 'Adam'} lr={lr:g}"
        train_final = float(answer_logprob_objective(model, processor, train, cfg).detach())
        results.append({"method": method, **out, "train_final": train_final, "seconds": time.perf_counter() - start})
        cos = out.get("gradient_cosine")
        print(
            json.dumps(
                {
                    "method": method,
                    "held_out": [round(v, 4) for _, v in out["curve"]],
                    "train_final": round(train_final, 4),
                    "gradient_cosine": [round(c, 4) for c in cos] if cos else None,
                    "seconds": round(results[-1]["seconds"], 1),
                }
            ),
            flush=True,
        )
    out = args.out or bench_output("es_vs_backprop", ".png", False)
    plot(results, out, args.budget)
    base = results[0]["curve"][0][1]
    print(f"\nbudget {args.budget} forward passes; held-out answer log-prob of the base model {base:.4f}\n")
    print(
        "| method | updates | held-out log-prob (final) | change | train objective (final) | mean gradient cosine | "
        "seconds |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        cos = r.get("gradient_cosine")
        updates = len(cos) if cos is not None else r["curve"][-1][0]
        mean_cos = f"{sum(cos) / len(cos):.4f}" if cos else "-"
        final = r["curve"][-1][1]
        print(
            f"| {r['method']} | {updates} | {final:.4f} | {final - base:+.4f} | {r['train_final']:.4f} | {mean_cos} | "
            f"{r['seconds']:.0f} |"
        )
    write_results("es_vs_backprop", results, quick=False)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
