"""scripts/bench/bench_vs_evotorch.py's new tasks: their batch-row losses score each member as it scores alone, and
one generation of each method runs; PGPE's side (EvoTorch, not installed in CI) is skipped without it."""

from __future__ import annotations

import importlib.util
import math
import runpy

import pytest
import torch
from torch import nn

from ERO_EGGROLL.config import ROOT


@pytest.fixture(scope="module")
def bench() -> dict:
    return runpy.run_path(str(ROOT / "scripts" / "bench" / "bench_vs_evotorch.py"))


class Shifted(nn.Module):
    """k different networks in one batch: the task's network with one output offset per block of rows, blocks in
    member-major order as Perturber.members lays members out."""

    def __init__(self, net: nn.Module, offsets: torch.Tensor) -> None:
        super().__init__()
        self.net, self.offsets = net, offsets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out + self.offsets.repeat_interleave(out.shape[0] // len(self.offsets), dim=0)


@pytest.mark.parametrize("name", ["cnn", "cartpole"])
def test_row_blocks_score_each_network_as_it_scores_alone(bench, name, one_torch_thread):
    """The losses ours is updated with (k members as row blocks) are, block by block, those PGPE gets from one network
    each: a layout that mixed members, images or start states up would differ here."""
    task = bench["get_task"](name)
    net, data = task.make_net(), task.batch(0)
    with torch.no_grad():
        offsets = 0.5 * torch.randn(3, net(data[0][:1] if name == "cnn" else data[:1]).shape[1])
        rows = task.losses(Shifted(net, offsets), data, 3)
        alone = [float(task.losses(Shifted(net, offsets[i : i + 1]), data, 1)[0]) for i in range(3)]
    torch.testing.assert_close(rows, torch.tensor(alone), rtol=1e-5, atol=1e-6)
    assert len(set(alone)) == 3  # the blocks really differ, so a swapped block would be caught


def test_one_generation_of_ours_runs(bench, one_torch_thread):
    task = bench["get_task"]("cartpole")
    ((seconds, loss),) = bench["run_ours"](task, 1, 0, bench["OURS_DEFAULTS"], population=4)
    assert math.isfinite(loss) and seconds > 0 and loss != task.loss(task.make_net())


@pytest.mark.skipif(importlib.util.find_spec("evotorch") is None, reason="evotorch is a benchmark-only dependency")
def test_one_generation_of_pgpe_is_one_update(bench, one_torch_thread):
    """After one scored generation PGPE's center has moved (EvoTorch's first step() only scores)."""
    task = bench["get_task"]("cnn")
    ((_, loss),) = bench["run_pgpe"](task, 1, 0, task.pgpe_grid[0], population=4)
    assert math.isfinite(loss) and loss != task.loss(task.make_net())
