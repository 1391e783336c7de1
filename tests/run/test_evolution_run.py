"""The evolution run end to end: smoke test, resume after a signal, replay, determinism, crash safety.

Each run is a separate process on a 1-task, population-4 configuration (about 10-20 s each);
`reference` (conftest.py) is one finished run shared with tests/run/test_run_safety.py.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import fault_env, run_args, run_module

from ERO_EGGROLL.config import ROOT
from ERO_EGGROLL.io.disk import OUTPUT_MARK
from ERO_EGGROLL.run.record import combined_digest, tensor_digests
from ERO_EGGROLL.storage.checkpoints import load_checkpoint, read_latest_name
from ERO_EGGROLL.storage.metrics import TIMING_FIELDS

SCRIPT = ROOT / "ERO_EGGROLL" / "arc_evolution_single_gpu.py"


def run(tmp: Path, name: str, *overrides: str, env=None) -> subprocess.CompletedProcess:
    done = subprocess.run(run_args(tmp, name, *overrides), capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def metrics(tmp: Path, name: str) -> list[dict]:
    rows = [json.loads(line) for line in (tmp / "results" / name / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in rows]


def final_weights(tmp: Path, name: str) -> dict[str, str]:
    """Per-tensor byte digests (digest.tensor_digest) of the final weights, from the run record (run.checkpoint: replay;
    tests/run/test_run_record.py checks them against tensors rebuilt by replay)."""
    return load_checkpoint(tmp / "checkpoints" / name)[2].tensor_digests


def assert_same_weights(a: dict[str, str], b: dict[str, str]):
    assert a and a == b


def test_smoke_script(tmp_path, tiny_model_dir):
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "smoke_test.py"),
            "--set",
            f"run.output_dir={tmp_path / 'r'}",
            "--set",
            f"run.checkpoint_dir={tmp_path / 'c'}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "smoke test passed" in done.stdout


def test_same_seed_same_numbers_in_another_process_with_loggers_and_batched_members(reference):
    """A second process with the same config and seed gives the same numbers, even with the loggers on (they report
    numbers, never change them) and members_per_batch auto (K > 1 members per generate call: speed, never numbers)."""
    assert (
        metrics(reference, "reference")[1]["member_max"] > metrics(reference, "reference")[1]["member_min"]
    )  # a real update happened
    assert metrics(reference, "reference")[0]["decoding"] == {
        "do_sample": False,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "repetition_penalty": 1.0,
    }  # recorded with the run
    done = run(reference, "again", "run.loggers=[tensorboard,wandb]", "evaluation.members_per_batch=auto")
    chosen = re.search(r"evaluation.members_per_batch auto: (\d+) member", done.stdout)
    assert chosen and int(chosen.group(1)) > 1, done.stdout
    assert metrics(reference, "again") == metrics(reference, "reference")
    assert_same_weights(final_weights(reference, "again"), final_weights(reference, "reference"))
    assert list((reference / "results" / "again" / "tensorboard").glob("events.out.tfevents.*"))
    assert list((reference / "results" / "again" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_replay_rebuilds_the_checkpoint_bit_for_bit(reference):
    code, out, err = run_module("ERO_EGGROLL.replay", str(reference / "checkpoints" / "reference"), "--check")
    assert code == 0 and "bit-identical" in out, out + err


def stopped_after_epoch_1(args: list[str], checkpoint: Path) -> str:
    """Run the training command `args` and send SIGTERM once `checkpoint` holds epoch 1;
    its stderr (exit code 130 checked)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while read_latest_name(checkpoint) != "epoch_0001" and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-2000:]
    return stderr


def test_sigterm_then_resume_equals_uninterrupted(reference, tmp_path):
    ckpt = tmp_path / "checkpoints" / "reference"
    stderr = stopped_after_epoch_1(run_args(tmp_path, "reference"), ckpt)
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr
    assert read_latest_name(ckpt) in ("epoch_0001", "epoch_0002")
    resumed = subprocess.run(
        [sys.executable, str(SCRIPT), "--resume", str(ckpt)], capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert metrics(tmp_path, "reference") == metrics(reference, "reference")
    assert_same_weights(final_weights(tmp_path, "reference"), final_weights(reference, "reference"))


def test_resume_refuses_a_changed_config(reference, capsys):
    from ERO_EGGROLL.cli.train import main

    args = run_args(reference, "reference", "evolution.rank=3")[2:] + [
        "--resume",
        str(reference / "checkpoints" / "reference"),
    ]
    assert main(args) == 2
    assert "cannot resume exactly: evolution.rank differs (the run has 2, now 3)" in capsys.readouterr().err


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_intact(tmp_path, tiny_model_dir):
    env = fault_env(tmp_path / "faults.txt", "slow_write epoch_0001 60")
    proc = subprocess.Popen(run_args(tmp_path, "crash"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ckpt = tmp_path / "checkpoints" / "crash"
    deadline = time.time() + 300
    while not list(ckpt.glob(".epoch_0001.tmp-*/evolvable.safetensors")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    assert read_latest_name(ckpt) == "epoch_0000"
    state = load_checkpoint(ckpt)[2]
    assert state.epoch == 0 and len(state.weight_digests) == 1  # the run record of epoch 0, intact
    resumed = subprocess.run(
        [sys.executable, str(SCRIPT), "--resume", str(ckpt)], capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert load_checkpoint(ckpt)[2].epoch == 2


def test_exported_best_model_loads_with_transformers(reference, tiny_model_dir):
    """The export is the base model's folder with the best weights, plus a model card (README.md)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    export = reference / "checkpoints" / "reference" / "best_model"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(export)
    state = load_checkpoint(reference / "checkpoints" / "reference")[2]
    params = dict(model.named_parameters())  # the best epoch's weights, as the run record's digest of that epoch says
    assert (
        combined_digest(tensor_digests({n: params[n] for n in state.tensor_digests}))
        == state.weight_digests[state.best_epoch]
    )
    base = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.name != "model.safetensors"}
    exported = {
        p.name: p.read_bytes()
        for p in export.iterdir()
        if p.name not in ("model.safetensors", "README.md", OUTPUT_MARK)
    }
    assert exported == base  # config, generation config, tokenizer, chat template, processor config: byte for byte
    card = (export / "README.md").read_text()
    best_epoch = state.best_epoch
    assert card.startswith("---\nbase_model: checkpoints/tiny-qwen2.5-vl\n") and f"epoch {best_epoch} of 2" in card
    assert "## Results (test-time search)" in card and "| T1 | b1fc8b8e |" in card and "| 2 | " in card
    assert f"python -m ERO_EGGROLL.replay {reference / 'checkpoints' / 'reference'} --check" in card


def test_evaluator_cli_on_an_evolved_checkpoint(reference):
    out = reference / "eval"
    code, _, err = run_module(
        "ERO_EGGROLL.arc_evaluator",
        "--config",
        str(ROOT / "configs" / "smoke.yaml"),
        "--set",
        "data.task_ids=[b1fc8b8e]",
        "--set",
        "evaluation.max_new_tokens_cap=48",
        "--checkpoint",
        str(reference / "checkpoints" / "reference"),
        "--out",
        str(out),
    )
    assert code == 0, err[-2000:]
    assert "| T1 | b1fc8b8e |" in (out.with_suffix(".md")).read_text()
