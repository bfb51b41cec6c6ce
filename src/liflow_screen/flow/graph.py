"""Batched crystal graphs shared by training and rollouts (one struct, one collate).

A ``GraphBatch`` holds G crystals concatenated atom-wise. Units: positions Å (unwrapped),
cell Å (rows a, b, c), masses amu, temperature K.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from ase.data import atomic_masses

from ..core.constants import LI_Z


@dataclass
class GraphBatch:
    """G crystals, N atoms in all."""

    numbers: torch.Tensor      # (N,) long, atomic numbers
    pos: torch.Tensor          # (N,3) float32, conditioning geometry X_tau, Å
    cell: torch.Tensor         # (G,3,3) float32, Å
    batch: torch.Tensor        # (N,) long, graph index of each atom
    ptr: torch.Tensor          # (G+1,) long, atom offsets
    temperature: torch.Tensor  # (G,) float32, K
    masses: torch.Tensor       # (N,) float32, amu

    @property
    def n_graphs(self) -> int:
        return int(self.cell.shape[0])

    @property
    def is_li(self) -> torch.Tensor:
        """(N,) bool: lithium atoms."""
        return self.numbers == LI_Z

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "GraphBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                                for f in fields(self)})

    def pin_memory(self) -> "GraphBatch":
        """Page-locked copy, for asynchronous host-to-GPU copies."""
        return replace(self, **{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    def with_pos(self, pos: torch.Tensor) -> "GraphBatch":
        """Same crystals, new conditioning positions (Å)."""
        return replace(self, pos=pos)


def make_batch(
    numbers: Sequence[np.ndarray],
    positions: Sequence[np.ndarray],
    cells: Sequence[np.ndarray],
    temperatures: Sequence[float],
    device: torch.device | str = "cpu",
) -> GraphBatch:
    """Concatenate G crystals into one GraphBatch (float32 positions and cells)."""
    counts = [len(z) for z in numbers]
    z = torch.as_tensor(np.concatenate(numbers), dtype=torch.long)
    ptr = torch.zeros(len(counts) + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(torch.as_tensor(counts), 0)
    return GraphBatch(
        numbers=z,
        pos=torch.as_tensor(np.concatenate(positions).reshape(-1, 3), dtype=torch.float32),
        cell=torch.as_tensor(np.stack([np.asarray(c).reshape(3, 3) for c in cells]), dtype=torch.float32),
        batch=torch.repeat_interleave(torch.arange(len(counts)), torch.as_tensor(counts)),
        ptr=ptr,
        temperature=torch.as_tensor(np.asarray(temperatures, dtype=np.float32)),
        masses=torch.as_tensor(atomic_masses[z.numpy()], dtype=torch.float32),
    ).to(device)
