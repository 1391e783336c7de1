"""An evolved model as a standard Qwen2.5-VL folder: the base model's folder with new weights.

Every non-weight file of the base checkpoint (config, generation config, tokenizer, chat template,
processor configs, ...) is copied byte for byte; only the safetensors files are rewritten, with the
base's shard layout, tensor names and dtypes. So whatever loads the base model (AutoProcessor,
Qwen2_5_VLForConditionalGeneration, other tools) loads the export the same way. A model card
(README.md) is added; a base README.md is kept as BASE_MODEL_README.md.

When the run's dtype differs from the base's, the weights are cast to the base's dtype, unless the
cast would keep less than KEEP_FRACTION of the elements the evolution changed: then they stay in the
run's dtype and only the dtype field of config.json (and the index's total size) differ from the base.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ERO_EGGROLL.core.errors import EggrollError
from ERO_EGGROLL.io.disk import (
    CHECKPOINT_INTACT,
    added_entries,
    aside_name,
    mark_output,
    output_mark,
    publish_dir,
    staged_dir,
    writing,
)

INDEX = "model.safetensors.index.json"
CARD, BASE_CARD = "README.md", "BASE_MODEL_README.md"
# weights in other formats would hold the base's numbers next to the evolved ones: not carried
STALE_WEIGHTS = ("pytorch_model*.bin", "pytorch_model.bin.index.json", "*.pt", "*.pth", "*.ckpt")
KEEP_FRACTION = 0.5
EXPORT_KIND = "model export"  # the mark (disk.mark_output) that lets a later export replace this one
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class ExportError(EggrollError):
    """The model's tensors do not fit the base checkpoint's layout."""


@dataclass
class WeightsReport:
    """What the export wrote, for the model card."""

    base_dtypes: list[str]
    run_dtype: str
    cast: bool = False  # some base dtype differs from the run's
    written_dtype: str | None = None  # None: each tensor in its base dtype
    changed_elements: int = 0  # elements that differ from the base, in the run's dtype
    kept_elements: int = 0  # of those, still different after the cast to the base dtype
    shards: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)


def base_layout(base_dir: Path) -> dict[str, list[str]]:
    """Shard file -> the tensor names it holds, as the base checkpoint stores them."""
    index = base_dir / INDEX
    if index.is_file():
        layout: dict[str, list[str]] = {}
        for name, shard in json.loads(index.read_text())["weight_map"].items():
            layout.setdefault(shard, []).append(name)
        return layout
    files = sorted(base_dir.glob("*.safetensors"))
    if len(files) != 1:
        raise ExportError(
            f"{base_dir} holds {len(files)} *.safetensors files and no {INDEX}; cannot tell its shard layout"
        )
    with safe_open(files[0], framework="pt") as f:
        return {files[0].name: list(f.keys())}


def saved_tensors(model) -> dict[str, torch.Tensor]:
    """The model's tensors under the names its checkpoint uses (transformers renames some at load; revert that)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, model.state_dict())


def _matched(tensors: dict[str, torch.Tensor], layout: dict[str, list[str]], base_dir: Path) -> None:
    names = {n for shard in layout.values() for n in shard}
    missing = sorted(names - tensors.keys())
    if missing:
        raise ExportError(
            f"{base_dir} stores tensor {missing[0]} (and {len(missing) - 1} more) that the model does not have; "
            "export from the base model the run loaded"
        )
    stored = {tensors[n].data_ptr() for n in names}
    extra = sorted(n for n in tensors.keys() - names if tensors[n].data_ptr() not in stored)  # tied copies are fine
    if extra:
        raise ExportError(
            f"the model has tensor {extra[0]} (and {len(extra) - 1} more) that {base_dir} does not store; "
            "export from the base model the run loaded"
        )


def _count_changes(tensors, layout, base_dir: Path, report: WeightsReport) -> None:
    """Elements that differ from the base, and how many of them survive the cast to the base dtype."""
    for shard, names in layout.items():
        with safe_open(base_dir / shard, framework="pt") as f:
            for name in names:
                base, evolved = f.get_tensor(name), tensors[name].detach().cpu()
                changed = evolved != base.to(evolved.dtype)
                report.changed_elements += int(changed.sum())
                report.kept_elements += int((evolved.to(base.dtype) != base)[changed].sum())


