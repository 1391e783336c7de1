"""The noise plan: which tensors evolve, with which class, key and sigma; a member's noise; one tensor's update
direction.

Everything here is a pure function of (seed, epoch, member) and the base weights' sigmas: nothing
is stored for the population. Noise comes from hyperscalees (JAX) through DLPack, drawn on the
weights' own device where JAX has it, one jitted call per group of same-shape tensors. LORA noise
is drawn for a tensor's 2-D view (`ParamSpec.matrix_shape`): a conv kernel is the matrix
(out_channels, in_channels/groups x kernel size), and its direction is reshaped back.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import torch

import hyperscalees as hs
from ERO_EGGROLL.core.bridge import jax_device_for, jax_to_torch
from ERO_EGGROLL.core.errors import EggrollError
from ERO_EGGROLL.core.settings import EvolutionSettings
from ERO_EGGROLL.core.tensor_classes import ParamClass, ParamSpec

LowRank = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (A_scaled (m, r), B (n, r)), weights' dtype and device
Dense = dict[str, torch.Tensor]  # name -> FULL noise, float32


def tensor_sigma(weight: torch.Tensor, evo: EvolutionSettings) -> float:
    """Absolute sigma; relative: sigma x std(W) of the base weight (rms(W) when std is 0, e.g. fresh norms);
    signed_mean: sigma x |mean(W)| (ERO's std.json read as per-tensor means; the sign of a scale on symmetric
    noise only swaps a member with its antithetic partner, so the magnitude is the whole rule). An all-zero tensor
    (a fresh LayerNorm bias) has no scale to be relative to: its sigma is 0, so it stays as it is (NoisePlan warns)."""
    if evo.sigma_mode == "absolute":
        return evo.sigma
    # float64 on the host in NumPy's fixed summation order: torch's reductions split the work by thread count, so the
    # last bits (and a resumed run's identity) would depend on how many threads computed them
    w = weight.detach().to("cpu", torch.float64).numpy()
    if evo.sigma_mode == "signed_mean":  # a mean of exactly 0 (fresh biases) gives 0: ERO would not move that tensor
        return evo.sigma * abs(float(w.mean()))
    scale = float(w.std(ddof=1)) if w.size > 1 else 0.0
    if scale == 0.0:
        scale = float(np.sqrt(np.mean(np.square(w))))
    return evo.sigma * scale


class StillTensorWarning(UserWarning):
    """Tensors whose scaled sigma is 0 (all zeros under sigma_mode relative, a zero mean under signed_mean): they are
    never perturbed and never move."""


def _warn_still(sigmas: dict[str, float], mode: str) -> None:
    still = [name for name, sigma in sigmas.items() if sigma == 0.0]
    if still:
        shown = ", ".join(still[:5]) + (f" and {len(still) - 5} more" if len(still) > 5 else "")
        warnings.warn(
            f"sigma_mode {mode!r} gives {shown} a sigma of 0 ({'all zeros' if mode == 'relative' else 'a zero mean'}: "
            "nothing to scale by), so they stay as they are; use an absolute sigma to evolve them, or make them FROZEN",
            StillTensorWarning,
            stacklevel=4,
        )


@dataclass
class _Group:
    """Same-shape tensors of one class, whose noise is drawn in one jitted call."""

    shape: tuple[int, ...]
    names: list[str]
    keys: jax.Array  # stacked JAX keys
    base_sigmas: np.ndarray


class NoisePlan:
    """The evolving tensors of a model and their noise, from the base weights, the evolution settings and the seed."""

    def __init__(
        self, specs: list[ParamSpec], weights: Mapping[str, torch.Tensor], evo: EvolutionSettings, seed: int
    ) -> None:
        self.rank, self.noise_reuse, self.sigma_decay, self.prng_impl = (
            evo.rank,
            evo.noise_reuse,
            evo.sigma_decay,
            evo.prng_impl,
        )
        self.antithetic = evo.antithetic
        self.specs = {s.name: s for s in specs if s.cls is not ParamClass.FROZEN}
        self.keys = self._keys(seed)
        self.sigma = {name: tensor_sigma(weights[name], evo) for name in self.specs}  # from the BASE weights, once
        _warn_still(self.sigma, evo.sigma_mode)
        self.dtypes = {name: weights[name].dtype for name in self.specs}
        self.device = next(iter(weights.values())).device if weights else torch.device("cpu")
        grouped: dict[tuple[ParamClass, tuple[int, ...]], list[str]] = defaultdict(list)
        for name, s in self.specs.items():
            grouped[(s.cls, s.matrix_shape if s.cls is ParamClass.LORA else s.shape)].append(name)
        self.groups: dict[ParamClass, list[_Group]] = {ParamClass.LORA: [], ParamClass.FULL: []}
        for (cls, shape), names in grouped.items():
            keys = jnp.stack([self.keys[n] for n in names])
            self.groups[cls].append(_Group(shape, names, keys, np.array([self.sigma[n] for n in names])))
        self.seed = seed
        self._jax_device = jax_device_for(self.device)  # noise is drawn where the weights live, when JAX can reach it
        self.contract_in_torch = self._jax_device is None

    def set_sigmas(self, sigmas: dict[str, float]) -> None:
        """New base sigmas (adapted ones, or a checkpoint's), for the noise and the update alike."""
        unknown = set(sigmas) - set(self.specs)
        if unknown:
            raise EggrollError(f"sigmas for tensors this plan does not evolve: {sorted(unknown)}")
        self.sigma.update({name: float(value) for name, value in sigmas.items()})
        for groups in self.groups.values():
            for g in groups:
                g.base_sigmas = np.array([self.sigma[n] for n in g.names])

    def _keys(self, seed: int) -> dict[str, jax.Array]:
        base_key = hs.make_key(seed, self.prng_impl)
        return {name: hs.param_key(base_key, s.key_index) for name, s in self.specs.items()}

    def reseed(self, seed: int) -> None:
        """Draw all later noise from `seed` (ERO's seed move at a reset); sigmas stay the base weights'. Rebinds, never
        mutates, the key containers, so a shallow copy of the plan (Perturber.with_fresh_optimizer) keeps its seed."""
        if seed == self.seed:
            return
        self.seed, self.keys = seed, self._keys(seed)
        self.groups = {
            cls: [_Group(g.shape, g.names, jnp.stack([self.keys[n] for n in g.names]), g.base_sigmas) for g in groups]
            for cls, groups in self.groups.items()
        }

    def drawn_member(self, member: int) -> int:
        """The keyed member whose noise member `member` gets: itself, or without antithetic pairs the even 2 x member
        (every member its own independent draw, as ERO samples)."""
        return member if self.antithetic else 2 * member

    def _weights_for_draws(self, fitness: np.ndarray) -> np.ndarray:
        """Fitness weights over the keyed members drawn: without antithetic pairs, w_i sqrt(2) at 2i and 0 at the odd
        ones, so the contraction's 1/sqrt(2N) over 2N draws is the population's 1/sqrt(N) over its own N."""
        if self.antithetic:
            return fitness
        out = np.zeros(2 * len(fitness), dtype=np.float32)
        out[0::2] = np.asarray(fitness, dtype=np.float32) * np.float32(math.sqrt(2))
        return out

    def names(self, cls: ParamClass) -> list[str]:
        return [n for g in self.groups[cls] for n in g.names]

    def sigma_scale(self, epoch: int) -> float:
        return self.sigma_decay**epoch

    def _jax_placement(self) -> contextlib.AbstractContextManager[object]:
        """JAX computations go to the weights' own device where JAX has it (a no-op context elsewhere)."""
        return jax.default_device(self._jax_device) if self._jax_device is not None else contextlib.nullcontext()

    def member_noise(self, epoch: int, member: int) -> tuple[LowRank, Dense]:
        """LORA factors (A_scaled, B) in the weights' dtype and device, and FULL noise in float32 on their
        device (FULL noise is added in fp32 and rounded once into the weight)."""
        scale, member = self.sigma_scale(epoch), self.drawn_member(member)
        lora: LowRank = {}
        full: Dense = {}
        with self._jax_placement():
            for g in self.groups[ParamClass.LORA]:
                a, b = hs.stacked_lowrank_factors(
                    g.keys,
                    g.shape,
                    epoch=epoch,
                    member=member,
                    rank=self.rank,
                    sigmas=g.base_sigmas * scale,
                    noise_reuse=self.noise_reuse,
                )
                a_t, b_t = jax_to_torch(a), jax_to_torch(b)
                for k, name in enumerate(g.names):
                    dtype = self.dtypes[name]
                    lora[name] = (
                        a_t[k].to(device=self.device, dtype=dtype),
                        b_t[k].to(device=self.device, dtype=dtype),
                    )
            for g in self.groups[ParamClass.FULL]:
                eps = jax_to_torch(
                    hs.stacked_full_noise(
                        g.keys,
                        g.shape,
                        epoch=epoch,
                        member=member,
                        sigmas=g.base_sigmas * scale,
                        noise_reuse=self.noise_reuse,
                    )
                )
                for k, name in enumerate(g.names):
                    full[name] = eps[k].to(self.device)
        return lora, full

    def direction(self, name: str, fitness: np.ndarray, epoch: int) -> torch.Tensor:
        """The fp32 ascent direction of one tensor (its own shape), regenerated from keys.

        Where JAX reaches the weights' device: hyperscalees' fused contraction there, handed over
        zero-copy by DLPack. Where it does not (CUDA weights, CPU-only JAX): only the small factors
        cross to the device and torch contracts them there, never moving an (m, n) buffer."""
        spec, key, sigma = self.specs[name], self.keys[name], self.sigma[name] * self.sigma_scale(epoch)
        fitness = self._weights_for_draws(fitness)
        if sigma == 0.0:  # a zero-mean (signed_mean) or all-zero (relative) tensor: never perturbed, never moved
            return torch.zeros(spec.shape, dtype=torch.float32, device=self.device)
        with self._jax_placement():
            if spec.cls is ParamClass.LORA and self.contract_in_torch:
                a, b = hs.population_lowrank_factors(
                    key,
                    spec.matrix_shape,
                    epoch=epoch,
                    members=np.arange(len(fitness)),
                    rank=self.rank,
                    sigma=sigma,
                    noise_reuse=self.noise_reuse,
                )
                f = torch.as_tensor(fitness, dtype=torch.float32, device=self.device)
                a_t, b_t = jax_to_torch(a).to(self.device), jax_to_torch(b).to(self.device)
                return (torch.einsum("nir,njr->ij", f[:, None, None] * a_t, b_t) / math.sqrt(len(fitness))).view(
                    spec.shape
                )
            if spec.cls is ParamClass.LORA:
                delta = hs.lowrank_update(
                    key,
                    spec.matrix_shape,
                    fitness,
                    epoch=epoch,
                    rank=self.rank,
                    sigma=sigma,
                    noise_reuse=self.noise_reuse,
                )
            else:
                delta = hs.full_update(key, spec.shape, fitness, epoch=epoch, sigma=sigma, noise_reuse=self.noise_reuse)
            return jax_to_torch(delta).to(self.device).view(spec.shape)

    def direction_sq_norm(self, name: str, fitness: np.ndarray, epoch: int) -> float:
        """||direction||^2 without the (m, n) buffer for LORA tensors (FULL tensors are small)."""
        spec = self.specs[name]
        if spec.cls is ParamClass.LORA and self.sigma[name] != 0.0:
            with self._jax_placement():
                return float(
                    hs.lowrank_update_sq_norm(
                        self.keys[name],
                        spec.matrix_shape,
                        self._weights_for_draws(fitness),
                        epoch=epoch,
                        rank=self.rank,
                        sigma=self.sigma[name] * self.sigma_scale(epoch),
                        noise_reuse=self.noise_reuse,
                    )
                )
        return float(torch.linalg.vector_norm(self.direction(name, fitness, epoch))) ** 2
