"""User trajectories (any format ASE reads): fixed-cell check, frame interval, unwrapping.

Units: positions Å, frame interval fs (input) and ps (frames), temperature K.

Wrapped or unwrapped: a file's positions are *unwrapped* (an MD code's extxyz, continuous in
time) or *wrapped* into the cell (VASP XDATCAR). The trajectories CSV says which (column
``unwrapped``: true / false / auto); auto takes any coordinate outside the cell (fractional
coordinate < 0 or >= 1, beyond :data:`OUTSIDE_TOL`) as proof of unwrapped input, and a file whose
atoms all stay inside the cell as wrapped.

* Unwrapped input is taken as is: each atom is shifted by the one lattice vector that puts it in
  the cell at frame 0 (the convention of every trajectory here); moves between frames are kept,
  however large.
* Wrapped input is unwrapped: every later frame adds the minimum-image fractional displacement
  from the frame before. That is only unambiguous while no atom moves more than
  :data:`MAX_FRAME_JUMP` of a lattice vector between saved frames; beyond that the file is refused
  with the file, atom and frames named (save frames more often, or declare the input unwrapped).

A cell that changes between frames (NpT) is refused: the dataset and LiFlow assume one fixed cell
per trajectory.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import InputError

#: Largest frame-to-frame move, as a fraction of a lattice vector, that unwraps unambiguously.
MAX_FRAME_JUMP = 0.25
#: A fractional coordinate beyond [0, 1) by more than this marks the input as unwrapped (auto).
OUTSIDE_TOL = 1e-6
#: Cell entries (Å) may differ by this much between frames and still count as fixed.
CELL_TOL_A = 1e-6


@dataclass
class InputTrajectory:
    """One trajectory read from a user file: unwrapped positions (F, n, 3) Å, fixed cell (3, 3) Å."""

    path: str
    numbers: np.ndarray
    cell: np.ndarray
    positions: np.ndarray
    energies: np.ndarray | None  # eV per frame, when the file has them
    frame_dt_fs: float | None    # from the file, when the format records it
    unwrapped_input: bool = False  # the file held unwrapped positions (declared or detected)


def vasprun_frame_dt_fs(path: str | os.PathLike[str]) -> float | None:
    """POTIM (fs) of a vasprun.xml: its ionic steps are one POTIM apart. None if absent."""
    for _, el in ET.iterparse(str(path), events=("end",)):
        if el.tag == "i" and el.get("name") == "POTIM" and el.text:
            return float(el.text.split()[0])
    return None


def unwrap(frac: np.ndarray, path: str = "trajectory") -> np.ndarray:
    """Unwrapped fractional coordinates (F, n, 3) from any-image ones, frame 0 wrapped into [0, 1).

    Raises InputError when a frame-to-frame move exceeds MAX_FRAME_JUMP of a lattice vector.
    """
    frac = np.asarray(frac, dtype=np.float64)
    out = np.empty_like(frac)
    out[0] = frac[0] - np.floor(frac[0])
    if len(frac) > 1:
        d = np.diff(frac, axis=0)
        d -= np.round(d)
        worst = np.abs(d)
        if worst.max() > MAX_FRAME_JUMP:
            f, i, k = np.unravel_index(int(np.argmax(worst)), worst.shape)
            raise InputError(f"{path}: atom {i} moves {worst[f, i, k]:.2f} of lattice vector {'abc'[k]} between "
                             f"frames {f} and {f + 1} of wrapped positions: unwrapping would be ambiguous "
                             f"(limit {MAX_FRAME_JUMP}); save frames more often, or, if the file's positions "
                             f"are already unwrapped, set unwrapped = true for it in the trajectories CSV")
        out[1:] = out[0] + np.cumsum(d, axis=0)
    return out


def is_unwrapped(frac: np.ndarray) -> bool:
    """Whether fractional coordinates (F, n, 3) leave the cell anywhere: proof of unwrapped input."""
    frac = np.asarray(frac)
    return bool((frac < -OUTSIDE_TOL).any() or (frac >= 1.0 + OUTSIDE_TOL).any())


def read(path: str | os.PathLike[str], fmt: str | None = None, unwrapped: bool | None = None) -> InputTrajectory:
    """Read every frame of ``path`` with ASE (format guessed unless ``fmt``), check, unwrap.

    ``unwrapped``: the file's positions are unwrapped (True: taken as is), wrapped (False: unwrapped
    here, refused when ambiguous) or None (auto: unwrapped if any coordinate is outside the cell).
    """
    from ase.io import read as ase_read

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: trajectory file not found")
    try:
        frames = ase_read(str(p), index=":", format=fmt)
    except Exception as exc:  # ASE raises many types for unreadable files
        raise InputError(f"{p}: not a trajectory ASE can read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(frames, list):
        frames = [frames]
    if len(frames) < 2:
        raise InputError(f"{p}: {len(frames)} frame(s); a trajectory needs at least 2")
    numbers = frames[0].get_atomic_numbers()
    cell = np.asarray(frames[0].cell.array, dtype=np.float64)
    if not all(frames[0].pbc) or abs(np.linalg.det(cell)) < 1e-6:
        raise InputError(f"{p}: not a periodic 3D cell (pbc {list(frames[0].pbc)})")
    for f, atoms in enumerate(frames[1:], start=1):
        if not np.array_equal(atoms.get_atomic_numbers(), numbers):
            raise InputError(f"{p}: frame {f} has other atoms than frame 0")
        if np.abs(atoms.cell.array - cell).max() > CELL_TOL_A:
            raise InputError(f"{p}: the cell changes at frame {f} (max change "
                             f"{np.abs(atoms.cell.array - cell).max():.3g} Å); a fixed cell (NVT) is required")
    pos = np.stack([a.get_positions(wrap=False) for a in frames])
    if not np.isfinite(pos).all():
        raise InputError(f"{p}: NaN or infinite positions")
    frac = pos @ np.linalg.inv(cell)
    as_is = is_unwrapped(frac) if unwrapped is None else bool(unwrapped)
    if as_is:  # one lattice translation per atom puts frame 0 in the cell; the motion is untouched
        positions = (frac - np.floor(frac[0])[None]) @ cell
    else:
        positions = unwrap(frac, str(p)) @ cell
    energies = None
    try:
        energies = np.array([a.get_potential_energy() for a in frames], dtype=np.float64)
    except Exception:  # no calculator results stored in this format / file
        energies = None
    dt = None
    if (fmt or "").startswith("vasp-xml") or p.name.endswith(("vasprun.xml", ".xml")):
        dt = vasprun_frame_dt_fs(p)
    return InputTrajectory(str(p), numbers.astype(np.int64), cell, positions, energies, dt, as_is)