def write_weights(model, base_dir: Path, out_dir: Path) -> WeightsReport:
    """The model's weights as the base's shards (names, layout, dtypes) into `out_dir`, plus the index."""
    layout, tensors = base_layout(base_dir), saved_tensors(model)
    _matched(tensors, layout, base_dir)
    base_dtypes: dict[str, torch.dtype] = {}
    metadata: dict[str, dict | None] = {}
    for shard, names in layout.items():
        with safe_open(base_dir / shard, framework="pt") as f:
            metadata[shard] = f.metadata()
            base_dtypes.update({n: SAFETENSORS_DTYPES.get(f.get_slice(n).get_dtype(), tensors[n].dtype) for n in names})
    run_dtype = next(model.parameters()).dtype

    def name(dtype):
        return str(dtype).removeprefix("torch.")

    report = WeightsReport(sorted({name(d) for d in base_dtypes.values()}), name(run_dtype), shards=sorted(layout))
    report.cast = any(d != run_dtype for d in base_dtypes.values())
    if report.cast:
        _count_changes(tensors, layout, base_dir, report)
        if report.changed_elements and report.kept_elements < KEEP_FRACTION * report.changed_elements:
            report.written_dtype = report.run_dtype
    total_size = 0
    for shard, names in layout.items():
        out = {
            n: tensors[n].detach().to("cpu", run_dtype if report.written_dtype else base_dtypes[n]).contiguous()
            for n in names
        }
        save_file(out, out_dir / shard, metadata=metadata[shard])
        total_size += sum(t.numel() * t.element_size() for t in out.values())
        del out
    if (base_dir / INDEX).is_file():
        if report.written_dtype:
            index = json.loads((base_dir / INDEX).read_text())
            index.setdefault("metadata", {})["total_size"] = total_size  # the tensors' bytes, as transformers writes it
            (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        else:
            shutil.copyfile(base_dir / INDEX, out_dir / INDEX)
    return report


def copy_base_files(base_dir: Path, out_dir: Path, layout: dict[str, list[str]]) -> list[str]:
    """Every non-weight file of the base, byte for byte (links followed); returns the weight files left out."""
    left_out = []
    for entry in sorted(base_dir.iterdir()):
        if entry.name in layout or entry.name == INDEX:
            continue
        if any(fnmatch.fnmatch(entry.name, p) for p in STALE_WEIGHTS) or entry.name.endswith(".safetensors"):
            left_out.append(entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, out_dir / entry.name)
        else:
            shutil.copyfile(entry, out_dir / (BASE_CARD if entry.name == CARD else entry.name))
    return left_out


def set_config_dtype(config_file: Path, base: str, new: str) -> None:
    """Change only the dtype fields ("dtype" / "torch_dtype") of config.json, leaving every other byte."""
    text = config_file.read_text(encoding="utf-8")
    config_file.write_text(
        re.sub(rf'("(?:torch_)?dtype"\s*:\s*)"{re.escape(base)}"', rf'\1"{new}"', text), encoding="utf-8"
    )


def earlier_export(path: Path) -> bool:
    """Whether `path` is a model folder an export wrote (which an export for the same run may replace)."""
    return export_owner(path) is not None


def export_owner(path: Path) -> str | None:
    """The run (its checkpoint folder, resolved) that the export at `path` was made for; '' for an export marked
    before marks named their run; None when `path` is no export."""
    mark = output_mark(path, EXPORT_KIND)
    return None if mark is None else mark["owner"]


def _keep_earlier(out_dir: Path, owner: str) -> Path | None:
    """Where the export being replaced goes instead of being deleted: aside when it holds a file its export did not
    write (a user's notes) or was made for another run; None (deleted, as it was ours) otherwise."""
    mark = output_mark(out_dir, EXPORT_KIND)
    if mark is None:
        return None
    added = added_entries(out_dir, mark)
    if not added and mark["owner"] == owner:
        return None
    aside = aside_name(out_dir)
    why = f"it holds {', '.join(added[:5])}, which no export wrote" if added else f"it was made for {mark['owner']}"
    print(f"note: the earlier {out_dir} is kept at {aside}: {why}", file=sys.stderr)
    return aside


def export_model(
    model, base_dir: Path, out_dir: Path, card, *, owner: str, then: str = CHECKPOINT_INTACT
) -> WeightsReport:
    """Build the folder in a staging directory and publish it atomically as `out_dir`, marked as made for `owner`
    (the run's checkpoint folder, resolved).

    `card(report) -> str` writes the model card once the weights are known; `then`: what a failed write leaves
    intact."""
    with staged_dir(out_dir, then) as staging:
        with writing(staging, then):
            report = write_weights(model, base_dir, staging)
            report.left_out = copy_base_files(base_dir, staging, base_layout(base_dir))
            if report.written_dtype:
                config = json.loads((base_dir / "config.json").read_text())
                set_config_dtype(
                    staging / "config.json",
                    config.get("dtype") or config.get("torch_dtype") or "",
                    report.written_dtype,
                )
            (staging / CARD).write_text(card(report), encoding="utf-8")
            mark_output(staging, EXPORT_KIND, owner)
        publish_dir(staging, out_dir, previous_to=_keep_earlier(out_dir, owner), then=then)
    return report
