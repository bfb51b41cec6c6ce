"""Assertion helpers for the symmetries of Proposition 1 (as NequIP ships ``assert_AtomicData_equivariant``).

A LiFlow vector field (or a whole rollout step) maps (displacement D, positions X, lattice L, ...)
to a displacement-like output. Proposition 1: it must be

* **E(3)-equivariant**: rotating / reflecting X, L and D by R rotates the output by R;
* **translation invariant**: shifting every position by the same vector changes nothing;
* **periodic**: moving any atom by a lattice vector (another image of it) changes nothing;
* **permutation equivariant**: renumbering atoms within a graph renumbers the output.

``fn(g, d) -> (N, 3)`` is any such function of a :class:`GraphBatch` and an (N, 3) tensor; use
``d = None`` for functions of the geometry only (e.g. a zero-noise rollout step from positions).
Units: Å. Tolerances are relative to the output's magnitude (float32).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .graph import GraphBatch

Field = Callable[[GraphBatch, "torch.Tensor | None"], torch.Tensor]


def _close(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor, rtol: float, what: str) -> None:
    err = float((a - b).abs().max())
    tol = rtol * float(ref.abs().max()) + 1e-7
    if not err <= tol:
        raise AssertionError(f"{what}: max deviation {err:.3g} Å > tolerance {tol:.3g} Å")


def _regraph(g: GraphBatch, pos: torch.Tensor, cell: torch.Tensor | None = None,
             perm: torch.Tensor | None = None) -> GraphBatch:
    idx = perm if perm is not None else slice(None)
    return GraphBatch(numbers=g.numbers[idx], pos=pos, cell=g.cell if cell is None else cell, batch=g.batch,
                      ptr=g.ptr, temperature=g.temperature, masses=g.masses[idx])


def random_orthogonal(seed: int, det: float = 1.0) -> torch.Tensor:
    """A random 3x3 orthogonal matrix with determinant ``det`` (+1 rotation, -1 improper)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    r = q * (np.sign(np.linalg.det(q)) * det)
    return torch.as_tensor(r, dtype=torch.float32)


def assert_equivariant(fn: Field, g: GraphBatch, d: torch.Tensor | None = None, seed: int = 0,
                       rtol: float = 1e-4) -> torch.Tensor:
    """Check all four symmetries of ``fn`` at (g, d); raise AssertionError naming the broken one.

    Row-vector convention: positions and outputs transform as ``x @ R``. Returns ``fn(g, d)``.
    """
    rng = np.random.default_rng(seed)
    out = fn(g, d)
    if out.shape != g.pos.shape:
        raise AssertionError(f"output shape {tuple(out.shape)} is not (N, 3) = {tuple(g.pos.shape)}")
    for det in (1.0, -1.0):
        r = random_orthogonal(seed + 1, det)
        got = fn(_regraph(g, g.pos @ r, g.cell @ r), None if d is None else d @ r)
        _close(got, out @ r, out, rtol, "rotation" if det > 0 else "reflection")
    shift = torch.as_tensor(rng.uniform(-4.0, 4.0, 3), dtype=torch.float32)
    _close(fn(g.with_pos(g.pos + shift), d), out, out, rtol, "translation")
    z = torch.as_tensor(rng.integers(-2, 3, (len(g.pos), 3)), dtype=torch.float32)
    imaged = g.pos + torch.einsum("nk,nkc->nc", z, g.cell[g.batch])
    _close(fn(g.with_pos(imaged), d), out, out, rtol, "lattice images (periodicity)")
    ptr = g.ptr.tolist()
    perm = torch.as_tensor(np.concatenate([lo + rng.permutation(hi - lo) for lo, hi in zip(ptr[:-1], ptr[1:])]))
    got = fn(_regraph(g, g.pos[perm], perm=perm), None if d is None else d[perm])
    _close(got, out[perm], out, rtol, "permutation")
    return out
