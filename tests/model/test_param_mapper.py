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


# Qwen2.5-VL-7B's decoder, written out by hand from its published numbers (configs/qwen2_5_vl_7b_config.json):
# hidden 3584, MLP 18944, 28 layers, 28 heads of 128, 4 key/value heads (512 wide); vocabulary 152,064 (untied head)
HIDDEN, MLP, LAYERS, KV_WIDTH = 3584, 18944, 28, 4 * 128
MATRICES_PER_LAYER = {  # (out, in) of each linear weight of one decoder layer
    "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
    "self_attn.k_proj.weight": (KV_WIDTH, HIDDEN),
    "self_attn.v_proj.weight": (KV_WIDTH, HIDDEN),
    "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
    "mlp.gate_proj.weight": (MLP, HIDDEN),
    "mlp.up_proj.weight": (MLP, HIDDEN),
    "mlp.down_proj.weight": (HIDDEN, MLP),
}
VECTORS_PER_LAYER = {  # q/k/v biases and the two norms
    "self_attn.q_proj.bias": HIDDEN,
    "self_attn.k_proj.bias": KV_WIDTH,
    "self_attn.v_proj.bias": KV_WIDTH,
    "input_layernorm.weight": HIDDEN,
    "post_attention_layernorm.weight": HIDDEN,
}


def test_summary_counts_match_the_published_architecture(specs_7b):
    """Parameters and noise bytes per class against the 7B's shapes written out above, not the mapper's formula."""
    rows = {r["class"]: r for r in summarize(list(specs_7b.values()), rank=2)}
    lora_per_layer = sum(m * n for m, n in MATRICES_PER_LAYER.values())
    assert lora_per_layer == 233_046_016  # 2 x 3584^2 + 2 x 512 x 3584 + 3 x 18944 x 3584
    assert rows["LORA"]["tensors"] == LAYERS * 7
    assert rows["LORA"]["parameters"] == LAYERS * lora_per_layer == 6_525_288_448
    # rank 2, fp32: a member draws A (m x 2) and B (n x 2) per matrix, 8 (m + n) bytes
    eggroll_per_layer = sum(8 * (m + n) for m, n in MATRICES_PER_LAYER.values())
    assert rows["LORA"]["noise bytes/member (EGGROLL)"] == LAYERS * eggroll_per_layer == 20_185_088
    assert rows["LORA"]["noise bytes/member (full-rank)"] == 4 * 6_525_288_448
    full = LAYERS * sum(VECTORS_PER_LAYER.values()) + HIDDEN  # and the final norm
    assert rows["FULL"]["tensors"] == LAYERS * 5 + 1
    assert rows["FULL"]["parameters"] == full == 333_312
    assert rows["FULL"]["noise bytes/member (EGGROLL)"] == rows["FULL"]["noise bytes/member (full-rank)"] == 4 * full
    assert rows["FROZEN"]["noise bytes/member (EGGROLL)"] == 0


def test_every_decoder_tensor_has_its_class_and_shape(specs_7b):
    """Each layer's matrices LORA and its vectors FULL, with the shapes above; everything else frozen."""
    expected = {"model.language_model.norm.weight": ((HIDDEN,), ParamClass.FULL)}
    for i in range(LAYERS):
        layer = f"model.language_model.layers.{i}."
        expected |= {layer + k: (shape, ParamClass.LORA) for k, shape in MATRICES_PER_LAYER.items()}
        expected |= {layer + k: ((n,), ParamClass.FULL) for k, n in VECTORS_PER_LAYER.items()}
    evolving = {n: (tuple(s.shape), s.cls) for n, s in specs_7b.items() if s.cls is not ParamClass.FROZEN}
    assert evolving == expected
    assert specs_7b["lm_head.weight"].shape == specs_7b["model.language_model.embed_tokens.weight"].shape
    assert tuple(specs_7b["lm_head.weight"].shape) == (152_064, HIDDEN)


def test_cli_runs_for_the_7b_without_weights():
    code, out, err = run_module("ERO_EGGROLL.qwen_param_mapper", "--config", str(ROOT / "configs/qwen2_5_vl_7b.yaml"))
    assert code == 0, err
    assert "LORA | 196 |" in out
