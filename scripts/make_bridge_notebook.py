"""Writes notebooks/bridge_inspection.ipynb from the cells below (keeps the notebook diffable).

Run: python scripts/make_bridge_notebook.py   (the test suite executes the notebook it writes)
"""

import json
import sys
from pathlib import Path

import nbformat

CELLS = [
    (
        "md",
        """# Inspecting the JAX -> PyTorch bridge

EGGROLL draws each member's low-rank factors in JAX and hands them to PyTorch through DLPack.
This notebook converts real factors of a Qwen2.5-VL-7B-shaped weight in both directions and shows,
for each conversion, the dtype, shape, device, data pointers and whether the buffer was shared.""",
    ),
    (
        "code",
        """import warnings
import ERO_EGGROLL  # first: JAX then allocates GPU memory on demand instead of taking 75% of it
import jax, jax.numpy as jnp, numpy as np, torch
import hyperscalees as hs
from ERO_EGGROLL.core.bridge import inspect_conversion, jax_to_torch, torch_to_jax, shares_memory, BridgeCopyWarning

# q_proj of one Qwen2.5-VL-7B decoder layer: hidden 3584 -> 3584
shape, rank, sigma = (3584, 3584), 2, 0.01
k_w = hs.param_key(hs.make_key(0), 0)
a_scaled, b = hs.lowrank_factors(k_w, shape, epoch=0, member=1, rank=rank, sigma=sigma)
print(inspect_conversion(a_scaled))
print(inspect_conversion(b))""",
    ),
    ("md", "## bf16 factors (how the GPU model consumes them)"),
    (
        "code",
        """a_bf16 = a_scaled.astype(jnp.bfloat16)
report = inspect_conversion(a_bf16)
print(report)
assert report.zero_copy and report.dtype_out == 'bfloat16'""",
    ),
    ("md", "## The member's delta, computed in torch from the shared buffers, equals JAX's"),
    (
        "code",
        """x = torch.randn(4, shape[1])
delta_torch = (x @ jax_to_torch(b)) @ jax_to_torch(a_scaled).T
delta_jax = (jnp.asarray(x.numpy()) @ b) @ a_scaled.T
print('max |torch - jax| =', float(np.abs(delta_torch.numpy() - np.asarray(delta_jax)).max()))""",
    ),
    ("md", "## torch -> JAX: zero-copy when aligned, an announced copy when not"),
    (
        "code",
        """weight = torch.randn(512, 3584, dtype=torch.bfloat16)
print(inspect_conversion(weight))
unaligned = torch.arange(1025, dtype=torch.float32)[1:]
print(inspect_conversion(unaligned))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    torch_to_jax(unaligned)
print('warning:', caught[0].message)""",
    ),
    (
        "md",
        """## Why the views are read-only

A torch view of a JAX array aliases JAX's buffer. Writing into it changes the JAX array behind
JAX's back (JAX assumes immutability), which is why the bridge never writes through a view.""",
    ),
    (
        "code",
        """scratch = jnp.zeros(4)
view = jax_to_torch(scratch)
print('shares memory:', shares_memory(scratch, view))
safe = view.clone(); safe += 1   # the right way: clone first
print('JAX array untouched:', np.asarray(scratch))""",
    ),
]


def build() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src) for kind, src in CELLS
    ]
    return nb


def main(argv: list[str] | None = None) -> int:
    """Write the notebook, or with --check say whether the committed one's cells are this generator's."""
    out = Path(__file__).resolve().parents[1] / "notebooks" / "bridge_inspection.ipynb"
    if (argv if argv is not None else sys.argv[1:]) == ["--check"]:
        committed = [c["source"] for c in json.loads(out.read_text())["cells"]]
        if committed != [c["source"] for c in json.loads(nbformat.writes(build()))["cells"]]:
            print(f"{out} differs from its generator: run python scripts/make_bridge_notebook.py")
            return 1
        print(f"{out} matches its generator")
        return 0
    nbformat.write(build(), out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
