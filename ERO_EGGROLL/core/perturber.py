"""The Perturber: EGGROLL on a torch model, the one object the training script, replay and users call.

    perturber = Perturber.for_module(net)                               # any nn.Module (Adam, 64 members)
    perturber = Perturber(model, specs, settings, seed)                 # classes chosen by the caller
    with perturber.member(epoch, i):  loss_i = ...                      # the model as W + E_i, exact restore on exit
    with perturber.members(epoch, [0, 1, 2, 3]):  ...                  # 4 members as blocks of batch rows
    stats = perturber.update(fitness, epoch)                            # the streamed ES update
    gen = perturber.ask(); ...; stats = perturber.tell(gen, fitness)    # the same, epochs kept for you (ask_tell)
    with Perturber.for_module(net) as perturber:  ...                  # the hooks are removed at the end
    state = perturber.state_dict(); perturber.load_state_dict(state)    # checkpoint and exact resume (checked first)

It composes the parts, each with one job: noise_plan (which tensors, keys, sigmas, noise and
directions), strategies (noise on the model, exact restore), streamed_update (the update step and
its optimizer state). A member never changes the model: its weights and its buffers (e.g.
BatchNorm running statistics) are restored bit for bit on exit.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import fields, replace
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn

from ERO_EGGROLL.core.ask_tell import OBJECTIVES, Generation, Objective, OnUpdate, UpdateStats
from ERO_EGGROLL.core.ero_search import EroSelection, reset_seed
from ERO_EGGROLL.core.errors import ConfigError, EggrollError
from ERO_EGGROLL.core.es_optimizer import EsOptimizer
from ERO_EGGROLL.core.noise_plan import Dense, LowRank, NoisePlan
from ERO_EGGROLL.core.saved_state import STATE_FIELDS, checked_sigma, checked_tensor, mapping, refuse, same_keys
from ERO_EGGROLL.core.saved_state import checked_int as saved_int
from ERO_EGGROLL.core.settings import (
    ADJUSTABLE_SETTINGS,
    FOR_MODULE_DEFAULTS,
    MAX_EPOCH,
    MAX_SEED,
    EvolutionSettings,
    check_settings,
    checked_int,
    for_module_settings,
    is_int,
    settings_dict,
)
from ERO_EGGROLL.core.strategies import ForwardHooks, SavedInPlace
from ERO_EGGROLL.core.streamed_update import StreamedUpdate
from ERO_EGGROLL.core.tensor_classes import Classifier, ParamClass, ParamSpec, classify_module, rank_problem


class PerturberUsageError(EggrollError):
    """A call the Perturber refuses (nested members, an epoch applied twice, a member id out of range)."""


def _holders(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> the names of the distinct modules that hold it (two for a tied embedding and output layer)."""
    holders: dict[int, list[str]] = defaultdict(list)
    for module_name, module in model.named_modules():
        for attr, tensor in module.named_parameters(recurse=False):
            holders[id(tensor)].append(f"{module_name}.{attr}" if module_name else attr)
    return holders


