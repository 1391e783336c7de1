"""Benchmark: time and peak-memory growth of one `Perturber.update`, by model size.

Each case runs in a fresh process: first a one-layer twin of the model (same tensor shapes) is
updated once, which compiles every jitted shape; then the model itself is built, the peak counter
is reset (writing 5 to /proc/self/clear_refs resets VmHWM) and its FIRST update is measured: the
peak RSS during it minus the RSS before it is what the update needs on top of the model (JAX keeps
freed CPU buffers for reuse, so a second update of the same model would hide what the first took).
Further updates are timed.

    python scripts/bench/bench_update.py [--quick] [--sizes tiny 100m 360m] [--optimizer sgd] [--dtype float32]
        -> results/bench/update.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench_common import write_results  # noqa: E402


def update_case(size: str, optimizer: str, dtype: str, population: int, reps: int) -> dict:
    """Child process: median seconds and peak growth of one update of a model of this size."""
    import torch

    from ERO_EGGROLL.config import EMBEDDED_MODEL_DIR, load_config
    from ERO_EGGROLL.memory.measure import measured_peak_rss_bytes, start_rss_measurement
    from ERO_EGGROLL.model.loading import load_model_from_dir
    from ERO_EGGROLL.model.qwen import run_perturber
    from ERO_EGGROLL.model.random_model import SHAPES, TextShape, random_model

    torch_dtype = getattr(torch, dtype)
    tiny_dir = ROOT / EMBEDDED_MODEL_DIR
    overrides = [
        f"evolution.population_size={population}",
        f"evolution.optimizer={optimizer}",
        "evolution.lr=0.01",
        f"evolution.stochastic_rounding={str(dtype != 'float32').lower()}",
    ]
    fitness = [float((7 * i) % 5) for i in range(population)]
    tiny = load_model_from_dir(tiny_dir)[0].to(torch_dtype)
    shape = SHAPES.get(size) or TextShape(
        tiny.config.text_config.hidden_size,
        tiny.config.text_config.intermediate_size,
        2,
        tiny.config.text_config.num_attention_heads,
        tiny.config.text_config.num_key_value_heads,
    )
    # random weights have all-zero biases, where relative sigma is undefined: absolute sigma for every model here
    cfg = load_config(
        ROOT / "configs" / "smoke.yaml", overrides + ["evolution.sigma_mode=absolute", "evolution.sigma=0.02"]
    )
    twin = run_perturber(random_model(tiny_dir, TextShape(**{**shape.__dict__, "layers": 1}), torch_dtype), cfg)
    twin.update(fitness, 0)  # compiles every tensor shape
    twin.remove_hooks()
    del twin
    model = tiny if size == "tiny" else random_model(tiny_dir, shape, torch_dtype)
    perturber = run_perturber(model, cfg)
    rss_before = start_rss_measurement()
    start = time.perf_counter()
    perturber.update(fitness, 1)
    times = [time.perf_counter() - start]
    growth = measured_peak_rss_bytes() - rss_before
    for epoch in range(2, reps + 1):
        start = time.perf_counter()
        perturber.update(fitness, epoch)
        times.append(time.perf_counter() - start)
    evolvable = sum(p.numel() for p in perturber.params.values())
    largest = max(p.numel() for p in perturber.params.values())
    return {
        "size": size,
        "dtype": dtype,
        "optimizer": optimizer,
        "population": population,
        "evolvable_params": evolvable,
        "update_s_median": sorted(times)[len(times) // 2],
        "update_peak_growth_mb": growth / 2**20,
        "largest_tensor_fp32_mb": largest * 4 / 2**20,
        "all_directions_fp32_mb": evolvable * 4 / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny and 100m only, 2 repetitions")
    parser.add_argument("--sizes", nargs="+", default=None, help="tiny, 26m, 100m, 360m, 1b")
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    reps = args.reps or (2 if args.quick else 5)  # the first (measured for memory) counts as one
    if args.case:
        print(json.dumps(update_case(args.case, args.optimizer, args.dtype, args.population, reps)))
        return
    sizes = args.sizes or (["tiny", "100m"] if args.quick else ["tiny", "100m", "360m"])
    rows = []
    print(
        "| model | dtype | optimizer | N | evolvable params | update s (median) | peak growth MB | largest tensor "
        "fp32 MB | all directions fp32 MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--case",
                size,
                "--optimizer",
                args.optimizer,
                "--dtype",
                args.dtype,
                "--population",
                str(args.population),
                "--reps",
                str(reps),
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            raise SystemExit(f"case {size} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(
            f"| {r['size']} | {r['dtype']} | {r['optimizer']} | {r['population']} | {r['evolvable_params'] / 1e6:.1f}M "
            f"| {r['update_s_median']:.3f} | {r['update_peak_growth_mb']:.1f} | {r['largest_tensor_fp32_mb']:.1f} | "
            f"{r['all_directions_fp32_mb']:.0f} |",
            flush=True,
        )
    write_results("update", rows, args.quick)


if __name__ == "__main__":
    main()
