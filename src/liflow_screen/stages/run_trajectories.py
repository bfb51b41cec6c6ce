"""Stage ``trajectories``: the user's own trajectories (a CSV manifest of files ASE reads) as a
structures manifest plus one MD-chunk folder, so ``stages.run_dataset`` builds the same Parquet
dataset from them as from the project's own MD.

Manifest columns: ``id`` (material), ``path`` (relative to the CSV's folder), ``temperature_K``;
optional ``frame_dt_fs`` (time between saved frames; required unless the file records it, as
vasprun.xml does), ``format`` (an ASE format name, else guessed), ``split`` (default train) and
``unwrapped`` (true / false / auto, default auto: whether the file's positions are unwrapped; see
:mod:`liflow_screen.dataset.trajectories`).
Units: Å, fs, ps, K.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..io import layout, schema
from ..core.constants import LI_Z
from ..core.errors import InputError
from ..core.geometry import perpendicular_widths
from ..io.files import provenance
from ..core.settings import Settings
from ..dataset.trajectories import InputTrajectory, read

log = logging.getLogger(__name__)

COLUMNS = ("id", "path", "temperature_K", "frame_dt_fs", "format", "split", "unwrapped")
#: Values of the ``unwrapped`` column (case-insensitive; empty = auto).
UNWRAPPED = {"true": True, "false": False, "auto": None}
REQUIRED = ("id", "path", "temperature_K")


def load_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The trajectory manifest, checked: known columns, required ones present, (id, T) unique."""
    p = Path(path)
    try:
        df = pd.read_csv(p, dtype={"id": str, "path": str, "format": str, "split": str, "unwrapped": str})
    except Exception as exc:
        raise InputError(f"{p}: unreadable trajectory manifest ({type(exc).__name__}: {exc})") from exc
    unknown = sorted(set(df.columns) - set(COLUMNS))
    if unknown:
        raise InputError(f"{p}: unknown column(s) {', '.join(unknown)} (known: {', '.join(COLUMNS)})")
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise InputError(f"{p}: missing column(s) {', '.join(missing)}")
    for c in ("frame_dt_fs", "format", "split", "unwrapped"):
        if c not in df.columns:
            df[c] = None
    words = df["unwrapped"].fillna("auto").astype(str).str.strip().str.lower()
    bad_uw = sorted(set(words) - set(UNWRAPPED))
    if bad_uw:
        raise InputError(f"{p}: column unwrapped: {bad_uw[0]!r} is not true, false or auto")
    df["unwrapped"] = [UNWRAPPED[w] for w in words]
    df["temperature_K"] = df["temperature_K"].astype(float)
    dup = df.assign(T=df["temperature_K"].round().astype(int)).duplicated(["id", "T"])
    if dup.any():
        r = df[dup].iloc[0]
        raise InputError(f"{p}: {r['id']} at {r['temperature_K']:g} K is listed twice")
    bad = sorted(set(df["split"].dropna()) - set(schema.SPLITS))
    if bad:
        raise InputError(f"{p}: unknown split(s) {', '.join(bad)} (train, val, test)")
    df["split"] = df["split"].fillna("train")
    df["path"] = [str((p.parent / q).resolve()) for q in df["path"]]
    return df


def _frame_dt_fs(row: Any, traj: InputTrajectory) -> float:
    given = row["frame_dt_fs"]
    given = None if given is None or (isinstance(given, float) and math.isnan(given)) else float(given)
    if given is None and traj.frame_dt_fs is None:
        raise InputError(f"{traj.path}: the file does not record the time between frames; give frame_dt_fs")
    if given is not None and traj.frame_dt_fs is not None and abs(given - traj.frame_dt_fs) > 1e-9 * given:
        raise InputError(f"{traj.path}: frame_dt_fs {given:g} disagrees with the file's {traj.frame_dt_fs:g} fs")
    return given if given is not None else float(traj.frame_dt_fs)


