"""How often reduced precision makes `members_per_batch` and `strategy` change a member's fitness.

In float32, K members as batch rows and the in-place strategy give every member exactly the fitness
of the sequential forward evaluator (tests/core/test_batched_members.py, tests/run/test_evolution_run.py). In
bfloat16 the rows run one member's operations (bit-identical logits on a CPU), but `inplace` rounds
W + A B^T into bf16, so some of its members' greedy answers change.
This script counts them on the embedded tiny model: one epoch's members (the smoke config with the
tests' small-run settings), fitness by forward K=1 (the reference), forward K=4 and K=8, and inplace
K=1, in float32 and in bfloat16.

    python scripts/bench/precision_consistency.py [--population 8] [--epochs 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import SMALL  # noqa: E402  (the tests' small-run settings: one task, sigma 2.0, 48 tokens)

import ERO_EGGROLL  # noqa: E402,F401  (before JAX)
from ERO_EGGROLL.arc.tasks import load_tasks  # noqa: E402
from ERO_EGGROLL.config import load_config  # noqa: E402
from ERO_EGGROLL.evaluation.evaluator import prepare, questions_for  # noqa: E402
from ERO_EGGROLL.model.loading import load_model_from_dir  # noqa: E402
from ERO_EGGROLL.model.qwen import run_perturber  # noqa: E402
from ERO_EGGROLL.run.population import evaluate_batch, member_batches  # noqa: E402

VARIANTS = [("forward", 1), ("forward", 4), ("forward", 8), ("inplace", 1)]


def fitness_of(model, processor, population: int, epoch: int, strategy: str, k: int) -> list[float]:
    cfg = load_config(
        ROOT / "configs" / "smoke.yaml",
        [
            *[s for s in SMALL if not s.startswith("evolution.epochs")],
            f"evolution.population_size={population}",
            f"evolution.strategy={strategy}",
        ],
    )
    prepared = prepare(questions_for(load_tasks(ids=cfg.data.task_ids), cfg, "fitness"), processor, cfg)
    perturber = run_perturber(model, cfg)
    try:
        return [
            f
            for ids in member_batches(population, k)
            for f in evaluate_batch(perturber, model, processor, prepared, cfg, epoch, ids)
        ]
    finally:
        perturber.remove_hooks()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument(
        "--epochs", type=int, nargs="+", default=[0, 1, 2], help="which epochs' noise to evaluate (base weights)"
    )
    args = parser.parse_args()
    model, processor = load_model_from_dir(ROOT / "checkpoints" / "tiny-qwen2.5-vl")
    rows = []
    for dtype in ("float32", "bfloat16"):
        model.to(getattr(__import__("torch"), dtype))
        for epoch in args.epochs:
            reference = fitness_of(model, processor, args.population, epoch, "forward", 1)
            for strategy, k in VARIANTS[1:]:
                other = fitness_of(model, processor, args.population, epoch, strategy, k)
                differ = sum(a != b for a, b in zip(reference, other))
                rows.append(
                    {
                        "dtype": dtype,
                        "epoch": epoch,
                        "variant": f"{strategy} K={k}",
                        "members": args.population,
                        "fitness differs": differ,
                        "max |difference|": max(abs(a - b) for a, b in zip(reference, other)),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    for dtype in ("float32", "bfloat16"):
        mine = [r for r in rows if r["dtype"] == dtype]
        print(
            f"{dtype}: {sum(r['fitness differs'] for r in mine)} of {sum(r['members'] for r in mine)} member "
            "evaluations differ from forward K=1"
        )


if __name__ == "__main__":
    main()
