"""The model card (README.md) of an exported model: what it is, how it was made, how well it does, how to rebuild it.

YAML front matter as Hugging Face model folders carry it, then Markdown. Every number comes from the
run's own records (the best model's test evaluation, the metrics history)."""

from __future__ import annotations

from pathlib import Path

import yaml

from ERO_EGGROLL.config import ROOT, Config, EvolutionConfig
from ERO_EGGROLL.evaluation.evaluator import EvalResult, results_table
from ERO_EGGROLL.model.export import BASE_CARD, WeightsReport
from ERO_EGGROLL.storage.record_check import Elite

PROTOCOL = {
    "test": (
        "test-time search",
        "the search's fitness was scored on these same test outputs (ERO's protocol, "
        "data.fitness_source: test), so they are not held out",
    ),
    "train_loo": (
        "held out",
        "the search's fitness came from leave-one-out training pairs (data.fitness_source: train_loo); "
        "the test outputs were never seen by the search",
    ),
}


def _shown(path: Path) -> str:
    """A path as a user types it: relative to the repository root when it lies inside."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _base_license(base_dir: Path) -> str | None:
    readme = base_dir / "README.md"
    if not readme.is_file():
        return None
    parts = readme.read_text(encoding="utf-8", errors="replace").split("---", 2)
    try:
        meta = yaml.safe_load(parts[1]) if len(parts) == 3 and not parts[0].strip() else None
    except yaml.YAMLError:
        return None
    return meta.get("license") if isinstance(meta, dict) else None


def _weights_section(report: WeightsReport) -> list[str]:
    base = ", ".join(report.base_dtypes)
    lines = [
        f"Files replaced: {', '.join(report.shards)} (and the shard index, if the base has one), with the base's "
        "tensor names and shard layout; every other file is the base's own, byte for byte."
    ]
    if report.left_out:
        lines.append(f"Left out (the base's weights in other formats): {', '.join(report.left_out)}.")
    kept = f"{report.kept_elements} of the {report.changed_elements} elements the evolution changed"
    if report.written_dtype:
        lines.append(
            f"**dtype: the run computed in {report.run_dtype}, the base stores {base}.** Casting to {base} would keep "
            f"only {kept}, so the weights stay in {report.run_dtype}; config.json's dtype field says so (its only "
            "change)."
        )
    elif report.cast:
        lines.append(
            f"**dtype: the run computed in {report.run_dtype}; the weights are cast to the base's {base}** "
            f"(the cast keeps {kept})."
        )
    else:
        lines.append(f"dtype: {base}, the base's and the run's.")
    return lines


def method(evo: EvolutionConfig) -> str:
    """The search, noise and rank that ran, as a card names them."""
    noise = "full-rank Gaussian noise" if evo.noise == "full" else f"low-rank noise of rank {evo.rank}"
    if evo.search == "ero":
        return (
            f"ERO's search (round-robin elites of {evo.elites} groups averaged, reset to the base after "
            f"{evo.reset_after} epochs without a better elite) with {noise}"
        )
    return f"EGGROLL evolution strategies with {noise}"


def _weights_line(best_epoch: int, last_epoch: int, elite: Elite | None, target: float) -> str:
    if elite is None:
        return f"the best mean model, epoch {best_epoch} of {last_epoch}"
    return (
        f"ERO's best elite: member {elite.member} of epoch {elite.epoch}'s population, fitness {elite.fitness:.4f}, "
        f"which reached run.target_fitness {target} and stopped the run; regenerated from its keys as the mean model "
        f"of epoch {elite.epoch - 1} plus that member's noise"
    )


def model_card(
    cfg: Config,
    task_ids: list[str],
    history: list[dict],
    best_epoch: int,
    best: EvalResult | None,
    ckpt_dir: Path,
    plot: Path | None,
    report: WeightsReport,
    elite: Elite | None = None,
) -> str:
    """The README.md text of an exported best model. `best`: its test evaluation, or None for an export that replay
    rebuilt without evaluating (the card then says how to score it); `plot`: the run's fitness curve, if any;
    `elite`: the member an ERO-search run stopped on, when that is the exported model (storage/record_check)."""
    base_dir = cfg.resolve_path(cfg.model.path)
    front: dict[str, object] = {
        "base_model": cfg.model.path,
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": ["qwen2_5_vl", "evolution-strategies", "eggroll", "arc-agi"],
    }
    if _base_license(base_dir):
        front["license"] = _base_license(base_dir)
    evo, protocol, why = cfg.evolution, *PROTOCOL[cfg.data.fitness_source]
    tasks = ", ".join(task_ids) if task_ids else f"every task of the {cfg.data.split} split"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {cfg.run.name}: Qwen2.5-VL evolved with {'ERO' if evo.search == 'ero' else 'EGGROLL'} on ARC-1",
        "",
        f"Base model: `{cfg.model.path}` with new weights "
        f"({_weights_line(best_epoch, history[-1]['epoch'], elite, cfg.run.target_fitness)})."
        + (f" The base model's own card is kept as {BASE_CARD}." if (base_dir / "README.md").is_file() else ""),
        "",
        *[part for line in _weights_section(report) for part in (line, "")],
        "## Method",
        "",
        f"{method(evo)} (ERO_EGGROLL): population {evo.population_size}, "
        f"sigma {evo.sigma} ({evo.sigma_mode}), optimizer {evo.optimizer}, lr {evo.lr}, {evo.mode} mode, fitness "
        f"`{cfg.evaluation.fitness}`, seed {cfg.seed}, {cfg.data.input_mode} input, decoding as in the config below.",
        "",
        "<details><summary>full config</summary>",
        "",
        "```yaml",
        yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(),
        "```",
        "",
        "</details>",
        "",
        "## Tasks",
        "",
        f"ARC-1 {cfg.data.split} split: {tasks}.",
        "",
        *_results_section(best, task_ids, protocol, why, ckpt_dir),
        "## Fitness curve",
        "",
        (f"Plot: `{_shown(plot)}` (the run's results folder). Its values:" if plot else "The run's values:"),
        "",
        "| epoch | mean model fitness | test score | cell accuracy | members mean [min, max] |",
        "|---|---|---|---|---|",
    ]
    for r in history:
        members = (
            f"{r['member_mean']:.4f} [{r['member_min']:.4f}, {r['member_max']:.4f}]"
            if r.get("fitness")
            else "(base model)"
        )
        lines.append(
            f"| {r['epoch']} | {r['mean_model_fitness']:.4f} | {r['mean_model_test_score']:.4f} | "
            f"{r['mean_model_cell_accuracy']:.4f} | {members} |"
        )
    lines += [
        "",
        "## Reproduce",
        "",
        "All noise is regenerated from keys: the base model, the config and the fitness history rebuild these "
        "weights bit for bit (from the repository root of ERO_EGGROLL):",
        "",
        "```bash",
        f"python -m ERO_EGGROLL.replay {_shown(ckpt_dir)} --check",
        "```",
        "",
    ]
    return "\n".join(lines)


def _results_section(
    best: EvalResult | None, task_ids: list[str], protocol: str, why: str, ckpt_dir: Path
) -> list[str]:
    if best is None:
        return [
            "## Results",
            "",
            "Not scored in this export (replay rebuilt the weights without evaluating them); score it with "
            f"`python -m ERO_EGGROLL.arc_evaluator --config <the run's config.yaml> --checkpoint {_shown(ckpt_dir)}`.",
            "",
        ]
    rows = results_table(task_ids, best)
    return [
        f"## Results ({protocol})",
        "",
        f"The exported model's scores on the tasks' test outputs; {why}.",
        "",
        "| task | id | char similarity | cell accuracy | exact |",
        "|---|---|---|---|---|",
        *[
            f"| {r['task']} | {r['id']} | {r['char_similarity']:.4f} | {r['cell_accuracy']:.4f} | {r['exact']:.4f} |"
            for r in rows
        ],
        "",
    ]
