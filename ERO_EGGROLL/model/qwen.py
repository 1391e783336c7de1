"""Which Qwen2.5-VL tensors evolve, and how: FROZEN, LORA (low-rank noise) or FULL (dense noise).

Rules (explicit `params.overrides` patterns win over them):
  vision tower (model.visual.*)    FROZEN by default; unfrozen: 2-D Linear weights LORA, norms and
                                   biases FULL, the 5-D patch embedding FROZEN
  embed_tokens, lm_head            FROZEN
  2-D attention / MLP projections  LORA
  norms and all biases (q/k/v too) FULL, or FROZEN with evolution.freeze_nonlora

    python -m ERO_EGGROLL.qwen_param_mapper --config configs/qwen2_5_vl_7b.yaml
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import cast

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

from ERO_EGGROLL.config import Config, ConfigError
from ERO_EGGROLL.core.forward_rules import RowRule, declare_row_rule, per_member_blocks
from ERO_EGGROLL.core.perturber import Perturber
from ERO_EGGROLL.core.tensor_classes import ParamClass, ParamSpec, make_specs


def _rms_norm_rows(module: Qwen2_5_VLRMSNorm, x: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """Qwen2_5_VLRMSNorm.forward with each block's member weight (the same operations, so the same bits)."""
    weight = values["weight"]
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    blocks = per_member_blocks(h.to(x.dtype), weight.shape[0])
    return (weight.view(weight.shape[0], *[1] * (blocks.dim() - 2), -1) * blocks).reshape(x.shape)


declare_row_rule(
    Qwen2_5_VLRMSNorm, cast(RowRule, _rms_norm_rows), stacked=True
)  # its weight is FULL, and K members may share a batch


def _rule(name: str, shape: tuple[int, ...], freeze_vision: bool, freeze_nonlora: bool) -> ParamClass:
    if name.startswith(("model.visual.", "visual.")):
        if freeze_vision or len(shape) > 2:
            return ParamClass.FROZEN
    elif "embed_tokens" in name or name.startswith("lm_head"):
        return ParamClass.FROZEN
    if len(shape) == 2:
        return ParamClass.LORA
    if len(shape) == 1:
        return ParamClass.FROZEN if freeze_nonlora else ParamClass.FULL
    return ParamClass.FROZEN


def classify(named_shapes: Iterable[tuple[str, Sequence[int]]], cfg: Config) -> list[ParamSpec]:
    """A ParamSpec per tensor, in the model's parameter order."""
    named = []
    patterns = cfg.params.overrides
    for name, shape in named_shapes:
        shape = tuple(int(d) for d in shape)
        cls = _rule(name, shape, cfg.params.freeze_vision, cfg.evolution.freeze_nonlora)
        for pattern, forced in patterns.items():
            if fnmatch.fnmatchcase(name, pattern):
                cls = ParamClass(forced)
        named.append((name, shape, cls))
    unused = [p for p in patterns if not any(fnmatch.fnmatchcase(name, p) for name, _, _ in named)]
    if unused:
        raise ConfigError(f"params.overrides pattern(s) {unused} match no tensor of this model")
    return make_specs(named)


def classify_model(model, cfg: Config) -> list[ParamSpec]:
    return classify(((n, p.shape) for n, p in model.named_parameters()), cfg)


def run_perturber(model, cfg: Config, specs: list[ParamSpec] | None = None) -> Perturber:
    """The Perturber of a run: the Qwen classification (or `specs`), the run's evolution settings and seed."""
    return Perturber(model, specs if specs is not None else classify_model(model, cfg), cfg.evolution, cfg.seed)


def meta_model_from_config_json(path: str | Path):
    """The architecture on the meta device (no weights, no memory): enough to list tensor shapes."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig.from_dict(json.loads(Path(path).read_text()))
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(config)


def architecture_json(cfg: Config) -> Path:
    """The model's config.json: from model.path when present, else model.config_json."""
    in_model_dir = cfg.resolve_path(cfg.model.path) / "config.json"
    if in_model_dir.is_file():
        return in_model_dir
    if cfg.model.config_json and cfg.resolve_path(cfg.model.config_json).is_file():
        return cfg.resolve_path(cfg.model.config_json)
    raise ConfigError(
        f"no config.json at {in_model_dir} and model.config_json is {cfg.model.config_json!r}; "
        "set model.config_json (configs/qwen2_5_vl_7b_config.json for the 7B) or build the model"
    )


def summarize(specs: list[ParamSpec], rank: int, bytes_per_value: int = 4) -> list[dict]:
    """Per class: tensors, parameters, noise bytes per member (low-rank vs full-rank ES)."""
    rows = []
    for cls in ParamClass:
        group = [s for s in specs if s.cls is cls]
        lowrank = (
            sum(sum(s.matrix_shape) * rank if cls is ParamClass.LORA else s.numel for s in group)
            if cls is not ParamClass.FROZEN
            else 0
        )
        fullrank = sum(s.numel for s in group) if cls is not ParamClass.FROZEN else 0
        rows.append(
            {
                "class": cls.value,
                "tensors": len(group),
                "parameters": sum(s.numel for s in group),
                "noise bytes/member (EGGROLL)": lowrank * bytes_per_value,
                "noise bytes/member (full-rank)": fullrank * bytes_per_value,
            }
        )
    return rows


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{unit}"
        n /= 1000
    return f"{n:.4g}P"


def format_summary(rows: list[dict]) -> str:
    header = ["class", "tensors", "parameters", "noise B/member EGGROLL", "noise B/member full-rank"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for r in rows:
        lines.append(
            " | ".join(
                [
                    r["class"],
                    str(r["tensors"]),
                    _human(r["parameters"]),
                    _human(r["noise bytes/member (EGGROLL)"]),
                    _human(r["noise bytes/member (full-rank)"]),
                ]
            )
        )
    return "\n".join(lines)
