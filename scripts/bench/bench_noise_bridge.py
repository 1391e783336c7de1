"""Benchmark: DLPack vs NumPy-copy conversion, low-rank vs full-rank noise, fused vs naive update.

Prints a table and writes results/bench/noise_bridge.json. Every comparison is measured side by
side in this one run (medians over repetitions); memory cases run in fresh subprocesses so each
peak RSS is its own.

    python scripts/bench/bench_noise_bridge.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import ERO_EGGROLL  # noqa: F401  (before JAX: on-demand GPU allocation)

# isort: split
import jax
import jax.numpy as jnp
import numpy as np
import psutil
import torch
from bench_common import median_seconds, write_results

import hyperscalees as hs
from ERO_EGGROLL.core.bridge import jax_to_torch, shares_memory, torch_to_jax
from ERO_EGGROLL.memory.measure import measured_peak_rss_bytes

ROOT = Path(__file__).resolve().parents[2]
MB = 1 << 20

# Qwen2.5-VL-7B language model: hidden 3584, intermediate 18944, 28 layers, 28 heads, 4 KV heads, head dim 128
HIDDEN, INTER, LAYERS, KV = 3584, 18944, 28, 4 * 128
LAYER_LORA_SHAPES = {
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (KV, HIDDEN),
    "v_proj": (KV, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (INTER, HIDDEN),
    "up_proj": (INTER, HIDDEN),
    "down_proj": (HIDDEN, INTER),
}


def numpy_copy_jax_to_torch(x: jax.Array) -> torch.Tensor:
    """The original plan's bridge: through a host NumPy copy. Kept only as this baseline."""
    return torch.from_numpy(np.array(x, copy=True))


def numpy_copy_torch_to_jax(t: torch.Tensor) -> jax.Array:
    return jnp.array(t.numpy(), copy=True)


