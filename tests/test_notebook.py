"""The bridge-inspection notebook runs headlessly and stays in step with its generator."""

import json
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "bridge_inspection.ipynb"


def test_notebook_executes_and_reports_zero_copy(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    assert "jax->torch: float32 -> float32 (3584, 2)" in text
    assert "zero-copy" in text and "COPIED" in text  # the unaligned tensor is announced as copied
    assert "JAX array untouched: [0. 0. 0. 0.]" in text


def test_committed_notebook_matches_its_generator(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_bridge_notebook
    finally:
        sys.path.pop(0)
    committed = json.loads(NOTEBOOK.read_text())
    assert [c["source"] for c in committed["cells"]] == [
        c["source"] for c in json.loads(nbformat.writes(make_bridge_notebook.build()))["cells"]
    ]
