"""What a run leaves in results/<run>/: resolved config, metrics.jsonl, member CSV, fitness plot."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import yaml

from ERO_EGGROLL.io.disk import writing

TIMING_FIELDS = (
    "seconds",
    "peak_memory_mb",
    "workers",
)  # the only metrics that differ between identical runs (workers: per-worker timing)
NON_FINITE_FLAG = "non_finite_fields"  # metrics.jsonl: fields whose value was inf or NaN, written as null


def write_resolved_config(run_dir: Path, config: dict) -> None:
    """results/<run>/config.yaml, written only when it changes (a no-op resume leaves it untouched)."""
    path = run_dir / "config.yaml"
    text = yaml.safe_dump(config, sort_keys=False)
    with writing(path):
        if path.is_file() and path.read_text() == text:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def strict_json_row(row: dict) -> dict:
    """`row` with every non-finite float (also inside lists) as None, and their field names under NON_FINITE_FLAG.

    Strict JSON has no NaN or Infinity: readers other than Python's reject a file that holds them."""
    bad = []

    def clean(key: str, value):
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(key)
            return None
        if isinstance(value, list):
            return [clean(key, v) for v in value]
        return value

    out = {k: clean(k, v) for k, v in row.items()}
    if bad:
        out[NON_FINITE_FLAG] = sorted(set(bad))
    return out


def rewrite_metrics(run_dir: Path, history: list[dict]) -> None:
    """metrics.jsonl and member_fitness.csv from the run's history (so a resumed run's files equal an uninterrupted
    run's)."""
    with writing(run_dir / "metrics.jsonl"):
        run_dir.mkdir(parents=True, exist_ok=True)
        with (run_dir / "metrics.jsonl").open("w") as f:
            for row in history:
                f.write(
                    json.dumps(strict_json_row({k: v for k, v in row.items() if k != "fitness"}), allow_nan=False)
                    + "\n"
                )
    with writing(run_dir / "member_fitness.csv"), (run_dir / "member_fitness.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "member", "fitness"])
        for row in history:
            for member, value in enumerate(row.get("fitness", [])):
                writer.writerow([row["epoch"], member, f"{value:.6f}"])


def plot_fitness(run_dir: Path, history: list[dict], title: str) -> Path:
    """fitness_curve.png: left, the search's fitness (members and mean model, on its own scale: a log-probability is
    <= 0); right, the mean model on the test questions: answer log-prob, and the greedy answer's scores in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax, test_ax) = plt.subplots(1, 2, figsize=(11, 4))
    members = [r for r in history if r.get("fitness")]
    if members:
        xs = [r["epoch"] for r in members]
        ax.fill_between(
            xs,
            [r["member_min"] for r in members],
            [r["member_max"] for r in members],
            alpha=0.2,
            label="members min-max",
        )
        ax.plot(xs, [r["member_mean"] for r in members], "--", label="members mean")
    ax.plot(epochs, [r["mean_model_fitness"] for r in history], "o-", label="mean model fitness")
    ax.set_title("fitness (search questions)", fontsize=9)
    logprob_ax = test_ax.twinx()
    logprob_ax.plot(
        epochs,
        [r.get("mean_model_answer_logprob") for r in history],
        "o-",
        color="C3",
        label="answer log-prob (right axis)",
    )
    logprob_ax.set_ylabel("mean answer-token log-prob")
    for key, style, label in (
        ("mean_model_char_similarity", "s:", "char similarity"),
        ("mean_model_cell_accuracy", "^:", "cell accuracy"),
        ("mean_model_exact", "v:", "exact match"),
    ):
        test_ax.plot(epochs, [r.get(key) for r in history], style, label=label)
    test_ax.set_ylim(-0.02, 1.02)
    test_ax.set_title("mean model on the test questions", fontsize=9)
    for axis in (ax, test_ax):
        axis.set_xlabel("epoch (0 = base model)")
        axis.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    lines = test_ax.get_legend_handles_labels()[0] + logprob_ax.get_legend_handles_labels()[0]
    test_ax.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = run_dir / "fitness_curve.png"
    with writing(path):
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
