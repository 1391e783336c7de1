"""run.checkpoint: replay: a run's checkpoints are its run record (kilobytes); resume, the guard and the export rebuild
the weights by replay. Small runs (population 2, 16 tokens) with the degeneration guard forced (patience 1, sigma 2.0).
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import in_process, run_args, run_module
from safetensors.torch import load_file
from test_evolution_run import SCRIPT, metrics, stopped_after_epoch_1

from ERO_EGGROLL.config import ROOT, ConfigError, config_from_dict, load_config
from ERO_EGGROLL.core.digest import tensor_digest
from ERO_EGGROLL.core.tensor_classes import ParamClass
from ERO_EGGROLL.evaluation.divergence import epoch_signs
from ERO_EGGROLL.model.qwen import classify_model, run_perturber
from ERO_EGGROLL.run.record import ReplayedBest, base_evolvable, nearest_snapshot, rebuild
from ERO_EGGROLL.run.resume import disk_bytes
from ERO_EGGROLL.storage.checkpoints import RunState, load_checkpoint
from ERO_EGGROLL.storage.metrics import TIMING_FIELDS
from ERO_EGGROLL.storage.record_fields import seal_of

GUARDED = ["evolution.population_size=2", "evaluation.max_new_tokens_cap=16", "run.degeneration_patience=1"]
JOINT = [*GUARDED, "evolution.epochs=4"]  # SGD
PER_TASK = [
    *GUARDED,
    "evolution.mode=per_task",
    "data.task_ids=[b1fc8b8e,e6de6e8f]",
    "evolution.epochs=2",
    "evolution.optimizer=adam",
]


def run(tmp: Path, name: str, *overrides: str) -> None:
    code, _, err = in_process(run_args(tmp, name, *overrides))
    assert code == 0, err[-3000:]


def resume(checkpoint: Path, *overrides: str) -> None:
    code, out, err = in_process(
        [sys.executable, str(SCRIPT), "--resume", str(checkpoint), *[a for o in overrides for a in ("--set", o)]]
    )
    assert code == 0 and "resumed" in out, err[-2000:]


def interrupted_then_resumed(tmp: Path, name: str, first: Path, *overrides: str) -> None:
    """The run stopped by SIGTERM once `first` holds epoch 1, then resumed by replay to its end."""
    stopped_after_epoch_1(run_args(tmp, name, *overrides), first)
    resume(tmp / "checkpoints" / name)


def digests(path: Path) -> dict[str, str]:
    return {n: tensor_digest(t) for n, t in sorted(load_file(path).items())}


def record(folder: Path) -> RunState:
    return load_checkpoint(folder)[2]


def guard_firings(state: RunState) -> int:
    """How often the guard fired; a rolled-back epoch must end with exactly the best epoch's weights
    (the record's digests)."""
    best, fired = 0, 0
    for row in state.history[1:]:
        if row["new_best"]:
            best = row["epoch"]
        if row["rolled_back"]:
            fired += 1
            assert state.weight_digests[row["epoch"]] == state.weight_digests[best], row["epoch"]
    return fired


def without_timings(state: RunState) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in state.history]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> Path:
    """A joint (SGD) run, then gone back to its epoch 1 and continued by replay with weight snapshots every 2 epochs
    (allowed to change, so the same numbers; the first line of epochs is moved aside); and a per_task (Adam) run,
    uninterrupted and stopped by SIGTERM then resumed. (The shared reference run covers SIGTERM in joint mode.)"""
    tmp = tmp_path_factory.mktemp("replay_runs")
    run(tmp, "joint", *JOINT)
    resume(tmp / "checkpoints" / "joint" / "epoch_0001", "run.snapshot_every=2")
    run(tmp, "per_task", *PER_TASK)
    interrupted_then_resumed(tmp, "per_task_resumed", tmp / "checkpoints" / "per_task_resumed" / "b1fc8b8e", *PER_TASK)
    return tmp


def test_joint_gone_back_and_continued_by_replay_equals_the_first_line(runs):
    ckpt = runs / "checkpoints" / "joint"
    first, again = record(next(ckpt.glob("moved_aside-*")) / "epoch_0004"), record(ckpt)
    assert without_timings(again) == without_timings(first)
    assert again.weight_digests == first.weight_digests and again.tensor_digests == first.tensor_digests
    assert guard_firings(first), "the guard never fired: the replayed best weights were not exercised"
    assert (ckpt / "epoch_0002" / "evolvable.safetensors").stat().st_size > 100_000  # the snapshot holds the weights


def test_per_task_resumed_by_replay_equals_uninterrupted_with_the_guard_firing(runs):
    fired = 0
    for task in ("b1fc8b8e", "e6de6e8f"):
        assert metrics(runs, f"per_task_resumed/{task}") == metrics(runs, f"per_task/{task}")
        done, again = (
            record(runs / "checkpoints" / "per_task" / task),
            record(runs / "checkpoints" / "per_task_resumed" / task),
        )
        assert done.weight_digests == again.weight_digests and done.tensor_digests == again.tensor_digests
        fired += guard_firings(done)
        assert digests(runs / "checkpoints" / "per_task" / task / "best_model" / "model.safetensors") == digests(
            runs / "checkpoints" / "per_task_resumed" / task / "best_model" / "model.safetensors"
        )
    assert fired, "the guard never fired: the replayed best weights were not exercised"


