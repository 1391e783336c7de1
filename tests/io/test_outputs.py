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
    assert replay.main(list(argv)) == 2
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
    mark_output(staging, EXPORT_KIND, "run")
    publish_dir(staging, tmp_path / "export")
    assert check_output(tmp_path / "export", "--export", earlier_export) == tmp_path / "export"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    mark_output(elsewhere, EXPORT_KIND, "run")
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
    assert evaluate.main(["--config", str(ROOT / "configs" / "smoke.yaml"), "--out", str(tmp_path / "t")]) == 2
    assert "did not write" in capsys.readouterr().err
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


def _published_export(folder: Path, owner: str | None, files: dict[str, str]) -> None:
    """An export as publish_dir leaves it, marked for `owner` (None: a mark from before marks named their run)."""
    import json

    from ERO_EGGROLL.io.disk import OUTPUT_MARK

    staging = folder.with_name(f".{folder.name}.staging")
    staging.mkdir(parents=True)
    for name, text in files.items():
        (staging / name).write_text(text)
    if owner is None:
        (staging / OUTPUT_MARK).write_text(json.dumps({"kind": EXPORT_KIND}) + "\n")
    else:
        mark_output(staging, EXPORT_KIND, owner)
    publish_dir(staging, folder)


def test_an_export_of_another_run_is_replaced_only_when_asked_and_then_kept_aside(run_folder, tmp_path, capsys):
    """replay checkpoints/A --export checkpoints/B/best_model deleted run B's model: each export now names its run,
    and another run's (or an unnamed older mark's) is refused unless --replace-other-run, which keeps it aside."""
    b_model = tmp_path / "checkpoints" / "B" / "best_model"
    _published_export(b_model, str((tmp_path / "checkpoints" / "B").resolve()), {"README.md": "run B\n"})
    old = tmp_path / "old_export"
    _published_export(old, None, {"README.md": "old\n"})
    before = snapshot(tmp_path / "checkpoints" / "B"), snapshot(old)
    assert f"holds the exported model of run {b_model.parent.resolve()}, not of " in refused(
        capsys, str(run_folder), "--export", str(b_model)
    )
    assert "a run it does not name (marked by an older version)" in refused(
        capsys, str(run_folder), "--export", str(old)
    )
    assert (snapshot(tmp_path / "checkpoints" / "B"), snapshot(old)) == before
    from ERO_EGGROLL.model.export import _keep_earlier

    replay.check_other_run(b_model, run_folder.resolve(), replace_other_run=True)  # asked: allowed
    kept = _keep_earlier(b_model, str(run_folder.resolve()))  # where export_model puts run B's model meanwhile
    assert kept is not None and kept.name.startswith("best_model.old-") and "it was made for" in capsys.readouterr().err
    replay.check_other_run(b_model, b_model.parent.resolve(), replace_other_run=False)  # run B's own: no flag needed


def test_a_users_file_in_an_earlier_export_is_kept_aside(tmp_path, capsys):
    """D/NOTES.md, put by a user into an export, was deleted when the next export replaced D."""
    from ERO_EGGROLL.model.export import _keep_earlier

    out = tmp_path / "D"
    _published_export(out, "run", {"README.md": "first\n"})
    assert _keep_earlier(out, "run") is None  # nothing added: the earlier version is ours to delete
    (out / "NOTES.md").write_text("my notes\n")
    kept = _keep_earlier(out, "run")
    assert kept is not None and "it holds NOTES.md, which no export wrote" in capsys.readouterr().err
    _published_export_again = tmp_path / ".D.next"
    _published_export_again.mkdir()
    publish_dir(_published_export_again, out, previous_to=kept)
    assert (kept / "NOTES.md").read_text() == "my notes\n" and not (out / "NOTES.md").exists()


def test_the_clean_up_removes_only_its_own_version_names(tmp_path):
    """A hidden `.NAME.v<anything>` folder beside the target was deleted with the leftover versions."""
    target = tmp_path / "export"
    mine = [tmp_path / ".export.v2-mine", tmp_path / ".export.v1", tmp_path / ".export.vault"]
    for folder in mine:
        folder.mkdir()
        (folder / "keep.txt").write_text("mine")
    orphan = tmp_path / f".export.v{10**18 + 7}"  # what a crash before a swap leaves: publish_dir's own name
    orphan.mkdir()
    staging = tmp_path / ".staging"
    staging.mkdir()
    publish_dir(staging, target)
    assert all((folder / "keep.txt").read_text() == "mine" for folder in mine) and not orphan.exists()


def test_export_and_out_at_one_path_are_refused(run_folder, tmp_path, capsys):
    same = tmp_path / "D" / "same"
    assert "are one path or one inside the other" in refused(
        capsys, str(run_folder), "--export", str(same), "--out", str(same)
    )
    assert "one inside the other" in refused(
        capsys, str(run_folder), "--export", str(same), "--out", str(same / "w.safetensors")
    )
    assert not (tmp_path / "D").exists()


def test_the_evaluators_two_tables_are_both_new_or_both_as_before(tmp_path, monkeypatch):
    """arc_evaluator --out wrote the .csv in place, then failed on the .md: a new .csv beside an old .md."""
    from ERO_EGGROLL.evaluation.evaluator import write_table

    row = {"task": "t", "id": "x", "char_similarity": 0.5, "cell_accuracy": 0.5, "exact": 0.0, "answer_logprob": -1.0}
    csv_path, md_path = write_table([row], tmp_path / "table")
    before = csv_path.read_bytes(), md_path.read_bytes()

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)  # the .md's write fails, after the .csv's
    with pytest.raises(WriteError, match="No space left on device"):
        write_table([dict(row, exact=1.0)], tmp_path / "table")
    assert (csv_path.read_bytes(), md_path.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv", "table.md"]


def test_a_failed_rename_puts_back_the_files_already_renamed(tmp_path, monkeypatch):
    """write_files: when the second rename fails, the first target gets its old file back."""
    from ERO_EGGROLL.io import disk

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("old a")
    b.write_text("old b")
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if Path(dst) == b and ".tmp-" in str(src):  # the new b cannot be put in place
            raise OSError(30, "Read-only file system")
        real(src, dst)

    monkeypatch.setattr(disk.os, "replace", replace)
    with pytest.raises(WriteError, match="Read-only file system"):
        disk.write_files({a: lambda p: p.write_text("new a"), b: lambda p: p.write_text("new b")})
    assert (a.read_text(), b.read_text()) == ("old a", "old b") and sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt"]
