"""Measured memory: the peak and current resident memory of this process, and the CUDA allocator's peak.

Beside the predictions of memory.py, so that every predicted figure can be checked by a measured one.
"""

from __future__ import annotations


def reset_peak_memory(device) -> None:
    """Start a new peak measurement: the CUDA allocator's counter, or the process's VmHWM (Linux)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then covers the whole process


def peak_memory_scope(device) -> str:
    """What `peak_memory_mb` in metrics.jsonl measures on this device (said next to the number)."""
    import torch

    if torch.device(device).type == "cuda":
        return "torch.cuda.max_memory_allocated during the epoch; JAX's own GPU allocations are not included"
    return "process peak RSS (VmHWM) during the epoch"


def measured_peak_rss_bytes() -> int:
    """This process's own peak resident memory.

    Reads VmHWM, which starts afresh at exec. (getrusage's ru_maxrss does not: a subprocess
    started from a big parent, pytest for instance, reports the parent's peak as its own.)
    """
    import resource

    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """This process's resident memory now (VmRSS; Linux), for measuring what a phase leaves held."""
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS:")).split()[1]) * 1024


def start_rss_measurement() -> int:
    """For benchmarks and tests: hand freed heap pages back (glibc), reset VmHWM to the current RSS,
    and return that RSS, so `measured_peak_rss_bytes() - start` is what the code after it needed."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    reset_peak_memory("cpu")
    return current_rss_bytes()


def fix_mmap_threshold() -> None:
    """glibc: serve blocks of 1 MiB and more by mmap and hand them back when freed (as MALLOC_MMAP_THRESHOLD_ does at
    start), so the RSS after a phase counts live bytes rather than the allocator's kept free blocks."""
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def phase_start(device) -> int:
    """Begin measuring one phase on `device`: the bytes held now (CUDA allocator's, or the process's RSS) with the
    peak counter reset to them; `phase_peak(device) - phase_start(device)` is then what the phase added."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return start_rss_measurement()


def phase_peak(device) -> int:
    """The peak since `phase_start`: torch's CUDA allocator peak, or VmHWM."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return measured_peak_rss_bytes()


def jax_gpu_pool_bytes() -> int | None:
    """The most JAX's GPU allocator has held (it never hands memory back to CUDA); None when JAX runs on no GPU."""
    import jax

    if jax.default_backend() != "gpu":
        return None
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0)))
