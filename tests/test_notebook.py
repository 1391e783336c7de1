"""The bridge-inspection notebook runs headlessly and stays in step with its generator."""

import nbformat
from conftest import run_script
from nbclient import NotebookClient

from ERO_EGGROLL.config import ROOT

NOTEBOOK = ROOT / "notebooks" / "bridge_inspection.ipynb"


def test_notebook_executes_and_reports_zero_copy(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    assert "jax->torch: float32 -> float32 (3584, 2)" in text
    assert "zero-copy" in text and "COPIED" in text  # the unaligned tensor is announced as copied
    assert "JAX array untouched: [0. 0. 0. 0.]" in text


def test_committed_notebook_matches_its_generator():
    code, out, _ = run_script(ROOT / "scripts" / "make_bridge_notebook.py", "--check")
    assert code == 0 and "matches its generator" in out, out
