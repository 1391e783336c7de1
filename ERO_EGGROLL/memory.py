"""Predicted peak memory of a run, next to full-rank ES (ERO-style) for the same population.

Works from the architecture alone (config.json), so it answers "will the 7B fit?" before any
weights are downloaded:

    python -m ERO_EGGROLL.memory --config configs/qwen2_5_vl_7b.yaml
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Sequence

from .config import Config, ConfigError, load_config
from .qwen_param_mapper import ParamClass, ParamSpec, architecture_json, classify, meta_model_from_config_json

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TOKENS_PER_GRID_CHAR = 0.7  # Qwen2 tokenizers split digits; "0, " is about two tokens
PROMPT_OVERHEAD_TOKENS = 120  # system prompt, labels, chat template
FP32 = 4


@dataclass(frozen=True)
class Workload:
    """The longest generate call of a run: prompt tokens, new tokens, image patches, batch rows."""

    prompt_tokens: int
    new_tokens: int
    image_patches: int
    batch: int


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per component. The peak is the resident part plus the larger of the two phases."""

    resident: dict[str, int]  # held for the whole run
    evaluation: int  # one member's generate: KV cache, activations, that member's noise
    update: int  # the fused update of the largest matrix: stacked factors of all N members + fp32 temporaries
    host: dict[str, int]  # bytes in host memory that a GPU run keeps off the GPU
    fullrank: dict[str, int]  # the same run with full-rank ES noise

    @property
    def device_total(self) -> int:
        return sum(self.resident.values()) + max(self.evaluation, self.update)

    @property
    def fullrank_total(self) -> int:
        return sum(self.fullrank.values())


