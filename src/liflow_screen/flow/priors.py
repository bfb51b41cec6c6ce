"""Prior distributions of the LiFlow displacements (paper Section 3.2.2, Eq. 10).

All priors are isotropic Gaussians per atom, D_0 ~ N(0, sigma_i^2 I3), with sigma (N,) in Å.
The scaled Maxwell–Boltzmann width follows the paper's convention: sqrt(KB T / m) with KB in
eV/K, T in K and m in amu, its numerical value taken as Å (e.g. Li at 800 K: 0.0997 Å).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.constants import K_B_EV as KB
from ..core.errors import ConfigError
from .graph import GraphBatch

PRIOR_KINDS = ("isotropic", "uniform", "adaptive")


def maxwell_boltzmann_sigma(g: GraphBatch) -> Tensor:
    """sqrt(KB T / m) per atom (N,), KB in eV/K, T of the atom's graph in K, m in amu (read as Å)."""
    temp = g.temperature.to(torch.float64)[g.batch]
    return torch.sqrt(KB * temp / g.masses.to(torch.float64)).to(g.pos.dtype)


def prior_sigma(g: GraphBatch, kind: str, scale: float = 1.0, li_scale: Tensor | None = None,
                frame_scale: Tensor | None = None) -> Tensor:
    """Per-atom prior width sigma (N,), Å.

    * ``isotropic``: ``scale`` Å for every atom;
    * ``uniform``: ``scale * sqrt(KB T / m)``;
    * ``adaptive`` (Eq. 10): ``li_scale[graph]`` for Li atoms and ``frame_scale[graph]`` for all
      other atoms (both (G,) tensors), times ``sqrt(KB T / m)``.
    """
    if kind == "isotropic":
        return torch.full((g.pos.shape[0],), float(scale), dtype=g.pos.dtype, device=g.pos.device)
    if kind == "uniform":
        return float(scale) * maxwell_boltzmann_sigma(g)
    if kind == "adaptive":
        if li_scale is None or frame_scale is None:
            raise ConfigError("adaptive prior needs per-graph li_scale and frame_scale")
        li_scale = torch.as_tensor(li_scale, dtype=g.pos.dtype, device=g.pos.device).reshape(-1)
        frame_scale = torch.as_tensor(frame_scale, dtype=g.pos.dtype, device=g.pos.device).reshape(-1)
        if li_scale.shape[0] != g.n_graphs or frame_scale.shape[0] != g.n_graphs:
            raise ConfigError(f"adaptive prior needs {g.n_graphs} li/frame scales, got "
                              f"{li_scale.shape[0]}/{frame_scale.shape[0]}")
        per_atom = torch.where(g.is_li, li_scale[g.batch], frame_scale[g.batch])
        return per_atom * maxwell_boltzmann_sigma(g)
    raise ConfigError(f"unknown prior kind {kind!r} (expected one of {', '.join(PRIOR_KINDS)})")


def sample_prior(sigma: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw D_0 (N,3) ~ N(0, sigma_i^2 I3), Å, on sigma's device and dtype.

    The normal variates are drawn on the generator's device (so a CPU generator gives the same
    numbers whatever the model device).
    """
    dev = generator.device if generator is not None else sigma.device
    z = torch.randn(sigma.shape[0], 3, generator=generator, device=dev, dtype=sigma.dtype)
    return z.to(sigma.device) * sigma.unsqueeze(-1)


def select_scales(slow: Tensor, pair: tuple[float, float] | list[float]) -> Tensor:
    """Per-graph scale (G,): ``pair[0]`` (small) where ``slow`` is True, else ``pair[1]`` (large)."""
    if len(pair) != 2:
        raise ConfigError(f"a prior scale pair needs 2 values (small, large), got {list(pair)}")
    slow = torch.as_tensor(slow, dtype=torch.bool)
    small = torch.full(slow.shape, float(pair[0]), device=slow.device)
    large = torch.full(slow.shape, float(pair[1]), device=slow.device)
    return torch.where(slow, small, large)


# --------------------------------------------------------------------------------------------
# Counter-based normal variates (Philox4x32-10) for batched rollouts
# --------------------------------------------------------------------------------------------
_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product a * b (a a 32-bit constant, b (…) int64 in
    [0, 2^32)), without int64 overflow: a is split into 16-bit halves."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_hi = b * a_hi                       # < 2^48
    p_lo = b * a_lo                       # < 2^48
    t = p_lo + ((p_hi & 0xFFFF) << 16)    # < 2^49
    return (p_hi >> 16) + (t >> 32), t & _MASK32


def philox4x32(counter: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[Tensor, Tensor],
               rounds: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32 (Salmon et al., SC'11; the generator behind cuRAND's and torch's CUDA streams):
    four 32-bit words of a counter and a two-word key (int64 tensors holding values in [0, 2^32),
    broadcastable) -> four pseudo-random 32-bit words. Plain torch integer ops: the same numbers on
    every device, and no generator state (draw i of stream k is a pure function of (k, i))."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        hi0, lo0 = _mulhilo32(_PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W[0]) & _MASK32
        k1 = (k1 + _PHILOX_W[1]) & _MASK32
    return c0, c1, c2, c3


def counter_normal(keys: Tensor, index: Tensor, counter: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal variates (n, 3), one row per atom, as a pure function of
    (key, atom index, counter): ``keys`` (n, 2) int64 32-bit words of the atom's stream (its
    structure's (seed, id, T) key), ``index`` (n,) the atom's index within its structure,
    ``counter`` (2,) int64 on the same device: (step, draw), e.g. draw = 4 * attempt + kind.
    Box–Muller on two pairs of Philox words (float64 inside). No host sync; a structure's numbers
    do not depend on which other structures share the batch, nor on the device."""
    ctr = counter.to(index.device, torch.long)
    zero = torch.zeros_like(index)
    x0, x1, x2, x3 = philox4x32((index, zero + ctr[0], zero + ctr[1], zero), (keys[:, 0], keys[:, 1]))
    scale = 2.0**-32
    u1 = (torch.stack([x0, x2], -1).to(torch.float64) + 0.5) * scale   # (0, 1)
    u2 = torch.stack([x1, x3], -1).to(torch.float64) * scale           # [0, 1)
    r = torch.sqrt(-2.0 * torch.log(u1))
    ang = (2.0 * math.pi) * u2
    z = torch.stack([r[:, 0] * torch.cos(ang[:, 0]), r[:, 0] * torch.sin(ang[:, 0]), r[:, 1] * torch.cos(ang[:, 1])],
                    dim=-1)
    return z.to(dtype)
