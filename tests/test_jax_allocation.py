"""JAX beside torch on one GPU: every entry point makes JAX allocate on demand before JAX starts."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

from ERO_EGGROLL.config import ROOT

VARIABLE = "XLA_PYTHON_CLIENT_PREALLOCATE"


@pytest.mark.parametrize("user_value, expected", [(None, "false"), ("true", "true")])
def test_importing_the_package_turns_preallocation_off_unless_the_user_chose(user_value, expected):
    env = {k: v for k, v in os.environ.items() if k != VARIABLE}
    if user_value is not None:
        env[VARIABLE] = user_value
    code = "import os, sys, ERO_EGGROLL; print(os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE'), 'jax' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [expected, "False"]  # set before anything imported JAX


def _top_level_imports(source: str) -> list[str]:
    """Module names imported at module level (including inside top-level if/try blocks), in order."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append((node.lineno, node.module))
    return [name for _, name in sorted(names)]


def _entry_point_sources() -> dict[str, str]:
    scripts = [*(ROOT / "scripts").glob("*.py"), *(ROOT / "scripts" / "bench").glob("*.py")]
    sources = {p.name: p.read_text() for p in sorted(scripts)}
    sources["arc_evolution_single_gpu.py"] = (ROOT / "ERO_EGGROLL" / "arc_evolution_single_gpu.py").read_text()
    notebook = json.loads((ROOT / "notebooks" / "bridge_inspection.ipynb").read_text())
    sources["bridge_inspection.ipynb"] = "\n".join(
        "".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"
    )
    return sources


@pytest.mark.parametrize("name, source", list(_entry_point_sources().items()))
def test_entry_points_import_the_package_before_jax(name, source):
    """Scripts run as files do not import the package implicitly: it must come before jax or hyperscalees."""
    relevant = [
        m
        for m in _top_level_imports(source)
        if m.split(".")[0] in ("jax", "hyperscalees", "ERO_EGGROLL", "bench_member")
    ]
    if relevant:
        assert relevant[0].split(".")[0] in ("ERO_EGGROLL", "bench_member"), (
            f"{name}: {relevant[0]} is imported before ERO_EGGROLL"
        )
