"""The exported model is the base model's folder with new weights (export.py) and a model card (model_card.py).

Built from the loaded tiny model against bases made here (the embedded one, and a sharded bf16 copy of it),
so no run is needed; the exported best model of a real run is checked in tests/run/test_evolution_run.py."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ERO_EGGROLL.config import Config
from ERO_EGGROLL.evaluation.evaluator import AnswerRecord, EvalResult
from ERO_EGGROLL.io.disk import OUTPUT_MARK
from ERO_EGGROLL.model.export import CARD, INDEX, export_model, saved_tensors
from ERO_EGGROLL.model.loading import STANDARD_PROCESSOR_CLASS, load_model_from_dir
from ERO_EGGROLL.storage.model_card import model_card

EVOLVED = "model.language_model.layers.0.mlp.down_proj.weight"  # the model's name
# the same tensor's name in the checkpoint files (transformers renames at load)
STORED = "model.layers.0.mlp.down_proj.weight"


@contextlib.contextmanager
def evolved(model, step: float):
    """One tensor moved by `step` x its own scale (the shared fixture gets its weights back)."""
    param = dict(model.named_parameters())[EVOLVED]
    saved = param.detach().clone()
    param.data += step * param.detach().abs().mean()
    try:
        yield
    finally:
        param.data.copy_(saved)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def sharded_bf16_base(src: Path, out: Path, processor) -> Path:
    """The tiny model as a downloaded 7B looks: bf16, two shards and an index,
    processor files saved by the project's processor."""
    out.mkdir()
    for f in src.iterdir():
        if not f.name.endswith(".safetensors") and f.name not in ("processor_config.json", "tokenizer_config.json"):
            shutil.copyfile(f, out / f.name)
    processor.save_pretrained(out)
    (out / "config.json").write_text(
        (src / "config.json").read_text().replace('"dtype": "float32"', '"dtype": "bfloat16"')
    )
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(src / "model.safetensors").items()}
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, out / shard, metadata={"format": "pt"})
    total = sum(tensors[k].numel() * 2 for k in names)
    index = {"metadata": {"total_size": total}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return out


def test_export_of_the_embedded_model_is_its_folder_with_new_weights(tiny, tiny_model_dir, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, _ = tiny
    with evolved(model, 0.5):
        expected = {k: v.detach().clone() for k, v in model.named_parameters()}
        report = export_model(model, tiny_model_dir, tmp_path / "best_model", lambda r: "card\n", owner="run")
    out = tmp_path / "best_model"
    base_files = files(tiny_model_dir)
    exported = files(out)
    assert exported.keys() == base_files.keys() | {CARD, OUTPUT_MARK}  # the mark lets a later export replace this one
    assert all(exported[name] == data for name, data in base_files.items() if name != "model.safetensors")
    assert report.written_dtype is None and not report.cast and report.shards == ["model.safetensors"]
    loaded = dict(Qwen2_5_VLForConditionalGeneration.from_pretrained(out).named_parameters())
    assert not loaded[EVOLVED].equal(load_file(tiny_model_dir / "model.safetensors")[STORED])
    assert loaded.keys() == expected.keys() and all(loaded[n].equal(expected[n]) for n in loaded)


@pytest.fixture
def bf16_base(tiny, tiny_model_dir, tmp_path):
    """(folder, model loaded from it in float32 as a CPU run loads it, the tiny processor)."""
    base = sharded_bf16_base(tiny_model_dir, tmp_path / "base", tiny[1])
    return base, load_model_from_dir(base)[0], tiny[1]


def test_a_sharded_bf16_base_keeps_its_layout_and_dtype(bf16_base, tmp_path):
    base, model, processor = bf16_base
    assert json.loads((base / "processor_config.json").read_text())["processor_class"] == STANDARD_PROCESSOR_CLASS
    assert json.loads((base / "tokenizer_config.json").read_text())["processor_class"] == STANDARD_PROCESSOR_CLASS
    with evolved(model, 0.5):
        expected = {k: v.to(torch.bfloat16) for k, v in saved_tensors(model).items()}
        report = export_model(model, base, tmp_path / "best_model", lambda r: "card\n", owner="run")
    out = tmp_path / "best_model"
    assert report.cast and report.written_dtype is None and report.kept_elements > 0.5 * report.changed_elements > 0
    assert {n: d for n, d in files(out).items() if not n.endswith(".safetensors") and n not in (CARD, OUTPUT_MARK)} == {
        n: d for n, d in files(base).items() if not n.endswith(".safetensors")
    }  # index and config too, byte for byte
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        with safe_open(out / shard, framework="pt") as new, safe_open(base / shard, framework="pt") as old:
            assert sorted(new.keys()) == sorted(old.keys()) and new.metadata() == old.metadata()
            assert all(
                new.get_tensor(k).dtype == torch.bfloat16 and new.get_tensor(k).equal(expected[k]) for k in new.keys()
            )
    exported_model, exported_processor = load_model_from_dir(
        out
    )  # the project's own loader: weights and the image-only processor
    assert dict(exported_model.named_parameters())[EVOLVED].equal(expected[STORED].float())
    assert exported_processor.tokenizer.chat_template == processor.tokenizer.chat_template


def test_a_cast_that_would_erase_the_evolution_keeps_the_run_dtype(bf16_base, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    base, model, _ = bf16_base
    with evolved(model, 1e-5):  # far below one bf16 step: the cast would give the base back
        expected = saved_tensors(model)[STORED].clone()
        report = export_model(model, base, tmp_path / "best_model", lambda r: "card\n", owner="run")
    out = tmp_path / "best_model"
    assert report.written_dtype == "float32" and report.kept_elements < 0.5 * report.changed_elements
    config = (out / "config.json").read_text()
    assert (
        config
        == (base / "config.json").read_text().replace('"dtype": "bfloat16"', '"dtype": "float32"')
        != (base / "config.json").read_text()
    )
    index = json.loads((out / INDEX).read_text())
    assert index["weight_map"] == json.loads((base / INDEX).read_text())["weight_map"]
    assert (
        index["metadata"]["total_size"] == 2 * json.loads((base / INDEX).read_text())["metadata"]["total_size"]
    )  # fp32: twice bf16
    loaded = dict(Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).named_parameters())
    assert loaded[EVOLVED].equal(expected)


def test_model_card_front_matter_metrics_curve_and_replay_command(tmp_path):
    cfg = Config()
    cfg.data.fitness_source = "train_loo"
    answers = [
        AnswerRecord(
            task_id="b1fc8b8e",
            score=0.5,
            text="[[0]]",
            char_similarity=0.75,
            exact=0.0,
            cell_accuracy=0.25,
            answer_logprob=-1.5,
            prompt_tokens=10,
            new_tokens=5,
        )
    ]  # distinct values: a swapped column shows
    history = [
        {"epoch": 0, "mean_model_fitness": 0.25, "mean_model_test_score": 0.3, "mean_model_cell_accuracy": 0.0},
        {
            "epoch": 1,
            "fitness": [0.2, 0.4],
            "member_mean": 0.3,
            "member_min": 0.2,
            "member_max": 0.4,
            "mean_model_fitness": 0.5,
            "mean_model_test_score": 0.5,
            "mean_model_cell_accuracy": 0.25,
        },
    ]
    from ERO_EGGROLL.model.export import WeightsReport

    report = WeightsReport(
        ["bfloat16"], "float32", cast=True, changed_elements=10, kept_elements=9, shards=["model.safetensors"]
    )
    card = model_card(
        cfg,
        ["b1fc8b8e"],
        history,
        1,
        EvalResult({"b1fc8b8e": 0.5}, answers),
        tmp_path / "ckpt",
        tmp_path / "fitness_curve.png",
        report,
    )
    _, front, body = card.split("---\n", 2)
    assert (
        yaml.safe_load(front)["base_model"] == cfg.model.path
        and yaml.safe_load(front)["library_name"] == "transformers"
    )
    assert "## Results (held out)" in body and "| T1 | b1fc8b8e | 0.7500 | 0.2500 | 0.0000 |" in body
    assert "| 1 | 0.5000 | 0.5000 | 0.2500 | 0.3000 [0.2000, 0.4000] |" in body and "fitness_curve.png" in body
    assert "cast to the base's bfloat16" in body and "9 of the 10" in body
    assert f"EGGROLL evolution strategies with low-rank noise of rank {cfg.evolution.rank}" in body
    assert f"python -m ERO_EGGROLL.replay {tmp_path / 'ckpt'} --check" in body
    cfg.data.fitness_source = "test"
    assert "## Results (test-time search)" in model_card(
        cfg,
        ["b1fc8b8e"],
        history,
        1,
        EvalResult({"b1fc8b8e": 0.5}, answers),
        tmp_path / "ckpt",
        tmp_path / "plot.png",
        report,
    )
    # replay's export: rebuilt, not evaluated, no plot; the card says how to score it and lists the whole split
    replayed = model_card(cfg, [], history, 1, None, tmp_path / "ckpt", None, report)
    assert "Not scored in this export" in replayed and f"--checkpoint {tmp_path / 'ckpt'}" in replayed
    assert "## Results (" not in replayed and "every task of the evaluation split" in replayed
    assert "| 1 | 0.5000 | 0.5000 | 0.2500 | 0.3000 [0.2000, 0.4000] |" in replayed


def test_the_embedded_tiny_model_names_the_stock_processor(tiny_model_dir):
    """A standard Qwen2.5-VL folder: AutoProcessor elsewhere builds the stock processor (tiny_model.py saves it so)."""
    for name in ("processor_config.json", "tokenizer_config.json"):
        found = json.loads((tiny_model_dir / name).read_text()).get("processor_class")
        assert found == STANDARD_PROCESSOR_CLASS, (
            f"{tiny_model_dir / name} names {found}: the tiny model was built before "
            "#18; rebuild it with `python scripts/build_tiny_model.py` (same weights)"
        )
