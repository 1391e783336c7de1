"""Putting members' noise on a model: the perturbation strategies, each a context manager owning its own state.

- `SavedInPlace`: noise added into the tensors, every one restored from an exact saved copy on exit
  (pinned host memory for CUDA tensors, so GPU memory does not double). A single member's FULL
  tensors go this way (under `forward`, all but Linear/Conv biases); LORA weights too under
  `strategy: inplace`.
- `ForwardHooks`: LORA weights are never touched; their module adds the low-rank delta in its
  forward (forward_rules), and so does a Linear/Conv its member's FULL bias. For K members at once,
  the batch rows are K equal member-major blocks and every perturbed module (LORA delta, bias, norm)
  works per block.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ERO_EGGROLL.core.errors import ConfigError, EggrollError
from ERO_EGGROLL.core.forward_rules import (
    RowRule,
    add_lowrank_rows,
    batchnorm_in_training,
    check_lowrank_module,
    is_bias_rule,
    lowrank_delta,
    per_member_blocks,
    project_rows,
    row_rule,
    shared_input_groups,
)
from ERO_EGGROLL.core.noise_plan import Dense, LowRank


class SavedInPlace:
    """Adds noise into tensors and restores their exact bits on exit, even on error."""

    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        self.params = params
        self._saved = {name: self._backup_buffer(p) for name, p in params.items()}

    @staticmethod
    def _backup_buffer(p: torch.Tensor) -> torch.Tensor:
        if p.device.type == "cuda":
            return torch.empty(p.shape, dtype=p.dtype, pin_memory=True)  # host copy: GPU memory does not double
        return torch.empty_like(p)

    @contextlib.contextmanager
    def applied(self, lora: LowRank, full: Dense) -> Iterator[None]:
        """The tensors as W + noise: FULL noise added in fp32, LORA as A_s B^T (reshaped to the kernel), rounded
        once."""
        with torch.no_grad():  # every backup is complete before any tensor changes
            for name, p in self.params.items():
                self._saved[name].copy_(p)
        try:
            with torch.no_grad():
                for name, eps in full.items():
                    p = self.params[name]
                    p.copy_(_noised(p, eps))
                for name, (a, b) in lora.items():
                    p = self.params[name]
                    p.copy_(_noised(p, (a.float() @ b.float().T).view(p.shape)))
            yield
        finally:
            with torch.no_grad():
                for name, saved in self._saved.items():
                    self.params[name].copy_(saved)


class _SharedProduct:
    """x [B_1 .. B_g] for a group of sibling Linears called on one input: computed once per input tensor.

    The input is held by a weak reference: the product must not keep a layer's activations alive."""

    x: Callable[[], torch.Tensor | None]
    xb: torch.Tensor | None

    def __init__(self, b: torch.Tensor) -> None:
        self.b, self.x, self.version, self.xb = (
            b,
            lambda: None,
            -1,
            None,
        )  # b: (K, n, R), the group's B factors side by side

    def of(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_inference():  # no version counter to check: no reuse
            return project_rows(x, self.b)
        # identity and version, not equality: a sibling receives the very tensor the first one did, unmodified
        if self.x() is not x or x._version != self.version:
            self.x, self.version, self.xb = weakref.ref(x), x._version, project_rows(x, self.b)
        assert self.xb is not None  # set with self.x, which returned x
        return self.xb


class ForwardHooks:
    """Low-rank deltas in the forward pass of LORA modules; per-row FULL values when members share a batch.

    One hook per LORA module; a module with FULL tensors runs its row rule in place of its forward while
    members are active (forward_rules). Everything a member needs (its factors side by side per shared-input
    group, transposed A, its FULL values in the model's dtype) is prepared once when it enters, so a
    forward pass runs no more Python per module than one dictionary lookup and the tensor operations.
    """

    def __init__(self, model: nn.Module, lora_names: list[str], full_names: list[str]) -> None:
        self._modules = dict(model.named_modules())

        def owner(name: str) -> str:
            return name.rpartition(".")[0]

        problems = [
            p
            for p in (
                check_lowrank_module(self._modules[owner(n)], n, self._modules.get(owner(owner(n)))) for n in lora_names
            )
            if p
        ]
        if problems:  # before any hook is installed, so a refused model is left as it was
            raise ConfigError(problems[0])
        self._linear_groups = shared_input_groups(
            {n: linear.in_features for n in lora_names if isinstance(linear := self._modules[owner(n)], nn.Linear)}
        )
        self._other_lora = [n for n in lora_names if not isinstance(self._modules[owner(n)], nn.Linear)]
        self._full_attrs: dict[str, list[str]] = defaultdict(list)
        for name in full_names:
            module, _, attr = name.rpartition(".")
            self._full_attrs[module].append(attr)
        self._rules = {
            m: row_rule(self._modules[m], attrs, self._modules[owner(m)] if m else None)
            for m, attrs in self._full_attrs.items()
        }
        self.unbatchable = next(
            (_tensor_name(m, self._full_attrs[m][0]) for m, rule in self._rules.items() if rule is None), None
        )
        self._bias_modules = [m for m, rule in self._rules.items() if is_bias_rule(rule)]
        # FULL biases of Linear/Conv modules go through their row rule even for one member, so that one member and K
        # members as rows compute x W^T + b in the same order (the same bits in any dtype, where GEMM rows are
        # independent)
        self.biases_in_forward = {_tensor_name(m, "bias") for m in self._bias_modules}
        self._active: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}  # module -> its member step
        hooked = dict.fromkeys(map(owner, lora_names))
        self._hooks = [self._modules[m].register_forward_hook(_MemberOutput(self, m)) for m in hooked]
        self.removed = False  # remove() was called: a member would get no low-rank noise

    def _lowrank_steps(self, lora: LowRank) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        """Per module, the step adding its low-rank delta; `lora` holds K members' factors stacked: (K, m, r), (K, n,
        r)."""
        steps: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
        for group in self._linear_groups:
            shared = _SharedProduct(torch.cat([lora[n][1] for n in group], dim=-1))
            first = 0
            for name in group:
                a_t, rank = lora[name][0].transpose(1, 2), lora[name][0].shape[-1]
                cols = slice(first, first + rank)

                def linear(
                    x: torch.Tensor,
                    out: torch.Tensor,
                    shared: _SharedProduct = shared,
                    cols: slice = cols,
                    a_t: torch.Tensor = a_t,
                ) -> torch.Tensor:
                    return add_lowrank_rows(out, shared.of(x)[..., cols], a_t)

                steps[name.rpartition(".")[0]] = linear
                first += rank
        for name in self._other_lora:
            module = self._modules[name.rpartition(".")[0]]
            a, b = lora[name]

            def other(
                x: torch.Tensor, out: torch.Tensor, module: nn.Module = module, a: torch.Tensor = a, b: torch.Tensor = b
            ) -> torch.Tensor:
                delta = [
                    lowrank_delta(module, xk, ak, bk) for xk, ak, bk in zip(per_member_blocks(x, a.shape[0]), a, b)
                ]
                return out + torch.cat(delta).reshape(out.shape)

            steps[name.rpartition(".")[0]] = other
        return steps

    @contextlib.contextmanager
    def _installed(self, noises: list[tuple[LowRank, Dense]], full_modules: list[str]) -> Iterator[None]:
        """The K members of `noises` (one block of rows each) in the forward pass: their low-rank deltas (hooks), and
        for each of `full_modules` its row rule in place of its forward, with the members' values (base + noise,
        rounded to the tensor's dtype once, here, not per forward pass)."""
        replaced: dict[nn.Module, Callable[[torch.Tensor], torch.Tensor]] = {}
        for m in full_modules:
            module, rule = self._modules[m], self._rules[m]
            assert rule is not None  # full_modules have rules: the bias modules, or all once check_batchable passed
            values = {
                a: torch.stack([_noised(getattr(module, a), full[_tensor_name(m, a)]) for _, full in noises])
                for a in self._full_attrs[m]
            }

            def forward(
                x: torch.Tensor,
                module: nn.Module = module,
                rule: RowRule = rule,
                values: dict[str, torch.Tensor] = values,
            ) -> torch.Tensor:
                return rule(module, x, values)

            replaced[module] = forward
        stacked = {
            n: (torch.stack([lr[n][0] for lr, _ in noises]), torch.stack([lr[n][1] for lr, _ in noises]))
            for n in noises[0][0]
        }
        with _forwards_replaced(replaced):
            try:
                self._active = self._lowrank_steps(stacked)
                yield
            finally:
                self._active = {}

    def member(self, lora: LowRank, biases: Dense) -> contextlib.AbstractContextManager[None]:
        """One member: LORA deltas and its FULL `biases` (those of biases_in_forward) in the forward pass; its other
        FULL tensors are in place (SavedInPlace)."""
        return self._installed([(lora, biases)], self._bias_modules)

    def check_batchable(self) -> None:
        """Refuse several members per batch where a FULL tensor's module has no per-row rule, or is a BatchNorm in
        training mode (its batch statistics would mix the members)."""
        if self.unbatchable:
            raise ConfigError(
                f"FULL tensor {self.unbatchable} belongs to a module with no per-row rule (forward_rules.ROW_RULES), "
                "so several members cannot share a batch through it; freeze it (params.overrides), declare a "
                "rule with forward_rules.declare_row_rule, or use evaluation.members_per_batch: 1"
            )
        training = next((m for m in self._full_attrs if batchnorm_in_training(self._modules[m])), None)
        if training is not None:
            raise ConfigError(
                f"{training or 'the model'} is a {type(self._modules[training]).__name__} in training mode (or without "
                "running statistics): several members in one batch would share its batch statistics; call "
                "model.eval() before members(), or evaluate one member at a time with member()"
            )

    def rows(self, noises: list[tuple[LowRank, Dense]]) -> contextlib.AbstractContextManager[None]:
        """K members at once, for a batch whose rows are K equal member-major blocks; no tensor's values change."""
        self.check_batchable()
        return self._installed(noises, list(self._full_attrs))

    @property
    def member_active(self) -> bool:
        return bool(self._active)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.removed = True