class Perturber:
    """Applies member noise to `model` and moves its weights with the ES update."""

    def __init__(
        self,
        model: nn.Module,
        specs: list[ParamSpec],
        settings: EvolutionSettings,
        seed: int,
        *,
        objective: Objective = "max",
        on_update: OnUpdate | None = None,
    ) -> None:
        """`specs`: every parameter's class and key (tensor_classes); `settings` as checked by check_settings;
        `objective`: whether fitness is maximised or minimised (a loss); `on_update(stats)`: called after each tell."""
        if objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
        self.objective, self.on_update = objective, on_update
        self.latest_generation: Generation | None = None  # the one generation tell() accepts
        evo = self.evo = settings
        if (
            evo.noise == "full"
        ):  # ERO's sampling: dense noise for every matrix too (applied in place, restored from a copy)
            specs = [replace(s, cls=ParamClass.FULL) if s.cls is ParamClass.LORA else s for s in specs]
        self.model, self.specs, self.seed = model, specs, checked_int(seed, "seed", 0, MAX_SEED)
        too_wide = rank_problem(specs, evo.rank)
        if too_wide is not None:
            raise ConfigError(too_wide)
        self._inside_member = False
        self._last_update: int | None = (
            None  # the epoch of the last update, so that one is not applied twice by mistake
        )
        self.classes = {s.name: s.cls for s in specs}
        if all(c is ParamClass.FROZEN for c in self.classes.values()):
            raise ConfigError(
                "every tensor is FROZEN, so nothing would evolve; make some tensors LORA or FULL (a run config: "
                "params.overrides, freeze_vision, freeze_nonlora; for_module: classify=)"
            )
        params = dict(model.named_parameters())
        self.params = {s.name: params[s.name] for s in specs if s.cls is not ParamClass.FROZEN}
        devices = {p.device for p in self.params.values()}
        if len(devices) > 1:
            raise ConfigError(
                f"the evolving tensors are on {len(devices)} devices ({', '.join(sorted(map(str, devices)))}); "
                "EGGROLL here needs them on one device (load the model without device_map='auto', or freeze the rest)"
            )
        if evo.search == "ero" and evo.reset_after:
            reset_seed(self.seed, 1, evo.reseed_step)  # not even one reset fits the key range: refused now
        self.plan = NoisePlan(specs, self.params, evo, self.seed)
        self.lora_names, self.full_names = self.plan.names(ParamClass.LORA), self.plan.names(ParamClass.FULL)
        # ERO's reset-to-base needs the base weights: one host copy of the evolving tensors, taken once
        self._base = (
            {n: p.detach().to("cpu", copy=True) for n, p in self.params.items()}
            if evo.search == "ero" and evo.reset_after
            else None
        )
        self._update = StreamedUpdate(self.plan, self.params, evo, self.seed, self._base)
        self._hooks = ForwardHooks(model, self.lora_names, self.full_names) if evo.strategy == "forward" else None
        if self._hooks is not None:
            self._refuse_shared_in_forward()
        if self._hooks is None:
            self._in_place = SavedInPlace(self.params)
        else:  # FULL tensors in place, but the biases that the forward pass adds (ForwardHooks.biases_in_forward)
            self._in_place = SavedInPlace(
                {n: self.params[n] for n in self.full_names if n not in self._hooks.biases_in_forward}
            )

    def _refuse_shared_in_forward(self) -> None:
        """A tensor that the forward pass perturbs through a hook on its module, held by several modules (tied weights),
        would get its noise in one of them only: refused by name (the hooks removed again, the model as it was)."""
        assert self._hooks is not None  # called for the forward strategy only
        holders = _holders(self.model)
        hooked = [*self.lora_names, *sorted(self._hooks.biases_in_forward)]
        shared = next((n for n in hooked if len(holders[id(self.params[n])]) > 1), None)
        if shared is not None:
            self._hooks.remove()
            raise ConfigError(
                f"{shared} is shared by {', '.join(holders[id(self.params[shared])])} (tied weights): the forward "
                "strategy would add its noise in one of them only; use strategy='inplace', or make it FROZEN"
            )

    @classmethod
    def for_module(
        cls,
        module: nn.Module,
        *,
        population_size: int = FOR_MODULE_DEFAULTS["population_size"],
        sigma: float = FOR_MODULE_DEFAULTS["sigma"],
        lr: float | None = None,
        rank: int = FOR_MODULE_DEFAULTS["rank"],
        seed: int = 0,
        optimizer: str | None = None,
        classify: Classifier | None = None,
        objective: Objective = "max",
        on_update: OnUpdate | None = None,
        **options: Any,
    ) -> Perturber:
        """EGGROLL for any module, without a run config. Defaults: Linear, ConvNd and Embedding weights LORA,
        norm weights and biases FULL (`classify(name, tensor)` returning a ParamClass overrides them, None
        keeps the default); a tensor with requires_grad=False is FROZEN unless `classify` says otherwise (PyTorch's own
        word for "do not train this"). `options`: any other evolution setting (strategy, sigma_mode, group_size,
        noise_reuse, weight_decay, lr_decay, sigma_decay, max_update_norm, stochastic_rounding, prng_impl,
        fitness_shaping, sigma_lr; ERO's search: search, noise, antithetic, elites, elite_ties, reset_after,
        reseed_step, clamp).

        The defaults (Adam, lr 0.002, sigma 0.002, rank 1, z-score fitness) were chosen by
        scripts/bench/bench_vs_evotorch.py (docs/comparisons-generic.md); full-rank habits (sigma 0.02, Adam lr
        0.01) diverge there. sigma is each element's standard deviation, as in full-rank ES, but rank-r
        noise puts it into r directions, so the perturbation's operator norm is far larger than a
        full-rank one's of the same sigma: start in 0.0005-0.005 (or sigma_mode='relative', 0.05-0.2).
        With search='ero' the step is the move to the elites' average, so lr and optimizer default to 1.0 and SGD,
        and antithetic to False (settings.FOR_MODULE_DEFAULTS and ERO_SEARCH_DEFAULTS hold these values).
        `objective='min'`: fitness is a loss to minimise; `on_update(stats)`: called with each tell()'s UpdateStats."""
        known = {f.name for f in fields(EvolutionSettings)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"Perturber.for_module: unknown option(s) {unknown}; known: {sorted(known)}")
        evo = for_module_settings(
            {"population_size": population_size, "sigma": sigma, "lr": lr, "rank": rank, "optimizer": optimizer}
            | options
        )
        check_settings(evo, "Perturber.for_module")

        def chosen(name: str, tensor: torch.Tensor) -> ParamClass | str | None:
            choice = classify(name, tensor) if classify is not None else None
            return ParamClass.FROZEN if choice is None and not tensor.requires_grad else choice

        return cls(module, classify_module(module, chosen), evo, seed, objective=objective, on_update=on_update)

    @property
    def optimizer(self) -> EroSelection | EsOptimizer:
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

    def _check_member(self, epoch: int, member: int) -> None:
        if self._hooks is not None and self._hooks.removed:
            raise PerturberUsageError(
                "this Perturber's hooks were removed (remove_hooks(), or the end of its `with` block): a member "
                "would get no low-rank noise; build a new Perturber for the module"
            )
        checked_int(epoch, "epoch", 0, MAX_EPOCH)
        if not is_int(member) or not 0 <= member < self.evo.population_size:
            raise PerturberUsageError(
                f"member {member!r} is not a member id: an integer in 0..{self.evo.population_size - 1}"
            )

    @contextlib.contextmanager
    def _one_at_a_time(self) -> Iterator[None]:
        """Members never nest: the inner one would restore the outer's weights and leave the model perturbed."""
        if self._inside_member:
            raise PerturberUsageError(
                "a member block inside another member block: the model is already a member; "
                "evaluate members one after the other (or several at once with members())"
            )
        self._inside_member = True
        try:
            yield
        finally:
            self._inside_member = False

    @contextlib.contextmanager
    def _buffers_restored(self) -> Iterator[None]:
        """Buffers (BatchNorm running statistics) as they were before the member ran."""
        saved = {name: b.clone() for name, b in self.model.named_buffers()}
        try:
            yield
        finally:
            with torch.no_grad():
                for name, b in self.model.named_buffers():
                    b.copy_(saved[name])

    @contextlib.contextmanager
    def member(self, epoch: int, member: int) -> Iterator[nn.Module]:
        """The model as member `member` of `epoch`; exact restore on exit, even on error."""
        self._check_member(epoch, member)
        lora, full = self.member_noise(epoch, member)
        with self._one_at_a_time(), self._buffers_restored():
            if self._hooks is None:
                with self._in_place.applied(lora, full):
                    yield self.model
            else:
                biases = {n: eps for n, eps in full.items() if n in self._hooks.biases_in_forward}
                in_place = {n: eps for n, eps in full.items() if n not in biases}
                with self._in_place.applied({}, in_place), self._hooks.member(lora, biases):
                    yield self.model

    def member_weights(self, epoch: int, member: int) -> dict[str, torch.Tensor]:
        """Member `member` of `epoch` as plain tensors (W + noise, rounded once as the in-place strategy applies it),
        e.g. to export one member: it is regenerated from its keys, never stored."""
        self._check_member(epoch, member)
        lora, full = self.member_noise(epoch, member)
        with self._one_at_a_time(), SavedInPlace(self.params).applied(lora, full):
            return {name: p.detach().clone() for name, p in self.params.items()}

    def check_batchable(self) -> None:
        """Whether several members can share a batch (the forward strategy, a per-row rule for every FULL tensor's
        module):
        raises the clear error before any evaluation runs."""
        if self._hooks is None:
            raise ConfigError("evaluating several members per batch needs evolution.strategy: forward")
        self._hooks.check_batchable()

    @contextlib.contextmanager
    def members(self, epoch: int, member_ids: Iterable[int]) -> Iterator[nn.Module]:
        """K members at once, for a batch whose rows are K equal blocks, member-major (row b is member b // (rows/K)).

        LORA deltas and FULL noise are applied per row in the forward pass; no weight is modified.
        """
        member_ids = list(member_ids)
        self.check_batchable()
        assert self._hooks is not None  # check_batchable refuses the inplace strategy
        if not member_ids:
            raise PerturberUsageError("members() needs at least one member id")
        for m in member_ids:
            self._check_member(epoch, m)
        with (
            self._one_at_a_time(),
            self._buffers_restored(),
            self._hooks.rows([self.member_noise(epoch, m) for m in member_ids]),
        ):
            yield self.model

    def update(self, raw_fitness: ArrayLike, epoch: int, *, again: bool = False) -> dict[str, Any]:
        """Normalize fitness and move the weights one tensor at a time (streamed_update); returns statistics.

        An epoch at or before the last one updated is refused (a loop that calls update twice would apply the step
        twice) unless `again`: a caller that has set the weights back (a replay) applies earlier epochs again."""
        checked_int(epoch, "epoch", 0, MAX_EPOCH)
        if not isinstance(again, bool):
            raise PerturberUsageError(f"update(again=...) must be True or False, got {again!r}")
        if self._last_update is not None and epoch <= self._last_update and not again:
            raise PerturberUsageError(
                f"update for epoch {epoch} after epoch {self._last_update} was applied: the step would be "
                "applied twice; pass again=True if the weights were set back to before it"
            )
        if self._inside_member:
            raise PerturberUsageError("update inside a member block: the weights would move while they are a member's")
        if self.objective == "min":  # a loss: the update ascends its negative
            raw_fitness = np.negative(np.asarray(raw_fitness, dtype=np.float64))
        stats = self._update.step(raw_fitness, epoch)
        self._last_update = epoch
        return stats

    def ask(self) -> Generation:
        """The next generation: the epoch after the last one updated (0 at the start); it replaces any earlier
        generation not yet told."""
        self.latest_generation = Generation(self, 0 if self._last_update is None else self._last_update + 1)
        return self.latest_generation

    def tell(self, generation: Generation, fitness: ArrayLike) -> UpdateStats:
        """The update from `generation`'s fitness (one value per member, in member order); refuses a generation that
        is not this Perturber's latest untold one (StaleGeneration). Calls on_update with the statistics."""
        generation.check_current(self)
        sigma = float(np.mean(list(self.plan.sigma.values()))) * self.plan.sigma_scale(generation.epoch)
        started = time.perf_counter()
        details = self.update(fitness, generation.epoch)
        generation.told = True
        stats = UpdateStats.of(generation.epoch, fitness, sigma, time.perf_counter() - started, details)
        if self.on_update is not None:
            self.on_update(stats)
        return stats

    def remove_hooks(self) -> None:
        """Take the forward hooks off the module; the Perturber refuses members afterwards."""
        if self._hooks is not None:
            self._hooks.remove()

    def __enter__(self) -> Perturber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove_hooks()

    def _fingerprint(self) -> dict[str, Any]:
        """What makes a saved state this module's: the seed and the evolving tensors with their classes and shapes."""
        return {
            "seed": self.seed,
            "tensors": {n: [self.classes[n].value, list(p.shape)] for n, p in self.params.items()},
        }

    def state_dict(self) -> dict[str, Any]:
        """The ES state a user's loop checkpoints beside `module.state_dict()`: the settings it was made with, the
        optimizer's step and tensors (Adam moments, ClipUp velocity, cloned), every tensor's sigma (adapted, or relative
        sigma from the base weights), and a fingerprint of the module it was made for. torch.save writes it as it is.
        `Perturber.for_module(net, seed=state["fingerprint"]["seed"], **state["settings"])` rebuilds its Perturber."""
        return {
            "fingerprint": self._fingerprint(),
            "settings": settings_dict(self.evo),
            "step": self.optimizer.step_count,
            "last_update": self._last_update,
            "optimizer": {k: t.detach().clone() for k, t in self.optimizer.state_tensors().items()},
            "sigmas": dict(self.plan.sigma),
            # ERO's reset-to-base goes back to these: a Perturber built on already-evolved weights must not use its own
            "base": {n: t.clone() for n, t in self._base.items()} if self._base is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any], *, settings: Literal["match", "mine"] = "match") -> None:
        """Resume from `state_dict()`: the next update continues exactly as the saved run would have.

        Every field is checked before anything changes (one StateError line naming it). The state's settings must
        match this Perturber's; `settings="mine"` continues with this Perturber's own values of the settings that
        only steer later steps (ADJUSTABLE_SETTINGS: lr, sigma, decays, ...; a changed sigma scales the saved
        sigmas by new / saved). The others (seed, rank, population, optimizer, ERO's search, ...) always must match."""
        if settings not in ("match", "mine"):
            raise refuse(f"settings must be 'match' or 'mine', got {settings!r}")
        state = mapping(state, "state")
        same_keys(state, set(STATE_FIELDS), "state", f"the fields of a state_dict() ({', '.join(STATE_FIELDS)})")
        self._check_fingerprint(mapping(state["fingerprint"], "state['fingerprint']"))
        saved_sigma = self._check_settings(mapping(state["settings"], "state['settings']"), settings)
        step = saved_int(state["step"], "state['step']", 0, MAX_EPOCH + 1)
        last_update = state["last_update"]
        if last_update is not None:
            saved_int(last_update, "state['last_update']", 0, MAX_EPOCH)
        shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        optimizer_tensors = mapping(state["optimizer"], "state['optimizer']")
        self.optimizer.check_state(step, optimizer_tensors, shapes)
        sigmas = self._checked_sigmas(mapping(state["sigmas"], "state['sigmas']"), saved_sigma)
        base = self._checked_base(state["base"])
        # every check passed: the state is taken whole (ERO's seed move is refused before the optimizer changes)
        self.optimizer.load_state(step, {k: v.clone() for k, v in optimizer_tensors.items()})
        self.plan.set_sigmas(sigmas)
        self._last_update = last_update  # a resumed loop may not apply a saved epoch twice either
        if self._base is not None and base is not None:
            for name, tensor in self._base.items():
                tensor.copy_(base[name])

    def _check_fingerprint(self, theirs: Mapping[str, Any]) -> None:
        mine = self._fingerprint()
        same_keys(theirs, set(mine), "state['fingerprint']", "the seed and the evolving tensors")
        if theirs["seed"] != mine["seed"]:
            raise refuse(
                f"the state was made with seed {theirs['seed']!r:.40}, this Perturber has seed {self.seed}: its "
                "noise would differ; build the Perturber with the state's seed"
            )
        tensors = mapping(theirs["tensors"], "state['fingerprint']['tensors']")
        differ = next(
            (n for n in sorted({*tensors, *mine["tensors"]}) if tensors.get(n) != mine["tensors"].get(n)), None
        )
        if differ is not None:
            there, here = tensors.get(differ, "not evolving"), mine["tensors"].get(differ, "not evolving")
            raise refuse(
                f"the state was made for another module or classification: tensor {differ} is {there!r:.60} there, "
                f"{here!r:.60} here; load it into a Perturber built the same way on the same architecture"
            )

    def _check_settings(self, theirs: Mapping[str, Any], settings: str) -> float:
        """Refuse settings that differ (those of ADJUSTABLE_SETTINGS only unless `settings` is 'mine'); returns the
        state's sigma setting, which its saved sigmas were made with."""
        mine = settings_dict(self.evo)
        same_keys(theirs, set(mine), "state['settings']", "every field of EvolutionSettings")
        differ = [k for k in mine if theirs[k] != mine[k]]
        fixed = [k for k in differ if k not in ADJUSTABLE_SETTINGS]
        if fixed or (differ and settings == "match"):
            listed = ", ".join(f"{k} {theirs[k]!r:.40} there, {mine[k]!r:.40} here" for k in fixed or differ)
            how = (
                "these decide what the saved state means: build the Perturber with the state's settings"
                if fixed
                else "pass settings='mine' to continue with this Perturber's values, or build it with the state's"
            )
            raise refuse(f"the state was made with other settings ({listed}); {how}")
        return checked_sigma(theirs["sigma"], "state['settings']['sigma']", allow_zero=False)

    def _checked_sigmas(self, sigmas: Mapping[str, Any], saved_sigma: float) -> dict[str, float]:
        """Every evolving tensor's saved sigma: finite and > 0 (>= 0 in the sigma modes that give still tensors 0), and
        with an absolute sigma that does not adapt, the state's sigma itself; scaled by this Perturber's sigma over the
        state's (settings='mine' with another sigma)."""
        same_keys(sigmas, set(self.params), "state['sigmas']", "one sigma per evolving tensor")
        still = self.evo.sigma_mode != "absolute"
        saved = {n: checked_sigma(sigmas[n], f"state['sigmas'][{n!r}]", allow_zero=still) for n in self.params}
        if self.evo.sigma_mode == "absolute" and self.evo.sigma_lr == 0:
            differ = next((n for n in saved if saved[n] != saved_sigma), None)
            if differ is not None:
                raise refuse(
                    f"state['sigmas'][{differ!r}] is {saved[differ]!r}, but an absolute sigma that does not adapt "
                    f"(sigma_lr 0) gives every tensor the state's sigma {saved_sigma}; the state was edited or damaged"
                )
            return dict(self.plan.sigma)  # this Perturber's own sigma, exactly
        scale = float(self.evo.sigma) / saved_sigma
        return {n: s if scale == 1.0 else s * scale for n, s in saved.items()}

    def _checked_base(self, base: Any) -> dict[str, torch.Tensor] | None:
        """ERO's saved base weights (search ero, reset_after > 0): the evolving tensors' shapes and dtypes, finite."""
        if self._base is None:
            if base is not None:
                raise refuse("state['base'] holds base weights, but this Perturber never resets to a base (None)")
            return None
        base = mapping(base, "state['base']")
        same_keys(base, set(self._base), "state['base']", "the base weights of every evolving tensor")
        return {
            n: checked_tensor(base[n], f"state['base'][{n!r}]", tuple(t.shape), t.dtype) for n, t in self._base.items()
        }

    def evolvable_state(self) -> dict[str, torch.Tensor]:
        """The evolvable tensors (what a checkpoint must hold), detached and contiguous."""
        return {name: p.detach().contiguous() for name, p in self.params.items()}
