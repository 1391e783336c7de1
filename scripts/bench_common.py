"""What every benchmark script shares: median timing and writing results/bench/<name>.json."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of `fn` over `reps` runs, after one warm-up run (jit compilation, first-touch allocation)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def save_plot(fig, out: Path, dpi: int = 110) -> None:
    """Lay out `fig`, write it to `out` (its folder made if needed) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)


def write_results(name: str, data, quick: bool) -> Path:
    out = ROOT / "results" / "bench" / (f"{name}_quick.json" if quick else f"{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    print(f"\nwrote {out}")
    return out
