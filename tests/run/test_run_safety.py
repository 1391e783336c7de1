"""Nothing saved is ever lost (issue 15): run-folder ownership, the lock, resume that is exact or
refused, the run identity, tensor hashes, atomic replacement and write failures.

Runs go through the training script's main() in this process (no new interpreter per run) on a copy
of the shared reference run (conftest.py), so each resume costs one epoch at most.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ERO_EGGROLL.cli import train as script
from ERO_EGGROLL.config import ROOT, ConfigError, load_config
from ERO_EGGROLL.core.digest import tensor_digest
from ERO_EGGROLL.io import disk
from ERO_EGGROLL.io.disk import WriteError, publish_dir
from ERO_EGGROLL.model import export
from ERO_EGGROLL.model.qwen import classify_model, run_perturber
from ERO_EGGROLL.storage import checkpoints as checkpointing
from ERO_EGGROLL.storage.checkpoints import (
    CheckpointError,
    RunState,
    latest_dir,
    load_checkpoint,
    read_latest_name,
    repair_latest,
    save_checkpoint,
)
from ERO_EGGROLL.storage.identity import ALLOWED_TO_CHANGE, IdentityError, check_identity, identity_of
from ERO_EGGROLL.storage.metrics import NON_FINITE_FLAG, rewrite_metrics
from ERO_EGGROLL.storage.run_folder import RunFolderError, RunLock, claim_run_folders


@pytest.fixture
def signals():
    """main() installs SIGINT/SIGTERM handlers; give pytest its own back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture
def copy_of_reference(reference, tmp_path) -> Path:
    for part in ("checkpoints", "results"):
        shutil.copytree(reference / part / "reference", tmp_path / part / "reference", symlinks=True)
    return tmp_path


def main(tmp: Path, *args: str) -> int:
    """The training script in this process, resuming the copy at `tmp` (its saved config points at the original)."""
    where = ["--set", f"run.checkpoint_dir={tmp / 'checkpoints'}", "--set", f"run.output_dir={tmp / 'results'}"]
    return script.main([*args, *where])


def weights_of(path: Path) -> dict[str, str]:
    """Per-tensor digests of a checkpoint's weights, from its run record (run.checkpoint: replay)."""
    return load_checkpoint(path)[2].tensor_digests


# --- 1, 2: a run folder belongs to one run -------------------------------------------------------


def test_rerun_of_an_existing_name_is_refused_and_nothing_changes(copy_of_reference, signals, capsys):
    ckpt = copy_of_reference / "checkpoints" / "reference"
    before = sorted(p.name for p in ckpt.iterdir())
    assert main(copy_of_reference, "--config", str(ROOT / "configs" / "smoke.yaml"), "--set", "run.name=reference") == 2
    err = capsys.readouterr().err
    assert f"{ckpt} already holds a run; continue it with --resume" in err and "--overwrite" in err
    assert sorted(p.name for p in ckpt.iterdir()) == before and read_latest_name(ckpt) == "epoch_0002"


def test_overwrite_moves_the_earlier_run_aside_never_deletes(tmp_path):
    ckpt, results = tmp_path / "checkpoints" / "run", tmp_path / "results" / "run"
    for folder in (ckpt, results):
        folder.mkdir(parents=True)
        (folder / "saved").write_text("earlier run")
    with pytest.raises(RunFolderError, match="already holds a run"):
        claim_run_folders(ckpt, results, move_earlier=False)
    moved = claim_run_folders(ckpt, results, move_earlier=True)
    assert not ckpt.exists() and not results.exists()
    assert [(p / "saved").read_text() for p in moved] == ["earlier run"] * 2 and all(".old-" in p.name for p in moved)


