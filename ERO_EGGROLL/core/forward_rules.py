"""How a module's output changes when members' noise is on its tensors, computed without touching the tensors.

Low-rank deltas (LORA weights), for an input x and factors A_s (m, r), B (n, r), E = A_s B^T:
  Linear     y += (x B) A_s^T      K members at once: one bmm per member block, added in place
  Embedding  y += A_s[ids] B^T                       (the gathered rows of E, E never formed)
  ConvNd     y += conv_1x1(conv(x, B^T as r kernels), A_s)   (two thin convolutions, groups kept)
Sibling Linears that a model calls on one input tensor (q/k/v, gate/up: SHARED_INPUT_SIBLINGS)
share one product x [B_q B_k B_v]. Per-row FULL rules replace a module's forward while members
share a batch: a Linear/Conv computes x W^T without its bias and adds each block's member bias
(rounded to the model's dtype first, the order of a member alone); a norm computes its output with
each member's weight (and bias), exactly as the module does with that value in place. Norm types
are declared in ROW_RULES (one block at a time) or STACKED_ROW_RULES (all blocks in one call), not
guessed from attribute names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ERO_EGGROLL.core.errors import EggrollError
from ERO_EGGROLL.core.tensor_classes import CONV_TYPES, LOW_RANK_TYPES, declare_norm

# Names of sibling Linears (children of one module) that the model calls on the same input tensor, so that one
# product x [B_1 .. B_g] serves all of them. A declaration only saves work: a hook whose input is not the tensor
# of its group's last product computes the product for that input.
SHARED_INPUT_SIBLINGS: list[tuple[str, ...]] = [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")]

ConvModule = nn.Conv1d | nn.Conv2d | nn.Conv3d  # the modules of CONV_TYPES


def shared_input_groups(in_features: dict[str, int]) -> list[list[str]]:
    """LORA Linear weight names (with their modules' in_features) grouped by SHARED_INPUT_SIBLINGS (same parent
    module, same input width); all others alone."""
    groups: dict[tuple[str] | tuple[str, tuple[str, ...], int], list[str]] = {}
    for name, width in in_features.items():
        parent, _, child = name.removesuffix(".weight").rpartition(".")
        siblings = next((s for s in SHARED_INPUT_SIBLINGS if child in s), None)
        groups.setdefault((parent, siblings, width) if siblings else (name,), []).append(name)
    return list(groups.values())


def project_rows(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x B per member: rows (K*P, ..., n), member-major, times b (K, n, R) -> (K, P*..., R)."""
    return torch.bmm(per_member_blocks(x, b.shape[0]).reshape(b.shape[0], -1, x.shape[-1]), b)


