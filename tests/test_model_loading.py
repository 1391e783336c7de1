"""One door for real and embedded models, with clear errors for what is not a Qwen2.5-VL checkpoint."""

import json
import shutil

import pytest
import torch

from ERO_EGGROLL.config import Config
from ERO_EGGROLL.model_loading import ModelLoadError, load_model, load_model_from_dir


def test_embedded_model_loads_through_load_model(tiny_model_dir):
    cfg = Config()
    cfg.model.path = str(tiny_model_dir)
    model, processor = load_model(cfg)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32  # auto = fp32 on the CPU
    assert 300_000 < sum(p.numel() for p in model.parameters()) < 5_000_000
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id


def test_dtype_from_config(tiny_model_dir):
    model, _ = load_model_from_dir(tiny_model_dir, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_missing_directory_says_where_to_put_weights(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist; put a Qwen2.5-VL checkpoint there"):
        load_model_from_dir(tmp_path / "Qwen2.5-VL-7B-Instruct")


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"has no config.json \(found: weights.bin\)"):
        load_model_from_dir(tmp_path)


def test_other_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="describes a 'llama' model, not 'qwen2_5_vl'"):
        load_model_from_dir(tmp_path)


def test_truncated_safetensors(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model_from_dir(broken)
