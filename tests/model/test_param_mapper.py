"""FROZEN / LORA / FULL classes on the tiny model and, without weights, on the real 7B."""

import pytest
from conftest import run_module

from ERO_EGGROLL.config import ROOT, Config, ConfigError, load_config
from ERO_EGGROLL.model.qwen import ParamClass, classify, classify_model, meta_model_from_config_json, summarize


@pytest.fixture(scope="module")
def specs_7b():
    cfg = load_config(ROOT / "configs" / "qwen2_5_vl_7b.yaml")
    return {s.name: s for s in classify_model(meta_model_from_config_json(ROOT / cfg.model.config_json), cfg)}


def test_rules_on_the_7b(specs_7b):
    def cls(name):
        return specs_7b[name].cls

    layer = "model.language_model.layers.3."
    assert cls(layer + "self_attn.q_proj.weight") is ParamClass.LORA
    assert cls(layer + "mlp.down_proj.weight") is ParamClass.LORA
    assert cls(layer + "self_attn.q_proj.bias") is ParamClass.FULL  # a 1-D bias is never LORA
    assert cls(layer + "input_layernorm.weight") is ParamClass.FULL
    assert cls("model.language_model.norm.weight") is ParamClass.FULL
    assert cls("model.language_model.embed_tokens.weight") is ParamClass.FROZEN
    assert cls("lm_head.weight") is ParamClass.FROZEN
    assert all(s.cls is ParamClass.FROZEN for n, s in specs_7b.items() if n.startswith("model.visual."))
    assert sum(s.cls is ParamClass.LORA for s in specs_7b.values()) == 28 * 7


def test_unfrozen_vision_and_freeze_nonlora(specs_7b):
    cfg = Config()
    cfg.params.freeze_vision = False
    cfg.evolution.freeze_nonlora = True
    shapes = [(n, s.shape) for n, s in specs_7b.items()]
    out = {s.name: s.cls for s in classify(shapes, cfg)}
    assert out["model.visual.blocks.0.attn.qkv.weight"] is ParamClass.LORA
    assert out["model.visual.patch_embed.proj.weight"] is ParamClass.FROZEN  # 5-D stays frozen
    assert out["model.visual.blocks.0.attn.qkv.bias"] is ParamClass.FROZEN  # FULL, frozen by freeze_nonlora
    assert out["model.language_model.norm.weight"] is ParamClass.FROZEN


def test_overrides_win_and_are_checked(specs_7b):
    shapes = [(n, s.shape) for n, s in specs_7b.items()]
    cfg = Config()
    cfg.params.overrides = {"model.language_model.layers.0.*": "FROZEN", "lm_head.weight": "LORA"}
    out = {s.name: s.cls for s in classify(shapes, cfg)}
    assert out["model.language_model.layers.0.self_attn.q_proj.weight"] is ParamClass.FROZEN
    assert out["lm_head.weight"] is ParamClass.LORA
    cfg.params.overrides = {"*.input_layernorm.weight": "LORA"}
    with pytest.raises(ConfigError, match="needs a tensor of 2 or more dimensions"):
        classify(shapes, cfg)
    cfg.params.overrides = {"no.such.*": "FULL"}
    with pytest.raises(ConfigError, match="match no tensor"):
        classify(shapes, cfg)


def test_summary_counts_noise_bytes(specs_7b):
    rows = {r["class"]: r for r in summarize(list(specs_7b.values()), rank=2)}
    lora = [s for s in specs_7b.values() if s.cls is ParamClass.LORA]
    assert rows["LORA"]["noise bytes/member (EGGROLL)"] == sum((s.shape[0] + s.shape[1]) * 2 * 4 for s in lora)
    assert rows["LORA"]["noise bytes/member (full-rank)"] == sum(s.numel * 4 for s in lora)
    assert 6e9 < rows["LORA"]["parameters"] < 7e9


def test_cli_runs_for_the_7b_without_weights():
    code, out, err = run_module("ERO_EGGROLL.qwen_param_mapper", "--config", str(ROOT / "configs/qwen2_5_vl_7b.yaml"))
    assert code == 0, err
    assert "LORA | 196 |" in out
