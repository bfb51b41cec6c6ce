"""Prior distributions of the LiFlow displacements (paper Section 3.2.2, Eq. 10).

All priors are isotropic Gaussians per atom, D_0 ~ N(0, sigma_i^2 I3), with sigma (N,) in Å.
The scaled Maxwell–Boltzmann width follows the paper's convention: sqrt(KB T / m) with KB in
eV/K, T in K and m in amu, its numerical value taken as Å (e.g. Li at 800 K: 0.0997 Å).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..constants import K_B_EV as KB
from ..errors import ConfigError
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
