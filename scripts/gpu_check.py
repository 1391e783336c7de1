"""One prepared command for a GPU machine (under 8 minutes): what only a GPU can measure, in one JSON report.

    python scripts/gpu_check.py [--out results/gpu_check.json] [--layers 28]
    python scripts/gpu_check.py --cpu        # the parts a CPU can run (CUDA tests skip, with their reason)
    python scripts/gpu_check.py --parts population_benchmark     # run again only the parts named; the report
                                                                  # keeps the other parts of its earlier run

Parts, each in its own process with its own time limit (a part that fails or runs out of time is reported
and the next one runs). The report is replaced only where it is an earlier check's of the same mode; any other
file at --out is refused before anything runs.
  1. jax_beside_torch: JAX's backend with XLA_PYTHON_CLIENT_PREALLOCATE=false, a JAX array and a torch tensor on
     the same device, and how much of the GPU each holds afterwards (JAX must not have taken 75% of it).
  2. rehearsal: `python -m ERO_EGGROLL.cli.rehearse` on a random model at Qwen2.5-VL-7B's shapes in bf16 with
     all 28 decoder layers (configs/qwen2_5_vl_7b.yaml on the ERO task with the longest prompt, so its
     projected times are that task's); with --cpu, the embedded tiny model and configs/smoke.yaml.
  3. cuda_tests: `pytest -m cuda` (restore bit for bit, K members as rows equal one member, replay equal to the run).
  4. population_benchmark: scripts/bench/bench_population.py --quick, fixed length (every call generates its
     max_new_tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the ERO task with the longest prompt (about 7400 tokens with its images, 66 new):
# the largest KV cache and prefill of the 15
SEVEN_B_TASKS = "data.task_ids=[0a1d4ef5]"
JAX_BESIDE_TORCH = """
import json, jax, jax.numpy as jnp, torch
device = "cuda" if torch.cuda.is_available() else "cpu"
t = torch.ones((1024, 1024), device=device)
x = jnp.ones((1024, 1024)).block_until_ready()
row = {"jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()], "torch_device": device,
       "XLA_PYTHON_CLIENT_PREALLOCATE": __import__("os").environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")}
if device == "cuda":
    free, total = torch.cuda.mem_get_info()
    stats = jax.devices()[0].memory_stats() or {}
    row.update(gpu_total_gib=total / 2**30, gpu_free_gib=free / 2**30,
               torch_allocated_mib=torch.cuda.memory_allocated() / 2**20,
               jax_bytes_in_use_mib=stats.get("bytes_in_use", 0) / 2**20,
               jax_bytes_reserved_mib=stats.get("bytes_reserved", 0) / 2**20,
               jax_took_under_half=free > total / 2)
print(json.dumps(row))
"""


def part_commands(cpu: bool, layers: int, rehearsal_json: Path) -> dict[str, tuple[list[str], int]]:
    """Each part's command line and time limit in seconds (the limits add up to 8 minutes)."""
    py = sys.executable
    if cpu:
        rehearsal = [
            "--config",
            str(ROOT / "configs" / "smoke.yaml"),
            "--set",
            "evolution.population_size=2",
            "--set",
            "evaluation.max_new_tokens_cap=8",
        ]
    else:
        rehearsal = [
            "--config",
            str(ROOT / "configs" / "qwen2_5_vl_7b.yaml"),
            "--random-layers",
            str(layers),
            "--set",
            SEVEN_B_TASKS,
        ]
    bench = [
        py,
        str(ROOT / "scripts" / "bench" / "bench_population.py"),
        "--quick",
        "--device",
        "cpu" if cpu else "cuda",
    ]
    return {
        "jax_beside_torch": ([py, "-c", JAX_BESIDE_TORCH], 60),
        "rehearsal": ([py, "-m", "ERO_EGGROLL.cli.rehearse", *rehearsal, "--json", str(rehearsal_json)], 210),
        "cuda_tests": (
            [
                py,
                "-m",
                "pytest",
                "-q",
                "-rs",
                "-m",
                "cuda",
                "-p",
                "no:cacheprovider",
                str(ROOT / "tests" / "test_cuda.py"),
            ],
            120,
        ),
        "population_benchmark": (bench, 90),
    }


def run_part(command: list[str], limit: int) -> dict:
    """Run one part: its exit code (None: out of time), seconds, the tail of its output
    and the JSON lines it printed."""
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit, cwd=ROOT, env=env)
        rc, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        rc, out = None, f"ran past its {limit} s limit\n" + (err.stdout or b"").decode(errors="replace")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{") and line.endswith("}")]
    return {
        "command": command,  # a part kept from an earlier check says what it ran, and when
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rc": rc,
        "seconds": round(time.perf_counter() - start, 1),
        "output_tail": out[-4000:],
        **({"data": rows} if rows else {}),
    }


PARTS = ("jax_beside_torch", "rehearsal", "cuda_tests", "population_benchmark")


def earlier_report(out: Path, mode: str) -> dict | None:
    """The report an earlier check of this mode wrote at `out` (None: nothing there). Anything else there is not
    this command's to replace: one line, exit 2."""
    if not out.exists():
        return None
    try:
        report = json.loads(out.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        report = None
    if not (isinstance(report, dict) and report.get("mode") == mode and isinstance(report.get("parts"), dict)):
        print(
            f"error: --out {out} exists and is not an earlier `gpu_check.py{' --cpu' if mode == 'cpu' else ''}` "
            "report; give another --out (this command replaces only its own reports)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return report


def parts_of(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown part(s) {', '.join(unknown) or '(none)'}; the parts are {', '.join(PARTS)}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cpu", action="store_true", help="only what a CPU can run: the tiny model; CUDA tests skip with their reason"
    )
    parser.add_argument("--layers", type=int, default=28, help="decoder layers of the 7B-shaped random model (28: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_check.json")
    parser.add_argument(
        "--parts",
        type=parts_of,
        default=list(PARTS),
        help=f"comma-separated, of {', '.join(PARTS)} (default: all); the others keep the earlier report's rows",
    )
    args = parser.parse_args(argv)
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA GPU here; run with --cpu for the parts a CPU can run", file=sys.stderr)
            return 2
    mode = "cpu" if args.cpu else "cuda"
    earlier = earlier_report(args.out, mode) or {"parts": {}}
    report = {"mode": mode, "parts": {name: earlier["parts"][name] for name in PARTS if name in earlier["parts"]}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        rehearsal_json = Path(scratch) / "rehearsal.json"  # the rehearsal's own figures, kept in the report
        commands = part_commands(args.cpu, args.layers, rehearsal_json)
        for name in args.parts:
            command, limit = commands[name]
            print(f"== {name} (limit {limit} s)", flush=True)
            row = report["parts"][name] = run_part(command, limit)
            if name == "rehearsal" and rehearsal_json.is_file():
                row["data"] = json.loads(rehearsal_json.read_text())
            print(
                f"   rc {row['rc']} in {row['seconds']} s\n"
                + "\n".join("   " + line for line in row["output_tail"].splitlines()[-12:]),
                flush=True,
            )
    report["parts"] = {name: report["parts"][name] for name in PARTS if name in report["parts"]}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return (
        0
        if all(row["rc"] in (0, 1) if name == "rehearsal" else row["rc"] == 0 for name, row in report["parts"].items())
        else 1
    )


if __name__ == "__main__":
    raise SystemExit(main())
