"""Exact member perturbation and the fused EGGROLL update for a torch model.

`with perturber.member(epoch, i):` makes the model behave as W + E_i; on exit every parameter is
bit-identical to before. LORA weights under the `forward` strategy are never touched: their
Linear adds x B A_s^T in its forward. Under `inplace` they are modified and restored from an
exact saved copy (pinned host memory on GPU). FULL tensors always get their dense noise in
place and are restored from an exact copy. Noise comes from hyperscalees through DLPack, one
jitted call per group of same-shape tensors.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import torch

import hyperscalees as hs

from .config import Config
from .es_optimizer import EsOptimizer, apply_change, clip_scale, rounding_generator
from .pytorch_jax_bridge import jax_device_for, jax_to_torch
from .qwen_param_mapper import ParamClass, ParamSpec, classify_model


@dataclass
class _Group:
    """Same-shape tensors of one class, whose noise is drawn in one jitted call."""

    shape: tuple[int, ...]
    names: list[str]
    keys: object  # stacked JAX keys
    base_sigmas: np.ndarray


def _tensor_sigma(weight: torch.Tensor, cfg: Config) -> float:
    """Absolute sigma, or relative: sigma x std(W) of the base weight (rms(W) when std is 0, e.g. fresh norms)."""
    evo = cfg.evolution
    if evo.sigma_mode == "absolute":
        return evo.sigma
    w = weight.detach().double()
    scale = float(w.std()) if w.numel() > 1 else 0.0
    if scale == 0.0:
        scale = float(w.pow(2).mean().sqrt())
    if scale == 0.0:
        raise ValueError("relative sigma needs a non-zero weight; this tensor is all zeros (use an absolute sigma or freeze it)")
    return evo.sigma * scale


class Perturber:
    """Applies member noise to `model` and moves its weights with the ES update."""

    def __init__(self, model: torch.nn.Module, cfg: Config, specs: list[ParamSpec] | None = None):
        self.model, self.cfg = model, cfg
        evo = cfg.evolution
        self.rank, self.noise_reuse, self.strategy = evo.rank, evo.noise_reuse, evo.strategy
        self.specs = specs if specs is not None else classify_model(model, cfg)
        self.classes = {s.name: s.cls for s in self.specs}
        params = dict(model.named_parameters())
        self.params = {s.name: params[s.name] for s in self.specs if s.cls is not ParamClass.FROZEN}
        base_key = hs.make_key(cfg.seed, evo.prng_impl)
        self.sigma = {}
        groups: dict[tuple, list[ParamSpec]] = defaultdict(list)
        for spec in self.specs:
            if spec.cls is ParamClass.FROZEN:
                continue
            self.sigma[spec.name] = _tensor_sigma(params[spec.name], cfg)
            groups[(spec.cls, spec.shape)].append(spec)
        self.groups: dict[ParamClass, list[_Group]] = {ParamClass.LORA: [], ParamClass.FULL: []}
        for (cls, shape), members in groups.items():
            keys = jnp.stack([hs.param_key(base_key, s.key_index) for s in members])
            self.groups[cls].append(_Group(shape, [s.name for s in members], keys, np.array([self.sigma[s.name] for s in members])))
        self.param_keys = {s.name: hs.param_key(base_key, s.key_index) for s in self.specs if s.cls is not ParamClass.FROZEN}
        self.key_index = {s.name: s.key_index for s in self.specs if s.cls is not ParamClass.FROZEN}
        device = next(iter(self.params.values())).device if self.params else torch.device("cpu")
        self._jax_device = jax_device_for(device)  # noise is drawn where the weights live, when JAX can reach it
        self._contract_in_torch = self._jax_device is None
        self.optimizer = EsOptimizer(evo.optimizer, evo.lr, evo.weight_decay)
        self._active: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # one member: (A_s, B) per LORA weight
        self._stacked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # K members: (K, m, r), (K, n, r)
        self._stacked_full: dict[str, torch.Tensor] = {}  # K members' FULL noise: (K, *shape)
        self._saved = {name: self._backup_buffer(p) for name, p in self.params.items()
                       if self.classes[name] is ParamClass.FULL or self.strategy == "inplace"}
        self._unbatchable: str | None = None  # a FULL tensor the per-row hooks cannot perturb
        self._hooks = [] if self.strategy == "inplace" else self._install_forward_hooks()

    # --- bookkeeping ---------------------------------------------------------------------------
    def _jax_placement(self):
        """JAX computations go to the weights' own device where JAX has it (a no-op context elsewhere)."""
        return jax.default_device(self._jax_device) if self._jax_device is not None else contextlib.nullcontext()

    @staticmethod
    def _backup_buffer(p: torch.Tensor) -> torch.Tensor:
        if p.device.type == "cuda":
            return torch.empty(p.shape, dtype=p.dtype, pin_memory=True)  # host copy: GPU memory does not double
        return torch.empty_like(p)

    def sigma_scale(self, epoch: int) -> float:
        return self.cfg.evolution.sigma_decay ** epoch

    def lr_at(self, epoch: int) -> float:
        return self.cfg.evolution.lr * self.cfg.evolution.lr_decay ** epoch

    @property
    def lora_names(self) -> list[str]:
        return [n for g in self.groups[ParamClass.LORA] for n in g.names]

    @property
    def full_names(self) -> list[str]:
        return [n for g in self.groups[ParamClass.FULL] for n in g.names]

    def _install_forward_hooks(self):
        modules = dict(self.model.named_modules())
        hooks = []
        for name in self.lora_names:
            module = modules[name.removesuffix(".weight")]
            if not isinstance(module, torch.nn.Linear) or not name.endswith(".weight"):
                raise TypeError(f"LORA tensor {name} does not belong to an nn.Linear; the forward strategy cannot perturb it (use strategy: inplace)")
            hooks.append(module.register_forward_hook(self._make_lora_hook(name)))
        for name in self.full_names:  # FULL noise per row: only used when several members share a batch
            owner = modules[name.rsplit(".", 1)[0]]
            if isinstance(owner, torch.nn.Linear) and name.endswith(".bias"):
                hooks.append(owner.register_forward_hook(self._make_bias_hook(name)))
            elif name.endswith(".weight") and hasattr(owner, "variance_epsilon"):
                hooks.append(owner.register_forward_hook(self._make_rmsnorm_hook(name)))
            else:
                self._unbatchable = name
        return hooks

    def _make_lora_hook(self, name: str):
        def add_low_rank_delta(module, inputs, output):
            if name in self._stacked:  # K members, rows member-major: (K*P, T, n) -> (K, P*T, n)
                a_stack, b_stack = self._stacked[name]
                k = a_stack.shape[0]
                x = inputs[0].reshape(k, -1, inputs[0].shape[-1])
                delta = torch.bmm(torch.bmm(x, b_stack), a_stack.transpose(1, 2))
                return output + delta.reshape(output.shape)
            factors = self._active.get(name)
            if factors is None:
                return output
            a_scaled, b = factors
            return output + (inputs[0] @ b) @ a_scaled.T

        return add_low_rank_delta

    def _rows(self, name: str, output: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(K, *shape) per-member values broadcast over the (K*P, T, ...) rows of `output`."""
        values = self._stacked_full[name]
        k = values.shape[0]
        return values.reshape(k, 1, *([1] * (output.dim() - 2)), values.shape[-1]), k

    def _make_bias_hook(self, name: str):
        def add_bias_noise(module, inputs, output):
            if name not in self._stacked_full:
                return output
            eps, k = self._rows(name, output)
            return (output.reshape(k, -1, *output.shape[1:]) + eps.to(output.dtype)).reshape(output.shape)

        return add_bias_noise

    def _make_rmsnorm_hook(self, name: str):
        """Recompute the norm with each member's weight, exactly as the module would with that weight in place."""
        def per_member_norm(module, inputs, output):
            if name not in self._stacked_full:
                return output
            x = inputs[0]
            h = x.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
            eps, k = self._rows(name, output)
            weights = (module.weight.float() + eps).to(module.weight.dtype)
            return (weights * h.to(x.dtype).reshape(k, -1, *x.shape[1:])).reshape(output.shape)

        return per_member_norm

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # --- member noise --------------------------------------------------------------------------
    def member_noise(self, epoch: int, member: int):
        """{name: (A_scaled, B)} for LORA, in the weights' dtype and device, and {name: eps} for FULL, in
        float32 (FULL noise is added in fp32 and rounded once into the weight)."""
        scale = self.sigma_scale(epoch)
        lora, full = {}, {}
        with self._jax_placement():
            for g in self.groups[ParamClass.LORA]:
                a, b = hs.stacked_lowrank_factors(g.keys, g.shape, epoch=epoch, member=member, rank=self.rank,
                                                  sigmas=g.base_sigmas * scale, noise_reuse=self.noise_reuse)
                a_t, b_t = jax_to_torch(a), jax_to_torch(b)
                for k, name in enumerate(g.names):
                    w = self.params[name]
                    lora[name] = (a_t[k].to(device=w.device, dtype=w.dtype), b_t[k].to(device=w.device, dtype=w.dtype))
            for g in self.groups[ParamClass.FULL]:
                eps = jax_to_torch(hs.stacked_full_noise(g.keys, g.shape, epoch=epoch, member=member,
                                                         sigmas=g.base_sigmas * scale, noise_reuse=self.noise_reuse))
                for k, name in enumerate(g.names):
                    full[name] = eps[k]
        return lora, full

    @contextlib.contextmanager
    def member(self, epoch: int, member: int):
        """The model as member `member` of `epoch`; exact restore on exit, even on error."""
        if not 0 <= member < self.cfg.evolution.population_size:
            raise ValueError(f"member {member} outside the population 0..{self.cfg.evolution.population_size - 1}")
        lora, full = self.member_noise(epoch, member)
        try:
            with torch.no_grad():
                for name, p in self.params.items():
                    if name in self._saved:
                        self._saved[name].copy_(p)
                for name, eps in full.items():
                    p = self.params[name]
                    p.copy_((p.float() + eps.to(p.device)).to(p.dtype))
                if self.strategy == "inplace":
                    for name, (a, b) in lora.items():
                        p = self.params[name]
                        p.copy_((p.float() + (a.float() @ b.float().T)).to(p.dtype))
                else:
                    self._active = lora
            yield self.model
        finally:
            self._active = {}
            with torch.no_grad():
                for name, saved in self._saved.items():
                    self.params[name].copy_(saved)

    @contextlib.contextmanager
    def members(self, epoch: int, member_ids):
        """K members at once, for a batch whose rows are K equal blocks, member-major (row b is member b // (rows/K)).

        LORA deltas and FULL noise are applied per row in the forward pass; no weight is modified.
        """
        member_ids = list(member_ids)
        if self.strategy != "forward":
            raise ValueError("evaluating several members per batch needs evolution.strategy: forward")
        if self._unbatchable:
            raise ValueError(f"FULL tensor {self._unbatchable} is neither a Linear bias nor an RMSNorm weight, so it cannot be "
                             "perturbed per row; freeze it (params.overrides) or use evaluation.members_per_batch: 1")
        noises = [self.member_noise(epoch, m) for m in member_ids]
        try:
            self._stacked = {name: (torch.stack([n[0][name][0] for n in noises]), torch.stack([n[0][name][1] for n in noises]))
                             for name in self.lora_names}
            self._stacked_full = {name: torch.stack([n[1][name] for n in noises]).to(self.params[name].device) for name in self.full_names}
            yield self.model
        finally:
            self._stacked, self._stacked_full = {}, {}

    # --- the update ----------------------------------------------------------------------------
    def update(self, raw_fitness, epoch: int) -> dict:
        """Normalize fitness, then move the weights one tensor at a time: regenerate its factors from
        keys, contract, let the optimizer turn the direction into a change, apply it, drop it.

        Peak extra memory is a few fp32 buffers of the largest tensor, whatever the model size. With
        `max_update_norm`, a first pass computes the global norm from the factors alone.
        """
        evo = self.cfg.evolution
        fitness = hs.normalize_fitness(raw_fitness, evo.group_size)
        if len(fitness) != evo.population_size:
            raise ValueError(f"got {len(fitness)} fitness values for a population of {evo.population_size}")
        scale = self.sigma_scale(epoch)
        norm, clip = None, 1.0  # without clipping, the norm is summed as the directions stream by
        if evo.max_update_norm is not None:
            norm = math.sqrt(sum(self._direction_sq_norm(name, fitness, epoch, scale) for name in self.params))
            clip = clip_scale(norm, evo.max_update_norm)
        self.optimizer.lr = self.lr_at(epoch)
        self.optimizer.begin_step()
        direction_sq = 0.0
        per_class: dict[str, float] = defaultdict(float)
        changed = total = 0
        intended = lost = 0.0
        # one fp32 workspace of the largest tensor's size holds each tensor's change in turn: no large
        # buffer is allocated and freed per tensor (the allocator would keep the freed ones)
        largest = max((p.numel() for p in self.params.values()), default=0)
        device = next(iter(self.params.values())).device if self.params else torch.device("cpu")
        workspace = torch.empty(largest, dtype=torch.float32, device=device)
        changed_mask = torch.empty(largest, dtype=torch.bool, device=device)
        with torch.no_grad():
            for name, w in self.params.items():
                direction = self._direction(name, fitness, epoch, scale)
                if norm is None:
                    direction_sq += float(torch.linalg.vector_norm(direction)) ** 2
                if clip != 1.0:
                    direction = direction * clip
                change = self.optimizer.change(name, direction, w, out=workspace[: w.numel()].view(w.shape))
                del direction  # frees the contraction's buffer before the change is applied
                applied = apply_change(w, change, self._rounding_generator(name, epoch, w), changed_mask[: w.numel()].view(w.shape))
                per_class[self.classes[name].value] += applied.sq_norm
                intended, lost = intended + applied.intended, lost + applied.lost
                changed, total = changed + applied.changed, total + w.numel()
        stats = {"update_norm": norm if norm is not None else math.sqrt(direction_sq), "clip_scale": clip,
                 "lr": self.optimizer.lr, "sigma_scale": scale, "normalized_fitness": fitness.tolist()}
        stats.update({f"update_norm_{k}": math.sqrt(v) for k, v in per_class.items()})
        stats["fraction_changed"] = changed / max(total, 1)
        stats["lost_update_fraction"] = lost / intended if intended else 0.0
        return stats

    def _rounding_generator(self, name: str, epoch: int, weight: torch.Tensor) -> torch.Generator | None:
        if not self.cfg.evolution.stochastic_rounding or weight.dtype != torch.bfloat16:
            return None  # only bf16 is rounded stochastically
        return rounding_generator(self.cfg.seed, epoch, self.key_index[name], weight.device)

    def _direction(self, name: str, fitness: np.ndarray, epoch: int, scale: float) -> torch.Tensor:
        """The fp32 ascent direction of one tensor, regenerated from keys.

        Where JAX reaches the weights' device: hyperscalees' fused contraction there, handed over
        zero-copy by DLPack. Where it does not (CUDA weights, CPU-only JAX): only the small factors
        cross to the device and torch contracts them there, never moving an (m, n) buffer."""
        w, key, sigma = self.params[name], self.param_keys[name], self.sigma[name] * scale
        lora = self.classes[name] is ParamClass.LORA
        with self._jax_placement():
            if lora and self._contract_in_torch:
                a, b = hs.population_lowrank_factors(key, tuple(w.shape), epoch=epoch, members=np.arange(len(fitness)),
                                                     rank=self.rank, sigma=sigma, noise_reuse=self.noise_reuse)
                f = torch.as_tensor(fitness, dtype=torch.float32, device=w.device)
                a_t, b_t = jax_to_torch(a).to(w.device), jax_to_torch(b).to(w.device)
                return torch.einsum("nir,njr->ij", f[:, None, None] * a_t, b_t) / math.sqrt(len(fitness))
            if lora:
                delta = hs.lowrank_update(key, tuple(w.shape), fitness, epoch=epoch, rank=self.rank, sigma=sigma, noise_reuse=self.noise_reuse)
            else:
                delta = hs.full_update(key, tuple(w.shape), fitness, epoch=epoch, sigma=sigma, noise_reuse=self.noise_reuse)
            return jax_to_torch(delta).to(w.device)

    def _direction_sq_norm(self, name: str, fitness: np.ndarray, epoch: int, scale: float) -> float:
        """||direction||^2 without the (m, n) buffer for LORA tensors (FULL tensors are small)."""
        w, key, sigma = self.params[name], self.param_keys[name], self.sigma[name] * scale
        if self.classes[name] is ParamClass.LORA:
            with self._jax_placement():
                return float(hs.lowrank_update_sq_norm(key, tuple(w.shape), fitness, epoch=epoch, rank=self.rank,
                                                       sigma=sigma, noise_reuse=self.noise_reuse))
        return float(torch.linalg.vector_norm(self._direction(name, fitness, epoch, scale))) ** 2

    def evolvable_state(self) -> dict[str, torch.Tensor]:
        """The evolvable tensors (what a checkpoint must hold), detached and contiguous."""
        return {name: p.detach().contiguous() for name, p in self.params.items()}
