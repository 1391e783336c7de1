"""run.checkpoint: replay: a run's checkpoints are its run record (kilobytes); resume, the guard and the export rebuild
the weights by replay. Small runs (population 2, 16 tokens) with the degeneration guard forced (patience 1, sigma 2.0).
"""

from __future__ import annotations

import copy
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ERO_EGGROLL.checkpointing import RunState, load_checkpoint, read_latest_name
from ERO_EGGROLL.config import config_from_dict
from ERO_EGGROLL.digest import tensor_digest
from ERO_EGGROLL.perturbation import Perturber
from ERO_EGGROLL.qwen_param_mapper import classify_model
from ERO_EGGROLL.resume import disk_bytes
from ERO_EGGROLL.run_record import ReplayedBest, base_evolvable, nearest_snapshot, rebuild
from ERO_EGGROLL.tensor_classes import ParamClass
from conftest import run_args
from test_evolution_run import SCRIPT, metrics

GUARDED = ["evolution.population_size=2", "evaluation.max_new_tokens_cap=16", "run.degeneration_patience=1"]
JOINT = [*GUARDED, "evolution.epochs=4"]  # SGD
PER_TASK = [*GUARDED, "evolution.mode=per_task", "data.task_ids=[b1fc8b8e,e6de6e8f]", "evolution.epochs=3", "evolution.optimizer=adam"]