class _PassThrough:
    """What a copy of a hooked module holds in place of a member hook: the output as it is (the copy has no
    Perturber; the original keeps its own)."""

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        return None


class _MemberOutput:
    """The forward hook of one LORA module: its member's low-rank delta while a member is active.

    `copy.deepcopy(model)` or pickling the model outside a member block gives the plain module at its current weights
    (the copy's hook passes the output through); inside a member block the weights are a member's, so it is refused.
    """

    def __init__(self, hooks: ForwardHooks, module_name: str) -> None:
        self._hooks, self._module_name = hooks, module_name

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        step = self._hooks._active.get(self._module_name)
        return output if step is None else step(inputs[0], output)

    def _copied(self) -> _PassThrough:
        if self._hooks.member_active:
            raise EggrollError(
                f"copying or pickling the model inside a member block: {self._module_name} is a member's, not the "
                "model's; copy it outside the `with perturber.member(...)` block"
            )
        return _PassThrough()

    def __deepcopy__(self, memo: dict[int, Any]) -> _PassThrough:
        return self._copied()

    def __reduce__(self) -> tuple[type[_PassThrough], tuple[()]]:
        self._copied()
        return (_PassThrough, ())


def _noised(base: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """A FULL tensor as a member has it: the noise added in fp32, rounded to the tensor's dtype once."""
    return (base.float() + eps).to(base.dtype)


def _tensor_name(module: str, attr: str) -> str:
    return f"{module}.{attr}" if module else attr


@contextlib.contextmanager
def _forwards_replaced(forwards: dict[nn.Module, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """Each module's forward replaced by the given function (its forward hooks still run), restored on exit."""
    own = {
        module: module.__dict__.get("forward") for module in forwards
    }  # a forward set on the instance (e.g. by a wrapper)
    try:
        for module, forward in forwards.items():
            module.forward = forward
        yield
    finally:
        for module, previous in own.items():
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
