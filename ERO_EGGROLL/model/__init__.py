"""Qwen2.5-VL: loading, the tensor classification and its norm rule, the tiny and random models, export."""