def bench_conversion(sizes_mb, reps):
    rows = []
    for size in sizes_mb:
        x = jnp.ones(size * MB // 4, jnp.float32).block_until_ready()
        t = torch.ones(size * MB // 4)
        row = {"size_mb": size}
        for name, fn, src in (
            ("jax->torch dlpack", lambda: jax_to_torch(x), x),
            ("jax->torch numpy", lambda: numpy_copy_jax_to_torch(x), x),
            ("torch->jax dlpack", lambda: torch_to_jax(t).block_until_ready(), t),
            ("torch->jax numpy", lambda: numpy_copy_torch_to_jax(t).block_until_ready(), t),
        ):
            row[name + " s"] = median_seconds(fn, reps)
            row[name + " bytes copied"] = 0 if shares_memory(src, fn()) else size * MB
        row["jax->torch speed-up"] = row["jax->torch numpy s"] / row["jax->torch dlpack s"]
        row["torch->jax speed-up"] = row["torch->jax numpy s"] / row["torch->jax dlpack s"]
        rows.append(row)
    return rows


def bench_member_noise(reps, layers_timed, rank):
    key = hs.make_key(0)
    keys = {name: hs.param_key(key, i) for i, name in enumerate(LAYER_LORA_SHAPES)}

    def lowrank_layer():
        out = [
            hs.lowrank_factors(keys[n], s, epoch=0, member=0, rank=rank, sigma=0.01)
            for n, s in LAYER_LORA_SHAPES.items()
        ]
        jax.block_until_ready(out)

    def fullrank_layer():
        for n, s in LAYER_LORA_SHAPES.items():
            hs.fullrank_noise(keys[n], s, epoch=0, member=0, sigma=0.01).block_until_ready()

    low = median_seconds(lowrank_layer, reps) * layers_timed
    full = median_seconds(fullrank_layer, max(1, reps // 3)) * layers_timed
    low_bytes = sum((m + n) * rank * 4 for m, n in LAYER_LORA_SHAPES.values()) * LAYERS
    full_bytes = sum(m * n * 4 for m, n in LAYER_LORA_SHAPES.values()) * LAYERS
    scale = LAYERS / layers_timed
    return {
        "note": f"timed {layers_timed} decoder layer(s) of 7 LORA matrices, extrapolated x{scale:g} to {LAYERS} layers",
        "rank": rank,
        "lowrank s/member": low * scale,
        "fullrank s/member": full * scale,
        "lowrank bytes/member": low_bytes,
        "fullrank bytes/member": full_bytes,
        "time ratio full/low": full / low,
        "bytes ratio full/low": full_bytes / low_bytes,
    }


UPDATE_SHAPE = (HIDDEN, INTER)


def _update_case(method: str, n: int, rank: int, reps: int) -> dict:
    """Runs in a child process: seconds and peak RSS growth of one update method."""
    key = hs.param_key(hs.make_key(0), 0)
    fitness = hs.normalize_fitness(np.random.default_rng(0).normal(size=n))
    if method == "fused":

        def fn():
            return hs.lowrank_update(key, UPDATE_SHAPE, fitness, epoch=0, rank=rank, sigma=0.01).block_until_ready()
    else:
        outer = jax.jit(lambda acc, f, a, b: acc + f * (a @ b.T))

        def fn():
            acc = jnp.zeros(UPDATE_SHAPE, jnp.float32)
            for i in range(n):
                a, b = hs.lowrank_factors(key, UPDATE_SHAPE, epoch=0, member=i, rank=rank, sigma=0.01)
                acc = outer(acc, fitness[i], a, b)
            return (acc / np.sqrt(n)).block_until_ready()

    rss_before = psutil.Process().memory_info().rss
    seconds = median_seconds(fn, reps)
    peak = measured_peak_rss_bytes()
    return {"seconds": seconds, "peak_rss_growth_mb": (peak - rss_before) / MB}


def bench_update(populations, rank, reps):
    rows = []
    for n in populations:
        row = {"N": n, "shape": list(UPDATE_SHAPE), "rank": rank}
        for method in ("fused", "naive loop"):
            out = subprocess.run(
                [sys.executable, __file__, "--update-case", method, str(n), str(rank), str(reps)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            case = json.loads(out.strip().splitlines()[-1])
            row[f"{method} s"], row[f"{method} peak MB"] = case["seconds"], case["peak_rss_growth_mb"]
        row["speed-up"] = row["naive loop s"] / row["fused s"]
        rows.append(row)
    return rows


def print_table(title, rows):
    print(f"\n## {title}")
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in keys))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions (a CI-sized check)")
    parser.add_argument("--update-case", nargs=4, metavar=("METHOD", "N", "RANK", "REPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.update_case:
        method, n, rank, reps = args.update_case
        print(json.dumps(_update_case(method, int(n), int(rank), int(reps))))
        return

    reps = 3 if args.quick else 7
    sizes = [1, 4, 16] if args.quick else [1, 4, 16, 64, 256]
    populations = [8] if args.quick else [8, 32, 128]
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": psutil.cpu_count(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "jax devices": [str(d) for d in jax.devices()],
    }
    print(f"machine: {machine}")
    results = {"machine": machine, "repetitions": reps}
    results["conversion"] = bench_conversion(sizes, reps)
    print_table("JAX <-> torch conversion of float32 buffers (median seconds; bytes copied)", results["conversion"])
    results["member_noise"] = bench_member_noise(reps, layers_timed=1, rank=2)
    print_table(
        "Noise for one member over all LORA matrices of Qwen2.5-VL-7B's language model", [results["member_noise"]]
    )
    results["update"] = bench_update(populations, rank=2, reps=max(1, reps // 3))
    print_table(
        f"Update of one {UPDATE_SHAPE[0]}x{UPDATE_SHAPE[1]} matrix: fused contraction vs naive per-member loop",
        results["update"],
    )
    write_results("noise_bridge", results, args.quick)


if __name__ == "__main__":
    main()
