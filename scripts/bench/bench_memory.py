"""Benchmark: the memory model's prediction against measurement, phase by phase, at scale on the CPU.

Each case is a fresh process with a random Qwen2.5-VL (`ERO_EGGROLL.model.random_model`), peak from VmHWM
and reset between phases by writing 5 to /proc/self/clear_refs:
  * resident: RSS held after the model and the Perturber exist (weights, saved copies)
  * evaluation: peak growth during one perturbed generate call (member noise, KV cache, activations)
  * update: peak growth during the first streamed update (JIT compilation done beforehand on a
    one-layer twin with the same tensor shapes, so it is not counted)
  * optimizer state (Adam cases): RSS held after the first update
glibc's mmap threshold is fixed (MALLOC_MMAP_THRESHOLD_) in the measured process so that freed
buffers go back to the OS and RSS counts live bytes, as the model does; `--no-fixed-threshold`
shows the allocator's own slack instead.

The 7B's own shapes (hidden 3584, MLP 18944, vocabulary 152,064 for the embedding and the untied output head,
the 32-block vision tower; all FROZEN but the decoder layers, as classified by default) with L decoder layers:
case `7b@L:bfloat16:sgd` (L = 2 takes about 6 GB of RAM).

    python scripts/bench/bench_memory.py [--quick] [--cases 360m:float32:sgd 7b@2:bfloat16:sgd ...]
        -> results/bench/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench_common import write_results  # noqa: E402

PROMPT_TOKENS, NEW_TOKENS, ROWS, RANK, POPULATION = 384, 8, 4, 64, 16
SEVEN_B = "7b@"  # a case "7b@L:bfloat16:sgd" is Qwen2.5-VL-7B's tensor shapes with L decoder layers
TOLERANCE = 0.20


def measure(size: str, dtype: str, optimizer: str, phase: str) -> dict:
    """Child process: measured and predicted bytes of the resident part and of one phase.

    One phase per process: JAX keeps freed CPU buffers for reuse, so a phase measured after another
    would be served from the first one's leftovers."""
    import torch

    import ERO_EGGROLL  # noqa: F401  (before JAX)
    from ERO_EGGROLL.config import EMBEDDED_MODEL_DIR, load_config
    from ERO_EGGROLL.memory.measure import current_rss_bytes, measured_peak_rss_bytes, start_rss_measurement
    from ERO_EGGROLL.memory.model import Workload, estimate
    from ERO_EGGROLL.model.qwen import classify_model, run_perturber
    from ERO_EGGROLL.model.random_model import SHAPES, TextShape, random_model, random_model_like

    torch_dtype, tiny_dir = getattr(torch, dtype), ROOT / EMBEDDED_MODEL_DIR
    if size.startswith(SEVEN_B):  # the 7B's own tensors (widths, vocabulary, vision tower), fewer decoder layers
        arch = json.loads((ROOT / "configs" / "qwen2_5_vl_7b_config.json").read_text())
        shape = TextShape(
            arch["hidden_size"],
            arch["intermediate_size"],
            int(size.removeprefix(SEVEN_B)),
            arch["num_attention_heads"],
            arch["num_key_value_heads"],
        )

        def build():
            return random_model_like(tiny_dir, arch, shape.layers, torch_dtype)
    else:
        shape = SHAPES[size]

        def build():
            return random_model(tiny_dir, shape, torch_dtype)

    cfg = load_config(
        ROOT / "configs" / "smoke.yaml",
        [
            f"evolution.population_size={POPULATION}",
            f"evolution.rank={RANK}",
            f"evolution.optimizer={optimizer}",
            "evolution.lr=0.01",
            "evolution.sigma_mode=absolute",
            "evolution.sigma=0.02",
        ],
    )
    fitness = [float((7 * i) % 5) for i in range(POPULATION)]
    # the twin has the evolvable tensors' shapes (one layer);
    # the embedded model's vocabulary and vision tower (FROZEN) suffice
    twin = run_perturber(random_model(tiny_dir, TextShape(**{**shape.__dict__, "layers": 1}), torch_dtype), cfg)
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad(), twin.member(0, 0):  # compiles the member-noise draws of one layer's tensor shapes
        twin.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2, do_sample=False
        )
    if phase == "update":
        twin.update(fitness, 0)  # compiles the update of every tensor shape
    twin.remove_hooks()
    del twin
    base = start_rss_measurement()
    model = build()
    perturber = run_perturber(model, cfg)
    start = start_rss_measurement()
    measured = {"resident": start - base}
    if phase == "update":
        perturber.update(fitness, 0)
        measured["update"] = measured_peak_rss_bytes() - start
        if optimizer != "sgd":  # Adam's moments are created by the first update and stay: resident, not workspace
            measured["optimizer state"] = current_rss_bytes() - start
            measured["update"] -= measured["optimizer state"]
    else:
        ids = torch.randint(0, 300, (ROWS, PROMPT_TOKENS))
        with torch.no_grad(), perturber.member(0, 1):
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
            )
        measured["evaluation"] = measured_peak_rss_bytes() - start
    est = estimate(
        cfg,
        model.config.to_dict(),
        classify_model(model, cfg),
        Workload(PROMPT_TOKENS, NEW_TOKENS, 0, ROWS),
        dtype,
        on_gpu=False,
    )
    state = {k: v for k, v in est.resident.items() if k.startswith("optimizer")}
    predicted = {
        "resident": sum(v for k, v in est.resident.items() if k not in state),
        "evaluation": est.evaluation_total,
        "update": est.update_total,
        "optimizer state": sum(state.values()),
    }
    return {
        "measured": measured,
        "predicted": {k: predicted[k] for k in measured},
        "components": {**est.evaluation, **est.update},
        "evolvable_params": sum(p.numel() for p in perturber.params.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 100m model in fp32 only")
    parser.add_argument("--cases", nargs="+", help="size:dtype:optimizer, e.g. 360m:bfloat16:adam or 7b@2:bfloat16:sgd")
    parser.add_argument("--out", default="memory", help="results/bench/<OUT>.json")
    parser.add_argument("--no-fixed-threshold", action="store_true", help="measure with glibc's dynamic mmap threshold")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(*args.case.split(":"))))
        return
    cases = args.cases or (
        ["100m:float32:sgd"] if args.quick else ["360m:float32:sgd", "360m:bfloat16:sgd", "360m:float32:adam"]
    )
    env = dict(os.environ) if args.no_fixed_threshold else {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    print(
        f"workload: {ROWS} rows x {PROMPT_TOKENS} prompt + {NEW_TOKENS} new tokens, rank {RANK}, population "
        f"{POPULATION}; CPU; MB = 2**20 bytes"
    )
    print("| case | phase | predicted MB | measured MB | measured / predicted |")
    print("|---|---|---|---|---|")
    rows, worst = [], 0.0
    for case in cases:
        for phase in ("update", "evaluation"):
            done = subprocess.run(
                [sys.executable, __file__, "--case", f"{case}:{phase}"], capture_output=True, text=True, env=env
            )
            if done.returncode != 0:
                raise SystemExit(f"case {case} {phase} failed:\n{done.stderr[-3000:]}")
            row = {"case": case, "phase": phase, **json.loads(done.stdout.strip().splitlines()[-1])}
            rows.append(row)
            for part, predicted in row["predicted"].items():
                if part == "resident" and phase != "update":
                    continue  # measured in both processes; reported once
                ratio = row["measured"][part] / predicted
                worst = max(worst, abs(ratio - 1))
                print(
                    f"| {case} | {part} | {predicted / 2**20:.0f} | {row['measured'][part] / 2**20:.0f} | "
                    f"{ratio:.2f} |",
                    flush=True,
                )
    print(f"\nlargest deviation from the prediction: {worst:.0%} (target: within {TOLERANCE:.0%})")
    write_results(args.out, rows, args.quick)


if __name__ == "__main__":
    main()
