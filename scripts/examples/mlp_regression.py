"""EGGROLL trains a small MLP from scratch on a synthetic regression task, no gradients (CPU, seconds).

    python scripts/examples/mlp_regression.py [--epochs 150]

Target: y = sin(2 x1) cos(x2) + 0.5 x3 on x ~ N(0, 1)^4. Linear weights evolve as rank-2 LORA,
biases as FULL noise. Prints the held-out mean squared error before and after.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from es_loop import evolve  # noqa: E402


def make_batch(epoch: int, size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh batch per epoch (epoch -1: the held-out batch), from a seeded generator."""
    g = torch.Generator().manual_seed(10_000 + epoch)
    x = torch.randn(size, 4, generator=g)
    return x, (torch.sin(2 * x[:, 0]) * torch.cos(x[:, 1]) + 0.5 * x[:, 2]).unsqueeze(1)


def run(epochs: int) -> dict:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
    )
    return evolve(
        net,
        make_batch,
        torch.nn.functional.mse_loss,
        epochs,
        population_size=32,
        rank=2,
        sigma=0.05,
        lr=0.03,
        optimizer="adam",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    torch.set_num_threads(1)  # nets this small run fastest on one thread (more threads spin-wait on a busy CPU)
    parser.add_argument("--epochs", type=int, default=150)
    result = run(parser.parse_args().epochs)
    print(f"held-out MSE: {result['before']:.4f} before, {result['after']:.4f} after ({result['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
