"""The pre-flight memory check: refuse a run the memory model says cannot fit, before any weights load.

Also the largest number of members per generate call that fits (`evaluation.members_per_batch: auto`).
"""

from __future__ import annotations

from ERO_EGGROLL.config import Config, ConfigError
from ERO_EGGROLL.core.tensor_classes import ParamSpec
from ERO_EGGROLL.memory.model import MemoryEstimate, Workload, estimate, plan_run


class DoesNotFit(ConfigError):
    """The memory model predicts that the run cannot fit; raised before anything is loaded."""


def advice_for(component: str) -> str:
    """What to change in the config when `component` (a memory model part's name) is what does not fit."""
    advice = {
        "optimizer": "use evolution.optimizer: sgd (no per-parameter state), or evolve fewer tensors "
        "(params.overrides)",
        "weights": "use a smaller model or model.dtype: bfloat16",
        "KV cache": "lower evaluation.batch_size, evaluation.members_per_batch or evaluation.max_new_tokens_cap, "
        "or data.max_train_examples",
        "prefill": "lower evaluation.batch_size or evaluation.members_per_batch, or use data.input_mode: text",
        "update": "lower evolution.rank or evolution.population_size, or evolve fewer or smaller tensors "
        "(params.overrides)",
        "members' factors": "lower evolution.rank or evaluation.members_per_batch",
        "low-rank projections": "lower evolution.rank, evaluation.batch_size or evaluation.members_per_batch",
        "saved": "use evolution.strategy: forward",
        "image": "use data.input_mode: text or lower data.max_pixels",
        "copies of the output head": "a CPU's bf16 matmul copies the head per row (a GPU does not): lower "
        "evaluation.batch_size or evaluation.members_per_batch, or use a GPU",
    }
    return next(
        (v for k, v in advice.items() if component.startswith(k)),
        "lower evaluation.batch_size or evaluation.members_per_batch",
    )


def check_fits(est: MemoryEstimate, free_bytes: int, where: str) -> None:
    """Refuse a run whose predicted peak exceeds the free memory, naming what to change."""
    if est.device_total <= free_bytes:
        return
    name, size = est.largest_component()
    what = advice_for(name)
    raise DoesNotFit(
        f"predicted peak {est.device_total / 2**30:.2f} GiB does not fit the {free_bytes / 2**30:.2f} GiB free on "
        f"{where}; the largest part is {name} ({size / 2**30:.2f} GiB): {what} (`python -m ERO_EGGROLL.memory --config "
        "<yaml>` shows every part; run.memory_check: false skips this check)"
    )


def workload_of(prepared, batch: int) -> Workload:
    """The longest generate call of these prepared questions, from their real tokens (not the estimate from text
    length)."""
    return Workload(
        prompt_tokens=max(int(p.inputs["input_ids"].shape[0]) for p in prepared),
        new_tokens=max(p.max_new_tokens for p in prepared),
        image_patches=max(
            (int(p.inputs["pixel_values"].shape[0]) for p in prepared if "pixel_values" in p.inputs), default=0
        ),
        batch=batch,
    )


def auto_members_per_batch(cfg: Config, arch: dict, specs: list[ParamSpec], prepared, device, dtype: str) -> int:
    """The largest K whose K-member generate calls fit in 80% of the free device memory (or half the free RAM)."""
    import psutil
    import torch

    work = workload_of(prepared, cfg.evaluation.batch_size)
    on_gpu = torch.device(device).type == "cuda"
    free = torch.cuda.mem_get_info(device)[0] * 0.8 if on_gpu else psutil.virtual_memory().available * 0.5

    def fits(k):
        return estimate(cfg, arch, specs, work, dtype, on_gpu, members=k).evaluation_total <= free

    k = 1
    while k < cfg.evolution.population_size and fits(k + 1):
        k += 1
    return k


def free_memory_bytes(on_gpu: bool) -> tuple[int, str]:
    """(bytes free for a run, where): the GPU's free memory, or the host's available RAM."""
    import psutil
    import torch

    if on_gpu:
        return torch.cuda.mem_get_info()[0], f"the GPU ({torch.cuda.get_device_name()})"
    return psutil.virtual_memory().available, "this machine's RAM"


def preflight(cfg: Config, tasks) -> MemoryEstimate:
    """Before a run loads anything: refuse it (DoesNotFit naming the part to change) when the predicted peak does not
    fit."""
    plan = plan_run(cfg, tasks)
    est = plan.estimate(cfg)
    check_fits(est, *free_memory_bytes(plan.on_gpu))
    return est
