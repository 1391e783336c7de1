"""Benchmark: what one member's fitness costs, generated (char similarity of the greedy answer) vs teacher-forced
(answer_logprob, one forward pass per question), on the same questions, members and batching, side by side in one run.

configs/default.yaml's questions (8 leave-one-out pairs of b1fc8b8e and e6de6e8f, token budget from the
demonstrations), a population of 16 evaluated K members per call, K in 1 and 16.

    python scripts/bench/bench_fitness.py [--reps 3] [--cap 256]     -> results/bench/fitness.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench_common import median_seconds, write_results  # noqa: E402

from ERO_EGGROLL.arc.tasks import load_tasks  # noqa: E402
from ERO_EGGROLL.config import load_config  # noqa: E402
from ERO_EGGROLL.evaluation.evaluator import evaluate_members  # noqa: E402
from ERO_EGGROLL.evaluation.prepared import prepare, questions_for  # noqa: E402
from ERO_EGGROLL.model.loading import load_model_from_dir  # noqa: E402
from ERO_EGGROLL.model.qwen import run_perturber  # noqa: E402

POPULATION = 16


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cap", type=int, default=256, help="evaluation.max_new_tokens_cap for the generated fitness")
    args = parser.parse_args()
    rows = []
    for k in (1, POPULATION):
        seconds = {}
        for fitness in ("char_similarity", "answer_logprob"):
            cfg = load_config(
                ROOT / "configs" / "default.yaml",
                [
                    f"evaluation.fitness={fitness}",
                    f"evolution.population_size={POPULATION}",
                    f"evaluation.max_new_tokens_cap={args.cap}",
                ],
            )
            model, processor = load_model_from_dir(cfg.resolve_path(cfg.model.path))
            prepared = prepare(questions_for(load_tasks(ids=cfg.data.task_ids), cfg, "fitness"), processor, cfg)
            perturber = run_perturber(model, cfg)

            def epoch() -> None:
                for first in range(0, POPULATION, k):
                    if k == 1:
                        with perturber.member(0, first):
                            evaluate_members(model, processor, prepared, cfg, 1)
                    else:
                        with perturber.members(0, range(first, first + k)):
                            evaluate_members(model, processor, prepared, cfg, k)

            seconds[fitness] = median_seconds(epoch, args.reps) / POPULATION
            perturber.remove_hooks()
        rows.append(
            {
                "K": k,
                "questions": len(prepared),
                "generated (char_similarity) s/member": seconds["char_similarity"],
                "answer_logprob s/member": seconds["answer_logprob"],
                "speed-up": seconds["char_similarity"] / seconds["answer_logprob"],
            }
        )
        print(
            json.dumps({key: (round(v, 4) if isinstance(v, float) else v) for key, v in rows[-1].items()}), flush=True
        )
    print(
        "\n| K (members per call) | questions | generated: s/member | answer_logprob: s/member | speed-up "
        "|\n|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['K']} | {r['questions']} | {r['generated (char_similarity) s/member']:.3f} | "
            f"{r['answer_logprob s/member']:.3f} | {r['speed-up']:.1f}x |"
        )
    write_results("fitness", rows, quick=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
