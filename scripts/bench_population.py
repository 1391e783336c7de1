"""Benchmark: batched population evaluation (K members per generate call) vs the throughput ceiling.

For K in 1, 2, 4, 8, 16 = N: the time to evaluate all N members of one epoch, next to the ceiling:
the same generate calls with the same rows and prompts and no perturbation. Every call generates
exactly its max_new_tokens (end-of-sequence ignored: min_new_tokens = max_new_tokens), so members and
ceiling do the same work and the ratio is the cost of the per-row deltas alone. Tiny model and a
~26M random Qwen2.5-VL, measured side by side in one run; the last line is
`ratio_to_ceiling=<~26M model at K=8>` (tiny model at K=8 with --quick).

    python scripts/bench_population.py [--quick]     -> results/bench/population.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import median_seconds, write_results  # noqa: E402
from bench_member import RANDOM_MODEL_SIGMA, config_for, random_30m_model  # noqa: E402

from ERO_EGGROLL import generation  # noqa: E402
from ERO_EGGROLL.arc_evaluator import evaluate_members, prepare, questions_for  # noqa: E402
from ERO_EGGROLL.arc_task import load_tasks  # noqa: E402
from ERO_EGGROLL.config import EMBEDDED_MODEL_DIR  # noqa: E402
from ERO_EGGROLL.model_loading import load_model_from_dir  # noqa: E402
from ERO_EGGROLL.perturbation import Perturber  # noqa: E402

POPULATION = 16


@contextlib.contextmanager
def fixed_length():
    """Every generate call of the evaluator produces exactly max_new_tokens tokens (no early stop)."""
    original = generation.generation_config

    def fixed(*args, **kwargs):
        config = original(*args, **kwargs)
        config.min_new_tokens = config.max_new_tokens
        return config

    generation.generation_config = fixed
    try:
        yield
    finally:
        generation.generation_config = original


def bench_model(name: str, model, processor, ks, reps: int, extra=()) -> list[dict]:
    cfg = config_for(POPULATION, extra=extra)
    prepared = prepare(questions_for(load_tasks(ids=cfg.data.task_ids), cfg, "fitness"), processor, cfg)
    perturber = Perturber(model, cfg)
    rows = []
    for k in ks:
        def perturbed_epoch():
            for first in range(0, POPULATION, k):
                if k == 1:  # the sequential reference path of the training loop
                    with perturber.member(0, first):
                        evaluate_members(model, processor, prepared, cfg, 1)
                    continue
                with perturber.members(0, range(first, first + k)):
                    evaluate_members(model, processor, prepared, cfg, k)

        def ceiling_epoch():  # the same generate calls, same rows, no noise installed
            for _ in range(0, POPULATION, k):
                evaluate_members(model, processor, prepared, cfg, k)

        with fixed_length():
            perturbed, ceiling = median_seconds(perturbed_epoch, reps), median_seconds(ceiling_epoch, reps)
        rows.append({"model": name, "K": k, "epoch s": perturbed, "members/s": POPULATION / perturbed,
                     "ceiling epoch s": ceiling, "ratio to ceiling": ceiling / perturbed})
        print(json.dumps({key: (round(v, 3) if isinstance(v, float) else v) for key, v in rows[-1].items()}), flush=True)
    perturber.remove_hooks()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, K in 1 and 8, one repetition")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per measurement (median)")
    args = parser.parse_args()
    reps = 1 if args.quick else args.reps
    ks = [1, 8] if args.quick else [1, 2, 4, 8, POPULATION]
    tiny_dir = ROOT / EMBEDDED_MODEL_DIR
    tiny, processor = load_model_from_dir(tiny_dir)
    print(f"## One epoch of N={POPULATION} members (3 ARC questions each, <= 64 new tokens), median of {reps}")
    rows = bench_model("tiny (embedded)", tiny, processor, ks, reps)
    if not args.quick:
        rows += bench_model("random ~26M", random_30m_model(tiny_dir), processor, ks, reps, RANDOM_MODEL_SIGMA)
    write_results("population", rows, args.quick)
    last = [r for r in rows if r["K"] == 8] or rows
    print(f"ratio_to_ceiling={last[-1]['ratio to ceiling']:.3f}")


if __name__ == "__main__":
    main()
