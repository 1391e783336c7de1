"""Write the evolved change (core/adapter.py) as a PEFT LoRA adapter folder that `PeftModel.from_pretrained(base,
DIR)` loads: adapter_config.json, adapter_model.safetensors, and adapter_report.json with every tensor's fit.

    report = export_lora_adapter(net, base, perturber.classes, "my_adapter", fitness=score)   # for_module users

Keys follow PEFT's saved layout: `base_model.model.<module>.lora_A.weight` (k, in) and `.lora_B.weight` (out, k)
with lora_alpha = r per module (rank_pattern / alpha_pattern), so the scaling is 1 and W = W0 + B A exactly as
factored. FULL biases of LoRA layers go in as `<module>.base_layer.bias` (bias='lora_only'); other FULL tensors'
modules are modules_to_save, all of their tensors saved. The folder is published like every other output: a new
path, an empty folder or an earlier adapter, never anything else (disk.check_output).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ERO_EGGROLL.core.adapter import DEFAULT_ENERGY, LoraChange, TensorFit, applied, lora_change
from ERO_EGGROLL.core.tensor_classes import ParamClass
from ERO_EGGROLL.io.disk import (
    NOTHING_ELSE_CHANGED,
    OutputError,
    check_output,
    mark_output,
    output_mark,
    publish_dir,
    staged_dir,
    writing,
)

ADAPTER_KIND = "lora adapter"
PREFIX = "base_model.model."


def earlier_adapter(path: Path, owner: str = "") -> bool:
    """Whether `path` is an adapter folder an earlier export wrote for the same `owner` (so this one may replace it):
    another run's adapter is never replaced."""
    mark = output_mark(path, ADAPTER_KIND)
    return mark is not None and mark["owner"] == owner


@dataclass(frozen=True)
class AdapterReport:
    """What was written: each factored tensor's fit, the FULL tensors saved dense, the LORA tensors left out (not a
    Linear weight), and, when a fitness function was given, the adapter's fitness beside the full change's."""

    fits: list[TensorFit]
    full: list[str]
    left_out: list[str]
    fitness_adapter: float | None
    fitness_full: float | None

    def lines(self) -> list[str]:
        """A human-readable summary, one tensor per line."""
        out = [
            f"{f.name}: rank {f.rank}, energy kept {f.energy_kept:.4f}, relative error {f.relative_error:.4f}"
            for f in self.fits
        ]
        out += [f"{n}: saved dense (FULL)" for n in self.full]
        out += [
            f"{n}: LEFT OUT (a LORA tensor that is not a Linear weight; the adapter keeps its base value)"
            for n in self.left_out
        ]
        if self.fitness_adapter is not None:
            out.append(f"fitness: adapter {self.fitness_adapter:.6g}, full change {self.fitness_full:.6g}")
        return out


def _tensors(model: nn.Module, change: LoraChange) -> tuple[dict[str, torch.Tensor], list[str], bool]:
    """(the adapter's state dict in PEFT's saved layout, modules_to_save, whether any bias rides on a LoRA layer)."""
    params = dict(model.named_parameters())
    tensors: dict[str, torch.Tensor] = {}
    for module, (a, b) in change.factors.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b.contiguous()
    lora_biases = False
    to_save: dict[str, None] = {}
    for name in change.full:
        module, _, attr = name.rpartition(".")
        if module in change.factors and attr == "bias":
            tensors[f"{PREFIX}{module}.base_layer.bias"] = change.full[name].contiguous()
            lora_biases = True
        else:
            to_save[module] = None
    for module in to_save:  # PEFT replaces the whole module: every tensor of it, the evolved ones at their best
        for attr, _ in dict(model.named_modules())[module].named_parameters(recurse=False):
            name = f"{module}.{attr}"
            tensors[f"{PREFIX}{name}"] = change.full.get(name, params[name].detach()).contiguous()
    return tensors, list(to_save), lora_biases


def _config(change: LoraChange, modules_to_save: list[str], lora_biases: bool, base_name: str | None) -> dict:
    ranks = {module: a.shape[0] for module, (a, _) in change.factors.items()}
    top = max(ranks.values(), default=1)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_name,
        "r": top,
        "lora_alpha": top,  # alpha = r for every module: scaling 1, W = W0 + B A
        "rank_pattern": {m: r for m, r in ranks.items() if r != top},
        "alpha_pattern": {m: r for m, r in ranks.items() if r != top},
        "target_modules": sorted(ranks),
        "modules_to_save": modules_to_save or None,
        "bias": "lora_only" if lora_biases else "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }


def export_lora_adapter(
    model: nn.Module,
    base: Mapping[str, torch.Tensor],
    classes: Mapping[str, ParamClass],
    out_dir: str | Path,
    *,
    rank: int | None = None,
    energy: float = DEFAULT_ENERGY,
    fitness: Callable[[nn.Module], float] | None = None,
    base_name: str | None = None,
    protected: Iterable[Path] = (),
    what: str = "the adapter folder",
    owner: str = "",
) -> AdapterReport:
    """Write `model`'s evolved change from `base` (core/adapter.lora_change) as a PEFT LoRA folder at `out_dir`.

    `fitness(model)`, if given, scores the model as the adapter makes it and as it is (the full change); `protected`:
    folders never written into (a run's, the base model's); `base_name`: the adapter's base_model_name_or_path;
    `owner`: the run the change comes from (replay passes its folder), so that an export replaces only its own."""
    out = check_output(out_dir, what, lambda path: earlier_adapter(path, owner), protected)
    change = lora_change(model, base, classes, rank=rank, energy=energy)
    if not change.factors and not change.full:
        raise OutputError(f"{what} {out}: the model does not differ from the base weights; nothing to export")
    fitness_full = fitness_adapter = None
    if fitness is not None:
        fitness_full = float(fitness(model))
        with applied(model, base, change):
            fitness_adapter = float(fitness(model))
    tensors, modules_to_save, lora_biases = _tensors(model, change)
    report = AdapterReport(change.fits, sorted(change.full), change.left_out, fitness_adapter, fitness_full)
    with staged_dir(out, NOTHING_ELSE_CHANGED) as staging:
        with writing(staging, NOTHING_ELSE_CHANGED):
            save_file({k: v.detach().cpu() for k, v in tensors.items()}, str(staging / "adapter_model.safetensors"))
            config = _config(change, modules_to_save, lora_biases, base_name)
            (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
            summary = {**asdict(report), "energy": energy, "rank": rank}
            (staging / "adapter_report.json").write_text(json.dumps(summary, indent=2) + "\n")
            mark_output(staging, ADAPTER_KIND, owner)
        publish_dir(staging, out, then=NOTHING_ELSE_CHANGED)
    return report
