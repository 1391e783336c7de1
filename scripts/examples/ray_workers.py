"""EGGROLL with Ray workers: only fitness scalars travel, never weights or noise.

    pip install ray                    # not a dependency of the package
    python scripts/examples/ray_workers.py [--workers 2] [--epochs 20]

Every worker holds its own copy of the network and a Perturber built with the same seed. The driver
asks each worker to score a share of the population; the fitness vectors come back (64 floats),
and every worker then applies the same update. The noise and the update are pure functions of
(seed, epoch, member, fitness), so the replicas stay identical bit for bit without any weight
broadcast (the script checks it at the end). EvoTorch's Ray actors instead ship each member's
parameter vector.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mlp_regression import make_batch  # noqa: E402

POPULATION = 32


def build_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
    )


class Worker:
    """One replica: scores its members, then applies the shared update."""

    def __init__(self):
        import ERO_EGGROLL  # noqa: F401  (before JAX: GPU memory on demand)
        from ERO_EGGROLL import Perturber

        torch.set_num_threads(1)
        self.net = build_net()
        self.perturber = Perturber.for_module(
            self.net, population_size=POPULATION, rank=2, sigma=0.05, lr=0.03, optimizer="adam"
        )

    def score(self, epoch: int, members: list[int]) -> list[float]:
        x, y = make_batch(epoch)
        out = []
        for i in members:
            with self.perturber.member(epoch, i), torch.no_grad():
                out.append(-float(torch.nn.functional.mse_loss(self.net(x), y)))
        return out

    def update(self, fitness: list[float], epoch: int) -> None:
        self.perturber.update(fitness, epoch)

    def held_out(self) -> tuple[float, str]:
        from ERO_EGGROLL.core.digest import tensor_digest

        x, y = make_batch(-1)
        with torch.no_grad():
            loss = float(torch.nn.functional.mse_loss(self.net(x), y))
        return loss, tensor_digest(torch.nn.utils.parameters_to_vector(self.net.parameters()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    try:
        import ray
    except ImportError:
        sys.exit("this example needs Ray: pip install ray")
    ray.init(
        num_cpus=args.workers,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": ":".join(sys.path)}},
    )
    workers = [ray.remote(num_cpus=1)(Worker).remote() for _ in range(args.workers)]
    shares = [list(range(POPULATION))[k :: args.workers] for k in range(args.workers)]
    print(f"held-out MSE before: {ray.get(workers[0].held_out.remote())[0]:.4f}")
    for epoch in range(args.epochs):
        parts = ray.get([w.score.remote(epoch, share) for w, share in zip(workers, shares)])
        fitness = [0.0] * POPULATION
        for share, part in zip(shares, parts):
            for i, f in zip(share, part):
                fitness[i] = f
        ray.get([w.update.remote(fitness, epoch) for w in workers])
    results = ray.get([w.held_out.remote() for w in workers])
    print(
        f"held-out MSE after {args.epochs} epochs: {results[0][0]:.4f}; replicas identical: "
        f"{len({d for _, d in results}) == 1}"
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
