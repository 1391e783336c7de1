"""Shared fixtures: the embedded tiny model (built once if missing) and small configs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ERO_EGGROLL.config import ROOT, Config, load_config
from ERO_EGGROLL.core.digest import tensor_digest
from ERO_EGGROLL.storage.checkpoints import load_checkpoint
from ERO_EGGROLL.storage.metrics import TIMING_FIELDS

FAULTS_PLUGIN = ROOT / "tests" / "faults"  # its sitecustomize.py injects faults into the processes started with it
FAULTS_ENV = "EGGROLL_TEST_FAULTS"


def fault_env(faults_file: Path, *faults: str) -> dict[str, str]:
    """The environment of a child process (and of the Ray workers it starts) that obeys `faults`, one per line as
    tests/faults/sitecustomize.py describes them."""
    faults_file.write_text("".join(f"{line}\n" for line in faults))
    path = os.pathsep.join([str(FAULTS_PLUGIN), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, FAULTS_ENV: str(faults_file)}


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The embedded default model, built exactly as `make run` builds it when it is missing."""
    from ERO_EGGROLL.cli.train import ensure_model

    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    ensure_model(cfg)
    return cfg.resolve_path(cfg.model.path)


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, processor) of the tiny model in fp32 on the CPU; tests must leave its weights as they found them."""
    from ERO_EGGROLL.model.loading import load_model_from_dir

    return load_model_from_dir(tiny_model_dir)


@pytest.fixture
def one_torch_thread():
    """Small nets run fastest on one thread; the suite's own thread count comes back after the test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _as_main(run, name: str, args: tuple[str, ...]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = [name, *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported before, as a library
            try:
                run()
                code = 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def run_module(module: str, *args: str) -> tuple[int, str, str]:
    """`python -m module args...` in this process (the entry module runs as __main__; torch and JAX are loaded
    already): its exit code, stdout and stderr."""
    return _as_main(lambda: runpy.run_module(module, run_name="__main__", alter_sys=True), module, args)


def run_script(path: Path, *args: str) -> tuple[int, str, str]:
    """`python path args...` in this process, as run_module does for a module."""
    return _as_main(lambda: runpy.run_path(str(path), run_name="__main__"), str(path), args)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def small_config(**evolution) -> Config:
    cfg = Config()
    cfg.evolution.population_size = evolution.pop("population_size", 4)
    for key, value in evolution.items():
        setattr(cfg.evolution, key, value)
    return cfg


# Relative sigma 2.0 (smoke.yaml: 0.5) and 48 tokens so that members really answer differently: at 0.5 all four members
# of a rebuilt tiny model can give the same answer (then no update happens and the determinism checks compare zeros).
SMALL = ["data.task_ids=[b1fc8b8e]", "evaluation.max_new_tokens_cap=48", "evolution.epochs=2", "evolution.sigma=2.0"]


def run_args(tmp: Path, name: str, *overrides: str) -> list[str]:
    """The training script's command line for a small run named `name` under `tmp`."""
    sets = [
        *SMALL,
        f"run.name={name}",
        f"run.output_dir={tmp / 'results'}",
        f"run.checkpoint_dir={tmp / 'checkpoints'}",
        *overrides,
    ]
    script = ROOT / "ERO_EGGROLL" / "arc_evolution_single_gpu.py"
    return [sys.executable, str(script), "--config", str(ROOT / "configs" / "smoke.yaml")] + [
        a for s in sets for a in ("--set", s)
    ]


@pytest.fixture(scope="session")
def reference(tmp_path_factory, tiny_model_dir) -> Path:
    """One finished 2-epoch run (results/reference, checkpoints/reference under the returned folder),
    shared by the suite.

    Tests that change a run work on a copy of it. What the run printed is kept in `reference.stdout` /
    `.stderr` there."""
    tmp = tmp_path_factory.mktemp("runs")
    done = subprocess.run(run_args(tmp, "reference"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (tmp / "reference.stdout").write_text(done.stdout)
    (tmp / "reference.stderr").write_text(done.stderr)
    return tmp


def run_folders(ckpt: Path) -> list[Path]:
    """The run's checkpoint folder, or in per_task mode one folder per task."""
    return [ckpt] if (ckpt / "LATEST").exists() else sorted(p for p in ckpt.iterdir() if (p / "LATEST").exists())


def outcome(tmp: Path, name: str) -> dict:
    """Metrics rows (timings dropped) and final weight digests of the run `name` under `tmp`."""
    result = {}
    for folder in run_folders(tmp / "checkpoints" / name):
        label = folder.relative_to(tmp / "checkpoints").as_posix()
        results = tmp / "results" / label
        rows = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
        weights, _, state = load_checkpoint(folder)
        result[label] = {
            "metrics": [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows],
            "weights": {n: tensor_digest(t) for n, t in sorted(weights.items())} if weights else state.tensor_digests,
        }
    return result


def differences(recorded: dict, current: dict, where: str = "") -> list[str]:
    """Human-readable paths where two nested outcomes differ."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        out = [f"{where}/{k}: missing" for k in recorded.keys() - current.keys()]
        out += [f"{where}/{k}: unexpected" for k in current.keys() - recorded.keys()]
        for k in recorded.keys() & current.keys():
            out += differences(recorded[k], current[k], f"{where}/{k}")
        return out
    if isinstance(recorded, list) and isinstance(current, list) and len(recorded) == len(current):
        return [d for i, (a, b) in enumerate(zip(recorded, current)) for d in differences(a, b, f"{where}[{i}]")]
    return [] if recorded == current else [f"{where}: {recorded!r} != {current!r}"]
