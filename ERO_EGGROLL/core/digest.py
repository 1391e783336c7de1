"""Hashes of tensors and files, so weights are compared by their bytes, never by float sums.

`tensor_digest` is the one per-tensor hash: checkpoints store it beside every tensor, and
anything that must prove two copies of a tensor identical (resume, a multi-worker consistency
check) compares it.
"""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Iterable
from pathlib import Path

import torch

from ERO_EGGROLL.core.errors import EggrollError

CHUNK = 1 << 24  # 16 MiB reads when hashing files


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of dtype, shape and the raw bytes (an integer view: -0.0, NaN payloads and bf16 all count)."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def files_digest(paths: Iterable[Path]) -> str:
    """sha256 over the names and every byte of `paths` (read in chunks: a 7B model is 15 GiB)."""
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        h.update(path.name.encode() + b"\0")
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO or a device would block the read for ever
            raise EggrollError(f"{path} is not a regular file (a FIFO or a device?); its bytes cannot be hashed")
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
    return h.hexdigest()[:32]


def tensor_digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """digest.tensor_digest of each tensor, by name."""
    return {name: tensor_digest(t) for name, t in sorted(tensors.items())}


def combined_digest(digests: dict[str, str]) -> str:
    """One hash over every tensor's name and digest: the record's checksum of an epoch's weights."""
    return hashlib.sha256("".join(f"{n}\0{d}\0" for n, d in sorted(digests.items())).encode()).hexdigest()[:32]
