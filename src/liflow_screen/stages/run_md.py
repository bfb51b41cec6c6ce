"""Stage ``md``: relax, describe and simulate one chunk of the manifest; write its files.

One chunk writes, each atomically with provenance (names from :mod:`liflow_screen.io.layout`):

- ``structures.parquet`` (schema STRUCTURES): relaxed supercell + descriptors for EVERY row;
- ``frames_T{T}.parquet`` (schema FRAMES), one per configured temperature, frames of the
  trajectories that ended ``ok`` (the split of each id is in ``structures.parquet``);
- ``status.parquet`` (schema STATUS): one row per (structure with ``run_md``, temperature).

Checkpoints live under ``out_dir/ckpt`` and are removed when the chunk completes.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from ase import Atoms
from ase.data import chemical_symbols

from ..io import layout, schema
from ..core.constants import LI_Z
from ..core.errors import InputError
from ..io.files import provenance
from ..core.runtime import deterministic_torch, resolve_device, retain_freed_memory
from ..core.settings import Settings
from ..md.integrate import FrameCallback, load_pickle, safe_name, save_pickle
from ..md.batched import MDJob, batch_atom_budget, pack, relax_batch, run_trajectories
from ..md.relax import build_supercell, relax
from ..md.potentials import Potential, load_potential


def _row_get(row: pd.Series, key: str, default: Any = None) -> Any:
    val = row.get(key, default)
    return default if val is None or (isinstance(val, float) and math.isnan(val)) else val


def _structure_row(sid: str, split: str, row: pd.Series, atoms: Atoms, desc_li: list, desc_frame: list,
                   energy: float, relax_status: str) -> dict[str, Any]:
    """The STRUCTURES row of one manifest row's (relaxed or not) supercell ``atoms`` (Å, eV)."""
    numbers = atoms.get_atomic_numbers()
    return {"id": sid, "reduced_formula": str(_row_get(row, "reduced_formula", atoms.get_chemical_formula("hill", empirical=True))),
            "split": split, "numbers": numbers.astype(np.int16).tolist(),
            "cell": atoms.cell.array.reshape(-1).tolist(), "positions": atoms.get_positions().reshape(-1).tolist(),
            "n_atoms": len(atoms), "n_li": int((numbers == LI_Z).sum()),
            "desc_li": desc_li, "desc_frame": desc_frame, "energy": energy, "relax_status": relax_status}


def run(settings: Settings, manifest: pd.DataFrame | str | Path, chunk: int, out_dir: Path,
              potential: Potential | None = None, progress: bool = True,
              frame_callback: FrameCallback | None = None) -> dict[str, Path]:
    """Relax, describe and simulate every manifest row with ``chunk == chunk``; write the chunk's files.

    ``settings``: the run's settings; ``manifest`` the manifest table or its Parquet file.
    Descriptors are computed for ALL rows; MD (every ``md.temperatures``) only for rows with
    ``run_md``. In a published-models-only screening, a row without MD holding an element outside
    the models' element table is not relaxed (nothing would roll it out): its row keeps the
    unrelaxed supercell with relax_status "skipped: ...", and the rollout stage reports the element.
    Returns the written paths by name. On CPU it runs with torch's deterministic kernels
    (:func:`~liflow_screen.core.runtime.deterministic_torch`): same input, same bits at 1 or 2 threads.
    """
    on_cpu = (potential.device if potential is not None else resolve_device(settings.md.device, "md.device")) == "cpu"
    retain_freed_memory()  # MLIP steps free and re-allocate tens of MB each: keep it (runtime docstring)
    with deterministic_torch(on_cpu):
        return _run(settings, manifest, chunk, out_dir, potential, progress, frame_callback)