def run(settings: Settings, table: str | os.PathLike[str], manifest_out: str | os.PathLike[str],
        out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Read, check and unwrap every listed trajectory; write the manifest and the chunk's files.

    The config must describe the trajectories: ``md.temperatures`` their temperatures and
    ``md.timestep_fs`` x ``md.save_every`` their frame interval (so ``dataset.delta_tau_ps`` maps
    onto whole frames). Returns the written paths by name.
    """
    df = load_table(table)
    md = settings.md
    cfg_temps = sorted({int(round(t)) for t in md.temperatures})
    cfg_dt_fs = md.frame_dt_ps * 1000.0
    extra = sorted({int(round(t)) for t in df["temperature_K"]} - set(cfg_temps))
    if extra:
        raise InputError(f"trajectories at {extra} K are not in md.temperatures {cfg_temps}")
    prov = provenance(settings, stage="trajectories", table=str(table))
    frames: dict[int, list[dict[str, Any]]] = {T: [] for T in cfg_temps}
    status, struct_rows, man_rows = [], [], []
    for sid, grp in df.sort_values(["id", "temperature_K"]).groupby("id", sort=True):
        ref: InputTrajectory | None = None
        for _, row in grp.iterrows():
            traj = read(row["path"], row["format"] if isinstance(row["format"], str) else None,
                        unwrapped=row["unwrapped"])
            dt_fs = _frame_dt_fs(row, traj)
            if abs(dt_fs - cfg_dt_fs) > 1e-6 * cfg_dt_fs:
                raise InputError(f"{traj.path}: frames are {dt_fs:g} fs apart but md.timestep_fs x md.save_every "
                                 f"= {cfg_dt_fs:g} fs; set them to match the trajectories")
            if ref is None:
                ref = traj
            elif not (np.array_equal(traj.numbers, ref.numbers) and np.allclose(traj.cell, ref.cell, atol=1e-6)):
                raise InputError(f"{traj.path}: other atoms or another cell than {ref.path} for the same id {sid}; "
                                 f"give it its own id")
            T = int(round(float(row["temperature_K"])))
            n_frames = len(traj.positions)
            for f in range(n_frames):
                frames[T].append({"id": sid, "source": "md", "frame": f, "time_ps": np.float32(f * dt_fs / 1000.0),
                                  "positions": traj.positions[f].astype(np.float32).reshape(-1),
                                  "energy": None if traj.energies is None else float(traj.energies[f]),
                                  "temperature_inst": None})
            how = "unwrapped input" if traj.unwrapped_input else "wrapped input, unwrapped"
            status.append(schema.status_row(sid, T, row["split"], "md", "ok", f"from {traj.path} ({how})", n_frames,
                                            (n_frames - 1) * dt_fs / 1000.0))
        assert ref is not None
        split = str(grp["split"].iloc[0])
        if grp["split"].nunique() > 1:
            raise InputError(f"{sid}: its trajectories are listed in different splits")
        struct_rows.append(_structure_row(sid, split, ref))
        man_rows.append(_manifest_row(sid, split, ref))
    out = Path(out_dir)
    paths = {"manifest": Path(manifest_out), "structures": out / layout.STRUCTURES, "status": out / layout.STATUS}
    schema.write_rows(man_rows, paths["manifest"], "manifest", prov=prov)
    schema.write_rows(struct_rows, paths["structures"], "structures", prov=prov)
    for T, rows in frames.items():
        paths[f"frames_T{T}"] = layout.frames_file(out, T)
        schema.write_rows(rows, paths[f"frames_T{T}"], "frames", prov=prov)
    schema.write_rows(status, paths["status"], "status", prov=prov)
    log.info("%d trajectories of %d structures -> %s", len(status), len(struct_rows), out)
    return paths


def _formulas(numbers: np.ndarray) -> tuple[str, str]:
    from pymatgen.core import Composition, Element

    comp = Composition({Element.from_Z(int(z)): int(c) for z, c in zip(*np.unique(numbers, return_counts=True))})
    return comp.formula, comp.reduced_formula


def _structure_row(sid: str, split: str, traj: InputTrajectory) -> dict[str, Any]:
    _, reduced = _formulas(traj.numbers)
    return {"id": sid, "reduced_formula": reduced, "split": split, "numbers": traj.numbers.tolist(),
            "cell": traj.cell.reshape(-1).tolist(), "positions": traj.positions[0].reshape(-1).tolist(),
            "n_atoms": len(traj.numbers), "n_li": int((traj.numbers == LI_Z).sum()), "desc_li": [],
            "desc_frame": [], "energy": None if traj.energies is None else float(traj.energies[0]),
            "relax_status": "input: frame 0 of the first trajectory (not relaxed)"}


def _manifest_row(sid: str, split: str, traj: InputTrajectory) -> dict[str, Any]:
    from ase import Atoms
    from pymatgen.io.ase import AseAtomsAdaptor

    formula, reduced = _formulas(traj.numbers)
    atoms = Atoms(numbers=traj.numbers, positions=traj.positions[0], cell=traj.cell, pbc=True)
    return {"id": sid, "formula": formula, "reduced_formula": reduced, "n_atoms": len(traj.numbers),
            "li_fraction": float((traj.numbers == LI_Z).mean()), "band_gap": None, "e_above_hull": None,
            "source": f"trajectory:{traj.path}", "cif": AseAtomsAdaptor.get_structure(atoms).to(fmt="cif"),
            "supercell": [1, 1, 1], "n_atoms_supercell": len(traj.numbers),
            "min_width": float(perpendicular_widths(traj.cell).min()), "split": split, "chunk": 0, "run_md": True}
