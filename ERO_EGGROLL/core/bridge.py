"""Zero-copy JAX <-> PyTorch conversion through DLPack.

Member noise is drawn in JAX and consumed by PyTorch layers; DLPack lets the torch tensor
point at the very buffer JAX wrote, so no population-sized copy ever exists.

READ-ONLY RULE: a tensor returned by `jax_to_torch` aliases a JAX buffer. JAX assumes its
arrays are immutable, so writing through that tensor (in-place ops, `.copy_`, `+=`) silently
changes the JAX array and anything jitted that still holds it. Never write into it; take
`.clone()` first if you need a mutable tensor.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import torch

from ERO_EGGROLL.core.errors import EggrollError

DLPACK_ALIGNMENT = 64


class BridgeCopyWarning(UserWarning):
    """A conversion had to copy instead of sharing the buffer (correct, but not zero-copy)."""


def _is_prng_key(x: jax.Array) -> bool:
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _jax_pointer(x: jax.Array) -> int:
    return x.unsafe_buffer_pointer()


def jax_device_for(device: torch.device) -> jax.Device | None:
    """The JAX device that is `device` itself, or None where JAX cannot reach it (CUDA weights with
    a CPU-only jaxlib). Arrays drawn there cross to torch without a copy."""
    platform = {"cpu": "cpu", "cuda": "gpu"}.get(torch.device(device).type)
    if platform is None:
        return None
    try:
        candidates = jax.devices(platform)
    except RuntimeError:  # no backend for that platform in this jaxlib
        return None
    index = torch.device(device).index or 0
    return candidates[index] if index < len(candidates) else None


def jax_to_torch(x: jax.Array) -> torch.Tensor:
    """Torch tensor sharing `x`'s buffer (same device, same dtype). Treat it as READ-ONLY."""
    if not isinstance(x, jax.Array):
        raise TypeError(f"jax_to_torch expects a jax.Array, got {type(x).__name__}")
    if _is_prng_key(x):
        raise TypeError(
            "typed PRNG key arrays cannot cross DLPack (their dtype has no torch equivalent); "
            "convert jax.random.key_data(key) instead if you need the raw key bits"
        )
    return torch.from_dlpack(x)


def _is_compact(t: torch.Tensor) -> bool:
    """True when the strides are a permutation of a dense row-major layout (what DLPack import accepts)."""
    expected = 1
    for size, stride in sorted(
        ((size, stride) for size, stride in zip(t.shape, t.stride()) if size > 1), key=lambda d: d[1]
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def torch_to_jax(t: torch.Tensor, *, strict: bool = False) -> jax.Array:
    """JAX array sharing `t`'s buffer where DLPack allows.

    Tensors that require grad are detached (the JAX side has no autograd graph). Where a copy is
    unavoidable (a data pointer not 64-byte aligned, strides that are not a dense layout) the copy is correct and a
    `BridgeCopyWarning` says so; with `strict=True` it raises instead. A conversion that would
    change the dtype (int64 without jax_enable_x64) raises, never truncates.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"torch_to_jax expects a torch.Tensor, got {type(t).__name__}")
    t = t.detach()
    if t.device.type == "cuda" and not any(d.platform == "gpu" for d in jax.devices()):
        raise EggrollError(
            f"tensor is on {t.device} but JAX sees no GPU ({jax.devices()}); install jax[cuda] or move the tensor to "
            "the CPU"
        )
    copied_reason = None
    if not _is_compact(t):
        copied_reason, t = f"strides {t.stride()} are not a dense layout", t.contiguous()
    x: jax.Array = jax.dlpack.from_dlpack(t)
    expected = str(t.dtype).removeprefix("torch.")
    if str(x.dtype) != expected:
        raise TypeError(
            f"torch {t.dtype} would arrive in JAX as {x.dtype} (JAX's 64-bit types are off); "
            "cast the tensor to a 32-bit type or set jax.config.update('jax_enable_x64', True)"
        )
    if t.numel() and (copied_reason or _jax_pointer(x) != t.data_ptr()):
        misaligned = f"data pointer {t.data_ptr():#x} is not {DLPACK_ALIGNMENT}-byte aligned"
        reason = copied_reason or (misaligned if t.data_ptr() % DLPACK_ALIGNMENT else "JAX could not alias this layout")
        message = f"torch_to_jax copied {t.numel() * t.element_size()} bytes: {reason}"
        if strict:
            raise EggrollError(message + " (strict=True)")
        warnings.warn(message, BridgeCopyWarning, stacklevel=2)
    return x


def _byte_range(x: torch.Tensor | jax.Array) -> tuple[int, int]:
    if isinstance(x, torch.Tensor):
        start = x.data_ptr()
        return start, start + x.untyped_storage().nbytes() - int(x.storage_offset()) * x.element_size()
    if isinstance(x, jax.Array):
        start = _jax_pointer(x)
        return start, start + x.nbytes
    raise TypeError(f"expected a torch.Tensor or jax.Array, got {type(x).__name__}")


def shares_memory(a: torch.Tensor | jax.Array, b: torch.Tensor | jax.Array) -> bool:
    """True when the buffers of `a` and `b` (torch or JAX, either order) overlap."""
    a_start, a_end = _byte_range(a)
    b_start, b_end = _byte_range(b)
    return a_start < b_end and b_start < a_end and a_start != a_end and b_start != b_end


@dataclass(frozen=True)
class ConversionReport:
    """What a conversion did, for humans (notebook) and tests."""

    direction: str
    dtype_in: str
    dtype_out: str
    shape: tuple[int, ...]
    device_in: str
    device_out: str
    pointer_in: int
    pointer_out: int
    nbytes: int
    zero_copy: bool

    def __str__(self) -> str:
        return (
            f"{self.direction}: {self.dtype_in} -> {self.dtype_out} {self.shape} on {self.device_in} -> "
            f"{self.device_out}, {self.nbytes:,} bytes, ptr {self.pointer_in:#x} -> {self.pointer_out:#x}, "
            f"{'zero-copy' if self.zero_copy else 'COPIED'}"
        )


def inspect_conversion(x: jax.Array | torch.Tensor) -> ConversionReport:
    """Convert `x` to the other framework and report dtype, shape, devices, pointers and whether it was zero-copy."""
    if isinstance(x, jax.Array):
        out_torch = jax_to_torch(x)
        return ConversionReport(
            "jax->torch",
            str(x.dtype),
            str(out_torch.dtype).removeprefix("torch."),
            tuple(x.shape),
            str(next(iter(x.devices()))),
            str(out_torch.device),
            _jax_pointer(x),
            out_torch.data_ptr(),
            x.nbytes,
            _jax_pointer(x) == out_torch.data_ptr(),
        )
    if isinstance(x, torch.Tensor):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BridgeCopyWarning)
            out = torch_to_jax(x)
        return ConversionReport(
            "torch->jax",
            str(x.dtype).removeprefix("torch."),
            str(out.dtype),
            tuple(x.shape),
            str(x.device),
            str(next(iter(out.devices()))),
            x.data_ptr(),
            _jax_pointer(out),
            x.numel() * x.element_size(),
            x.data_ptr() == _jax_pointer(out),
        )
    raise TypeError(f"inspect_conversion expects a torch.Tensor or jax.Array, got {type(x).__name__}")
