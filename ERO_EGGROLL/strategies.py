"""Putting members' noise on a model: the perturbation strategies, each a context manager owning its own state.

- `SavedInPlace`: noise added into the tensors, every one restored from an exact saved copy on exit
  (pinned host memory for CUDA tensors, so GPU memory does not double). FULL tensors of a single
  member always go this way; LORA weights too under `strategy: inplace`.
- `ForwardHooks`: LORA weights are never touched; their module adds the low-rank delta in its
  forward (forward_rules). For K members at once, the batch rows are K equal member-major blocks and
  every perturbed module (LORA delta, bias, norm) works per block.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch import nn

from .config import ConfigError
from .forward_rules import check_lowrank_module, lowrank_delta, per_member_blocks, row_rule
from .noise_plan import Dense, LowRank


class SavedInPlace:
    """Adds noise into tensors and restores their exact bits on exit, even on error."""

    def __init__(self, params: dict[str, nn.Parameter]):
        self.params = params
        self._saved = {name: self._backup_buffer(p) for name, p in params.items()}

    @staticmethod
    def _backup_buffer(p: torch.Tensor) -> torch.Tensor:
        if p.device.type == "cuda":
            return torch.empty(p.shape, dtype=p.dtype, pin_memory=True)  # host copy: GPU memory does not double
        return torch.empty_like(p)

    @contextlib.contextmanager
    def applied(self, lora: LowRank, full: Dense):
        """The tensors as W + noise: FULL noise added in fp32, LORA as A_s B^T (reshaped to the kernel), rounded once."""
        with torch.no_grad():  # every backup is complete before any tensor changes
            for name, p in self.params.items():
                self._saved[name].copy_(p)
        try:
            with torch.no_grad():
                for name, eps in full.items():
                    p = self.params[name]
                    p.copy_((p.float() + eps).to(p.dtype))
                for name, (a, b) in lora.items():
                    p = self.params[name]
                    p.copy_((p.float() + (a.float() @ b.float().T).view(p.shape)).to(p.dtype))
            yield
        finally:
            with torch.no_grad():
                for name, saved in self._saved.items():
                    self.params[name].copy_(saved)


class ForwardHooks:
    """Low-rank deltas in the forward pass of LORA modules; per-row FULL noise when members share a batch."""

    def __init__(self, model: nn.Module, lora_names: list[str], full_names: list[str]):
        modules = dict(model.named_modules())
        self._single: LowRank = {}  # one member's LORA factors
        self._stacked: LowRank = {}  # K members: (K, m, r), (K, n, r)
        self._stacked_full: Dense = {}  # K members' FULL noise: (K, *shape)
        self._hooks = []
        owner = lambda name: name.rpartition(".")[0]
        problems = [p for p in (check_lowrank_module(modules[owner(n)], n, modules.get(owner(owner(n)))) for n in lora_names) if p]
        if problems:  # before any hook is installed, so a refused model is left as it was
            raise ConfigError(problems[0])
        for name in lora_names:
            self._hooks.append(modules[owner(name)].register_forward_hook(self._lowrank_hook(name)))
        by_module: dict[str, list[str]] = defaultdict(list)
        for name in full_names:
            owner, _, attr = name.rpartition(".")
            by_module[owner].append(attr)
        self.unbatchable: str | None = None  # a FULL tensor whose module has no per-row rule
        for owner, attrs in by_module.items():
            rule = row_rule(modules[owner], attrs)
            if rule is None:
                self.unbatchable = f"{owner}.{attrs[0]}"
                continue
            self._hooks.append(modules[owner].register_forward_hook(self._row_hook(owner, attrs, rule)))

    def _lowrank_hook(self, name: str):
        def add_low_rank_delta(module, inputs, output):
            if name in self._stacked:
                a_stack, b_stack = self._stacked[name]
                if isinstance(module, nn.Linear):  # one batched matmul pair: (K*P, T, n) -> (K, P*T, n)
                    x = per_member_blocks(inputs[0], a_stack.shape[0]).reshape(a_stack.shape[0], -1, inputs[0].shape[-1])
                    delta = torch.bmm(torch.bmm(x, b_stack), a_stack.transpose(1, 2))
                    return output + delta.reshape(output.shape)
                blocks = per_member_blocks(inputs[0], a_stack.shape[0])
                delta = torch.cat([lowrank_delta(module, x, a, b) for x, a, b in zip(blocks, a_stack, b_stack)])
                return output + delta.reshape(output.shape)
            factors = self._single.get(name)
            if factors is None:
                return output
            return output + lowrank_delta(module, inputs[0], *factors)

        return add_low_rank_delta

    def _row_hook(self, owner: str, attrs: list[str], rule):
        names = [f"{owner}.{a}" for a in attrs]

        def per_member_rows(module, inputs, output):
            if names[0] not in self._stacked_full:
                return output
            k = self._stacked_full[names[0]].shape[0]
            blocks = zip(per_member_blocks(inputs[0], k), per_member_blocks(output, k))
            out = [rule(module, x, y, {a: self._stacked_full[n][i] for a, n in zip(attrs, names)}) for i, (x, y) in enumerate(blocks)]
            return torch.cat(out).reshape(output.shape)

        return per_member_rows

    @contextlib.contextmanager
    def member(self, lora: LowRank):
        """One member's LORA deltas in the forward pass."""
        try:
            self._single = lora
            yield
        finally:
            self._single = {}

    def check_batchable(self) -> None:
        """Refuse several members per batch where a FULL tensor's module has no per-row rule."""
        if self.unbatchable:
            raise ConfigError(f"FULL tensor {self.unbatchable} belongs to a module with no per-row rule (forward_rules.ROW_RULES), "
                              "so several members cannot share a batch through it; freeze it (params.overrides), declare a "
                              "rule with forward_rules.declare_row_rule, or use evaluation.members_per_batch: 1")

    @contextlib.contextmanager
    def rows(self, noises: list[tuple[LowRank, Dense]]):
        """K members at once, for a batch whose rows are K equal member-major blocks; no tensor is modified."""
        self.check_batchable()
        lora_names, full_names = noises[0][0].keys(), noises[0][1].keys()
        try:
            self._stacked = {n: (torch.stack([m[0][n][0] for m in noises]), torch.stack([m[0][n][1] for m in noises])) for n in lora_names}
            self._stacked_full = {n: torch.stack([m[1][n] for m in noises]) for n in full_names}
            yield
        finally:
            self._stacked, self._stacked_full = {}, {}

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
