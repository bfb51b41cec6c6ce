"""Compute devices (one resolver for MD, training and rollouts)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .errors import ConfigError


def resolve_device(device: str = "auto", key: str = "device") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without a GPU is a ConfigError.

    ``key`` names the config key in the message (e.g. ``md.device``).
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"config key {key}: unknown device {device!r} (auto, cpu, cuda)")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key {key} is 'cuda' but no CUDA device is available")
    return device


@contextlib.contextmanager
def deterministic_torch(enabled: bool = True) -> Iterator[None]:
    """torch's deterministic kernels for the duration (warn-only), restored after; a no-op when not
    ``enabled`` (on CUDA they would trade speed for it: callers enable them for CPU work).

    Without them, CPU reductions of some graph operations (the MLIP's force and stress sums) run in
    a thread-dependent order: at 2 threads a 30-step CHGNet relaxation that stopped unconverged
    (γ-Li3PO4 in the default run) ended 1e-5 to 4e-5 Å apart in two identical runs; with them, and
    at 1 thread, it is bit-identical. Structures the kernels already gave identically are unchanged.
    """
    if not enabled:
        yield
        return
    import torch

    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)


_MALLOC_TUNED = False


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process instead of handing it back to the kernel
    (mmap threshold 1 GiB, trim threshold 2 GiB, top pad 256 MiB; ``mallopt``, idempotent). Returns
    whether it applied (False off glibc).

    Why: an MLIP step on CPU allocates and frees tensors of tens of MB (edge features); by default
    each one is a fresh mmap, so every call page-faults its memory in again. Measured on MACE-MP-0
    small's architecture, 96-atom Li2O, 1 thread: 1.1 s per structure and call with 4 structures in
    one graph (sys time > user time, 1.4 M minor faults) vs 0.6 s with this setting (no faults), and
    one structure alone 0.6-1.1 s vs 0.6 s. The process keeps up to ~2 GiB of freed heap.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = (mallopt(m_mmap_threshold, 1 << 30) == 1) & (mallopt(m_trim_threshold, (1 << 31) - 1) == 1) & (
        mallopt(m_top_pad, 256 << 20) == 1)
    _MALLOC_TUNED = bool(ok)
    return _MALLOC_TUNED
