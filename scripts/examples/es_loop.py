"""The ask/tell loop the examples share: every member scored on the same batch, then one EGGROLL update.

Fitness is minus the loss, so the update climbs towards lower loss. Members run one at a time here
(`perturber.member`); `perturber.members(epoch, ids)` scores several in one batch instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

import ERO_EGGROLL  # noqa: F401  (before JAX: GPU memory on demand)
from ERO_EGGROLL.core.perturber import Perturber


def evolve(net: torch.nn.Module, batch: Callable[[int], tuple], loss: Callable, epochs: int, **options) -> dict:
    """Evolve `net` for `epochs` on batch(epoch); returns the loss on a held-out batch before and after."""
    perturber = Perturber.for_module(net, **options)
    population = perturber.evo.population_size
    net.eval()
    held_out = batch(-1)
    with torch.no_grad():
        before = float(loss(net(held_out[0]), held_out[1]))
    start = time.perf_counter()
    for epoch in range(epochs):
        x, y = batch(epoch)
        fitness = []
        for i in range(population):
            with perturber.member(epoch, i), torch.no_grad():
                fitness.append(-float(loss(net(x), y)))
        perturber.update(fitness, epoch)
    perturber.remove_hooks()
    with torch.no_grad():
        after = float(loss(net(held_out[0]), held_out[1]))
    return {"before": before, "after": after, "seconds": time.perf_counter() - start}
