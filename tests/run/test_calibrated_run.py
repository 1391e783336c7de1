"""A `sigma: auto` run: calibrated once, recorded as the number evolution.sigma, replayed and resumed bit for bit
without measuring again, and a hand-edited sigma refused."""

from __future__ import annotations

import json
import shutil

from conftest import run_args, run_module, run_script

from ERO_EGGROLL.config import ROOT

FAST = [
    "data.fitness_source=train_loo",
    "evaluation.max_new_tokens_rule=demonstrations",
    "evaluation.fitness=answer_logprob",
    "evaluation.max_new_tokens_cap=4",
    "evaluation.batch_size=8",
    "evolution.sigma=auto",
    "evolution.calibration.members=2",
]


def _state(folder):
    return json.loads((folder / "state.json").read_text())


def test_a_sigma_auto_run_replays_and_resumes_bit_for_bit_and_an_edited_sigma_is_refused(tiny_model_dir, tmp_path):
    args = run_args(tmp_path, "auto", *FAST)[2:]  # the training script's arguments
    script = ROOT / "ERO_EGGROLL" / "arc_evolution_single_gpu.py"
    code, out, err = run_script(script, *args)
    assert code == 0, err[-2000:]
    assert "calibration: sigma" in out and "member evaluations" in out  # it says what it spent
    ckpt = tmp_path / "checkpoints" / "auto"
    first = _state(ckpt / "epoch_0002")
    sigma = first["config"]["evolution"]["sigma"]
    assert isinstance(sigma, float) and first["identity"]["evolution.sigma"] == sigma  # the number, recorded

    code, out, err = run_module("ERO_EGGROLL.replay", str(ckpt), "--check")
    assert code == 0 and "bit-identical" in out, err[-2000:]

    shutil.copytree(ckpt, tmp_path / "original")
    code, out, err = run_script(script, *args, "--resume", str(ckpt / "epoch_0001"))  # the config still says auto
    assert code == 0, err[-2000:]
    assert "recorded, not measured again" in out and "calibration: sigma" not in out
    assert _state(ckpt / "epoch_0002")["weight_digests"] == first["weight_digests"]

    edited = tmp_path / "original" / "epoch_0002"
    state = _state(edited)
    state["config"]["evolution"]["sigma"] = sigma * 1.5
    state["identity"]["evolution.sigma"] = sigma * 1.5
    (edited / "state.json").write_text(json.dumps(state))
    code, out, err = run_module("ERO_EGGROLL.replay", str(edited), "--check")
    assert code == 2 and "sigma" in err, err[-2000:]
