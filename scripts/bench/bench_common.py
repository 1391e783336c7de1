"""What every benchmark script shares: median timing, and its outputs under results/bench/.

A benchmark writes its figure and JSON to results/bench/<name>[_quick].*; a committed figure (the docs show those,
under results/examples/) is never its target: promoting a run to a committed figure is a deliberate copy.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of `fn` over `reps` runs, after one warm-up run (jit compilation, first-touch allocation)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_output(name: str, suffix: str, quick: bool) -> Path:
    """results/bench/<name>[_quick]<suffix>: a --quick run never lands where the full run's figures are."""
    return ROOT / "results" / "bench" / f"{name}{'_quick' if quick else ''}{suffix}"


def is_committed(path: Path) -> bool:
    """Whether git tracks `path` in this checkout (outside a git checkout: whatever lies under results/examples/)."""
    try:
        done = subprocess.run(
            ["git", "ls-files", "--error-unmatch", str(path)], cwd=ROOT, capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return (ROOT / "results" / "examples") in path.resolve().parents
    return done.returncode == 0


def save_plot(fig, out: Path, dpi: int = 110) -> None:
    """Lay out `fig`, write it to `out` (its folder made if needed) and free it; a committed figure is refused."""
    import matplotlib.pyplot as plt

    if is_committed(out):
        sys.exit(
            f"error: {out} is a committed figure, which a benchmark never overwrites; leave --out at its default "
            "(results/bench/) and copy the file over deliberately if this run should replace it"
        )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)


def write_results(name: str, data, quick: bool) -> Path:
    out = bench_output(name, ".json", quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    print(f"\nwrote {out}")
    return out
