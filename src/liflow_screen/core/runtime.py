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
