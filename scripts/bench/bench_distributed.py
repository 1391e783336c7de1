"""Epoch time of the tiny-model run in one process and with W CPU workers, and the scaling this predicts on W GPUs.

    python scripts/bench/bench_distributed.py [--workers 2] [--population 8] [--epochs 5]

Every process gets one torch thread (OMP_NUM_THREADS=1 for the driver, distributed.cpus_per_worker=1 for the
workers), so that one process and one worker are the same unit of compute. The first epoch is left out (JAX
compiles, workers load the model); the rest are averaged. From the workers' figures: t_batch, one member batch's
evaluation; t_update, one worker's epoch step (every worker repeats it). The driver evaluates the mean model
and applies the step too: t_driver, the epoch's time outside the workers' evaluation and step. On paper

    epoch(W) = ceil(B / W) t_batch + t_driver + t_update        (B = population / members_per_batch batches)
    epoch(1) = B t_batch + t_driver

(t_update: the driver waits for the workers' step and digests after its own). The machine may be shared: the load
average is printed beside every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import run_args  # noqa: E402  (the tests' small run: one task, 48 new tokens, relative sigma 2.0)


def run(tmp: Path, name: str, epochs: int, population: int, workers: int) -> list[dict]:
    """One training run; its metrics rows and the load average around it."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "HyperscaleES" / "src")]),
    }
    args = run_args(
        tmp,
        name,
        f"evolution.epochs={epochs}",
        f"evolution.population_size={population}",
        f"distributed.workers={workers}",
        "distributed.cpus_per_worker=1",
    )
    before = os.getloadavg()[0]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (tmp / "results" / name / "metrics.jsonl").read_text().splitlines()]
    print(f"{name}: load average {before:.1f} before, {os.getloadavg()[0]:.1f} after")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        single = run(Path(tmp), "single", args.epochs, args.population, 1)[2:]
        multi = run(Path(tmp), "multi", args.epochs, args.population, args.workers)[2:]
    epoch_1 = sum(r["seconds"] for r in single) / len(single)
    epoch_w = sum(r["seconds"] for r in multi) / len(multi)
    figures = [w for r in multi for w in r["workers"]]
    t_member = sum(w["seconds"] for w in figures) / sum(w["members"] for w in figures)
    t_update = sum(w["update_seconds"] for w in figures) / len(figures)
    t_driver = sum(
        r["seconds"] - max(w["seconds"] for w in r["workers"]) - max(w["update_seconds"] for w in r["workers"])
        for r in multi
    ) / len(multi)
    print(
        f"\nepoch seconds, epochs 2..{args.epochs} averaged: 1 process {epoch_1:.2f}, {args.workers} workers "
        f"{epoch_w:.2f}: "
        f"speed-up {epoch_1 / epoch_w:.2f}x (load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    batches = args.population  # members_per_batch 1
    t_alone = (epoch_1 - t_driver) / batches  # one process's member, the driver's own share taken out
    print(
        f"t_batch {t_alone:.3f} s per member alone (1 process), {t_member:.3f} s in a worker beside the others on "
        f"these {os.cpu_count()} shared CPUs; t_update {t_update:.3f} s, t_driver {t_driver:.3f} s"
    )
    print("on paper, W workers each on its own device (e.g. W GPUs), so each member costs t_batch alone:")
    for w in [w for w in (1, 2, 4, 8, 16, 32) if w <= batches]:
        predicted = math.ceil(batches / w) * t_alone + t_driver + (t_update if w > 1 else 0)
        print(f"  W={w:2d}: epoch {predicted:.2f} s, speed-up {(batches * t_alone + t_driver) / predicted:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