def test_a_folder_holding_a_nested_live_runs_lock_is_never_moved(tmp_path):
    """run.name=a/b still writing inside checkpoints/a: a new run `a` with --overwrite (or if_exists: move_aside)
    moved a aside, and b died. Its lock (checkpoints/a/.b.lock) is live, so nothing moves; a stale one does not
    block."""
    from ERO_EGGROLL.storage.run_folder import RunLock

    ckpt, results = tmp_path / "checkpoints" / "a", tmp_path / "results" / "a"
    for folder in (ckpt / "b", results / "b"):
        folder.mkdir(parents=True)
        (folder / "saved").write_text("run a/b")
    with RunLock(ckpt / "b"):
        with pytest.raises(RunFolderError, match=r"holds the lock .*\.b\.lock of a run that is still being written"):
            claim_run_folders(ckpt, results, move_earlier=True)
        assert (ckpt / "b" / "saved").is_file() and (results / "b" / "saved").is_file()
    (ckpt / ".b.lock").write_text(json.dumps({"pid": 999999999, "host": socket.gethostname()}))
    assert len(claim_run_folders(ckpt, results, move_earlier=True)) == 2  # a dead process's lock: moved with a


def test_the_default_config_moves_its_earlier_run_aside():
    """A newcomer's second `make run` just works: the earlier default run is kept under another name."""
    assert load_config(ROOT / "configs" / "default.yaml").run.if_exists == "move_aside"
    assert load_config(ROOT / "configs" / "smoke.yaml").run.if_exists == "refuse"


