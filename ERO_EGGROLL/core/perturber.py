"""The Perturber: EGGROLL on a torch model, the one object the training script, replay and users call.

    perturber = Perturber.for_module(net, population_size=32, sigma=0.02, lr=0.05)   # any nn.Module
    perturber = Perturber(model, specs, settings, seed)                 # classes chosen by the caller
    with perturber.member(epoch, i):  loss_i = ...                      # the model as W + E_i, exact restore on exit
    with perturber.members(epoch, [0, 1, 2, 3]):  ...                  # 4 members as blocks of batch rows
    stats = perturber.update(fitness, epoch)                            # the streamed ES update

It composes the parts, each with one job: noise_plan (which tensors, keys, sigmas, noise and
directions), strategies (noise on the model, exact restore), streamed_update (the update step and
its optimizer state). A member never changes the model: its weights and its buffers (e.g.
BatchNorm running statistics) are restored bit for bit on exit.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import fields, replace

import torch
from torch import nn

from ERO_EGGROLL.core.errors import ConfigError
from ERO_EGGROLL.core.noise_plan import Dense, LowRank, NoisePlan
from ERO_EGGROLL.core.settings import EvolutionSettings, check_settings
from ERO_EGGROLL.core.strategies import ForwardHooks, SavedInPlace
from ERO_EGGROLL.core.streamed_update import StreamedUpdate
from ERO_EGGROLL.core.tensor_classes import Classifier, ParamClass, ParamSpec, classify_module


class Perturber:
    """Applies member noise to `model` and moves its weights with the ES update."""

    def __init__(self, model: nn.Module, specs: list[ParamSpec], settings: EvolutionSettings, seed: int):
        """`specs`: every parameter's class and key (tensor_classes); `settings` as checked by check_settings."""
        evo = self.evo = settings
        if evo.noise == "full":  # ERO's sampling: dense noise for every matrix too (applied in place, restored from a copy)
            specs = [replace(s, cls=ParamClass.FULL) if s.cls is ParamClass.LORA else s for s in specs]
        self.model, self.specs, self.seed = model, specs, seed
        self.classes = {s.name: s.cls for s in specs}
        if all(c is ParamClass.FROZEN for c in self.classes.values()):
            raise ConfigError("every tensor is FROZEN, so nothing would evolve; make some tensors LORA or FULL (a run config: "
                              "params.overrides, freeze_vision, freeze_nonlora; for_module: classify=)")
        params = dict(model.named_parameters())
        self.params = {s.name: params[s.name] for s in specs if s.cls is not ParamClass.FROZEN}
        devices = {p.device for p in self.params.values()}
        if len(devices) > 1:
            raise ConfigError(f"the evolving tensors are on {len(devices)} devices ({', '.join(sorted(map(str, devices)))}); "
                              "EGGROLL here needs them on one device (load the model without device_map='auto', or freeze the rest)")
        self.plan = NoisePlan(specs, self.params, evo, seed)
        self.lora_names, self.full_names = self.plan.names(ParamClass.LORA), self.plan.names(ParamClass.FULL)
        # ERO's reset-to-base needs the base weights: one host copy of the evolving tensors, taken once
        self._base = ({n: p.detach().to("cpu", copy=True) for n, p in self.params.items()}
                      if evo.search == "ero" and evo.reset_after else None)
        self._update = StreamedUpdate(self.plan, self.params, evo, seed, self._base)
        self._hooks = ForwardHooks(model, self.lora_names, self.full_names) if evo.strategy == "forward" else None
        if self._hooks is None:
            self._in_place = SavedInPlace(self.params)
        else:  # FULL tensors in place, but the biases that the forward pass adds (ForwardHooks.biases_in_forward)
            self._in_place = SavedInPlace({n: self.params[n] for n in self.full_names if n not in self._hooks.biases_in_forward})

    @classmethod
    def for_module(cls, module: nn.Module, *, population_size: int, sigma: float, lr: float, rank: int = 1, seed: int = 0,
                   optimizer: str = "sgd", classify: Classifier | None = None, **options) -> Perturber:
        """EGGROLL for any module, without a run config. Defaults: Linear, ConvNd and Embedding weights LORA,
        norm weights and biases FULL (`classify(name, tensor)` returning a ParamClass overrides them, None
        keeps the default). `options`: any other evolution setting (strategy, sigma_mode, group_size,
        noise_reuse, weight_decay, lr_decay, sigma_decay, max_update_norm, stochastic_rounding, prng_impl; ERO's search:
        search, noise, antithetic, elites, elite_ties, reset_after, reseed_step, clamp)."""
        known = {f.name for f in fields(EvolutionSettings)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"Perturber.for_module: unknown option(s) {unknown}; known: {sorted(known)}")
        evo = EvolutionSettings(population_size=population_size, sigma=sigma, lr=lr, rank=rank, optimizer=optimizer, **options)
        check_settings(evo, "Perturber.for_module")
        return cls(module, classify_module(module, classify), evo, seed)

    @property
    def optimizer(self):
        """The update's optimizer state (step count, Adam moments): what a checkpoint saves."""
        return self._update.optimizer

    def with_fresh_optimizer(self) -> Perturber:
        """The same model, weights and noise plan with a new optimizer state: a replay to an earlier epoch (the guard's
        best weights, run.checkpoint: replay) moves the weights without touching the live Adam moments."""
        view = copy.copy(self)
        view.plan = copy.copy(self.plan)  # ERO's reseed in a replay must not move the live plan's seed
        view._update = StreamedUpdate(view.plan, self.params, self.evo, self.seed, self._base)
        return view

    def member_noise(self, epoch: int, member: int) -> tuple[LowRank, Dense]:
        """{name: (A_scaled, B)} for LORA, in the weights' dtype and device; {name: eps} for FULL, in float32."""
        return self.plan.member_noise(epoch, member)

    def _check_member(self, member: int) -> None:
        if not 0 <= member < self.evo.population_size:
            raise ValueError(f"member {member} outside the population 0..{self.evo.population_size - 1}")

    @contextlib.contextmanager
    def _buffers_restored(self):
        """Buffers (BatchNorm running statistics) as they were before the member ran."""
        saved = {name: b.clone() for name, b in self.model.named_buffers()}
        try:
            yield
        finally:
            with torch.no_grad():
                for name, b in self.model.named_buffers():
                    b.copy_(saved[name])

    @contextlib.contextmanager
    def member(self, epoch: int, member: int):
        """The model as member `member` of `epoch`; exact restore on exit, even on error."""
        self._check_member(member)
        lora, full = self.member_noise(epoch, member)
        with self._buffers_restored():
            if self._hooks is None:
                with self._in_place.applied(lora, full):
                    yield self.model
            else:
                biases = {n: eps for n, eps in full.items() if n in self._hooks.biases_in_forward}
                in_place = {n: eps for n, eps in full.items() if n not in biases}
                with self._in_place.applied({}, in_place), self._hooks.member(lora, biases):
                    yield self.model

    def check_batchable(self) -> None:
        """Whether several members can share a batch (the forward strategy, a per-row rule for every FULL tensor's module):
        raises the clear error before any evaluation runs."""
        if self._hooks is None:
            raise ConfigError("evaluating several members per batch needs evolution.strategy: forward")
        self._hooks.check_batchable()

    @contextlib.contextmanager
    def members(self, epoch: int, member_ids):
        """K members at once, for a batch whose rows are K equal blocks, member-major (row b is member b // (rows/K)).

        LORA deltas and FULL noise are applied per row in the forward pass; no weight is modified.
        """
        member_ids = list(member_ids)
        self.check_batchable()
        for m in member_ids:
            self._check_member(m)
        with self._buffers_restored(), self._hooks.rows([self.member_noise(epoch, m) for m in member_ids]):
            yield self.model

    def update(self, raw_fitness, epoch: int) -> dict:
        """Normalize fitness and move the weights one tensor at a time (streamed_update); returns statistics."""
        return self._update.step(raw_fitness, epoch)

    def remove_hooks(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()

    def evolvable_state(self) -> dict[str, torch.Tensor]:
        """The evolvable tensors (what a checkpoint must hold), detached and contiguous."""
        return {name: p.detach().contiguous() for name, p in self.params.items()}
