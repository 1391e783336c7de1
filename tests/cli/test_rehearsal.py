"""The rehearsal (cli/rehearse.py, doctor --rehearse): per-phase figures and a verdict, and nothing left changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ERO_EGGROLL.cli import doctor, rehearse
from ERO_EGGROLL.config import ROOT
from ERO_EGGROLL.core.digest import combined_digest, files_digest, tensor_digests

SMALL = [
    "data.task_ids=[b1fc8b8e]",
    "evaluation.batch_size=2",
    "evaluation.max_new_tokens_cap=16",
    "evolution.population_size=4",
    "evolution.strategy=forward",
    "evaluation.members_per_batch=2",
    "evolution.optimizer=adam",
    "evolution.calibration.members=2",  # the signal scan: 2 members per sigma
]


def _tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` (symlinks followed) with its bytes' digest: what 'unchanged' means for a folder."""
    return {str(p.relative_to(folder)): files_digest([p]) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rehearsal_reports_every_phase_and_leaves_weights_model_folder_and_run_folders_unchanged(
    tmp_path, tiny, tiny_model_dir, monkeypatch, capsys
):
    loaded = []

    def load_and_keep(cfg):  # the rehearsal's own model, kept so that its weights can be compared afterwards
        loaded.append(real_load(cfg))
        return loaded[-1]

    real_load = rehearse.load_model
    monkeypatch.setattr(rehearse, "load_model", load_and_keep)
    run_dir = tmp_path / "results" / "rehearsed"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"epoch": 0}\n')  # an earlier run's folder: must stay as it is
    model_before, runs_before = _tree(tiny_model_dir), _tree(tmp_path)
    sets = [
        *SMALL,
        "run.name=rehearsed",
        f"run.output_dir={tmp_path / 'results'}",
        f"run.checkpoint_dir={tmp_path / 'checkpoints'}",
    ]
    out = tmp_path / "rehearsal.json"
    code = rehearse.main(
        ["--config", str(ROOT / "configs" / "smoke.yaml"), *[a for s in sets for a in ("--set", s)], "--json", str(out)]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    for phase in ("resident", "evaluation", "update"):
        assert f"| {phase} |" in text
    assert "seconds per member" in text and "per run" in text and "VERDICT: FITS" in text
    report = json.loads(out.read_text())
    assert {p["name"] for p in report["phases"]} == {"resident", "evaluation", "update"}
    assert all(p["measured"] > 0 and p["predicted"] > 0 for p in report["phases"])
    assert report["members_per_batch"] == 2 and report["fits"]
    signal = report["signal"]  # the noise and the step judged beside the memory
    assert f"SIGNAL VERDICT: {signal['verdict']}" in text and "step: one update at lr" in text
    assert len(signal["scan"]) == 5 and signal["suggested_sigma"] > 0 and signal["step_kl"] > 0
    out.unlink()
    model = loaded[0][0]
    assert combined_digest(tensor_digests(dict(model.named_parameters()))) == combined_digest(
        tensor_digests(dict(tiny[0].named_parameters()))
    )
    assert _tree(tiny_model_dir) == model_before
    assert _tree(tmp_path) == runs_before  # no checkpoints/ folder either


def test_bad_layer_count_is_one_line_and_exit_2(capsys):
    code = rehearse.main(["--config", str(ROOT / "configs" / "smoke.yaml"), "--random-layers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--random-layers 0" in err


def _result(resident: int, evaluation: int, update: int, capacity: int) -> rehearse.Rehearsal:
    phases = [
        rehearse.Phase("resident", resident, resident, "weights"),
        rehearse.Phase("evaluation", evaluation, evaluation, "KV cache"),
        rehearse.Phase("update", update, update, "update step 2: optimizer + apply (fp32 buffers)"),
    ]
    return rehearse.Rehearsal(
        "cuda:0",
        "bfloat16",
        "m",
        1,
        phases,
        capacity,
        "the GPU",
        seconds={"member": 1.0, "first_batch": 2.0, "update": 3.0, "first_update": 4.0, "mean_model": 5.0},
        projection={"epochs": 12, "epoch_seconds": 60.0, "run_seconds": 725.0},
    )


@pytest.mark.parametrize(
    "capacity, fits, start", [(100, True, "FITS with a margin of"), (42, True, "TIGHT"), (39, False, "DOES NOT FIT")]
)
def test_verdict_names_the_margin_or_what_to_change(capacity, fits, start):
    result = _result(30 * 2**30, 10 * 2**30, 5 * 2**30, capacity * 2**30)
    ok, line = result.verdict()
    assert ok is fits and line.startswith(start)
    if not fits:
        assert (
            "evaluation takes 10.00 GiB" in line and "evaluation.batch_size" in line
        )  # the larger phase, and what shrinks it


def test_doctor_rehearse_prints_the_rehearsal_and_fails_when_it_does_not_fit(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "run_checks", lambda cfg: [("versions", True, "ok")])
    monkeypatch.setattr(rehearse, "rehearse", lambda cfg: _result(30 * 2**30, 10 * 2**30, 5 * 2**30, 39 * 2**30))
    code = doctor.main(["--config", str(ROOT / "configs" / "smoke.yaml"), "--rehearse"])
    out = capsys.readouterr().out
    assert code == 1 and "| evaluation | 10240 | 10240 | 1.00 |" in out and "VERDICT: DOES NOT FIT" in out


def test_json_never_overwrites_the_model_or_a_file_it_did_not_write(tiny_model_dir, capsys):
    target = tiny_model_dir / "config.json"
    before = target.read_bytes()
    code = rehearse.main(["--config", str(ROOT / "configs" / "smoke.yaml"), "--json", str(target)])
    assert code == 2 and "--json" in capsys.readouterr().err and target.read_bytes() == before


def test_json_that_cannot_be_written_is_one_line_and_the_earlier_report_stays(monkeypatch, tmp_path, capsys):
    """--json on a full disk (a write that fails) after the whole rehearsal: one line, exit 2, the earlier report
    whole (the new one is staged beside it and renamed)."""
    monkeypatch.setattr(rehearse, "rehearse", lambda cfg, layers: _result(2**30, 2**30, 2**30, 100 * 2**30))
    out = tmp_path / "r.json"
    assert rehearse.main(["--config", str(ROOT / "configs" / "smoke.yaml"), "--json", str(out)]) == 0
    before = out.read_bytes()

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    code = rehearse.main(["--config", str(ROOT / "configs" / "smoke.yaml"), "--json", str(out)])
    err = capsys.readouterr().err
    assert (
        code == 2 and err.startswith(f"error: could not write {out}: No space left on device") and err.count("\n") == 1
    )
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