def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    ckpt = tmp_path / "run"
    with RunLock(ckpt) as lock:
        owner = json.loads(lock.path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"]
        with pytest.raises(RunFolderError, match=f"being written by process {os.getpid()} on {owner['host']}"):
            RunLock(ckpt).__enter__()
    assert not lock.path.exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.path.write_text(json.dumps({"pid": dead.pid, "host": owner["host"]}))
    with RunLock(ckpt):
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert f"stale lock {lock.path} from process {dead.pid}" in capsys.readouterr().err


def test_the_training_script_refuses_a_run_locked_by_a_live_process(copy_of_reference, signals, capsys):
    ckpt = copy_of_reference / "checkpoints" / "reference"
    with RunLock(ckpt):
        assert main(copy_of_reference, "--resume", str(ckpt)) == 2
    assert "is being written by process" in capsys.readouterr().err


# --- 3, 7, 8: resume is exact or refused ---------------------------------------------------------


def test_resume_without_any_complete_checkpoint_is_refused(tmp_path):
    save_checkpoint(tmp_path, {"w": torch.ones(2)}, {}, RunState(epoch=1), keep=False, best=False)
    (tmp_path / "LATEST").write_text("garbage")
    repair_latest(tmp_path)
    assert read_latest_name(tmp_path) == "epoch_0001"
    (tmp_path / "epoch_0001" / "state.json").unlink()
    with pytest.raises(CheckpointError, match="LATEST is damaged .* no complete epoch_NNNN/ directory is left"):
        latest_dir(tmp_path)


def test_resume_rebuilds_latest_extends_with_set_and_goes_back_moving_later_epochs_aside(
    copy_of_reference, signals, capsys
):
    """Reproductions 3, 7 and 8 on one copy of the reference run (each step is one resume)."""
    ckpt, results = copy_of_reference / "checkpoints" / "reference", copy_of_reference / "results" / "reference"
    (ckpt / "LATEST").unlink()
    assert main(copy_of_reference, "--resume", str(ckpt)) == 0  # (the copy's new folders are written into config.yaml)
    assert "LATEST in" in capsys.readouterr().err and read_latest_name(ckpt) == "epoch_0002"
    assert load_checkpoint(ckpt)[2].epoch == 2  # rebuilt from the newest complete epoch, not started again from 0
    config_yaml = (results / "config.yaml").stat().st_mtime_ns
    assert main(copy_of_reference, "--resume", str(ckpt)) == 0  # a no-op: finished, same config
    assert "already finished" in capsys.readouterr().out
    assert (results / "config.yaml").stat().st_mtime_ns == config_yaml and "epochs: 2" in (
        results / "config.yaml"
    ).read_text()

    assert main(copy_of_reference, "--resume", str(ckpt), "--set", "evolution.rank=3") == 2
    assert "cannot resume exactly: evolution.rank differs (the run has 2, now 3)" in capsys.readouterr().err

    assert main(copy_of_reference, "--resume", str(ckpt), "--set", "evolution.epochs=3") == 0
    assert read_latest_name(ckpt) == "epoch_0003" and "epochs: 3" in (results / "config.yaml").read_text()
    assert [json.loads(line)["epoch"] for line in (results / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    extended = weights_of(ckpt)

    # the recovery the corruption message promises (epoch_0001 saved epochs: 2, so the --set is needed to reach 3 again)
    assert main(copy_of_reference, "--resume", str(ckpt / "epoch_0001"), "--set", "evolution.epochs=3") == 0
    aside = next(ckpt.glob("moved_aside-*"))
    assert {p.name for p in aside.iterdir()} >= {"epoch_0002", "epoch_0003"}
    assert read_latest_name(ckpt) == "epoch_0003"
    redone = weights_of(ckpt)
    assert extended and redone == extended  # going back and forth is exact (the resume checked the record's digest)
    assert weights_of(aside / "epoch_0003") == extended  # and the moved epochs are intact


def test_resuming_an_epoch_that_was_moved_aside_is_refused(copy_of_reference, signals, capsys):
    """--resume of an epoch inside moved_aside-*/ silently resumed the run's newest checkpoint instead."""
    ckpt = copy_of_reference / "checkpoints" / "reference"
    aside = ckpt / "moved_aside-20250101-000000"
    shutil.copytree(ckpt / "epoch_0001", aside / "epoch_0001")
    latest = read_latest_name(ckpt)
    assert main(copy_of_reference, "--resume", str(aside / "epoch_0001")) == 2
    err = capsys.readouterr().err
    assert "that epoch was moved aside (in moved_aside-20250101-000000/)" in err and err.count("\n") == 1, err
    assert read_latest_name(ckpt) == latest


# --- 4: one identity, refused by name ------------------------------------------------------------


def _identity(cfg, model, **changes):
    param = next(model.parameters())
    resolved = {
        "device_type": param.device.type,
        "dtype": param.dtype,
        "members_per_batch": 1,
        "base_weights": "abc",
        **changes,
    }
    return identity_of(cfg, classify_model(model, cfg), **resolved)


def test_identity_covers_every_field_but_the_allow_list(tiny):
    model, _ = tiny
    base = load_config(ROOT / "configs" / "smoke.yaml")
    reference = _identity(base, model)
    for key in ALLOWED_TO_CHANGE:
        assert key not in reference
    changed = {
        "seed": "seed=1",
        "evolution.rank": "evolution.rank=3",
        "data.task_ids": "data.task_ids=[e6de6e8f]",
        "evaluation.batch_size": "evaluation.batch_size=1",
        "run.degeneration_patience": "run.degeneration_patience=2",
        "model.attn_implementation": "model.attn_implementation=eager",
        "evaluation.decoding": "evaluation.decoding.repetition_penalty=1.1",
    }
    for field, override in changed.items():
        with pytest.raises(IdentityError, match=f"cannot resume exactly: {field} differs"):
            check_identity(
                reference, _identity(load_config(ROOT / "configs" / "smoke.yaml", [override]), model), "run", "resume"
            )
    allowed = load_config(
        ROOT / "configs" / "smoke.yaml",
        ["evolution.epochs=9", "run.save_every=3", "model.device=auto", "evaluation.members_per_batch=2"],
    )
    check_identity(reference, _identity(allowed, model), "run", "resume")  # fp32: batching changes speed only
    flat_fields = {f"{s}.{k}" for s, v in base.to_dict().items() if isinstance(v, dict) for k in v} | {"seed"}
    assert flat_fields - set(ALLOWED_TO_CHANGE) - {"evaluation.members_per_batch"} <= set(reference)


def test_identity_refuses_another_dtype_device_type_or_base_weights(tiny):
    model, _ = tiny
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    saved = _identity(cfg, model)
    with pytest.raises(IdentityError, match="model.dtype differs \\(the run has 'float32', now 'bfloat16'\\)"):
        check_identity(saved, _identity(cfg, model, dtype=torch.bfloat16), "run", "resume")
    with pytest.raises(IdentityError, match="model.device differs .*CPU and GPU arithmetic differ.*model.device: cpu"):
        check_identity(saved, _identity(cfg, model, device_type="cuda"), "run", "replay")
    with pytest.raises(IdentityError, match="base_weights differs"):
        check_identity(saved, _identity(cfg, model, base_weights="other"), "run", "resume")
    assert {"versions.torch", "versions.jax", "versions.transformers", "tensor_keys", "jax_backend"} <= set(saved)
    with pytest.raises(IdentityError, match="jax_backend differs .*install the jaxlib"):
        check_identity(saved, {**saved, "jax_backend": "gpu"}, "run", "resume")


# --- 5: non-finite values and flipped bytes ------------------------------------------------------


def test_tensor_digest_sees_every_byte():
    t = torch.tensor([0.0, 1.0])
    assert tensor_digest(t) == tensor_digest(t.clone())
    assert tensor_digest(t) != tensor_digest(torch.tensor([-0.0, 1.0]))  # equal as floats, different bytes
    assert tensor_digest(t) != tensor_digest(t.to(torch.float64))


def test_flipped_bytes_are_named_with_the_epoch_to_fall_back_to(tmp_path):
    for epoch in (1, 2):
        save_checkpoint(
            tmp_path, {"a": torch.ones(64), "b": torch.zeros(64)}, {}, RunState(epoch=epoch), keep=True, best=False
        )
    weights = tmp_path / "epoch_0002" / "evolvable.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # inside b's bytes, the last tensor: the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=f"tensor b does not match the hash saved with it .*--resume {tmp_path / 'epoch_0001'}"
    ):
        load_checkpoint(tmp_path)


def test_non_finite_weights_are_never_saved(tmp_path):
    save_checkpoint(tmp_path, {"w": torch.ones(2)}, {}, RunState(epoch=1), keep=False, best=False)
    with pytest.raises(CheckpointError, match="epoch 2: tensor w is not finite .*epoch_0001 is intact"):
        save_checkpoint(
            tmp_path, {"w": torch.tensor([1.0, float("nan")])}, {}, RunState(epoch=2), keep=False, best=False
        )
    assert read_latest_name(tmp_path) == "epoch_0001" and not (tmp_path / "epoch_0002").exists()


def test_metrics_jsonl_is_strict_json(tmp_path):
    rewrite_metrics(
        tmp_path,
        [{"epoch": 1, "fitness": [0.5], "update_norm": float("inf"), "answers": ["x"], "member_mean": float("nan")}],
    )

    def refuse(constant):
        raise ValueError(constant)

    row = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert row["update_norm"] is None and row["member_mean"] is None
    assert row[NON_FINITE_FLAG] == ["member_mean", "update_norm"]


def test_loading_weights_checks_presence_shape_and_dtype(tiny):
    model, _ = tiny
    name, param = next(iter(model.named_parameters()))
    with pytest.raises(CheckpointError, match="1 evolved tensor\\(s\\) missing, e.g. other"):
        checkpointing.assign_weights(model, {}, "ckpt", expected=["other"])
    with pytest.raises(CheckpointError, match=f"{name} is bfloat16, the model is float32"):
        checkpointing.assign_weights(model, {name: param.detach().to(torch.bfloat16)}, "ckpt")
    with pytest.raises(CheckpointError, match="has shape"):
        checkpointing.assign_weights(model, {name: torch.zeros(3)}, "ckpt")


# --- atomic replacement --------------------------------------------------------------------------


def test_publishing_a_directory_is_atomic(tmp_path, monkeypatch):
    def version(text: str) -> Path:
        staging = tmp_path / f".staging-{text}"
        staging.mkdir()
        (staging / "f").write_text(text)
        return staging

    publish_dir(version("one"), tmp_path / "best")
    publish_dir(version("two"), tmp_path / "best")
    assert (tmp_path / "best" / "f").read_text() == "two" and len(list(tmp_path.glob(".best.v*"))) == 1

    def crash(*args):
        raise OSError(errno.EIO, "simulated crash before the swap")

    monkeypatch.setattr(disk.os, "replace", crash)
    with pytest.raises(WriteError):
        publish_dir(version("three"), tmp_path / "best")
    assert (tmp_path / "best" / "f").read_text() == "two"  # the reader still sees a complete version
    monkeypatch.undo()
    publish_dir(version("four"), tmp_path / "best")
    assert (tmp_path / "best" / "f").read_text() == "four" and len(
        list(tmp_path.glob(".best.v*"))
    ) == 1  # the crash's orphan is gone


def test_a_failed_export_leaves_the_previous_best_model(tmp_path, tiny, tiny_model_dir, monkeypatch):
    model, _ = tiny
    out = tmp_path / "best_model"
    export.export_model(model, tiny_model_dir, out, lambda report: "first\n", owner="run")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "save_file", disk_full)
    with pytest.raises(WriteError, match="No space left on device.*previous checkpoint is intact"):
        export.export_model(model, tiny_model_dir, out, lambda report: "second\n", owner="run")
    assert (out / "README.md").read_text() == "first\n" and not list(tmp_path.glob(".best_model.tmp-*"))


# --- 6: write failures are one line, exit 2 ------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_results_write_failure_names_the_path(tmp_path, monkeypatch, code):
    def failing(self, *args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(Path, "open", failing)
    with pytest.raises(WriteError, match=f"could not write {tmp_path / 'metrics.jsonl'}: {os.strerror(code)} "):
        rewrite_metrics(tmp_path, [{"epoch": 0}])


def test_disk_full_during_a_run_is_one_line_and_exit_2(copy_of_reference, signals, capsys, monkeypatch):
    ckpt = copy_of_reference / "checkpoints" / "reference"

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointing, "save_file", disk_full)
    assert main(copy_of_reference, "--resume", str(ckpt), "--set", "evolution.epochs=3") == 2
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("error:"))
    assert (
        f"could not write {ckpt / 'epoch_0003'}: No space left on device" in line
        and "previous checkpoint is intact" in line
    )
    assert "Traceback" not in err and read_latest_name(ckpt) == "epoch_0002"


# --- 7: bad input gets one line before the model loads -------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"*": "FROZEN"}, "every tensor is FROZEN.* nothing would evolve"),
        (
            {"model.language_model.norm.weight": "LORA"},
            "model.language_model.norm.weight .* is classified LORA, but low-rank noise needs "
            "a tensor of 2 or more dimensions",
        ),
    ],
)
def test_classifications_that_cannot_evolve_are_refused(tiny, overrides, message):
    model, _ = tiny
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    cfg.params.overrides = overrides
    with pytest.raises(ConfigError, match=message):
        run_perturber(model, cfg)
    assert not any(m._forward_hooks for m in model.modules())  # a refused model is left as it was


def test_task_errors_come_before_the_model_loads(tmp_path, signals, capsys):
    args = [
        "--config",
        str(ROOT / "configs" / "smoke.yaml"),
        "--set",
        "data.task_ids=[zzzz]",
        "--set",
        "model.path=/no/such/model",
    ]
    assert main(tmp_path, *args) == 2
    err = capsys.readouterr().err
    assert "unknown task id 'zzzz'" in err and "model" not in err.split("unknown task id")[0].lower()
    assert not (tmp_path / "checkpoints").exists()  # nothing started
