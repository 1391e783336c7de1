"""distributed.workers: 2 Ray workers (1 CPU each) give the single-process run's numbers and weights, also when one
dies mid-epoch; workers whose weights drift from the driver's stop the run.

One local Ray instance serves the module; each run is the training script joining it through distributed.address.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import FAULTS_ENV, fault_env, run_args
from test_evolution_run import assert_same_weights, final_weights, metrics
from test_run_record import record, resume, without_timings

from ERO_EGGROLL.config import Config, ConfigError, config_from_dict

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    """A 2-CPU local Ray instance, as `ray start --head` would give on a machine; ended with the module. Its workers
    read their faults from one file, which each run writes (distributed_run)."""
    faults = tmp_path_factory.mktemp("faults") / "faults.txt"
    faults.write_text("")
    os.environ[FAULTS_ENV] = str(faults)  # the workers inherit it from the instance
    try:
        ray.init(
            address="local", num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False
        )
        yield ray.get_runtime_context().gcs_address
        ray.shutdown()
    finally:
        del os.environ[FAULTS_ENV]


def distributed_run(
    tmp, name: str, address: str, fault: str | None = None, overrides: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """A 2-worker run joining `address`; `fault` (tests/faults/sitecustomize.py) is obeyed by its workers."""
    env = fault_env(Path(os.environ[FAULTS_ENV]), *([fault] if fault else []))
    args = run_args(
        tmp,
        name,
        *overrides,
        "distributed.workers=2",
        "distributed.cpus_per_worker=1",
        f"distributed.address={address}",
    )
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)


def assert_same_run(tmp, name: str, reference) -> list[dict]:
    assert metrics(tmp, name) == metrics(reference, "reference")  # metrics minus timings and per-worker figures
    assert_same_weights(final_weights(tmp, name), final_weights(reference, "reference"))
    return [json.loads(line)["workers"] for line in (tmp / "results" / name / "metrics.jsonl").read_text().splitlines()]


def test_two_workers_equal_the_single_process_run_even_when_one_is_lost(reference, tmp_path, ray_address):
    """Both workers take member batches; worker 1 exits when asked for its 2nd batch, its batch goes to worker 0 and
    a replacement replays the history: every number and digest still equals the one-process run's."""
    done = distributed_run(tmp_path, "two", ray_address, fault="exit 1 1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "worker 1 lost in epoch" in done.stderr
    workers = assert_same_run(tmp_path, "two", reference)
    for epoch in workers[1:]:
        assert [w["worker"] for w in epoch] == [0, 1] and sum(w["members"] for w in epoch) == 4
    assert all(w["members"] >= 1 for w in workers[1])  # both took batches: the first two are handed out at once
    assert workers[-1][1]["restarts"] == 1 and workers[-1][0]["restarts"] == 0


ERO_RUN = [
    "evolution.search=ero",
    "evolution.antithetic=false",
    "evolution.elites=2",
    "evolution.reset_after=1",
    "evolution.clamp=10.0",
    "evolution.epochs=3",
    "evaluation.max_new_tokens_cap=16",
]
FORCED_RESET = 2  # whether the members ever score below the best so far depends on the tiny model's build (ties in
# char similarity; on some CPUs they always tie), so the faults plugin lowers every member of this epoch


def test_ero_search_on_two_workers_through_a_reset_then_resumed_by_replay_is_the_same_run(
    tmp_path, tiny_model_dir, ray_address
):
    """ERO's search (evolution.search: ero) is exact as EGGROLL's is. On 2 Ray workers: each applies the driver's rows
    through the epoch step and is checked against the driver's weights after every epoch (a drift stops the run, test
    below), so a finished run means bit-identical weights. Then, in one process, gone back to the epoch of the first
    reset: replay rebuilds the epochs up to it (the reset among them; rebuild checks the recorded digest) and the next
    epoch must draw the moved seed's noise again, as the first line did."""
    done = distributed_run(tmp_path, "ero", ray_address, fault=f"worse {FORCED_RESET}", overrides=tuple(ERO_RUN))
    assert done.returncode == 0, done.stderr[-3000:]
    first = record(tmp_path / "checkpoints" / "ero")
    assert all(len(row["workers"]) == 2 for row in first.history[1:])
    resets = [row["epoch"] for row in first.history[1:] if row["reset_to_base"]]
    assert resets[:1] == [FORCED_RESET] and FORCED_RESET < len(first.history) - 1, resets  # an epoch after it
    assert first.weight_digests[FORCED_RESET] == first.weight_digests[0]  # a reset is exactly the base weights
    resume(tmp_path / "checkpoints" / "ero" / f"epoch_{FORCED_RESET:04d}", "distributed.workers=1")
    again = record(tmp_path / "checkpoints" / "ero")
    assert without_timings(again) == without_timings(first)
    assert again.weight_digests == first.weight_digests and again.tensor_digests == first.tensor_digests


def test_a_worker_whose_weights_drift_stops_the_run(tmp_path, tiny_model_dir, ray_address):
    done = distributed_run(
        tmp_path, "drift", ray_address, fault="drift 0 1"
    )  # one ulp in one tensor after epoch 1's step
    assert done.returncode == 2, done.stderr[-3000:]
    assert "error: worker 0 disagrees with the driver after epoch 1: tensor " in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("workers", 0, "distributed.workers must be between 1"),
        ("workers", 6, "and evolution.population_size 4"),
        ("address", "http://head", "distributed.address must be null"),
        ("cpus_per_worker", 0, "distributed.cpus_per_worker must be >= 1"),
        ("gpus_per_worker", 0, "distributed.gpus_per_worker must be > 0"),
    ],
)
def test_distributed_settings_are_validated(key, value, message):
    data = Config().to_dict()
    data["evolution"]["population_size"] = 4
    data["distributed"][key] = value
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)