def test_per_task_mode_tabulates_every_task_and_replay_checks_each_bit_for_bit(runs):
    """ERO's protocol: an independent evolution per task, one table row per task; replay rebuilds a task's weights
    (its guard's rollbacks included) from the record alone."""
    table = (runs / "results" / "per_task" / "final_table.md").read_text()
    assert "| T1 | b1fc8b8e |" in table and "| T2 | e6de6e8f |" in table
    code, out, err = run_module("ERO_EGGROLL.replay", str(runs / "checkpoints" / "per_task" / "e6de6e8f"), "--check")
    assert code == 0 and "bit-identical" in out, out + err


def test_the_record_is_the_weights_replay_rebuilds_and_the_export_matches(runs, tmp_path):
    """The record's per-tensor digests are those of the tensors replay writes,
    and replay --export is the run's own export."""
    ckpt = runs / "checkpoints" / "per_task" / "e6de6e8f"
    code, out, err = run_module(
        "ERO_EGGROLL.replay",
        str(ckpt),
        "--check",
        "--out",
        str(tmp_path / "w.safetensors"),
        "--export",
        str(tmp_path / "export"),
    )
    assert code == 0 and "bit-identical to the run record" in out, out + err
    assert digests(tmp_path / "w.safetensors") == record(ckpt).tensor_digests
    assert digests(tmp_path / "export" / "model.safetensors") == digests(ckpt / "best_model" / "model.safetensors")


def test_a_smoke_run_record_is_kilobytes(runs, tiny):
    """No snapshots: the checkpoint folder besides best_model/ is under half of one copy of the evolvable weights
    (measured for 4 epochs of the smoke config in the README)."""
    ckpt = runs / "checkpoints" / "per_task" / "b1fc8b8e"  # made without snapshots
    state = record(ckpt)
    params = dict(tiny[0].named_parameters())
    one_copy = sum(params[n].numel() * params[n].element_size() for n in state.tensor_digests)
    records = disk_bytes(ckpt) - disk_bytes(ckpt / "best_model")
    assert len(state.weight_digests) == 3 and records < one_copy / 2, (records, one_copy)
    assert not (ckpt / "best").exists()  # the best epoch is a number in the record, not a copy


def test_a_tampered_fitness_is_caught_by_the_checksum_at_resume(reference, tmp_path):
    """A changed member fitness (with the members' mean, max, min and signal signs to match) leaves every decision as
    recorded, and a re-sealed record hides it from the seal: only replay can catch it, at the epoch it changed, where
    the replayed update differs from the recorded one (the weights' digest of that epoch would be next)."""
    for part in ("checkpoints", "results"):
        shutil.copytree(reference / part / "reference", tmp_path / part / "reference", symlinks=True)
    state_file = tmp_path / "checkpoints" / "reference" / "epoch_0002" / "state.json"
    state = json.loads(state_file.read_text())
    row = state["history"][1]
    row["fitness"][0] += 0.25
    row.update(member_mean=sum(row["fitness"]) / len(row["fitness"]), member_max=max(row["fitness"]))
    row.update(member_min=min(row["fitness"]))
    row.update(epoch_signs(row, state["history"][0], state["config"]["evaluation"]["fitness"]))
    state["seal"] = seal_of(state)  # as a user who reruns the sealing code
    state_file.write_text(json.dumps(state))
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--resume",
            str(tmp_path / "checkpoints" / "reference"),
            "--set",
            "evolution.epochs=3",
            "--set",
            f"run.checkpoint_dir={tmp_path / 'checkpoints'}",
            "--set",
            f"run.output_dir={tmp_path / 'results'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "epoch 1: the saved history records update_norm" in done.stderr
    assert "Traceback" not in done.stderr


def test_base_weights_read_from_disk_are_the_loaded_ones_and_a_snapshot_resumes_the_same(tiny, runs):
    """per_task's base weights come from the model files exactly;
    a replay from a snapshot reaches the record's digest."""
    model = copy.deepcopy(tiny[0])
    ckpt = runs / "checkpoints" / "joint"
    state = record(ckpt)
    cfg = config_from_dict(state.config, "test")
    base_dir = cfg.resolve_path(cfg.model.path)
    names = [s.name for s in classify_model(model, cfg) if s.cls is not ParamClass.FROZEN]
    params = dict(model.named_parameters())
    assert all(t.equal(params[n]) for n, t in base_evolvable(model, base_dir, names).items())
    assert nearest_snapshot(ckpt, 3) == ckpt / "epoch_0002"  # run.snapshot_every=2
    rebuild(
        run_perturber(model, cfg), state, 3, ReplayedBest(base_dir, ckpt, cfg.run.degeneration_patience)
    )  # checks the digest


@pytest.mark.parametrize(
    "override,message",
    [
        ("run.checkpoint=copies", "run.checkpoint"),
        ("run.snapshot_every=-1", "run.snapshot_every must be >= 0"),
        ("run.export_best=mean", "run.export_best"),
    ],
)
def test_the_new_run_keys_are_checked_where_they_enter(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "smoke.yaml", [override])
    with pytest.raises(ConfigError, match="run.snapshot_every applies to run.checkpoint 'replay' only"):
        load_config(ROOT / "configs" / "smoke.yaml", ["run.checkpoint=full", "run.snapshot_every=2"])
