"""Supercells of manifest rows and their relaxation (FIRE, positions + cell). Units: Å, eV.
"""

from __future__ import annotations

import contextlib
import io as _io
import math
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from ..core.errors import InputError
from .integrate import failure_reason
from .potentials import Potential


def build_supercell(row: Any) -> Atoms:
    """Supercell (ase.Atoms, pbc) of a manifest row: its ``cif`` unit cell repeated ``supercell`` times."""
    from ase.io import read

    get = row.get if hasattr(row, "get") else lambda k, d=None: getattr(row, k, d)
    sid = get("id", "?")
    cif = get("cif")
    if not isinstance(cif, str) or not cif.strip():
        raise InputError(f"structure {sid}: empty CIF text in the manifest")
    try:
        atoms = read(_io.StringIO(cif), format="cif")
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"structure {sid}: unreadable CIF ({msg})") from exc
    if isinstance(atoms, list):
        atoms = atoms[0]
    rep = get("supercell")
    rep = (1, 1, 1) if rep is None else tuple(int(r) for r in rep)
    if len(rep) != 3 or min(rep) < 1:
        raise InputError(f"structure {sid}: supercell repeats {rep} are not three positive integers")
    atoms = atoms.repeat(rep)
    atoms.pbc = True
    atoms.info.clear()
    return atoms


def _finite(atoms: Atoms) -> bool:
    return bool(np.isfinite(atoms.get_positions()).all() and np.isfinite(atoms.cell.array).all())


def _single_threaded_blas():
    """Limit BLAS to one thread: the cell filter's 3x3 expm/solve calls are ~10x slower when a
    multi-threaded OpenBLAS competes for a busy 2-core machine. No-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only a speed matter
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def relax(atoms: Atoms, potential: Potential, fmax: float = 0.05, steps: int = 200,
          cell: bool = True) -> tuple[Atoms, str]:
    """Relax positions (and the cell with ASE's FrechetCellFilter when ``cell``) with FIRE.

    Returns (relaxed copy with a single-point calculator holding energy eV / forces eV/Å, status):
    ``ok`` (max force < fmax eV/Å), ``not_converged`` (``steps`` exhausted) or ``failed: <reason>``
    (exception or NaN), in which case the unrelaxed input is returned. Never raises on model failure.
    """
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    work = atoms.copy()
    work.calc = potential.calculator
    try:
        target = FrechetCellFilter(work) if cell else work
        opt = FIRE(target, logfile=None)
        with _single_threaded_blas():
            converged = bool(opt.run(fmax=fmax, steps=steps))
        energy = float(work.get_potential_energy())
        forces = np.asarray(work.get_forces(), dtype=float)
        if not (_finite(work) and math.isfinite(energy) and np.isfinite(forces).all()):
            raise FloatingPointError("non-finite positions, cell, energy or forces")
    except Exception as exc:
        failed = atoms.copy()
        failed.calc = None
        return failed, f"failed: {failure_reason(exc)}"
    out = atoms.copy()
    out.set_cell(work.cell.array, scale_atoms=False)
    out.set_positions(work.get_positions())
    out.calc = SinglePointCalculator(out, energy=energy, forces=forces)
    return out, "ok" if converged else "not_converged"
