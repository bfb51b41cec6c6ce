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


def _canonical_edge_order(i: "torch.Tensor", j: "torch.Tensor", s: "torch.Tensor", n: int,
                          k: int | None = None) -> "torch.Tensor":
    """Permutation sorting edges by (i, j, integer image shift s): one order whatever produced them.

    ``k`` > max |s| (computed here when not given: one host sync). One sort of a single int64 key when
    it fits (it does for any realistic batch), else three stable sorts (least significant first)."""
    import torch

    if i.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=i.device)
    k = int(s.abs().max()) + 1 if k is None else int(k)
    w = 2 * k + 1
    code = ((s[:, 0] + k) * w + (s[:, 1] + k)) * w + (s[:, 2] + k)
    if float(n) * float(n) * float(w) ** 3 < 2.0**62:
        return torch.argsort((i * n + j) * (w**3) + code, stable=True)
    order = torch.argsort(code, stable=True)
    order = order[torch.argsort(j[order], stable=True)]
    return order[torch.argsort(i[order], stable=True)]


#: Candidate pairs examined per chunk of the batched cell list (bounds its temporary memory:
#: ~100 bytes per candidate).
NL_CANDIDATES_PER_CHUNK = 1 << 24


class _CellListPlan:
    """What the batched cell list needs that depends only on the cells and the batch layout (fixed
    during a rollout): built once per (cells, batch, cutoff) and reused every step, so a call costs
    one host sync. Cells in Å (rows a, b, c)."""

    def __init__(self, cell: "torch.Tensor", batch: "torch.Tensor", cutoff: float) -> None:
        import torch

        dev = cell.device
        self.refs = (cell, batch)  # keep the keyed tensors alive (their id() is the cache key)
        c = cell.detach().to(torch.float64)                                   # (G,3,3)
        b = batch.to(dev, torch.long)
        self.c_b = c[b]                                                       # (N,3,3)
        self.inv_b = torch.linalg.inv(c)[b]                                   # frac = p @ inv(cell)
        vol = torch.linalg.det(c).abs()
        cross = torch.stack([torch.linalg.cross(c[:, 1], c[:, 2]), torch.linalg.cross(c[:, 2], c[:, 0]),
                             torch.linalg.cross(c[:, 0], c[:, 1])], dim=1)    # (G,3,3)
        width = vol.unsqueeze(-1) / torch.linalg.vector_norm(cross, dim=-1)   # (G,3) perpendicular widths, Å
        nb = torch.clamp(torch.floor(2.0 * width / cutoff), min=1.0).long()  # bins per direction
        reach = torch.ceil(cutoff * nb.to(torch.float64) / width - 1e-9).long().clamp(min=1)  # bins to scan
        nbin_g = nb.prod(dim=1)
        base = torch.cumsum(nbin_g, 0) - nbin_g                               # first bin id per graph
        host = torch.cat([reach.max().view(1), nbin_g.sum().view(1)]).cpu()   # one sync per plan
        self.m, self.n_bins = int(host[0]), int(host[1])
        rng = torch.arange(-self.m, self.m + 1, device=dev)
        offs = torch.cartesian_prod(rng, rng, rng)                            # (K,3) bin offsets
        self.offs, self.n_off = offs, int(offs.shape[0])
        self.nb_a, self.base_b = nb[b], base[b]                               # (N,3), (N,)
        self.within_reach = (offs.abs().unsqueeze(0) <= reach[b].unsqueeze(1)).all(-1)  # (N,K)


_PLANS: dict[tuple, _CellListPlan] = {}


def _plan(cell: "torch.Tensor", batch: "torch.Tensor", cutoff: float) -> _CellListPlan:
    key = (id(cell), id(batch), float(cutoff), tuple(cell.shape), tuple(batch.shape), str(cell.device))
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= 8:
            _PLANS.pop(next(iter(_PLANS)))
        plan = _PLANS[key] = _CellListPlan(cell, batch, cutoff)
    return plan