def _run(settings: Settings, manifest: pd.DataFrame | str | Path, chunk: int, out_dir: Path,
         potential: Potential | None, progress: bool, frame_callback: FrameCallback | None) -> dict[str, Path]:
    from tqdm.auto import tqdm

    md = settings.md
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "ckpt"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if not isinstance(manifest, pd.DataFrame):
        manifest = schema.read_df(manifest, "manifest")
    if "chunk" not in manifest.columns:
        raise InputError("manifest has no 'chunk' column")
    if chunk not in set(manifest["chunk"]):
        raise InputError(f"chunk {chunk} is not in the manifest (chunks 0..{int(manifest['chunk'].max())})")
    rows = manifest[manifest["chunk"] == chunk]
    temps = list(md.temperatures)
    if len({int(round(t)) for t in temps}) != len(temps):
        raise InputError(f"md.temperatures {temps} contain duplicates after rounding to whole K")
    if potential is None:
        potential = load_potential(md)

    from ..flow.published import screening_elements

    usable = screening_elements(settings)
    struct_rows: list[dict[str, Any]] = []
    status_rows: list[dict[str, Any]] = []
    split_of: dict[str, str] = {}
    jobs: list[MDJob] = []

    def status_row(sid: str, split: str, temp: float, status: str, reason: str, n_frames: int = 0,
                   wall_s: float = 0.0) -> dict[str, Any]:
        return schema.status_row(sid, temp, split, "md", status, reason, n_frames,
                                 max(n_frames - 1, 0) * md.frame_dt_ps, wall_s)

    # pass 1: supercells, and which rows need a relaxation (no checkpointed one with this fingerprint)
    todo: list[tuple[str, str, pd.Series, bool, Atoms | None, Path, str]] = []
    recs: dict[str, dict[str, Any]] = {}  # relaxation records (checkpointed in ckpt/relax_*.pkl) by id
    for _, row in rows.iterrows():
        sid = str(row["id"])
        split = str(_row_get(row, "split", "train"))
        split_of[sid] = split
        run_md = bool(_row_get(row, "run_md", False))
        try:
            atoms0 = build_supercell(row)
        except InputError as exc:
            for t in temps if run_md else []:
                status_rows.append(status_row(sid, split, t, "error", str(exc)))
            continue
        outside = sorted(set(atoms0.get_chemical_symbols()) - {chemical_symbols[z] for z in usable}) if (
            usable is not None and not run_md) else []
        if outside:
            struct_rows.append(_structure_row(
                sid, split, row, atoms0, [], [], float("nan"),
                f"skipped: {', '.join(outside)} outside the published models' element table"))
            continue
        rpath = ckpt_dir / f"relax_{safe_name(sid)}.pkl"
        rfp = hashlib.sha256(json.dumps([str(row["cif"]), [int(r) for r in _row_get(row, "supercell", (1, 1, 1))],
                                         md.relax_fmax, md.relax_steps, md.relax_cell, potential.name,
                                         potential.dtype]).encode()).hexdigest()[:24]
        rec = load_pickle(rpath)
        fresh = rec is None or rec.get("fingerprint") != rfp
        if not fresh:
            recs[sid] = rec
        todo.append((sid, split, row, run_md, atoms0 if fresh else None, rpath, rfp))
        struct_rows.append({})  # filled in pass 3 (rows stay in manifest order)

    # pass 2: relax what needs it: one by one (ASE FIRE) or in batches (md.batch_size > 1)
    need = [t for t in todo if t[4] is not None]
    if md.batch_size > 1:
        relaxed_of: dict[str, tuple[Atoms, str]] = {}
        order = sorted(range(len(need)), key=lambda i: len(need[i][4]))  # similar sizes share a batch
        budget = batch_atom_budget(md.batch_atoms, potential.device)
        for idx in tqdm(pack([len(need[i][4]) for i in order], md.batch_size, budget),
                        desc=f"relax chunk {chunk} (batched)", disable=not progress):
            group = [need[order[i]] for i in idx]
            for t, res in zip(group, relax_batch([t[4] for t in group], potential, md.relax_fmax, md.relax_steps,
                                                 md.relax_cell)):
                relaxed_of[t[0]] = res
    for sid, _split, _row, _run_md, atoms0, rpath, rfp in tqdm(need, desc=f"relax chunk {chunk}",
                                                                disable=not progress or md.batch_size > 1):
        if md.batch_size > 1:
            relaxed, rstatus = relaxed_of[sid]
        else:
            relaxed, rstatus = relax(atoms0, potential, md.relax_fmax, md.relax_steps, md.relax_cell)
        energy = float(relaxed.get_potential_energy()) if relaxed.calc is not None else float("nan")
        try:
            desc_li, desc_frame = potential.descriptors(relaxed)
            desc_li, desc_frame = desc_li.tolist(), desc_frame.tolist()
        except Exception:  # descriptors unavailable (e.g. element outside the model): empty lists
            desc_li, desc_frame = [], []
        recs[sid] = {"fingerprint": rfp, "numbers": relaxed.get_atomic_numbers(), "cell": relaxed.cell.array,
                     "positions": relaxed.get_positions(), "status": rstatus, "energy": energy,
                     "desc_li": desc_li, "desc_frame": desc_frame}
        save_pickle(rpath, recs[sid])

    # pass 3: structure rows and MD jobs, in manifest order
    slots = [i for i, r in enumerate(struct_rows) if not r]
    for slot, (sid, split, row, run_md, _atoms0, _rpath, _rfp) in zip(slots, todo):
        rec = recs[sid]
        relaxed = Atoms(numbers=rec["numbers"], positions=rec["positions"], cell=rec["cell"], pbc=True)
        struct_rows[slot] = _structure_row(sid, split, row, relaxed, rec["desc_li"], rec["desc_frame"], rec["energy"],
                                           rec["status"])
        if not run_md:
            continue
        if rec["status"].startswith("failed"):
            for t in temps:
                status_rows.append(status_row(sid, split, t, "relax_failed", rec["status"]))
            continue
        jobs.extend(MDJob(sid, relaxed, t) for t in temps)

    bar = tqdm(total=len(jobs) * (md.n_frames - 1), desc=f"md chunk {chunk}", disable=not progress)
    lock = threading.Lock()

    def on_frame(sid: str, temp: float, frame: int) -> None:
        if frame > 0:
            with lock:
                bar.update(1)
        if frame_callback is not None:
            frame_callback(sid, temp, frame)

    results = run_trajectories(jobs, potential, md, settings.seed, md.batch_size, ckpt_dir, on_frame, md.batch_atoms)
    bar.close()

    frames_by_t: dict[int, list[dict[str, Any]]] = {int(round(t)): [] for t in temps}
    for res in results:
        tk = int(round(res.temperature))
        status_rows.append(status_row(res.sid, split_of[res.sid], res.temperature, res.status, res.reason,
                                      res.n_frames, res.wall_s))
        if res.status != "ok":
            continue
        for f in range(res.n_frames):
            frames_by_t[tk].append({
                "id": res.sid, "source": "md", "frame": f, "time_ps": np.float32(f * md.frame_dt_ps),
                "positions": res.positions[f].reshape(-1), "energy": float(res.energies[f]),
                "temperature_inst": np.float32(res.temperatures[f]),
            })

    prov = provenance(settings, stage="md", chunk=int(chunk), potential=potential.name)
    paths = {"structures": out_dir / layout.STRUCTURES, "status": out_dir / layout.STATUS}
    schema.write_rows(struct_rows, paths["structures"], "structures", prov=prov)
    for tk, frows in frames_by_t.items():
        paths[f"frames_T{tk}"] = layout.frames_file(out_dir, tk)
        schema.write_rows(frows, paths[f"frames_T{tk}"], "frames", prov=prov)
    schema.write_rows(status_rows, paths["status"], "status", prov=prov)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return paths
