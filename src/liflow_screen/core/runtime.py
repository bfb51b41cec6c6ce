"""Compute devices (one resolver for MD, training and rollouts)."""

from __future__ import annotations

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
