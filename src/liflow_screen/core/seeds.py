"""Seeds: the one recipe for every per-(structure, temperature) random stream.

Each (config seed, structure id, T) has one ``numpy.random.SeedSequence``; its streams are told apart
by spawn keys: the MD initial velocities use the root sequence itself, LiFlow rollouts its child
``(ROLLOUT,)`` and pilot rollouts its child ``(PILOT,)``; a rollout stream is the 64-bit key of the
counter-based noise (``rollout_key``, ``flow.priors.counter_normal``). Nothing depends on batching, chunking,
process or Python's hash seed (the structure key is a SHA-256 of the id).
"""

from __future__ import annotations

import hashlib

import numpy as np

#: spawn keys of the streams derived from one (seed, structure, T) sequence
MD_VELOCITIES: tuple[int, ...] = ()
ROLLOUT = 1
PILOT = 2


def replica_stream(replica: int) -> tuple[int, ...]:
    """Spawn key of replica ``replica`` (0, 1, ...) of a (structure, T) rollout: ``(ROLLOUT,)`` for
    replica 0, ``(ROLLOUT, r)`` for r >= 1; every replica is an independent stream."""
    r = int(replica)
    if r < 0:
        raise ValueError(f"replica must be >= 0, got {r}")
    return (ROLLOUT,) if r == 0 else (ROLLOUT, r)


def structure_key(sid: str) -> int:
    """Stable 64-bit key of a structure id (first 8 bytes of its SHA-256, little-endian)."""
    return int.from_bytes(hashlib.sha256(str(sid).encode()).digest()[:8], "little")


def trajectory_seed(seed: int, sid: str, temperature: float, *stream: int) -> np.random.SeedSequence:
    """SeedSequence of one (structure, T K) trajectory; ``stream`` selects a child (spawn key)."""
    return np.random.SeedSequence([int(seed), structure_key(sid), int(round(float(temperature) * 1000))],
                                  spawn_key=tuple(int(s) for s in stream))


def numpy_rng(seed: int, sid: str, temperature: float, *stream: int) -> np.random.Generator:
    """numpy Generator of a stream (the MD velocities: no stream)."""
    return np.random.default_rng(trajectory_seed(seed, sid, temperature, *stream))


def rollout_key(seed: int, sid: str, temperature: float, *stream: int) -> tuple[int, int]:
    """Two 32-bit words keying the counter-based noise of one (structure, T K) rollout stream
    (``ROLLOUT`` or ``PILOT``): draw i of that stream is a pure function of (key, i), whatever the
    batch, chunk, device or process (see ``flow.priors.counter_normal``)."""
    state = trajectory_seed(seed, sid, temperature, *stream).generate_state(2, dtype=np.uint32)
    return int(state[0]), int(state[1])