def add_lowrank_rows(out: torch.Tensor, xb: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """out + (x B) A_s^T per member block, with xb (K, rows, r) and a_t (K, r, m); in place in the module's output."""
    if out.is_contiguous() and out.dtype == xb.dtype == a_t.dtype:  # (autocast makes them differ)
        out.view(a_t.shape[0], -1, a_t.shape[-1]).baddbmm_(xb, a_t)
        return out
    return out + torch.bmm(xb, a_t).view(out.shape)


def lowrank_delta(module: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """What E = A_s B^T on `module`'s weight adds to its output for input `x`."""
    if isinstance(module, nn.Linear):
        return (x @ b) @ a.T
    if isinstance(module, nn.Embedding):
        return F.embedding(x, a) @ b.T
    conv = cast(ConvModule, module)  # the LOW_RANK_TYPES left (check_lowrank_module)
    groups, rank, nd = conv.groups, a.shape[1], len(conv.kernel_size)
    if x.dim() == nd + 1:  # an unbatched input, which torch's convolutions accept
        return lowrank_delta(conv, x.unsqueeze(0), a, b).squeeze(0)
    kernel_b = b.T.reshape(rank, conv.in_channels // groups, *conv.kernel_size).repeat(groups, *[1] * (nd + 1))
    inner = conv._conv_forward(x, kernel_b, None)  # the module's own stride, padding (mode), dilation and groups
    kernel_a = a.reshape(*a.shape, *[1] * nd)
    conv_nd: Callable[..., torch.Tensor] = getattr(F, f"conv{nd}d")
    return conv_nd(inner, kernel_a, groups=groups)


def check_lowrank_module(module: nn.Module, name: str, parent: nn.Module | None) -> str | None:
    """Why the forward strategy cannot add low-rank noise to `name` of `module` (None: it can)."""
    if isinstance(parent, nn.MultiheadAttention):
        return (
            f"{name}: MultiheadAttention uses its out_proj weight without calling out_proj, so a forward hook would "
            "never add the noise; use strategy 'inplace', or make it FULL or FROZEN"
        )
    if not isinstance(module, LOW_RANK_TYPES) or name.rpartition(".")[2] != "weight":
        return (
            f"{name} is LORA, but the forward strategy adds low-rank noise only to the weights of "
            f"{', '.join(t.__name__ for t in LOW_RANK_TYPES)} (it belongs to a {type(module).__name__}); use strategy "
            "'inplace', or make it FULL or FROZEN"
        )
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return f"{name}: an Embedding with max_norm renormalises its weight in place; use strategy 'inplace'"
    return None


def per_member_blocks(t: torch.Tensor, k: int) -> torch.Tensor:
    """(K*P, ...) rows, member-major, as (K, P, ...). Dimension 0 must be the batch."""
    if t.dim() == 0 or t.shape[0] % k:
        raise EggrollError(
            f"{k} members share this batch, but a module's input has shape {tuple(t.shape)}: its first dimension "
            "must be the batch, K equal blocks of rows (member-major)"
        )
    return t.reshape(k, -1, *t.shape[1:])


def _member_bias(module: nn.Module, x: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """x W^T (or the convolution) without the bias, then each block's member bias: the order of a member alone."""
    module = cast(nn.Linear | ConvModule, module)  # row_rule gives it to BIAS_TYPES only
    bias = values["bias"]
    per_member_blocks(x, bias.shape[0])  # the input's first dimension must be the batch (its clear error)
    out = F.linear(x, module.weight) if isinstance(module, nn.Linear) else module._conv_forward(x, module.weight, None)
    blocks = per_member_blocks(out, bias.shape[0])
    shape = [1] * blocks.dim()
    channel = out.dim() - len(module.kernel_size) if isinstance(module, CONV_TYPES) else -1  # in blocks: one more dim
    shape[0], shape[channel] = bias.shape[0], -1
    return blocks.add_(bias.view(shape)).reshape(out.shape)


def _rms_norm(module: nn.Module, x: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
    module = cast(nn.RMSNorm, module)  # its ROW_RULES type
    return F.rms_norm(x, module.normalized_shape, values.get("weight", module.weight), module.eps)


def _layer_norm(module: nn.Module, x: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
    module = cast(nn.LayerNorm, module)  # its ROW_RULES type
    return F.layer_norm(
        x, module.normalized_shape, values.get("weight", module.weight), values.get("bias", module.bias), module.eps
    )


def _group_norm(module: nn.Module, x: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
    module = cast(nn.GroupNorm, module)  # its ROW_RULES type
    return F.group_norm(
        x, module.num_groups, values.get("weight", module.weight), values.get("bias", module.bias), module.eps
    )


def _batch_norm(module: nn.Module, x: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
    module = cast(nn.modules.batchnorm._BatchNorm, module)  # its ROW_RULES type
    if module.training or module.running_mean is None:  # members() refuses it by name first (batchnorm_in_training)
        raise EggrollError(
            "several members per batch need BatchNorm in eval mode (batch statistics would mix the members)"
        )
    return F.batch_norm(
        x,
        module.running_mean,
        module.running_var,
        values.get("weight", module.weight),
        values.get("bias", module.bias),
        False,
        0.0,
        module.eps,
    )


RowRule = Callable[[nn.Module, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
# module type -> its output for one block of rows (its input x), given the member's values of its FULL tensors
ROW_RULES: dict[type, RowRule] = {
    nn.RMSNorm: _rms_norm,
    nn.LayerNorm: _layer_norm,
    nn.GroupNorm: _group_norm,
    nn.modules.batchnorm._BatchNorm: _batch_norm,
}
# module type -> its output for all K blocks in one call, given the K members' values stacked on a first dimension
STACKED_ROW_RULES: dict[type, RowRule] = {}
BIAS_TYPES = (nn.Linear, *CONV_TYPES)
_PLAIN_FORWARDS = {t.forward for t in BIAS_TYPES}


def declare_row_rule(module_type: type, rule: RowRule, *, stacked: bool = False) -> None:
    """Let several members share a batch through `module_type` (a norm): `rule(module, x, values)` returns the
    module's output for one block of rows `x`, given the member's `values` of its FULL tensors (base + noise, added
    in fp32 and rounded to the tensor's dtype, as the member has them in place). While members share a batch the
    rule replaces the module's forward, so it must compute the whole output (and not call `module` itself).
    `stacked=True`: the rule takes all K blocks at once, each value stacked per member on a first dimension."""
    (STACKED_ROW_RULES if stacked else ROW_RULES)[module_type] = rule
    declare_norm(module_type)


def _block_by_block(rule: RowRule) -> RowRule:
    def stacked(module: nn.Module, x: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
        k = next(iter(values.values())).shape[0]
        blocks = per_member_blocks(x, k)
        return torch.cat([rule(module, xb, {a: v[i] for a, v in values.items()}) for i, xb in enumerate(blocks)])

    return stacked


def row_rule(module: nn.Module, attrs: list[str], parent: nn.Module | None = None) -> RowRule | None:
    """The forward of `module` (child of `parent`) for K member blocks, with FULL tensors `attrs` (values stacked per
    member), or None where no rule is declared or none can act."""
    if isinstance(parent, nn.MultiheadAttention):  # it reads out_proj's tensors without calling out_proj
        return None
    for rules, wrap in ((STACKED_ROW_RULES, lambda r: r), (ROW_RULES, _block_by_block)):
        for module_type, rule in rules.items():
            if isinstance(module, module_type):
                return wrap(rule)
    if attrs == ["bias"] and type(module).forward in _PLAIN_FORWARDS:  # a subclass may compute otherwise
        return _member_bias
    return None


def batchnorm_in_training(module: nn.Module) -> bool:
    """A BatchNorm that would normalise with batch statistics (training mode, or no running statistics): several
    members' rows in one batch would mix."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or module.running_mean is None)


def is_bias_rule(rule: RowRule | None) -> bool:
    return rule is _member_bias
