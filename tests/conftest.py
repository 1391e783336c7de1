"""Shared fixtures: the embedded tiny model (built once if missing) and small configs."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import runpy
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from ERO_EGGROLL.config import ROOT, Config, load_config
from ERO_EGGROLL.core.digest import tensor_digest
from ERO_EGGROLL.storage.checkpoints import load_checkpoint
from ERO_EGGROLL.storage.metrics import TIMING_FIELDS

# One JAX compilation cache for the session: every training run the tests start in a fresh process, and every Ray
# worker (they inherit the environment), would otherwise spend ~5 s compiling the same noise kernels again (19.5 s ->
# 13.4 s for a 2-epoch tiny run, same numbers). The kernels take ~0.25 s each, below JAX's default threshold. A size
# limit turns on the cache's file lock: processes that start together (Ray workers, pytest-xdist workers) write and
# read the same entries, and without it one may read another's half-written file.
JAX_CACHE_SETTINGS = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(2**30),
}
JAX_CACHE_DIR = "JAX_COMPILATION_CACHE_DIR"
_OWN_JAX_CACHE = "eggroll_owns_jax_cache"
# Under pytest-xdist every process runs torch on one thread: the workers, and through OMP_NUM_THREADS the training
# runs and Ray workers they start. Two workers of two threads each on two cores spent their CPU waiting on each
# other (the whole suite took 30.9 CPU-minutes in 16 min wall). The tiny model alone is built with torch's own thread
# count, as `make run` builds it.
BUILD_THREADS = "EGGROLL_TESTS_BUILD_THREADS"


def pytest_configure(config) -> None:
    """The first process of the session (pytest-xdist's controller, or pytest alone) makes the cache; its workers and
    children find it in the environment."""
    import jax

    if JAX_CACHE_DIR not in os.environ:
        os.environ[JAX_CACHE_DIR] = tempfile.mkdtemp(prefix="eggroll-tests-jax-cache-")
        setattr(config, _OWN_JAX_CACHE, True)
    os.environ.update(JAX_CACHE_SETTINGS)
    jax.config.update("jax_compilation_cache_dir", os.environ[JAX_CACHE_DIR])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", 2**30)
    if getattr(config.option, "numprocesses", None) or "PYTEST_XDIST_WORKER" in os.environ:
        os.environ.setdefault(BUILD_THREADS, str(torch.get_num_threads()))  # the controller's, before the change
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_unconfigure(config) -> None:
    if getattr(config, _OWN_JAX_CACHE, False):
        shutil.rmtree(os.environ.pop(JAX_CACHE_DIR), ignore_errors=True)


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
    checkout = hashlib.sha256(bytes(ROOT)).hexdigest()[:12]
    lock = Path(tempfile.gettempdir()) / f"eggroll-tests-model-build-{checkout}.lock"
    threads = torch.get_num_threads()
    with lock.open("w") as held:  # pytest-xdist's workers: one builds, the others wait and find it built
        fcntl.flock(held, fcntl.LOCK_EX)
        torch.set_num_threads(int(os.environ.get(BUILD_THREADS, threads)))
        try:
            ensure_model(cfg)
        finally:
            torch.set_num_threads(threads)
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


def in_process(command: list[str]) -> tuple[int, str, str]:
    """A `python script args...` command line (run_args's) run in this process, as run_script does: ~7 s of imports
    less than a fresh process. Tests that signal, kill or compare processes start their own."""
    return run_script(Path(command[1]), *command[2:])


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
    code, out, err = in_process(run_args(tmp, "reference"))
    assert code == 0, err[-3000:]
    (tmp / "reference.stdout").write_text(out)
    (tmp / "reference.stderr").write_text(err)
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
