"""scripts/gpu_check.py --cpu: every part a CPU can run, end to end, into one JSON report; --parts runs some again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import run_script

from ERO_EGGROLL.config import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.py"


def test_gpu_check_runs_end_to_end_on_the_cpu_and_its_cuda_tests_skip_with_a_reason(tmp_path):
    """In two calls, as a user reruns one failed part: the second keeps the first's parts and their order."""
    out = tmp_path / "gpu_check.json"
    code, printed, err = run_script(SCRIPT, "--cpu", "--out", str(out), "--parts", "rehearsal,cuda_tests")
    assert code == 0, printed[-4000:] + err[-2000:]
    first = json.loads(out.read_text())["parts"]
    assert list(first) == ["rehearsal", "cuda_tests"]
    code, printed, err = run_script(
        SCRIPT, "--cpu", "--out", str(out), "--parts", "population_benchmark,jax_beside_torch"
    )
    assert code == 0, printed[-4000:] + err[-2000:]
    parts = json.loads(out.read_text())["parts"]
    assert list(parts) == ["jax_beside_torch", "rehearsal", "cuda_tests", "population_benchmark"]
    assert parts["rehearsal"] == first["rehearsal"] and parts["cuda_tests"] == first["cuda_tests"]
    assert parts["jax_beside_torch"]["data"][0]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    rehearsal = parts["rehearsal"]["data"]
    assert {p["name"] for p in rehearsal["phases"]} == {"resident", "evaluation", "update"} and rehearsal["fits"]
    assert (
        "SKIPPED [" in parts["cuda_tests"]["output_tail"] and "needs a CUDA GPU" in parts["cuda_tests"]["output_tail"]
    )
    assert any("ratio to ceiling" in row for row in parts["population_benchmark"]["data"])


@pytest.mark.parametrize(
    ("existing", "args", "says"),
    [
        ('{"mode": "cuda", "parts": {}}', [], "not an earlier `gpu_check.py --cpu` report"),
        ("my notes", [], "not an earlier `gpu_check.py --cpu` report"),
        (None, ["--parts", "rehearsal,warp_drive"], "unknown part(s) warp_drive"),
    ],
)
def test_gpu_check_refuses_what_it_did_not_write_and_unknown_parts_before_running_anything(
    tmp_path, existing, args, says
):
    out = tmp_path / "gpu_check.json"
    if existing is not None:
        out.write_text(existing)
    code, printed, err = run_script(SCRIPT, "--cpu", "--out", str(out), *args)
    assert code == 2 and says in err and "==" not in printed, printed + err
    assert (out.read_text() if out.exists() else None) == existing


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: without --cpu the check would run in full")
def test_gpu_check_without_a_gpu_says_so_in_one_line():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--cpu" in done.stderr
