"""Outputs never destroy: replay --export/--out and the evaluator's --out write only into a new path or over an
earlier output of their own kind; everything else is refused in one line (exit 2) before any work,
and left as it was."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ERO_EGGROLL.cli import replay
from ERO_EGGROLL.config import Config
from ERO_EGGROLL.io.disk import OutputError, WriteError, check_output, mark_output, publish_dir
from ERO_EGGROLL.model.export import EXPORT_KIND, earlier_export
from ERO_EGGROLL.storage.checkpoints import RunState, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small nets; the thread count is restored after


@pytest.fixture
def run_folder(tmp_path, tiny_model_dir) -> Path:
    """A run's checkpoint folder (a run record without tensors) whose config points at the tiny model,
    under tmp_path."""
    cfg = Config()
    cfg.run.name, cfg.run.checkpoint_dir, cfg.run.output_dir = (
        "r",
        str(tmp_path / "checkpoints"),
        str(tmp_path / "results"),
    )
    cfg.model.path = str(tiny_model_dir)
    base = {
        "epoch": 0,
        "mean_model_fitness": 0.5,
        "new_best": True,
        "rolled_back": False,
    }  # epoch 0 only: a consistent record
    state = RunState(config=cfg.to_dict(), history=[base], best_fitness=0.5, best_epoch=0, weight_digests=["a"])
    save_checkpoint(cfg.checkpoint_path, {}, {}, state, keep=True, best=False)
    return cfg.checkpoint_path


def refused(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        replay.main(list(argv))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def snapshot(path: Path) -> dict[str, bytes | str]:
    """Every entry under `path` (links not followed) with its bytes or link target: what must stay unchanged."""
    out: dict[str, bytes | str] = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = Path(root) / name
            out[str(p)] = os.readlink(p) if p.is_symlink() else (p.read_bytes() if p.is_file() else "dir")
    return out


def test_an_export_never_replaces_what_it_did_not_write(run_folder, tiny_model_dir, tmp_path, capsys):
    """A user's folder, a symlink (and its target), the run's folder, the base model's folder, a plain file, a device,
    '' and '.', a folder inside the base model: each refused by name, and each left byte for byte as it was."""
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    link = tmp_path / "link"
    link.symlink_to(user)
    plain = tmp_path / "file.txt"
    plain.write_text("keep me too")
    before = snapshot(tmp_path), snapshot(tiny_model_dir)
    cases = {
        str(user): "did not write",
        str(link): "symlink",
        str(run_folder): "run or base model folder",
        str(tiny_model_dir): "run or base model folder",
        str(tiny_model_dir / "sub"): "run or base model folder",
        str(plain): "a file that this command did not write",
        "/dev/null": "device or special file",
        "": "not '' or '.'",
        ".": "not '' or '.'",
    }
    for target, message in cases.items():
        assert message in refused(capsys, str(run_folder), "--export", target), target
        assert message in refused(capsys, str(run_folder), "--out", target), target
    assert (snapshot(tmp_path), snapshot(tiny_model_dir)) == before
    assert os.path.exists("/dev/null") and not os.path.islink("/dev/null")


def test_out_into_an_unwritable_place_is_one_line():
    """replay --out where nothing can be written: one WriteError line (main prints it, exit 2), no traceback."""
    with pytest.raises(WriteError, match="could not write /proc/replayed.safetensors"):
        replay.save_out({"w": torch.zeros(2)}, Path("/proc/replayed.safetensors"))


def test_an_earlier_export_or_out_may_be_replaced(tmp_path):
    """What a command wrote (an export published as a symlink, an --out file) is recognised; a look-alike is not."""
    staging = tmp_path / "staging"
    staging.mkdir()
    mark_output(staging, EXPORT_KIND)
    publish_dir(staging, tmp_path / "export")
    assert check_output(tmp_path / "export", "--export", earlier_export) == tmp_path / "export"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    mark_output(elsewhere, EXPORT_KIND)
    (tmp_path / "pointer").symlink_to(elsewhere)  # marked, but a symlink to a folder the export did not publish
    with pytest.raises(OutputError, match="symlink"):
        check_output(tmp_path / "pointer", "--export", earlier_export)
    replay.save_out({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    assert check_output(tmp_path / "w.safetensors", "--out", replay.earlier_out)
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", "--export", earlier_export)


def test_the_evaluator_refuses_a_table_over_a_foreign_file(tmp_path, capsys):
    """arc_evaluator --out: a stem whose .md is someone else's file is refused before the model loads."""
    from ERO_EGGROLL.cli import evaluate
    from ERO_EGGROLL.config import ROOT

    (tmp_path / "t.md").write_text("my notes\n")
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["--config", str(ROOT / "configs" / "smoke.yaml"), "--out", str(tmp_path / "t")])
    assert exit_.value.code == 2 and "did not write" in capsys.readouterr().err
    assert (tmp_path / "t.md").read_text() == "my notes\n"


def test_a_published_folder_never_follows_a_link_it_did_not_make(tmp_path):
    """best_model/ or best/ re-pointed by a user at their own folder: publishing refuses (the folder stays), and
    moving the run aside moves the link, not what it points at."""
    from ERO_EGGROLL.io.disk import move_aside

    mine = tmp_path / "model-store"
    mine.mkdir()
    (mine / "weights.bin").write_text("mine")
    run = tmp_path / "run"
    run.mkdir()
    (run / "best_model").symlink_to(mine)
    staging = run / ".staging"
    staging.mkdir()
    with pytest.raises(OutputError, match="symlink to .* that this command did not make"):
        publish_dir(staging, run / "best_model")
    moved = move_aside(run / "best_model")
    assert moved.is_symlink() and (mine / "weights.bin").read_text() == "mine"
    published = run / "best"  # a link publish_dir made is replaced, its earlier version removed
    for content in ("first", "second"):
        stage = run / f".stage-{content}"
        stage.mkdir()
        (stage / "f.txt").write_text(content)
        publish_dir(stage, published)
    assert (published / "f.txt").read_text() == "second" and len(list(run.glob(".best.v*"))) == 1


def test_a_plain_folder_at_a_published_path_is_kept_aside_not_deleted(tmp_path):
    run = tmp_path / "run"
    (run / "best_model").mkdir(parents=True)
    (run / "best_model" / "notes.txt").write_text("mine")
    stage = run / ".stage"
    stage.mkdir()
    (stage / "f.txt").write_text("new")
    publish_dir(stage, run / "best_model")
    assert (run / "best_model" / "f.txt").read_text() == "new"
    kept = [p for p in run.iterdir() if p.name.startswith("best_model.old-")]
    assert len(kept) == 1 and (kept[0] / "notes.txt").read_text() == "mine"