def radius_graph_pbc(
    pos: torch.Tensor,
    cell: torch.Tensor,
    batch: torch.Tensor,
    cutoff: float,
    ptr: torch.Tensor | None = None,
    max_candidates: int | None = None,
    return_images: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Periodic radius graph of a whole batch of crystals in ONE call, on the device of ``pos``.

    pos (N,3) Å unwrapped (any lattice image is fine), cell (G,3,3) Å (rows a, b, c), batch (N,)
    graph index, atoms of a graph contiguous (``ptr`` (G+1,) offsets, unused: kept for callers).
    Returns ``edge_index`` (2,E) as (i, j) global atom indices with |r_j + S - r_i| < cutoff, and
    ``shift`` (E,3), the Cartesian image offset S in Å, so that the edge vector is
    ``pos[j] - pos[i] + shift``. Self-pairs are excluded unless they connect distinct images. Edges
    are in canonical order: sorted by (i, j, integer image), whatever the batch (messages summed in
    this order are bit-reproducible on CPU). ``return_images``: also return the integer lattice
    image (E,3) int64 with ``shift = image @ cell`` (what MLIPs need to strain the cell for stress).

    Method: a batched cell list in plain torch (no per-graph Python loop). Each graph's wrapped
    fractional coordinates are binned into n_k = floor(2 w_k / cutoff) slabs per lattice direction
    (w_k the perpendicular width, Å; at least 1), so a slab is >= cutoff/2 thick; every atom then
    scans the bins within m_k = ceil(cutoff n_k / w_k) slabs in each direction (images included,
    so cells narrower than the cutoff work too). Each (bin, image) pair is visited once, so no pair
    is found twice. Distances are tested in float64 on wrapped positions; the integer image shift
    is then carried back to the unwrapped input, which makes the shift exact. The cell-dependent
    part is planned once per (cells, batch) tensors; a call then makes one host sync (the output
    size). ``max_candidates`` bounds the candidate pairs held at once (default
    ``NL_CANDIDATES_PER_CHUNK``); larger inputs are processed in atom chunks (one sync each).
    """
    import torch

    dev = pos.device
    n_atoms, n_graphs = int(pos.shape[0]), int(cell.shape[0])
    empty = (torch.zeros(2, 0, dtype=torch.long, device=dev), torch.zeros(0, 3, dtype=pos.dtype, device=dev))
    if return_images:
        empty = (*empty, torch.zeros(0, 3, dtype=torch.long, device=dev))
    if n_atoms == 0 or n_graphs == 0:
        return empty
    budget = int(max_candidates or NL_CANDIDATES_PER_CHUNK)
    cutoff = float(cutoff)
    pl = _plan(cell, batch, cutoff)
    n_off, nb_a = pl.n_off, pl.nb_a
    p = pos.detach().to(torch.float64)
    frac = torch.bmm(p.unsqueeze(1), pl.inv_b).squeeze(1)                 # (N,3)
    offset = torch.floor(frac)                                            # lattice image of each atom
    fw = (frac - offset).clamp(0.0, 1.0 - 1e-12)                          # wrapped fractional, [0,1)
    pw = p - torch.bmm(offset.unsqueeze(1), pl.c_b).squeeze(1)            # wrapped Cartesian, Å
    bins = torch.minimum(torch.floor(fw * nb_a.to(torch.float64)).long(), nb_a - 1)
    gid = pl.base_b + (bins[:, 0] * nb_a[:, 1] + bins[:, 1]) * nb_a[:, 2] + bins[:, 2]
    order = torch.argsort(gid, stable=True)                               # atoms sorted by bin
    count = torch.bincount(gid, minlength=pl.n_bins)
    start = torch.cumsum(count, 0) - count
    raw = bins.unsqueeze(1) + pl.offs.unsqueeze(0)                        # (N,K,3)
    image = torch.div(raw, nb_a.unsqueeze(1), rounding_mode="floor")      # lattice image of that bin
    wrapped = raw - image * nb_a.unsqueeze(1)
    nbr = (pl.base_b.unsqueeze(1) + (wrapped[..., 0] * nb_a[:, 1:2] + wrapped[..., 1]) * nb_a[:, 2:3]
           + wrapped[..., 2])
    cnt = torch.where(pl.within_reach, count[nbr], torch.zeros_like(nbr)).reshape(-1)  # candidates per (atom, offset)
    first_j = start[nbr].reshape(-1)                                      # their first slot in ``order``
    # atom i moved into the frame of that bin's image: vec = pw[j] - q  (= pw[j] + S@c - pw[i])
    q = (pw.unsqueeze(1) - torch.bmm(image.to(torch.float64), pl.c_b)).reshape(-1, 3)  # (N*K,3) Å
    center = n_off // 2                                                   # the zero offset
    per_atom = cnt.view(n_atoms, n_off).sum(1)
    # the call's one host sync: candidate counts (chunk bounds, output sizes) and the largest image
    # offset of an atom (bounds the unwrapped shifts for the canonical sort key)
    host = torch.cat([torch.cumsum(per_atom, 0), offset.abs().max().long().view(1)]).cpu()
    cum, max_off = host[:-1], int(host[-1])
    bounds = [0]
    while bounds[-1] < n_atoms:                                           # atom chunks of <= budget candidates
        lo = bounds[-1]
        done = int(cum[lo - 1]) if lo > 0 else 0
        hi = int(torch.searchsorted(cum, torch.tensor(done + budget), right=True))
        bounds.append(min(max(hi, lo + 1), n_atoms))
    c2 = cutoff * cutoff
    srcs, jj = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        n_c = int(cum[hi - 1]) - (int(cum[lo - 1]) if lo > 0 else 0)
        if n_c == 0:
            continue
        cnt_c = cnt[lo * n_off:hi * n_off]
        src = torch.repeat_interleave(torch.arange(lo * n_off, hi * n_off, device=dev), cnt_c, output_size=n_c)
        slot = first_j[src] + torch.arange(n_c, device=dev) - (torch.cumsum(cnt_c, 0) - cnt_c)[src - lo * n_off]
        j = order[slot]
        vec = pw[j] - q[src]
        keep = (vec * vec).sum(-1) < c2
        keep &= (j != torch.div(src, n_off, rounding_mode="floor")) | (src % n_off != center)  # no self pair
        srcs.append(src[keep])
        jj.append(j[keep])
    if not srcs:
        return empty
    src, j = torch.cat(srcs), torch.cat(jj)
    i = torch.div(src, n_off, rounding_mode="floor")
    s = image.reshape(-1, 3)[src]                                         # image of j's bin, wrapped frame
    # image shift of the unwrapped input: p_w[j] - p_w[i] + s@c = p[j] - p[i] + (s - off_j + off_i)@c
    s = s - offset[j].long() + offset[i].long()
    perm = _canonical_edge_order(i, j, s, n_atoms, k=pl.m + 2 * max_off + 1)
    i, j, s = i[perm], j[perm], s[perm]
    shift = (s.to(torch.float64).unsqueeze(-1) * pl.c_b[i]).sum(1)        # (E,3) Å, float64, exact sum of 3
    if return_images:
        return torch.stack([i, j]), shift.to(pos.dtype), s
    return torch.stack([i, j]), shift.to(pos.dtype)


def radius_graph_pbc_vesin(
    pos: torch.Tensor,
    cell: torch.Tensor,
    batch: torch.Tensor,
    cutoff: float,
    ptr: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same graph as :func:`radius_graph_pbc` (same edges, same order), computed graph by graph
    with vesin-torch: the engine before the batched cell list, kept as the independent check in
    tests and as the comparison in ``bench/bench_rollout.py``. One vesin call and a few host syncs
    per graph."""
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
        frac = torch.linalg.solve(c.T, p.T).T
        offset = torch.floor(frac)
        p_wrapped = p - offset @ c
        i, j, s = nl.compute(points=p_wrapped, box=c, periodic=True, quantities="ijS")
        s = s.long() - offset[j].long() + offset[i].long()
        order = _canonical_edge_order(i.long(), j.long(), s, hi - lo)
        edges.append(torch.stack([i.long()[order] + lo, j.long()[order] + lo]))
        shifts.append((s[order].to(torch.float64).unsqueeze(-1) * c).sum(1))
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
