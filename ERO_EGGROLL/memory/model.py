"""Predicted peak memory of a run, next to full-rank ES (ERO-style) for the same population.

Works from the architecture alone (config.json), so it answers "will the 7B fit?" before any
weights are downloaded:

    python -m ERO_EGGROLL.memory --config configs/qwen2_5_vl_7b.yaml
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from ERO_EGGROLL.config import Config, ConfigError
from ERO_EGGROLL.core.forward_rules import shared_input_groups
from ERO_EGGROLL.core.tensor_classes import ParamClass, ParamSpec, rank_problem
from ERO_EGGROLL.model.qwen import architecture_json, classify, meta_model_from_config_json

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
    """Bytes per component, phase by phase. The device peak is the resident part plus the larger phase."""

    resident: dict[str, int]  # held on the device for the whole run
    evaluation: dict[str, int]  # one generate call: its members' noise, KV cache, activations, image tensors
    update: dict[str, int]  # the streamed update's two steps for the largest tensor; they do not overlap (max, not sum)
    host: dict[str, int]  # host memory that a GPU run keeps off the GPU
    fullrank: dict[str, int]  # the same run with full-rank ES noise

    @property
    def evaluation_total(self) -> int:
        return sum(self.evaluation.values())

    @property
    def update_total(self) -> int:
        return max(self.update.values(), default=0)

    @property
    def device_total(self) -> int:
        return sum(self.resident.values()) + max(self.evaluation_total, self.update_total)

    @property
    def fullrank_total(self) -> int:
        return sum(self.fullrank.values())

    def largest_component(self) -> tuple[str, int]:
        parts = {**self.resident, **self.evaluation, **self.update}
        name = max(parts, key=lambda k: parts[k])
        return name, parts[name]


def workload_from_tasks(tasks, cfg: Config) -> Workload:
    """Estimate the longest prompt of the configured questions without a tokenizer."""
    from ERO_EGGROLL.arc.prompts import answer_text
    from ERO_EGGROLL.arc.tasks import grid_to_text, render_grid
    from ERO_EGGROLL.evaluation.prepared import questions_for, token_budget

    longest_prompt, new, patches = 0, 0, 0
    for q in questions_for(tasks, cfg, "fitness") + questions_for(tasks, cfg, "test"):
        grids = [g for p in q.examples for g in (p.input, p.answer)] + [q.query]
        text_chars = sum(len(grid_to_text(g)) for g in grids) if cfg.data.input_mode != "image" else 0
        image_tokens = image_patches = 0
        if cfg.data.input_mode != "text":
            for g in grids:
                img = render_grid(g, cfg.data.cell_size, max_pixels=cfg.data.max_pixels)
                image_patches += (img.width // 14) * (img.height // 14)
            image_tokens = image_patches // 4
        longest_prompt = max(
            longest_prompt, PROMPT_OVERHEAD_TOKENS + int(text_chars * TOKENS_PER_GRID_CHAR) + image_tokens
        )
        new = max(new, token_budget(cfg.evaluation, q, lambda grid: int(len(answer_text(grid)) * TOKENS_PER_GRID_CHAR)))
        patches = max(patches, image_patches)
    return Workload(longest_prompt, new, patches, cfg.evaluation.batch_size)


@dataclass(frozen=True)
class _Shapes:
    """What the memory model needs from the architecture and the parameter classes."""

    lora: list[ParamSpec]
    full: list[ParamSpec]
    all_numel: int
    text: dict
    vision: dict

    largest_linear: (
        int  # elements of the largest 2-D weight that is not an embedding (the output head of a large vocabulary)
    )

    @property
    def evolvable(self) -> int:
        return sum(s.numel for s in self.lora + self.full)


def _shapes(arch: dict, specs: list[ParamSpec], noise: str = "lowrank") -> _Shapes:
    """evolution.noise: full makes every LORA tensor FULL, as the Perturber does (dense noise, applied in place)."""
    lora = [s for s in specs if s.cls is ParamClass.LORA] if noise == "lowrank" else []
    return _Shapes(
        lora,
        [s for s in specs if s.cls is ParamClass.FULL or s.cls is ParamClass.LORA and noise == "full"],
        sum(s.numel for s in specs),
        arch.get("text_config", arch),
        arch.get("vision_config", {}),
        max((s.numel for s in specs if len(s.shape) == 2 and "embed" not in s.name), default=0),
    )


# How a full-rank member is applied and restored (ERO's sampling on a big model): the member's dense noise is added
# in place into every evolving tensor, and the exact mean must come back afterwards. Per member, n evolving
# elements of b bytes each:
#   saved copy on the device     +n b device memory; two device copies of n b per member (fast; doubles the weights)
#   host copy written back       +n b pinned host memory; n b over PCIe each way per member (what SavedInPlace does on
#                                a GPU: 2 x 12 GiB of the 7B's evolving tensors, about 1 s per member at 25 GB/s, so
#                                about 17 min of an epoch of 1000 members on copies alone)
#   subtracting regenerated noise  no copy at all, but (w + eps) - eps is not w in bf16 (each add rounds), so the mean
#                                drifts member by member; refused here, where every epoch must replay bit for bit


JAX_POOL = "JAX's GPU pool (kept after the update's contraction)"
OPTIMIZER_STATE = "optimizer state (per evolvable parameter: Adam moments 2 x fp32, ClipUp velocity 1 x fp32)"


def resident_phase(cfg: Config, sh: _Shapes, b: int, on_gpu: bool) -> tuple[dict[str, int], dict[str, int]]:
    """(device, host) bytes held for the whole run: weights, Adam moments, exact saved copies."""
    evo = cfg.evolution
    saved = sum(s.numel for s in sh.full) * b + (sum(s.numel for s in sh.lora) * b if evo.strategy == "inplace" else 0)
    device = {
        "weights": sh.all_numel * b,
        OPTIMIZER_STATE: {"adam": 2, "adamw": 2, "clipup": 1}.get(evo.optimizer, 0) * sh.evolvable * FP32,
        "saved copies for exact restore (FULL tensors; LORA too under inplace)": 0 if on_gpu else saved,
    }
    base = sh.evolvable * b if evo.search == "ero" and evo.reset_after else 0  # ERO's reset-to-base: a host copy
    return device, {
        "saved copies for exact restore (pinned host memory)": saved if on_gpu else 0,
        "base weights for ERO's reset-to-base (host copy)": base,
    }


# Live activations of one decoder layer during the prefill, in units of (rows x prompt tokens x width x dtype
# bytes): the MLP holds act(gate), up and their product (3 x intermediate); attention holds the residual, the
# normed input, q, the attention output and its projection (about 6 x hidden). Checked by scripts/bench/bench_memory.py.
PREFILL_INTERMEDIATE_COPIES = 3
PREFILL_HIDDEN_COPIES = 6
PIXEL_VALUES_PER_PATCH = 3 * 2 * 14 * 14  # channels x temporal patch x 14 x 14, fp32


# On the CPU, a reduced-precision Linear whose input is a slice (the prefill's last position, `hidden[:, -1:]`) makes a
# copy of its weight per batch row: the output head's 152,064 x 3584 x 2 bytes per row at the 7B's shapes (measured:
# 4 rows 4.06 GiB, scripts/bench/bench_memory.py 7b@2:bfloat16:sgd; 1, 2, 4 rows 1, 2, 4 copies on a narrower model;
# none in fp32, none for a contiguous input). GPU GEMMs run in bf16 natively.
CPU_UPCAST = "copies of the output head, one per row (CPU reduced-precision matmul on a sliced input)"


def evaluation_phase(
    cfg: Config, sh: _Shapes, work: Workload, b: int, members: int = 1, on_gpu: bool = True
) -> dict[str, int]:
    """Bytes of one generate call evaluating `members` members on `work.batch` prompts each."""
    text, r = sh.text, cfg.evolution.rank
    rows = work.batch * members
    hidden, inter, vocab = text["hidden_size"], text["intermediate_size"], text["vocab_size"]
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads", heads)
    head_dim = text.get("head_dim") or hidden // heads
    # fp32 draws (JAX) plus, for reduced-precision weights, their copies in the weights' dtype; K members are stacked
    factor_bytes = FP32 + (b if b != FP32 else 0)
    per_member = sum(sum(s.matrix_shape) * r for s in sh.lora) * factor_bytes + sum(s.numel for s in sh.full) * FP32
    eager_scores = cfg.model.attn_implementation == "eager"  # sdpa never materializes the (T, T) scores
    forward = cfg.evolution.strategy == "forward"
    # the forward hooks stack the K members' factors (a copy even for one member) and lay each shared-input group's B
    # side by side (strategies.ForwardHooks), then every hooked Linear computes x B per batch row: rows x tokens x r
    # per sibling of the widest group, one layer at a time (forward_rules.project_rows)
    stacked = sum((sum(s.matrix_shape) + s.matrix_shape[1]) * r for s in sh.lora) * b * members if forward else 0
    group = max((len(g) for g in shared_input_groups({s.name: s.shape[-1] for s in sh.lora})), default=0)
    return {
        "member noise (LORA factors, FULL noise)": per_member * members * (2 if members > 1 else 1),
        LOWRANK_STACKED: stacked,
        LOWRANK_PROJECTIONS: rows * work.prompt_tokens * r * group * b if forward else 0,
        "KV cache": 2
        * text["num_hidden_layers"]
        * kv_heads
        * head_dim
        * (work.prompt_tokens + work.new_tokens - 1)
        * rows
        * b,
        "prefill activations (one layer at a time)": rows
        * work.prompt_tokens
        * (PREFILL_INTERMEDIATE_COPIES * inter + PREFILL_HIDDEN_COPIES * hidden)
        * b
        + (rows * heads * work.prompt_tokens**2 * b if eager_scores else 0),
        "logits (last position, fp32)": rows * vocab * FP32,
        "image tensors and vision activations": work.image_patches
        * members
        * (PIXEL_VALUES_PER_PATCH * FP32 + 8 * sh.vision.get("hidden_size", 0) * b),
        CPU_UPCAST: rows * sh.largest_linear * b if not on_gpu and b != FP32 else 0,
    }


# Copies of all members' stacked factors that the contraction holds, measured with XLA's compiled memory analysis
# (jax 0.10.2 on the CPU, tests/memory/test_memory.py; the process's peak RSS agrees): philox draws in place (2),
# threefry2x32 takes two more; one more for either once the stacked factors outgrow the dense direction,
# N r (m + n) >= m n. (A flat 4 was 40-60% over for philox and 25% under for threefry past dense.)
UPDATE_FACTOR_COPIES = {"philox4x32": 2, "philox2x32": 2, "threefry2x32": 4}
LOWRANK_STACKED = "members' factors stacked for the forward hooks (A, B, B per shared-input group)"
LOWRANK_PROJECTIONS = "low-rank projections x B per batch row (one layer at a time)"
UPDATE_CONTRACTION = "update step 1: JAX contraction (all members' factors + direction)"


def update_phase(cfg: Config, sh: _Shapes, b: int) -> dict[str, int]:
    """The streamed update holds one tensor's work at a time, so the costliest evolvable tensor decides.

    Steps that do not overlap (a global norm first, for max_update_norm or ClipUp, regenerates half the factors;
    XLA fuses its Gram products (jax's memory_analysis on the CPU), so the contraction is the larger): JAX's
    contraction (UPDATE_FACTOR_COPIES copies of all members' stacked factors, one more once they outgrow the dense
    direction, plus the fp32 direction it returns); then torch's optimizer and apply (direction + change for SGD;
    Adam adds the gradient and two moment temporaries; reduced-precision weights add the stochastic-rounding
    noise), plus a 1-byte mask. Without antithetic pairs member i draws keyed member 2i, so the update
    regenerates 2N members.
    """
    evo = cfg.evolution
    if not sh.lora and not sh.full:
        return {}
    largest = max(sh.lora + sh.full, key=lambda s: s.numel)
    buffers = (2 if evo.optimizer == "sgd" else 4) + (1 if b != FP32 else 0)
    draws = evo.population_size * (1 if evo.antithetic else 2)

    def contraction(s: ParamSpec) -> int:
        if s not in sh.lora:
            return s.numel * FP32
        stacked = draws * sum(s.matrix_shape) * evo.rank
        copies = UPDATE_FACTOR_COPIES[evo.prng_impl] + (1 if stacked >= s.numel else 0)
        return (copies * stacked + s.numel) * FP32

    phase = {
        UPDATE_CONTRACTION: max(map(contraction, sh.lora + sh.full)),
        "update step 2: optimizer + apply (fp32 buffers)": largest.numel * (buffers * FP32 + 1),
    }
    return phase


def estimate(
    cfg: Config,
    arch: dict,
    specs: list[ParamSpec],
    work: Workload,
    dtype: str,
    on_gpu: bool,
    members: int = 1,
    jax_on_device: bool = False,
) -> MemoryEstimate:
    """The run's memory, phase by phase, from the architecture and the parameter classes alone.

    `jax_on_device`: JAX draws on the GPU itself. Its allocator grows on demand but never hands memory
    back to CUDA, so what its largest computation (the update's contraction) once took stays held."""
    sh = _shapes(arch, specs, cfg.evolution.noise)
    b = DTYPE_BYTES[dtype]
    resident, host = resident_phase(cfg, sh, b, on_gpu)
    update = update_phase(cfg, sh, b)
    if jax_on_device:
        resident[JAX_POOL] = update.get(UPDATE_CONTRACTION, 0)
    evaluation = evaluation_phase(cfg, sh, work, b, members, on_gpu)
    kv_and_activations = sum(
        v
        for k, v in evaluation.items()
        if not k.startswith("member noise") and k not in (LOWRANK_STACKED, LOWRANK_PROJECTIONS)
    )
    lora_numel = sum(s.numel for s in sh.lora)
    fullrank = {
        "weights": resident["weights"],
        OPTIMIZER_STATE: resident[OPTIMIZER_STATE],
        "dense member noise (LORA tensors, in place) + saved copy": 2 * lora_numel * b
        + sum(s.numel for s in sh.full) * b,
        "update accumulator (fp32)": sh.evolvable * FP32,
        "evaluation (KV cache + activations)": kv_and_activations,
    }
    return MemoryEstimate(resident, evaluation, update, host, fullrank)


def ero_search_config(cfg: Config) -> Config:
    """The same run with ERO's search (configs/ero.yaml's evolution settings): full-rank members, in place, one at a
    time."""
    ero = copy.deepcopy(cfg)
    for key, value in {
        "search": "ero",
        "noise": "full",
        "antithetic": False,
        "reset_after": 3,
        "strategy": "inplace",
        "optimizer": "sgd",
    }.items():
        setattr(ero.evolution, key, value)
    return ero


def _phases(est: MemoryEstimate) -> list[str]:
    lines = ["  resident:"] + [f"    {k:68s} {_gib(v)}" for k, v in est.resident.items() if v]
    for phase, parts, total in (
        ("phase: evaluate one generate call (sum)", est.evaluation, est.evaluation_total),
        ("phase: streamed update (the larger step)", est.update, est.update_total),
    ):
        lines += [f"  {phase}: {_gib(total).strip()}"] + [f"    {k:68s} {_gib(v)}" for k, v in parts.items() if v]
    lines += [f"  {'peak on the device (resident + larger phase)':70s} {_gib(est.device_total)}"]
    return lines + [f"  {k:70s} {_gib(v)}" for k, v in est.host.items() if v]


def _gib(n: int) -> str:
    return f"{n / 2**30:8.3f} GiB"


@dataclass(frozen=True)
class RunPlan:
    """What the memory model needs about a run before any weights are loaded."""

    arch: dict
    source: Path
    specs: list[ParamSpec]
    work: Workload
    dtype: str
    on_gpu: bool
    members: int

    def estimate(self, cfg: Config) -> MemoryEstimate:
        import jax

        jax_on_device = self.on_gpu and jax.default_backend() == "gpu"
        return estimate(cfg, self.arch, self.specs, self.work, self.dtype, self.on_gpu, self.members, jax_on_device)


def plan_run(cfg: Config, tasks) -> RunPlan:
    """Architecture (config.json only), parameter classes on the meta device, and the longest generate call."""
    import torch

    source = architecture_json(cfg)
    specs = classify(((name, p.shape) for name, p in meta_model_from_config_json(source).named_parameters()), cfg)
    too_wide = rank_problem(specs, cfg.evolution.rank) if cfg.evolution.noise == "lowrank" else None
    if too_wide is not None:  # before any weights load (the Perturber refuses it too, once they have)
        raise ConfigError(f"evolution.{too_wide}")
    on_gpu = cfg.model.device == "cuda" or cfg.model.device == "auto" and torch.cuda.is_available()
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    k = cfg.evaluation.members_per_batch
    return RunPlan(
        json.loads(source.read_text()),
        source,
        specs,
        workload_from_tasks(tasks, cfg),
        dtype,
        on_gpu,
        1 if k == "auto" else k,
    )


def report(cfg: Config) -> str:
    from ERO_EGGROLL.arc.tasks import load_tasks

    plan = plan_run(cfg, load_tasks(cfg.data.source, cfg.data.split, cfg.data.task_ids))
    source, work, dtype, on_gpu = plan.source, plan.work, plan.dtype, plan.on_gpu
    est = plan.estimate(cfg)
    lines = [
        f"architecture {source}; {dtype} on {'GPU' if on_gpu else 'CPU'}; population "
        f"{cfg.evolution.population_size}, rank {cfg.evolution.rank}",
        f"longest generate call (estimated): {work.prompt_tokens} prompt + {work.new_tokens} new tokens x batch "
        f"{work.batch}, {work.image_patches} image patches",
        "",
        "EGGROLL (this design):",
    ]
    lines += _phases(est)
    ero_cfg = ero_search_config(cfg)
    ero = RunPlan(plan.arch, source, plan.specs, work, dtype, on_gpu, 1).estimate(ero_cfg)
    lines += [
        "",
        "ERO's search on one GPU (predicted: full-rank members applied in place, one at a time, restored from a "
        f"{'pinned host' if on_gpu else 'saved'} copy; the elites' average through the same streamed update):",
    ]
    lines += _phases(ero)
    lines += ["", "full-rank ES (ERO-style noise, same sequential evaluation):"]
    lines += [f"  {k:70s} {_gib(v)}" for k, v in est.fullrank.items() if v]
    lines += [
        f"  {'peak on the device':70s} {_gib(est.fullrank_total)}",
        "",
        f"EGGROLL needs {est.device_total / est.fullrank_total:.2f}x the memory of full-rank ES; only the update "
        "phase grows with N, by a few N(m+n)r x 4 bytes of the largest tensor",
    ]
    return "\n".join(lines)
