"""Check, bit for bit, that `hyperscalees` draws the noise of the official HyperscaleES for the same keys.

The official code (GPL-3.0) is not part of this repository: clone it yourself and name its checkout,

    git clone https://github.com/ESHyperscale/HyperscaleES /tmp/HyperscaleES
    python scripts/check_official_hyperscalees.py /tmp/HyperscaleES

For a few shapes, ranks, sigmas, epochs and members it compares, under threefry2x32 and float32 and for one
parameter key k_W, the official src/hyperscalees/noiser/eggroll.py (`get_lora_update_params`: A_scaled and B with
sigma / sqrt(rank) computed as its own `do_mm` does; `get_nonlora_update_params`: the FULL noise) with
hyperscalees.lowrank_factors and hyperscalees.full_noise.
Exit 0 when every array is bit-identical, 1 otherwise, 2 when the path is no checkout.
The official module is loaded from its file under another package name, so the two `hyperscalees` never clash;
optax, which it imports but these functions never use, is stubbed when it is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "HyperscaleES" / "src"))

import ERO_EGGROLL  # noqa: E402,F401  (first: JAX then allocates GPU memory on demand)

# isort: split
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import hyperscalees as hs  # noqa: E402

OFFICIAL_PACKAGE = "official_hyperscalees_noiser"
SHAPES = [(7, 5), (33, 64), (128, 384), (3584, 512)]
RANKS_SIGMAS = [(1, 0.3), (2, 0.02), (3, 0.123), (7, 1e-3)]
EPOCHS_MEMBERS = [(0, 0), (0, 1), (3, 6), (5, 11)]
NOISE_REUSE = (0, 1, 2)


def load_official_noiser(checkout: Path) -> types.ModuleType:
    """The official noiser/eggroll.py as `official_hyperscalees_noiser.eggroll` (its relative import resolves there)."""
    noiser = checkout / "src" / "hyperscalees" / "noiser"
    if importlib.util.find_spec("optax") is None:
        sys.modules["optax"] = types.ModuleType("optax")  # imported at the top, used only by init_noiser
    package = types.ModuleType(OFFICIAL_PACKAGE)
    package.__path__ = [str(noiser)]
    sys.modules[OFFICIAL_PACKAGE] = package
    spec = importlib.util.spec_from_file_location(f"{OFFICIAL_PACKAGE}.eggroll", noiser / "eggroll.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def mismatches(official: types.ModuleType) -> tuple[int, list[str]]:
    """(arrays compared, a line per array that differs in any bit)."""
    key = hs.param_key(hs.make_key(0, "threefry2x32"), 12345)
    compared, bad = 0, []
    for shape, (rank, sigma), (epoch, member), reuse in itertools.product(
        SHAPES, RANKS_SIGMAS, EPOCHS_MEMBERS, NOISE_REUSE
    ):
        frozen = {"rank": rank, "noise_reuse": reuse}
        param = jnp.zeros(shape, jnp.float32)
        where = f"shape {shape} rank {rank} sigma {sigma} epoch {epoch} member {member} noise_reuse {reuse}"
        # the official do_mm's scale: sigma / jnp.sqrt(rank), then A * (+-scale)
        a_off, b_off = official.get_lora_update_params(frozen, sigma / jnp.sqrt(rank), (epoch, member), param, key)
        a, b = hs.lowrank_factors(key, shape, epoch=epoch, member=member, rank=rank, sigma=sigma, noise_reuse=reuse)
        eps_off = official.get_nonlora_update_params(frozen, jnp.float32(sigma), (epoch, member), param, key)
        eps = hs.full_noise(key, shape, epoch=epoch, member=member, sigma=sigma, noise_reuse=reuse)
        for name, ours, theirs in (("A_scaled", a, a_off), ("B", b, b_off), ("FULL noise", eps, eps_off)):
            compared += 1
            ours, theirs = np.asarray(ours), np.asarray(theirs)
            if ours.dtype != theirs.dtype or ours.shape != theirs.shape or ours.tobytes() != theirs.tobytes():
                differing = int(np.sum(ours != theirs)) if ours.shape == theirs.shape else "shape"
                bad.append(f"{name} differs ({differing} of {theirs.size} values) at {where}")
    return compared, bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a clone of github.com/ESHyperscale/HyperscaleES")
    args = parser.parse_args(argv)
    if not (args.checkout / "src" / "hyperscalees" / "noiser" / "eggroll.py").is_file():
        print(
            f"error: {args.checkout} has no src/hyperscalees/noiser/eggroll.py; name a HyperscaleES clone",
            file=sys.stderr,
        )
        return 2
    official = load_official_noiser(args.checkout.resolve())
    compared, bad = mismatches(official)
    print(f"jax {jax.__version__} on {jax.default_backend()}: {compared} arrays compared, {len(bad)} differ")
    print("\n".join(bad[:20]) if bad else "every LORA factor and FULL noise array is bit-identical to the official")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
