"""The single geometry module: cells, supercells, periodic neighbour lists, centre of mass.

Conventions: Cartesian positions in Å, lattice ``cell`` as rows a, b, c (Å), masses in amu.
Positions are never wrapped into the cell: trajectories are kept unwrapped everywhere.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is only needed by the graph functions (the 'ml' extra)
    import torch


def perpendicular_widths(cell: np.ndarray) -> np.ndarray:
    """Distances between opposite faces of the cell, Å: V / |b x c|, V / |c x a|, V / |a x b|."""
    cell = np.asarray(cell, dtype=float)
    vol = abs(np.linalg.det(cell))
    a, b, c = cell
    areas = np.array([np.linalg.norm(np.cross(b, c)), np.linalg.norm(np.cross(c, a)), np.linalg.norm(np.cross(a, b))])
    return vol / areas


def supercell_repeats(cell: np.ndarray, min_width: float) -> tuple[int, int, int]:
    """Smallest diagonal repeats (na, nb, nc) making every perpendicular width >= min_width, Å.

    The width of face pair i of an (na, nb, nc) supercell is n_i times the unit cell's.
    """
    widths = perpendicular_widths(cell)
    return tuple(max(1, int(math.ceil(min_width / w - 1e-9))) for w in widths)  # type: ignore[return-value]


def tile(numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray,
         reps: tuple[int, int, int] | list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (na, nb, nc) supercell of a cell: (numbers, positions Å, cell rows Å), atoms ordered image
    by image (m_a, m_b, m_c with m_c fastest) as ``ase.Atoms.repeat`` orders them."""
    numbers, positions, cell = np.asarray(numbers), np.asarray(positions, dtype=float), np.asarray(cell, dtype=float)
    na, nb, nc = (int(r) for r in reps)
    if min(na, nb, nc) < 1:
        raise ValueError(f"supercell repeats must be >= 1, got {tuple(reps)}")
    images = np.array([(i, j, k) for i in range(na) for j in range(nb) for k in range(nc)], dtype=float)
    shifts = images @ cell                                          # (n_img, 3) Å
    pos = (positions[None, :, :] + shifts[:, None, :]).reshape(-1, 3)
    return np.tile(numbers, len(images)), pos, cell * np.array([[na], [nb], [nc]], dtype=float)


def center_of_mass(pos: torch.Tensor, masses: torch.Tensor, batch: torch.Tensor, n_graphs: int) -> torch.Tensor:
    """Mass-weighted mean position per graph, Å. pos (N,3), masses (N,), batch (N,) -> (G,3)."""
    import torch

    m = masses.to(pos.dtype).unsqueeze(-1)
    num = torch.zeros(n_graphs, 3, dtype=pos.dtype, device=pos.device).index_add_(0, batch, pos * m)
    den = torch.zeros(n_graphs, 1, dtype=pos.dtype, device=pos.device).index_add_(0, batch, m)
    return num / den


def _canonical_edge_order(i: "torch.Tensor", j: "torch.Tensor", s: "torch.Tensor", n: int) -> "torch.Tensor":
    """Permutation sorting edges by (i, j, image shift s): one order whatever produced them."""
    import torch

    if i.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=i.device)
    k = int(s.abs().max()) + 1
    w = 2 * k + 1
    code = ((s[:, 0] + k) * w + (s[:, 1] + k)) * w + (s[:, 2] + k)
    key = (i * n + j) * (w**3) + code
    return torch.argsort(key, stable=True)


