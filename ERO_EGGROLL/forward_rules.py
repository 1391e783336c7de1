"""How a module's output changes when a member's noise is on its tensors, computed without touching the tensors.

Low-rank deltas (LORA weights), for an input x and factors A_s (m, r), B (n, r), E = A_s B^T:
  Linear     y += (x B) A_s^T
  Embedding  y += A_s[ids] B^T                       (the gathered rows of E, E never formed)
  ConvNd     y += conv_1x1(conv(x, B^T as r kernels), A_s)   (two thin convolutions, groups kept)
Per-row FULL rules (several members as blocks of batch rows): a bias is added per block; a norm is
recomputed per block with each member's weight (and bias), exactly as the module computes it with
that value in place. Norm types are declared in ROW_RULES, not guessed from attribute names.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

from .tensor_classes import CONV_TYPES, LOW_RANK_TYPES, declare_norm


def lowrank_delta(module: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """What E = A_s B^T on `module`'s weight adds to its output for input `x`."""
    if isinstance(module, nn.Linear):
        return (x @ b) @ a.T
    if isinstance(module, nn.Embedding):
        return F.embedding(x, a) @ b.T
    groups, rank, nd = module.groups, a.shape[1], len(module.kernel_size)
    if x.dim() == nd + 1:  # an unbatched input, which torch's convolutions accept
        return lowrank_delta(module, x.unsqueeze(0), a, b).squeeze(0)
    kernel_b = b.T.reshape(rank, module.in_channels // groups, *module.kernel_size).repeat(groups, *[1] * (nd + 1))
    inner = module._conv_forward(x, kernel_b, None)  # the module's own stride, padding (mode), dilation and groups
    kernel_a = a.reshape(*a.shape, *[1] * nd)
    return getattr(F, f"conv{nd}d")(inner, kernel_a, groups=groups)


def check_lowrank_module(module: nn.Module, name: str, parent: nn.Module | None) -> str | None:
    """Why the forward strategy cannot add low-rank noise to `name` of `module` (None: it can)."""
    if isinstance(parent, nn.MultiheadAttention):
        return (f"{name}: MultiheadAttention uses its out_proj weight without calling out_proj, so a forward hook would "
                "never add the noise; use strategy 'inplace', or make it FULL or FROZEN")
    if not isinstance(module, LOW_RANK_TYPES) or name.rpartition(".")[2] != "weight":
        return (f"{name} is LORA, but the forward strategy adds low-rank noise only to the weights of "
                f"{', '.join(t.__name__ for t in LOW_RANK_TYPES)} (it belongs to a {type(module).__name__}); use strategy "
                "'inplace', or make it FULL or FROZEN")
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return f"{name}: an Embedding with max_norm renormalises its weight in place; use strategy 'inplace'"
    return None


def per_member_blocks(t: torch.Tensor, k: int) -> torch.Tensor:
    """(K*P, ...) rows, member-major, as (K, P, ...). Dimension 0 must be the batch."""
    if t.dim() == 0 or t.shape[0] % k:
        raise ValueError(f"{k} members share this batch, but a module's input has shape {tuple(t.shape)}: its first dimension "
                         "must be the batch, K equal blocks of rows (member-major)")
    return t.reshape(k, -1, *t.shape[1:])


def _value(module: nn.Module, attr: str, noise: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """A tensor of `module` as a member has it: base + noise, added in fp32 and rounded once, as in place."""
    base = getattr(module, attr)
    return (base.float() + noise[attr]).to(base.dtype) if attr in noise else base


def _added_bias(module, x, out, noise):
    channel_dim = 1 if isinstance(module, CONV_TYPES) else out.dim() - 1
    shape = [1] * out.dim()
    shape[channel_dim] = -1
    return out + noise["bias"].view(shape).to(out.dtype)


def _rms_norm_qwen(module, x, out, noise):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    return _value(module, "weight", noise) * h.to(x.dtype)


def _rms_norm(module, x, out, noise):
    return F.rms_norm(x, module.normalized_shape, _value(module, "weight", noise), module.eps)


def _layer_norm(module, x, out, noise):
    return F.layer_norm(x, module.normalized_shape, _value(module, "weight", noise), _value(module, "bias", noise), module.eps)


def _group_norm(module, x, out, noise):
    return F.group_norm(x, module.num_groups, _value(module, "weight", noise), _value(module, "bias", noise), module.eps)


def _batch_norm(module, x, out, noise):
    if module.training or module.running_mean is None:
        raise ValueError("several members per batch need BatchNorm in eval mode (batch statistics would mix the members)")
    return F.batch_norm(x, module.running_mean, module.running_var, _value(module, "weight", noise),
                        _value(module, "bias", noise), False, 0.0, module.eps)


RowRule = Callable[[nn.Module, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
# module type -> its output for one block of rows, given the member's fp32 noise on its FULL tensors
ROW_RULES: dict[type, RowRule] = {Qwen2_5_VLRMSNorm: _rms_norm_qwen, nn.RMSNorm: _rms_norm, nn.LayerNorm: _layer_norm,
                                  nn.GroupNorm: _group_norm, nn.modules.batchnorm._BatchNorm: _batch_norm}
BIAS_TYPES = (nn.Linear, *CONV_TYPES)


def declare_row_rule(module_type: type, rule: RowRule) -> None:
    """Let several members share a batch through `module_type` (a norm): `rule(module, x, out, noise)` returns the
    output of one block of rows, given its input `x`, its output `out` with the base tensors and the member's fp32
    `noise` per FULL attribute. The rule must not call `module` itself (its hook would run again)."""
    ROW_RULES[module_type] = rule
    declare_norm(module_type)


declare_norm(Qwen2_5_VLRMSNorm)


def row_rule(module: nn.Module, attrs: list[str]) -> RowRule | None:
    """The per-row rule for `module` with FULL tensors `attrs`, or None where none is declared."""
    for module_type, rule in ROW_RULES.items():
        if isinstance(module, module_type):
            return rule
    if attrs == ["bias"] and isinstance(module, BIAS_TYPES):
        return _added_bias
    return None
