"""Random Qwen2.5-VL models of chosen size, for measuring speed and memory at scale on any machine.

They share the embedded tiny model's tokenizer and vision tower shape (vision is FROZEN in a run);
only the language model grows. Weights are created directly in the requested dtype, so a bf16
model never passes through an fp32 copy (which would distort a memory measurement).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class TextShape:
    """The language model's size: what decides the evolvable parameter count."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int


# Named sizes used by the benchmarks and tests (evolvable parameters are approximate).
SHAPES = {
    "26m": TextShape(hidden=512, intermediate=1536, layers=8, heads=8, kv_heads=4),
    "100m": TextShape(hidden=768, intermediate=2048, layers=14, heads=12, kv_heads=12),
    "360m": TextShape(hidden=1024, intermediate=3584, layers=24, heads=16, kv_heads=16),
    "1b": TextShape(hidden=1536, intermediate=5632, layers=28, heads=12, kv_heads=2),
}


def random_model(tiny_dir: Path, shape: TextShape, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A Qwen2.5-VL with the given text shape and random weights (eval mode, no grad)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    data = json.loads((Path(tiny_dir) / "config.json").read_text())
    head_dim = shape.hidden // shape.heads
    data["text_config"].update(
        {
            "hidden_size": shape.hidden,
            "intermediate_size": shape.intermediate,
            "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads,
            "layer_types": ["full_attention"] * shape.layers,
        }
    )
    # mrope sections must sum to head_dim / 2 (same proportions as Qwen2.5-VL-7B's 16/24/24 for head_dim 128)
    data["text_config"]["rope_parameters"]["mrope_section"] = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    data["vision_config"]["out_hidden_size"] = shape.hidden
    config = Qwen2_5_VLConfig.from_dict(data)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


def random_model_like(
    tiny_dir: Path,
    arch: dict,
    layers: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: str | torch.device = "cpu",
):
    """A random Qwen2.5-VL with another checkpoint's shapes (widths, vocabulary, vision tower; `arch` is its
    config.json)
    but `layers` decoder layers: a real model's tensor sizes measured on a machine that cannot hold all its layers.

    The token ids stay the embedded tiny model's, so its tokenizer and processor drive the model. The weights are
    created on `device` (a 7B-sized model is initialised in seconds on a GPU, in minutes on a CPU)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text, vision = arch.get("text_config", arch), arch["vision_config"]
    data = json.loads((Path(tiny_dir) / "config.json").read_text())
    data["text_config"].update(
        {
            key: text[key]
            for key in (
                "hidden_size",
                "intermediate_size",
                "num_attention_heads",
                "num_key_value_heads",
                "vocab_size",
                "rms_norm_eps",
            )
        }
    )
    data["text_config"].update({"num_hidden_layers": layers, "layer_types": ["full_attention"] * layers})
    mrope = (text.get("rope_parameters") or text.get("rope_scaling") or {})["mrope_section"]
    data["text_config"]["rope_parameters"]["mrope_section"] = list(mrope)
    data["vision_config"].update(
        {
            key: vision[key]
            for key in (
                "depth",
                "hidden_size",
                "intermediate_size",
                "num_heads",
                "out_hidden_size",
                "fullatt_block_indexes",
                "window_size",
            )
        }
    )
    data["tie_word_embeddings"] = arch.get("tie_word_embeddings", False)
    config = Qwen2_5_VLConfig.from_dict(data)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)