def run(tmp: Path, name: str, *overrides: str) -> None:
    done = subprocess.run(run_args(tmp, name, *overrides), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def interrupted_then_resumed(tmp: Path, name: str, first: Path, *overrides: str) -> None:
    """The run stopped by SIGTERM once `first` holds epoch 1, then resumed by replay to its end."""
    proc = subprocess.Popen(run_args(tmp, name, *overrides), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while read_latest_name(first) != "epoch_0001" and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-2000:]
    resumed = subprocess.run([sys.executable, str(SCRIPT), "--resume", str(tmp / "checkpoints" / name)], capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed" in resumed.stdout


def digests(path: Path) -> dict[str, str]:
    return {n: tensor_digest(t) for n, t in sorted(load_file(path).items())}


def record(folder: Path) -> RunState:
    return load_checkpoint(folder)[2]


def assert_guard_kept_its_meaning(state: RunState) -> None:
    """A rolled-back epoch ends with exactly the best epoch's weights (the record's digests say so)."""
    best, fired = 0, 0
    for row in state.history[1:]:
        if row["new_best"]:
            best = row["epoch"]
        if row["rolled_back"]:
            fired += 1
            assert state.weight_digests[row["epoch"]] == state.weight_digests[best], row["epoch"]
    assert fired, "the guard never fired: the test would not exercise the replayed best weights"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> Path:
    """Joint (SGD) and per_task (Adam) runs, each uninterrupted and stopped by SIGTERM then resumed (the joint one with
    weight snapshots every 2 epochs: allowed to change, so the same numbers)."""
    tmp = tmp_path_factory.mktemp("replay_runs")
    run(tmp, "joint", *JOINT)
    interrupted_then_resumed(tmp, "joint_resumed", tmp / "checkpoints" / "joint_resumed", *JOINT, "run.snapshot_every=2")
    run(tmp, "per_task", *PER_TASK)
    interrupted_then_resumed(tmp, "per_task_resumed", tmp / "checkpoints" / "per_task_resumed" / "b1fc8b8e", *PER_TASK)
    return tmp


@pytest.mark.parametrize("name,folders", [("joint", [""]), ("per_task", ["b1fc8b8e", "e6de6e8f"])])
def test_resumed_by_replay_equals_uninterrupted_with_the_guard_firing(runs, name, folders):
    for folder in folders:
        label = f"/{folder}" if folder else ""
        assert metrics(runs, f"{name}_resumed{label}") == metrics(runs, f"{name}{label}")
        done, again = record(runs / "checkpoints" / f"{name}{label}"), record(runs / "checkpoints" / f"{name}_resumed{label}")
        assert done.weight_digests == again.weight_digests and done.tensor_digests == again.tensor_digests
        assert_guard_kept_its_meaning(done)
        exported = digests(runs / "checkpoints" / f"{name}{label}" / "best_model" / "model.safetensors")
        assert exported == digests(runs / "checkpoints" / f"{name}_resumed{label}" / "best_model" / "model.safetensors")


def test_the_record_is_the_weights_replay_rebuilds_and_the_export_matches(runs, tmp_path):
    """The record's per-tensor digests are those of the tensors replay writes, and replay --export is the run's own export."""
    ckpt = runs / "checkpoints" / "per_task" / "e6de6e8f"
    done = subprocess.run([sys.executable, "-m", "ERO_EGGROLL.replay", str(ckpt), "--check", "--out", str(tmp_path / "w.safetensors"),
                           "--export", str(tmp_path / "export")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "bit-identical to the run record" in done.stdout, done.stdout + done.stderr
    assert digests(tmp_path / "w.safetensors") == record(ckpt).tensor_digests
    assert digests(tmp_path / "export" / "model.safetensors") == digests(ckpt / "best_model" / "model.safetensors")


def test_a_smoke_run_record_is_kilobytes(runs, tiny):
    """4 epochs, no snapshots: the checkpoint folder besides best_model/ is under half of one copy of the evolvable weights."""
    ckpt = runs / "checkpoints" / "joint"
    state = record(ckpt)
    params = dict(tiny[0].named_parameters())
    one_copy = sum(params[n].numel() * params[n].element_size() for n in state.tensor_digests)
    records = disk_bytes(ckpt) - disk_bytes(ckpt / "best_model")
    assert len(state.weight_digests) == 5 and records < one_copy / 2, (records, one_copy)
    assert not (ckpt / "best").exists()  # the best epoch is a number in the record, not a copy


def test_a_tampered_fitness_is_caught_by_the_checksum_at_resume(reference, tmp_path):
    """A changed member fitness leaves every decision as recorded: only the digest of the rebuilt weights can catch it.
    (The shared reference run has no guard, so every epoch's fitness reaches the final weights.)"""
    for part in ("checkpoints", "results"):
        shutil.copytree(reference / part / "reference", tmp_path / part / "reference", symlinks=True)
    state_file = tmp_path / "checkpoints" / "reference" / "epoch_0002" / "state.json"
    state = json.loads(state_file.read_text())
    state["history"][1]["fitness"][0] += 0.25
    state_file.write_text(json.dumps(state))
    done = subprocess.run([sys.executable, str(SCRIPT), "--resume", str(tmp_path / "checkpoints" / "reference"), "--set", "evolution.epochs=3",
                           "--set", f"run.checkpoint_dir={tmp_path / 'checkpoints'}", "--set", f"run.output_dir={tmp_path / 'results'}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "epoch 2: the weights rebuilt by replay do not match the run record's checksum" in done.stderr
    assert "Traceback" not in done.stderr


def test_base_weights_read_from_disk_are_the_loaded_ones_and_a_snapshot_resumes_the_same(tiny, runs):
    """per_task's base weights come from the model files exactly; a replay from a snapshot reaches the record's digest."""
    model = copy.deepcopy(tiny[0])
    ckpt = runs / "checkpoints" / "joint_resumed"
    state = record(ckpt)
    cfg = config_from_dict(state.config, "test")
    base_dir = cfg.resolve_path(cfg.model.path)
    names = [s.name for s in classify_model(model, cfg) if s.cls is not ParamClass.FROZEN]
    params = dict(model.named_parameters())
    assert all(t.equal(params[n]) for n, t in base_evolvable(model, base_dir, names).items())
    assert nearest_snapshot(ckpt, 3) == ckpt / "epoch_0002"  # run.snapshot_every=2
    rebuild(Perturber(model, cfg), state, 3, ReplayedBest(base_dir, ckpt, cfg.run.degeneration_patience))  # checks the digest