def workload_from_tasks(tasks, cfg: Config) -> Workload:
    """Estimate the longest prompt of the configured questions without a tokenizer."""
    from .arc_evaluator import questions_for, token_budget
    from .arc_task import grid_to_text, render_grid
    from .prompts import answer_text

    longest_prompt, new, patches = 0, 0, 0
    for q in questions_for(tasks, cfg, "fitness") + questions_for(tasks, cfg, "test"):
        grids = [g for p in q.examples for g in (p.input, p.output)] + [q.query]
        text_chars = sum(len(grid_to_text(g)) for g in grids) if cfg.data.input_mode != "image" else 0
        image_tokens = image_patches = 0
        if cfg.data.input_mode != "text":
            for g in grids:
                img = render_grid(g, cfg.data.cell_size, max_pixels=cfg.data.max_pixels)
                image_patches += (img.width // 14) * (img.height // 14)
            image_tokens = image_patches // 4
        longest_prompt = max(longest_prompt, PROMPT_OVERHEAD_TOKENS + int(text_chars * TOKENS_PER_GRID_CHAR) + image_tokens)
        new = max(new, token_budget(cfg.evaluation, q.target, int(len(answer_text(q.target)) * TOKENS_PER_GRID_CHAR)))
        patches = max(patches, image_patches)
    return Workload(longest_prompt, new, patches, cfg.evaluation.batch_size)


def estimate(cfg: Config, arch: dict, specs: list[ParamSpec], work: Workload, dtype: str, on_gpu: bool) -> MemoryEstimate:
    """Bytes per component for one member evaluated at a time (peak = weights + the largest phase)."""
    text = arch.get("text_config", arch)
    vision = arch.get("vision_config", {})
    b = DTYPE_BYTES[dtype]
    n, r = cfg.evolution.population_size, cfg.evolution.rank
    hidden, inter = text["hidden_size"], text["intermediate_size"]
    layers, heads = text["num_hidden_layers"], text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads", heads)
    head_dim = text.get("head_dim") or hidden // heads
    vocab = text["vocab_size"]
    seq = work.prompt_tokens + work.new_tokens
    lora = [s for s in specs if s.cls is ParamClass.LORA]
    full = [s for s in specs if s.cls is ParamClass.FULL]
    evolvable = sum(s.numel for s in lora + full)
    weights = sum(s.numel for s in specs) * b
    kv_cache = 2 * layers * kv_heads * head_dim * seq * work.batch * b
    attention_scores = 0 if on_gpu and cfg.model.attn_implementation == "sdpa" else work.batch * heads * work.prompt_tokens**2 * b
    activations = work.batch * work.prompt_tokens * (4 * hidden + 3 * inter) * b + attention_scores + work.batch * vocab * FP32
    vision_act = work.image_patches * vision.get("hidden_size", 0) * 8 * b if work.image_patches else 0
    noise = sum((s.shape[0] + s.shape[1]) * r for s in lora) * (FP32 + b) + sum(s.numel for s in full) * (FP32 + b)
    full_copies = sum(s.numel for s in full) * b
    largest = max(lora, key=lambda s: s.numel, default=None)
    update = 0 if largest is None else n * (largest.shape[0] + largest.shape[1]) * r * FP32 + largest.numel * (3 * FP32 + b)
    optimizer = 2 * evolvable * FP32 if cfg.evolution.optimizer in ("adam", "adamw") else 0
    inplace_copies = sum(s.numel for s in lora) * b if cfg.evolution.strategy == "inplace" else 0
    resident = {"weights": weights, "optimizer state": optimizer, "FULL saved copies": full_copies,
                "inplace saved copies": 0 if on_gpu else inplace_copies}
    evaluation = kv_cache + activations + vision_act + noise
    host = {"inplace saved copies (pinned host)": inplace_copies if on_gpu else 0}
    lora_numel = sum(s.numel for s in lora)
    fullrank = {"weights": weights, "optimizer state": optimizer,
                "dense member noise (LORA tensors, in place) + saved copy": 2 * lora_numel * b + full_copies,
                "update accumulator (fp32)": evolvable * FP32,
                "evaluation (KV cache + activations)": kv_cache + activations + vision_act}
    return MemoryEstimate(resident, evaluation, update, host, fullrank)


def auto_members_per_batch(cfg: Config, arch: dict, specs: list[ParamSpec], prepared, device, dtype: str) -> int:
    """The largest K whose K-member generate calls fit in 80% of the free device memory (or half the free RAM)."""
    import psutil
    import torch

    work = Workload(
        prompt_tokens=max(int(p.inputs["input_ids"].shape[0]) for p in prepared),
        new_tokens=max(p.max_new_tokens for p in prepared),
        image_patches=max((int(p.inputs["pixel_values"].shape[0]) for p in prepared if "pixel_values" in p.inputs), default=0),
        batch=cfg.evaluation.batch_size,
    )
    on_gpu = torch.device(device).type == "cuda"
    per_member = estimate(cfg, arch, specs, work, dtype, on_gpu).evaluation
    free = torch.cuda.mem_get_info(device)[0] * 0.8 if on_gpu else psutil.virtual_memory().available * 0.5
    return int(max(1, min(cfg.evolution.population_size, free // max(per_member, 1))))


def measured_peak_rss_bytes() -> int:
    """This process's own peak resident memory.

    Reads VmHWM, which starts afresh at exec. (getrusage's ru_maxrss does not: a subprocess
    started from a big parent, pytest for instance, reports the parent's peak as its own.)
    """
    import resource

    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _gib(n: int) -> str:
    return f"{n / 2**30:8.3f} GiB"


def report(cfg: Config) -> str:
    from .arc_task import load_tasks

    source = architecture_json(cfg)
    arch = json.loads(source.read_text())
    specs = classify(((name, p.shape) for name, p in meta_model_from_config_json(source).named_parameters()), cfg)
    tasks = load_tasks(cfg.data.source, cfg.data.split, cfg.data.task_ids)
    work = workload_from_tasks(tasks, cfg)
    on_gpu = cfg.model.device == "cuda"
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    est = estimate(cfg, arch, specs, work, dtype, on_gpu)
    lines = [f"architecture {source}; {dtype} on {'GPU' if on_gpu else 'CPU'}; population {cfg.evolution.population_size}, rank {cfg.evolution.rank}",
             f"longest generate call (estimated): {work.prompt_tokens} prompt + {work.new_tokens} new tokens x batch {work.batch}, "
             f"{work.image_patches} image patches", "", "EGGROLL (this design):"]
    lines += [f"  {k:58s} {_gib(v)}" for k, v in est.resident.items() if v]
    lines += [f"  {'phase: evaluate a member (KV cache, activations, noise)':58s} {_gib(est.evaluation)}",
              f"  {'phase: fused update (N members factors, fp32 temporaries)':58s} {_gib(est.update)}"]
    lines += [f"  {'peak on the device (resident + larger phase)':58s} {_gib(est.device_total)}"]
    lines += [f"  {k:58s} {_gib(v)}" for k, v in est.host.items() if v]
    lines += ["", "full-rank ES (ERO-style noise, same sequential evaluation):"]
    lines += [f"  {k:58s} {_gib(v)}" for k, v in est.fullrank.items() if v]
    lines += [f"  {'peak on the device':58s} {_gib(est.fullrank_total)}",
              "", f"EGGROLL needs {est.device_total / est.fullrank_total:.2f}x the memory of full-rank ES; only the update phase grows with N, by N(m+n)r x 4 bytes"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Predict a run's peak memory (no weights needed).")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        print(report(load_config(args.config, args.set)))
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
