"""run.loggers: a short fake history through TensorBoard and W&B (offline), read back from what they wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ERO_EGGROLL.config import ConfigError, config_from_dict
from ERO_EGGROLL.run import loggers as loggers_module
from ERO_EGGROLL.run.loggers import Loggers, check_available
from ERO_EGGROLL.storage.identity import ALLOWED_TO_CHANGE

HISTORY = [
    {
        "epoch": 0,
        "mean_model_fitness": 0.25,
        "mean_model_test_score": 0.3,
        "new_best": True,
        "peak_memory_scope": "process",
        "decoding": {"do_sample": False},
        "answers": ["[[0]]"],
    },
    {
        "epoch": 1,
        "fitness": [0.1, 0.3, 0.2, 0.6],
        "member_mean": 0.3,
        "mean_model_fitness": 0.5,
        "mean_model_test_score": 0.5,
        "update_norm": float("nan"),
        "new_best": True,
    },
    {
        "epoch": 2,
        "fitness": [0.4, 0.5, 0.5, 0.7],
        "member_mean": 0.525,
        "mean_model_fitness": 0.75,
        "mean_model_test_score": 0.7,
        "update_norm": 0.125,
        "new_best": False,
    },
]
CONFIG = {"seed": 0, "evolution": {"population_size": 4}}


def log_history(names: list[str], run_dir: Path) -> None:
    loggers = Loggers(names, run_dir, CONFIG, "fake")
    for row in HISTORY:
        loggers.log(row)
    loggers.close()


def test_tensorboard_event_files_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_history(["tensorboard"], tmp_path)
    events = EventAccumulator(
        str(tmp_path / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0, "tensors": 0}
    )
    events.Reload()

    def read(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    assert read("mean_model_fitness") == [(0, 0.25), (1, 0.5), (2, 0.75)]
    assert read("new_best") == [(0, 1.0), (1, 1.0), (2, 0.0)]
    assert read("update_norm") == [(2, 0.125)]  # the NaN is left out, as metrics.jsonl writes null
    assert "answers" not in events.Tags()["scalars"] and "peak_memory_scope" not in events.Tags()["scalars"]
    histograms = events.Histograms("population/fitness")
    assert [h.step for h in histograms] == [1, 2] and [h.histogram_value.num for h in histograms] == [4, 4]
    assert histograms[0].histogram_value.min == 0.1 and histograms[1].histogram_value.max == 0.7
    assert "config/text_summary" in events.Tags()["tensors"]


def wandb_records(path: Path):
    """The protobuf records of an offline .wandb file
    (a LevelDB-style log: 32 KiB blocks of CRC, length, type, data)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def test_wandb_writes_an_offline_run_without_an_account(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    import wandb

    log_history(["wandb"], tmp_path)
    # finish() may return before wandb-core has written the last records (seen 2 times in 6); exit does this
    wandb.teardown()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    history, config = {}, {}
    for record in wandb_records(run_file):
        if record.HasField("history"):
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[items["_step"]] = items
        if record.HasField("run"):
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    assert sorted(history) == [0, 1, 2]
    assert [history[s]["mean_model_fitness"] for s in (0, 1, 2)] == [0.25, 0.5, 0.75]
    assert "update_norm" not in history[1] and history[2]["update_norm"] == 0.125
    assert history[2]["population/fitness/_type"] == "histogram" and "population/fitness/_type" not in history[0]
    assert config["evolution"] == {"population_size": 4}


def test_nothing_is_written_before_the_first_row(tmp_path):
    """A resumed run that is already finished logs no row: no empty event file or W&B run."""
    Loggers(["tensorboard", "wandb"], tmp_path, CONFIG, "finished").close()
    assert list(tmp_path.iterdir()) == []


def test_a_missing_package_is_named_with_what_to_install(monkeypatch):
    real = loggers_module.importlib.util.find_spec
    monkeypatch.setattr(
        loggers_module.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name)
    )
    check_available(["tensorboard"])
    with pytest.raises(
        ConfigError,
        match=r"run.loggers names wandb, but the package is not installed here: pip install wandb==0\.31\.0",
    ):
        check_available(["tensorboard", "wandb"])


def test_a_run_with_a_missing_logger_stops_before_reading_tasks_or_the_model(monkeypatch):
    from ERO_EGGROLL.cli import train as script

    monkeypatch.setattr(loggers_module.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(script, "load_tasks", lambda *args: pytest.fail("the run went on past the logger check"))
    with pytest.raises(ConfigError, match="pip install tensorboard==2.21.0"):
        script.run(config_from_dict({"run": {"loggers": ["tensorboard"]}}), None, False, script.StopFlag())


def test_config_loggers_are_checked_and_do_not_change_a_runs_identity():
    assert config_from_dict({}).run.loggers == []
    assert config_from_dict({"run": {"loggers": ["tensorboard", "wandb"]}}).run.loggers == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match=r"run.loggers\[0\]: 'tensorbord' is not one of .*did you mean 'tensorboard'"):
        config_from_dict({"run": {"loggers": ["tensorbord"]}})
    with pytest.raises(ConfigError, match="names a logger twice"):
        config_from_dict({"run": {"loggers": ["wandb", "wandb"]}})
    assert "run.loggers" in ALLOWED_TO_CHANGE
