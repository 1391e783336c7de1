"""One line, exit 2, nothing moved: loggers checked before epoch 0 (and switched off when they fail later), Ray's
join bounded in time, train_loo tasks that cannot give a demonstration, live runs never moved by --overwrite, and the
evaluator's base-weight check. Unit-level: no model is loaded and no epoch runs."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from ERO_EGGROLL.arc.tasks import ArcDataError, ArcTask, Pair
from ERO_EGGROLL.config import Config, ConfigError
from ERO_EGGROLL.run import loggers as loggers_module
from ERO_EGGROLL.run.loggers import Loggers, check_available
from ERO_EGGROLL.storage.checkpoints import RunState, save_checkpoint


def test_a_logger_whose_folder_is_a_file_or_that_does_not_import_is_refused_before_epoch_0(tmp_path, monkeypatch):
    (tmp_path / "tensorboard").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"its folder .*tensorboard cannot be written: .*tensorboard is not a folder"):
        check_available(["tensorboard"], tmp_path)
    real = loggers_module.importlib.import_module
    monkeypatch.setattr(
        loggers_module.importlib,
        "import_module",
        lambda name: (_ for _ in ()).throw(OSError("broken install")) if name == "wandb" else real(name),
    )
    with pytest.raises(
        ConfigError, match=r"run.loggers names wandb, but it does not import here \(OSError: broken install\)"
    ):
        check_available(["wandb"], tmp_path / "fresh")


def test_a_logger_that_fails_later_is_switched_off_with_one_warning(tmp_path, monkeypatch, capsys):
    class Flaky:
        def __init__(self, *args):
            self.rows = 0

        def log(self, row):
            self.rows += 1
            raise OSError(28, "No space left on device")

        def close(self):
            pytest.fail("a logger switched off is not closed")

    monkeypatch.setitem(loggers_module.LOGGERS, "tensorboard", Flaky)
    loggers = Loggers(["tensorboard"], tmp_path, {}, "run")
    for epoch in range(3):
        loggers.log({"epoch": epoch})
    loggers.close()
    assert (
        capsys.readouterr().err.count(
            "warning: logger tensorboard failed (OSError: [Errno 28] No space left on device)"
        )
        == 1
    )


def test_joining_an_unreachable_ray_cluster_fails_in_bounded_time():
    from ERO_EGGROLL.config import DistributedConfig
    from ERO_EGGROLL.run.distributed import DistributedError, connect

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing answers there
    start = time.monotonic()
    with pytest.raises(
        DistributedError, match=f"nothing answers at the Ray cluster address '127.0.0.1:{port}' after 1 s"
    ):
        connect(DistributedConfig(workers=2, address=f"127.0.0.1:{port}", connect_timeout_s=1.0))
    assert time.monotonic() - start < 10


def test_sigterm_ends_the_wait_for_a_ray_cluster():
    """distributed.connect_timeout_s long, nothing answering: SIGTERM used to be ignored for the whole wait. Now the
    run's stop flag ends it within about a second (the timeout here is 20 s, so a regression fails, never hangs)."""
    import os
    import signal
    import threading

    from ERO_EGGROLL.config import DistributedConfig
    from ERO_EGGROLL.run.distributed import connect
    from ERO_EGGROLL.run.stop_signals import RunInterrupted, StopFlag

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    start = time.monotonic()
    try:
        timer.start()
        with StopFlag().installed() as stop, pytest.raises(RunInterrupted, match="SIGTERM"):
            connect(DistributedConfig(workers=2, address=f"127.0.0.1:{port}", connect_timeout_s=20.0), stop)
    finally:
        timer.cancel()
    assert time.monotonic() - start < 5


def test_train_loo_refuses_a_task_with_one_training_pair():
    from ERO_EGGROLL.evaluation.prepared import questions_for

    cfg = Config()
    cfg.data.fitness_source = "train_loo"
    task = ArcTask("lonely01", (Pair([[1]], [[2]]),), (Pair([[3]], [[4]]),))
    with pytest.raises(ArcDataError, match="task lonely01 has 1 training pair.s.: data.fitness_source 'train_loo'"):
        questions_for([task], cfg, "fitness")


def live_lock(folder: Path, process: subprocess.Popen) -> None:
    """`folder`'s lock, held by `process` (alive) on this host."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.with_name(f".{folder.name}.lock").write_text(json.dumps({"pid": process.pid, "host": socket.gethostname()}))


@pytest.mark.parametrize("spelling", ["shared results folder", "symlinked run folder"])
def test_overwrite_never_moves_a_live_run(tmp_path, capsys, spelling):
    """A live run (its lock held by a running process) is refused before anything moves, however the new run reaches
    its folders: the same results folder under another checkpoint folder, or a symlink to the live run's folder."""
    from ERO_EGGROLL.cli import train
    from ERO_EGGROLL.config import ROOT

    live_ckpt, live_results = tmp_path / "checkpoints" / "live", tmp_path / "results" / "live"
    for folder in (live_ckpt, live_results):
        folder.mkdir(parents=True)
        (folder / "LATEST").write_text("epoch_0000")
    if spelling == "shared results folder":
        name, ckpt_root = "live", tmp_path / "other_checkpoints"
    else:
        name, ckpt_root = "alias", tmp_path / "checkpoints"
        (ckpt_root / "alias").symlink_to(live_ckpt)
        (tmp_path / "results" / "alias").symlink_to(live_results)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    holder = subprocess.Popen(["sleep", "60"])
    try:
        live_lock(live_ckpt, holder)
        live_lock(live_results, holder)
        rc = train.main(
            [
                "--config",
                str(ROOT / "configs" / "smoke.yaml"),
                "--set",
                f"run.name={name}",
                "--set",
                f"run.checkpoint_dir={ckpt_root}",
                "--set",
                f"run.output_dir={tmp_path / 'results'}",
                "--set",
                "run.memory_check=false",
                "--overwrite",
            ]
        )
    finally:
        holder.kill()
        holder.wait()
    assert rc == 2 and "is being written by process" in capsys.readouterr().err
    assert all(Path(p).exists() for p in before)
    assert not [p for p in tmp_path.rglob("*") if ".old-" in p.name]  # nothing moved aside


def test_the_evaluator_refuses_a_checkpoint_of_other_base_weights(tmp_path, tiny_model_dir):
    from ERO_EGGROLL.run.record import load_evaluated_model
    from ERO_EGGROLL.storage.identity import IdentityError

    cfg = Config()
    cfg.model.path = str(tiny_model_dir)
    row = {"epoch": 0, "mean_model_fitness": 0.5, "new_best": True, "rolled_back": False}
    state = RunState(
        identity={"base_weights": "other bytes"},
        config=cfg.to_dict(),
        history=[row],
        best_fitness=0.5,
        best_epoch=0,
        weight_digests=["a"],
    )
    save_checkpoint(tmp_path / "run", {}, {}, state, keep=True, best=False, store_tensors=False)
    with pytest.raises(IdentityError, match="cannot evaluate exactly: base_weights differs"):
        load_evaluated_model(cfg, str(tmp_path / "run"))
