"""What a run leaves in results/<run>/: resolved config, metrics.jsonl, member CSV, fitness plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml

TIMING_FIELDS = ("seconds", "peak_memory_mb")  # the only metrics that differ between identical runs


def write_resolved_config(run_dir: Path, config: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def rewrite_metrics(run_dir: Path, history: list[dict]) -> None:
    """metrics.jsonl and member_fitness.csv from the run's history (so a resumed run's files equal an uninterrupted run's)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "metrics.jsonl").open("w") as f:
        for row in history:
            f.write(json.dumps({k: v for k, v in row.items() if k != "fitness"}) + "\n")
    with (run_dir / "member_fitness.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "member", "fitness"])
        for row in history:
            for member, value in enumerate(row.get("fitness", [])):
                writer.writerow([row["epoch"], member, f"{value:.6f}"])


def plot_fitness(run_dir: Path, history: list[dict], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    members = [r for r in history if r.get("fitness")]
    if members:
        xs = [r["epoch"] for r in members]
        ax.fill_between(xs, [r["member_min"] for r in members], [r["member_max"] for r in members], alpha=0.2, label="members min-max")
        ax.plot(xs, [r["member_mean"] for r in members], "--", label="members mean")
    ax.plot(epochs, [r["mean_model_fitness"] for r in history], "o-", label="mean model fitness")
    ax.plot(epochs, [r["mean_model_test_score"] for r in history], "s:", label="mean model test score")
    ax.plot(epochs, [r["mean_model_cell_accuracy"] for r in history], "^:", label="mean model cell accuracy")
    ax.set_xlabel("epoch (0 = base model)")
    ax.set_ylabel("score")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = run_dir / "fitness_curve.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
