"""`python -m ERO_EGGROLL.replay <run> --export-adapter DIR`: the best epoch's change as a PEFT adapter, with each
tensor's truncation error and the adapter's fitness beside the full change's, under the output rules."""

from __future__ import annotations

import json

from conftest import run_module


def test_replay_exports_the_best_change_as_an_adapter_and_reports_it(reference, tmp_path):
    ckpt = reference / "checkpoints" / "reference"
    code, out, err = run_module("ERO_EGGROLL.replay", str(ckpt), "--export-adapter", str(tmp_path / "adapter"))
    assert code == 0, err
    assert "relative error" in out and "fitness: adapter" in out and "LoRA adapter to" in out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"]
    assert all(t.startswith("model.language_model.layers.") for t in config["target_modules"])
    report = json.loads((tmp_path / "adapter" / "adapter_report.json").read_text())
    assert report["energy"] == 0.99 and all(f["energy_kept"] >= 0.99 for f in report["fits"])

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    code, _, err = run_module("ERO_EGGROLL.replay", str(ckpt), "--export-adapter", str(foreign), "--rank", "1")
    assert code == 2 and err.startswith("error: --export-adapter") and "did not write" in err
    assert (foreign / "notes.txt").read_text() == "keep"
