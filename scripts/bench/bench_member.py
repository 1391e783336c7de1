"""Benchmark: what the update costs, memory against the population size, and prompt batching.

On the embedded tiny model and a ~30M-parameter random Qwen2.5-VL (same tokenizer), measured side
by side in one run (medians over repetitions; a member's generation cost per strategy, at fixed
length, is scripts/bench/bench_population.py's):
  * the fused update: JAX contraction (hyperscalees.lowrank_update) vs torch einsum over the
    DLPack'd factors
  * peak RSS vs population size (fresh subprocess per size: it must stay flat)
  * prompt batching inside one member: batch_size = all prompts vs one prompt per generate call

    python scripts/bench/bench_member.py [--quick]      -> results/bench/member.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import ERO_EGGROLL  # noqa: E402,F401  (before JAX: on-demand GPU allocation)

# isort: split

import torch  # noqa: E402
from bench_common import median_seconds, write_results  # noqa: E402

import hyperscalees as hs  # noqa: E402
from ERO_EGGROLL.arc.tasks import load_tasks  # noqa: E402
from ERO_EGGROLL.config import EMBEDDED_MODEL_DIR, load_config  # noqa: E402
from ERO_EGGROLL.core.bridge import jax_to_torch  # noqa: E402
from ERO_EGGROLL.core.perturber import Perturber  # noqa: E402
from ERO_EGGROLL.evaluation.evaluator import evaluate, prepare, questions_for  # noqa: E402
from ERO_EGGROLL.memory.measure import measured_peak_rss_bytes  # noqa: E402
from ERO_EGGROLL.model.loading import load_model_from_dir  # noqa: E402
from ERO_EGGROLL.model.qwen import run_perturber  # noqa: E402
from ERO_EGGROLL.model.random_model import SHAPES, random_model  # noqa: E402


def random_30m_model(tiny_dir: Path):
    """A ~26M-parameter Qwen2.5-VL (8 layers, hidden 512) with random weights and the tiny model's tokenizer."""
    return random_model(tiny_dir, SHAPES["26m"])


# These benchmarks measure generation: pin a generated fitness on the test questions,
# whatever default.yaml's fitness is.
GENERATION = (
    "evaluation.fitness=char_similarity",
    "data.fitness_source=test",
    "evaluation.max_new_tokens_rule=target_tokens",
    "evaluation.batch_size=2",
    "evaluation.members_per_batch=1",
    "evolution.lr=0.5",
)


def config_for(population: int, strategy: str = "forward", extra: tuple[str, ...] = ()):
    return load_config(
        ROOT / "configs" / "default.yaml",
        [
            *GENERATION,
            f"evolution.population_size={population}",
            f"evolution.strategy={strategy}",
            "evaluation.max_new_tokens_cap=64",
            *extra,
        ],
    )


# A random model's biases are all zero, so sigma relative to their scale is undefined: use an absolute sigma there.
RANDOM_MODEL_SIGMA = ("evolution.sigma_mode=absolute", "evolution.sigma=0.02")


def bench_model(name: str, model, processor, reps: int, extra: tuple[str, ...] = ()) -> dict:
    cfg = config_for(16, extra=extra)
    prepared = prepare(questions_for(load_tasks(ids=cfg.data.task_ids), cfg, "fitness"), processor, cfg)
    row = {"model": name, "parameters": sum(p.numel() for p in model.parameters())}
    perturber = run_perturber(model, cfg)
    fitness = hs.normalize_fitness([float(i % 5) for i in range(16)])

    def jax_directions():
        for name in perturber.lora_names:
            w = perturber.params[name]
            hs.lowrank_update(
                perturber.plan.keys[name],
                tuple(w.shape),
                fitness,
                epoch=0,
                rank=cfg.evolution.rank,
                sigma=perturber.plan.sigma[name],
            ).block_until_ready()

    def torch_directions():
        """The same contraction as one torch einsum over the DLPack'd factors of all members."""
        f = torch.from_numpy(fitness)
        for name in perturber.lora_names:
            w = perturber.params[name]
            a, b = hs.population_lowrank_factors(
                perturber.plan.keys[name],
                tuple(w.shape),
                epoch=0,
                members=range(16),
                rank=cfg.evolution.rank,
                sigma=perturber.plan.sigma[name],
            )
            torch.einsum("nir,njr->ij", f[:, None, None] * jax_to_torch(a), jax_to_torch(b)) / 4.0  # / sqrt(16)

    row["LORA update directions, JAX contraction s"] = median_seconds(jax_directions, reps)
    row["LORA update directions, torch einsum s"] = median_seconds(torch_directions, reps)
    row["whole update (Perturber.update) s"] = median_seconds(
        lambda: _update_and_restore(perturber, list(fitness)), reps
    )
    perturber.remove_hooks()
    cfg_one = config_for(16, extra=extra)
    cfg_one.evaluation.batch_size = 1
    cfg_all = config_for(16, extra=extra)
    cfg_all.evaluation.batch_size = len(prepared)
    row["prompts one at a time s"] = median_seconds(lambda: evaluate(model, processor, prepared, cfg_one), reps)
    row["prompts batched s"] = median_seconds(lambda: evaluate(model, processor, prepared, cfg_all), reps)
    row["batching speed-up"] = row["prompts one at a time s"] / row["prompts batched s"]
    return row


def _update_and_restore(perturber: Perturber, fitness: list[float]) -> None:
    snapshot = {n: p.clone() for n, p in perturber.params.items()}
    perturber.update(fitness, 0, again=True)  # the weights are set back below: each repetition is the same update
    with torch.no_grad():
        for n, p in perturber.params.items():
            p.copy_(snapshot[n])


def _memory_case(population: int) -> dict:
    """Child process: one member evaluation and one update at this population size; peak RSS."""
    cfg = config_for(population)
    model, processor = load_model_from_dir(ROOT / EMBEDDED_MODEL_DIR)
    prepared = prepare(questions_for(load_tasks(ids=cfg.data.task_ids), cfg, "fitness"), processor, cfg)
    perturber = run_perturber(model, cfg)
    with perturber.member(0, population - 1):
        evaluate(model, processor, prepared, cfg)
    perturber.update([float(i % 3) for i in range(population)], 0)
    return {"population": population, "peak_rss_mb": measured_peak_rss_bytes() / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-case", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_case:
        print(json.dumps(_memory_case(args.memory_case)))
        return
    reps = 2 if args.quick else 5
    tiny_dir = ROOT / EMBEDDED_MODEL_DIR
    tiny, processor = load_model_from_dir(tiny_dir)
    rows = [bench_model("tiny (embedded)", tiny, processor, reps)]
    if not args.quick:
        rows.append(bench_model("random ~26M", random_30m_model(tiny_dir), processor, reps, RANDOM_MODEL_SIGMA))
    print("\n## Update and prompt batching (3 ARC questions, <= 64 new tokens; medians)")
    for row in rows:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
    memory = []
    for population in [4, 64] if args.quick else [4, 16, 64, 256]:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-case", str(population)], capture_output=True, text=True, check=True
        )
        memory.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("\n## Peak RSS vs population size (tiny model, one member + one update, fresh process each)")
    for m in memory:
        print(f"N={m['population']:4d}  peak RSS {m['peak_rss_mb']:.0f} MB")
    write_results("member", {"per_member": rows, "memory_vs_population": memory}, args.quick)


if __name__ == "__main__":
    main()
