"""Benchmark: what replaying a run record costs per epoch (run.checkpoint: replay), on the tiny and a random model.

Replaying an epoch is its update (regenerate the factors, contract, optimizer, round) plus, once at the end,
the digest of the evolvable weights; starting from the base model costs one read of the evolvable tensors
from the model's safetensors files (here just written, so from the page cache). Each is timed here; the
evaluation of an epoch (population x questions x generate) is what it is compared with.

    python scripts/bench/bench_replay.py [--sizes tiny 100m] [--epochs 3] [--population 16]
        -> results/bench/replay.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench_common import write_results  # noqa: E402


def measure(size: str, epochs: int, population: int, dtype_name: str) -> dict:
    import numpy as np
    import torch

    from ERO_EGGROLL.config import load_config
    from ERO_EGGROLL.model.loading import load_model_from_dir
    from ERO_EGGROLL.model.qwen import run_perturber
    from ERO_EGGROLL.model.random_model import SHAPES, random_model
    from ERO_EGGROLL.run.record import base_evolvable, combined_digest, tensor_digests
    from ERO_EGGROLL.storage.checkpoints import assign_weights

    cfg = load_config(
        ROOT / "configs" / "smoke.yaml",
        [
            f"evolution.population_size={population}",
            f"model.dtype={dtype_name}",
            "evolution.sigma_mode=absolute",
            "evolution.sigma=0.01",
        ],
    )  # a random model's biases are 0
    dtype = getattr(torch, dtype_name)
    tiny_dir = cfg.resolve_path(cfg.model.path)
    with tempfile.TemporaryDirectory() as tmp:
        if size == "tiny":
            model_dir = tiny_dir
            model, _ = load_model_from_dir(tiny_dir, dtype=dtype)
        else:
            model_dir = Path(tmp)
            model = random_model(tiny_dir, SHAPES[size], dtype)
            model.save_pretrained(model_dir)
        perturber = run_perturber(model, cfg)
        names = list(perturber.params)
        evolvable_bytes = sum(p.numel() * p.element_size() for p in perturber.params.values())
        rng = np.random.default_rng(0)
        perturber.update(rng.random(population).tolist(), 0)  # compiles every shape once, not counted
        start = time.perf_counter()
        for epoch in range(1, epochs + 1):
            perturber.update(rng.random(population).tolist(), epoch)
        update_s = (time.perf_counter() - start) / epochs
        start = time.perf_counter()
        combined_digest(tensor_digests(perturber.evolvable_state()))
        digest_s = time.perf_counter() - start
        start = time.perf_counter()  # read (memory-mapped, so timed with the copy into the parameters)
        assign_weights(model, base_evolvable(model, model_dir, names), "base weights")
        base_read_s = time.perf_counter() - start
    return {
        "size": size,
        "dtype": dtype_name,
        "population": population,
        "evolvable_tensors": len(names),
        "evolvable_bytes": evolvable_bytes,
        "replay_update_s_per_epoch": round(update_s, 3),
        "weights_digest_s": round(digest_s, 3),
        "base_restore_s": round(base_read_s, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "100m"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    rows = [measure(size, args.epochs, args.population, args.dtype) for size in args.sizes]
    for row in rows:
        print(row)
    write_results("replay", rows, quick=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
