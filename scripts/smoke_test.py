"""Smoke test: population 4 on the embedded tiny model, end to end, then check what it left behind.

    python scripts/smoke_test.py [--config configs/smoke.yaml]

Exits non-zero, saying what is missing or wrong, when the run fails, an output is absent, or a
number is not finite. Part of the test suite (tests/run/test_evolution_run.py::test_smoke_script).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ERO_EGGROLL.config import load_config  # noqa: E402


def check_outputs(run_dir: Path, ckpt_dir: Path, population: int) -> list[str]:
    """Problems found in a finished run's outputs (empty when all is well)."""
    problems = []
    for path in [
        run_dir / "config.yaml",
        run_dir / "metrics.jsonl",
        run_dir / "member_fitness.csv",
        run_dir / "fitness_curve.png",
        run_dir / "final_table.md",
        run_dir / "final_table.csv",
        ckpt_dir / "LATEST",
        ckpt_dir / "epoch_0000" / "state.json",
        ckpt_dir / "best_model" / "config.json",
        ckpt_dir / "best_model" / "model.safetensors",
    ]:
        if not path.is_file() or path.stat().st_size == 0:
            problems.append(f"missing or empty: {path}")
    if (run_dir / "metrics.jsonl").is_file():
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        if len(rows) < 2:
            problems.append(f"metrics.jsonl has {len(rows)} row(s); expected the base model and at least one epoch")
        for row in rows:
            for key, value in row.items():
                if isinstance(value, float) and not math.isfinite(value):
                    problems.append(f"metrics.jsonl epoch {row['epoch']}: {key} is {value}")
    if (run_dir / "member_fitness.csv").is_file():
        lines = (run_dir / "member_fitness.csv").read_text().splitlines()[1:]
        if len(lines) % population or not lines:
            problems.append(f"member_fitness.csv has {len(lines)} rows, not a multiple of the population {population}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "smoke.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    shutil.rmtree(cfg.checkpoint_path, ignore_errors=True)
    start = time.perf_counter()
    command = [sys.executable, str(ROOT / "ERO_EGGROLL" / "arc_evolution_single_gpu.py"), "--config", args.config]
    for override in args.set:
        command += ["--set", override]
    done = subprocess.run(command, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        print(f"SMOKE FAILED: the run exited with {done.returncode}")
        return 1
    problems = check_outputs(cfg.run_dir, cfg.checkpoint_path, cfg.evolution.population_size)
    for problem in problems:
        print(f"SMOKE FAILED: {problem}")
    if not problems:
        print(f"smoke test passed in {seconds:.1f}s: outputs in {cfg.run_dir} and {cfg.checkpoint_path}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
