"""Every command lives in cli/ and goes through the one error wrapper; the names users know stay doors to it."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest

import ERO_EGGROLL.cli
from ERO_EGGROLL.cli.common import command
from ERO_EGGROLL.config import ROOT
from ERO_EGGROLL.core.errors import EggrollError

PACKAGE = ROOT / "ERO_EGGROLL"
CLI = PACKAGE / "cli"
# the `python -m ERO_EGGROLL.<name>` (or by path) names of README's command table, and the cli module each opens
DOORS = {
    "arc_evolution_single_gpu.py": "train",
    "replay.py": "replay",
    "doctor.py": "doctor",
    "arc_evaluator.py": "evaluate",
    "arc_task.py": "render_task",
    "qwen_param_mapper.py": "param_mapper",
    "config/__main__.py": "show_config",
    "memory/__main__.py": "memory",
}


def test_argument_parsing_happens_only_in_cli():
    outside = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if CLI not in p.parents and "argparse" in p.read_text()
    ]
    assert outside == []


@pytest.mark.parametrize("door", sorted(DOORS))
def test_each_door_only_opens_its_cli_command(door):
    imports = [
        line.partition("  #")[0]
        for line in (PACKAGE / door).read_text().splitlines()
        if line.startswith(("from ", "import ")) and line not in ("import sys", "from pathlib import Path")
    ]
    assert imports == [f"from ERO_EGGROLL.cli.{DOORS[door]} import main"]


def test_every_cli_command_is_wrapped():
    commands = [m.name for m in pkgutil.iter_modules(ERO_EGGROLL.cli.__path__) if m.name != "common"]
    for name in commands:
        main = getattr(importlib.import_module(f"ERO_EGGROLL.cli.{name}"), "main", None)
        if main is not None:
            assert getattr(main, "__wrapped__", None) is not None, f"cli/{name}.main is not wrapped by command"
    assert set(DOORS.values()) <= set(commands)


def test_the_wrapper_prints_a_refusal_as_one_line_with_exit_2(capsys):
    @command
    def refuse(argv):
        raise EggrollError("evolution.rank 0 is not a rank: give an integer >= 1")

    assert refuse([]) == 2
    assert capsys.readouterr().err == "error: evolution.rank 0 is not a rank: give an integer >= 1\n"


def test_the_wrapper_leaves_real_bugs_their_traceback():
    @command
    def bug(argv):
        raise KeyError("not an input problem")

    with pytest.raises(KeyError):
        bug([])


def test_every_command_refuses_a_missing_config_in_one_line(tmp_path):
    from conftest import run_module

    missing = str(tmp_path / "nope.yaml")
    for module in ("ERO_EGGROLL.config", "ERO_EGGROLL.memory", "ERO_EGGROLL.qwen_param_mapper"):
        code, _, err = run_module(module, "--config", missing)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "nope.yaml" in err, (module, err)


def test_doors_exist():
    assert all((PACKAGE / door).is_file() for door in DOORS)
    assert Path(ERO_EGGROLL.cli.__file__).parent == CLI