def radius_graph_pbc(
    pos: torch.Tensor,
    cell: torch.Tensor,
    batch: torch.Tensor,
    cutoff: float,
    ptr: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Periodic radius graph of a batch of crystals, on the device of ``pos`` (vesin-torch).

    pos (N,3) Å unwrapped (any lattice image is fine), cell (G,3,3) Å, batch (N,) graph index.
    Returns ``edge_index`` (2,E) as (i, j) global atom indices with |r_j + S - r_i| < cutoff,
    and ``shift`` (E,3), the Cartesian image offset S in Å, so that the edge vector is
    ``pos[j] - pos[i] + shift``. Self-pairs are excluded unless they connect distinct images.
    Computed in float64 for a stable edge set; the shift makes it exact for unwrapped input.
    """
    import torch
    from vesin.torch import NeighborList

    n_graphs = cell.shape[0]
    if ptr is None:
        counts = torch.bincount(batch, minlength=n_graphs)
        ptr = torch.zeros(n_graphs + 1, dtype=torch.long, device=pos.device)
        ptr[1:] = torch.cumsum(counts, 0)
    nl = NeighborList(cutoff=float(cutoff), full_list=True)
    pos64 = pos.detach().to(torch.float64)
    cell64 = cell.detach().to(torch.float64)
    edges, shifts = [], []
    for g in range(n_graphs):
        lo, hi = int(ptr[g]), int(ptr[g + 1])
        p = pos64[lo:hi]
        c = cell64[g]
        # vesin wants points inside the box: wrap a copy, remember the lattice offset.
        frac = torch.linalg.solve(c.T, p.T).T
        offset = torch.floor(frac)
        p_wrapped = p - offset @ c
        i, j, s = nl.compute(points=p_wrapped, box=c, periodic=True, quantities="ijS")
        s = s.to(torch.float64)
        # vector = p_wrapped[j] - p_wrapped[i] + s@c  =  p[j] - p[i] + (s - off_j + off_i)@c
        s_unwrapped = s - offset[j] + offset[i]
        # canonical edge order (i, j, image): sums over edges then do not depend on the order
        # the neighbour-list library happens to return (bit-reproducible messages)
        order = _canonical_edge_order(i.long(), j.long(), s.long(), hi - lo)
        edges.append(torch.stack([i.long()[order] + lo, j.long()[order] + lo]))
        shifts.append(s_unwrapped[order] @ c)
    edge_index = torch.cat(edges, dim=1) if edges else torch.zeros(2, 0, dtype=torch.long, device=pos.device)
    shift = torch.cat(shifts, dim=0).to(pos.dtype) if shifts else torch.zeros(0, 3, dtype=pos.dtype, device=pos.device)
    return edge_index.to(pos.device), shift.to(pos.device)


def neighbor_pairs(points: np.ndarray, cell: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All periodic pairs (i, j, distance Å) with distance < ``cutoff`` Å (full list, both orders),
    from vesin's NumPy neighbour list (no torch). ``points`` (n,3) Å, unwrapped or not; ``cell`` rows
    a, b, c in Å. Pairs of an atom with its own periodic images are included."""
    from vesin import NeighborList

    c = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    p = np.asarray(points, dtype=np.float64)
    frac = np.linalg.solve(c.T, p.T).T
    wrapped = p - np.floor(frac) @ c  # vesin wants points inside the box; distances are unchanged
    i, j, d = NeighborList(cutoff=float(cutoff), full_list=True).compute(points=wrapped, box=c, periodic=True,
                                                                          quantities="ijd")
    return i.astype(np.int64), j.astype(np.int64), d.astype(np.float64)


def shortest_distance(points: np.ndarray, cell: np.ndarray, mask_a: np.ndarray, mask_b: np.ndarray | None = None,
                      cutoff: float = 8.0) -> float:
    """Shortest periodic distance (Å) between an atom of ``mask_a`` and a different atom (or image) of
    ``mask_b`` (default: ``mask_a``); ``cutoff`` Å if there is none closer."""
    ma = np.asarray(mask_a, dtype=bool)
    mb = ma if mask_b is None else np.asarray(mask_b, dtype=bool)
    i, j, d = neighbor_pairs(points, cell, cutoff)
    keep = ma[i] & mb[j] & (d > 1e-8)
    return float(d[keep].min()) if keep.any() else float(cutoff)


def mic_displacements(delta: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Minimum-image version of displacement vectors ``delta`` (..., 3) in a cell, Å.

    Used only to *check* unwrapping (a trajectory stays unwrapped everywhere else).
    """
    cell = np.asarray(cell, float)
    frac = delta @ np.linalg.inv(cell)
    frac -= np.round(frac)
    return frac @ cell
