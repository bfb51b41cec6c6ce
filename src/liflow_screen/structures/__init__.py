"""Structures stage: collect candidate crystals, build supercells, split by composition, plan chunks."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from ..core.errors import InputError
from ..core.geometry import perpendicular_widths, supercell_repeats
from ..core.settings import Settings, StructuresSettings
from .sources import Record, Rejection, cif_dir, manifest_file, materials_project

log = logging.getLogger(__name__)


def collect(s: StructuresSettings) -> tuple[list[Record], list[Rejection], dict[str, Any]]:
    """Records from the configured source (panel | embedded | mp | cif_dir | manifest).

    ``panel``: the validation panel's compounds (``structures.panel_ids``, null = all 20), plus the
    user's own structures from ``structures.path`` when given (a folder of CIFs or a CSV manifest),
    screened beside them.
    """
    src = s.source
    extra: dict[str, Any] = {"source": src}
    if src == "panel":
        from pathlib import Path

        from .panel import panel_structures

        records = [Record(sid, st, note, extra={"role": cls})
                   for sid, st, note, cls in panel_structures(s.panel_ids)]
        rejected = []
        if s.path:
            own = Path(s.path)
            mine, rejected = cif_dir(own) if own.is_dir() else manifest_file(own)
            records += mine
            extra["own_structures"] = {"path": str(own), "ids": [r.id for r in mine]}
        extra["panel_ids"] = [r.id for r in records if r.id.startswith("panel-")]
    elif src == "embedded":
        from .embedded import embedded_structures

        records = [Record(sid, st, note, extra={"role": role}) for sid, st, note, role in embedded_structures()]
        rejected: list[Rejection] = []
    elif src == "mp":
        records, rejected, mp_prov = materials_project(s.mp)
        extra["materials_project"] = mp_prov
    elif src == "cif_dir":
        records, rejected = cif_dir(s.path)
    elif src == "manifest":
        records, rejected = manifest_file(s.path)
    else:  # pragma: no cover - the schema forbids it
        raise InputError(f"unknown structures.source {src!r}")
    if s.ids:
        wanted = set(s.ids)
        missing = wanted - {r.id for r in records}
        if missing:
            raise InputError(f"structures.ids not found in the source: {', '.join(sorted(missing))}")
        records = [r for r in records if r.id in wanted]
    return records, rejected, extra


def split_by_composition(formulas: list[str], test_fraction: float, val_fraction: float, seed: int) -> dict[str, str]:
    """Map each reduced formula to train / val / test (seeded shuffle of unique compositions).

    Test takes round(test_fraction * n_comp) compositions (at least one when there are >= 3),
    validation takes round(val_fraction * rest) of the remainder (at least one when >= 3 remain).
    No composition is in two splits.
    """
    comps = sorted(set(formulas))
    rng = np.random.default_rng(seed)
    order = [comps[i] for i in rng.permutation(len(comps))]
    n = len(order)
    n_test = int(round(test_fraction * n))
    if test_fraction > 0 and n >= 3:
        n_test = max(n_test, 1)
    rest = n - n_test
    n_val = int(round(val_fraction * rest))
    if val_fraction > 0 and rest >= 3:
        n_val = max(n_val, 1)
    out = {}
    for k, comp in enumerate(order):
        out[comp] = "test" if k < n_test else ("val" if k < n_test + n_val else "train")
    return out


def build_manifest(settings: Settings) -> tuple[pd.DataFrame, list[Rejection], dict[str, Any]]:
    """The manifest table (schema.MANIFEST) for the configured source."""
    s, md = settings.structures, settings.md
    records, rejected, extra = collect(s)
    rows = []
    for r in records:
        st = r.structure
        reps = supercell_repeats(st.lattice.matrix, s.min_width)
        n_super = len(st) * int(np.prod(reps))
        if s.max_atoms and n_super > s.max_atoms:
            rejected.append(Rejection(r.id, f"{r.id}: supercell {reps} has {n_super} atoms > structures.max_atoms={s.max_atoms}"))
            continue
        widths = perpendicular_widths(st.lattice.matrix) * np.asarray(reps)
        rows.append({
            "id": r.id,
            "formula": st.composition.formula,
            "reduced_formula": st.composition.reduced_formula,
            "n_atoms": len(st),
            "li_fraction": float(st.composition.get_atomic_fraction("Li")),
            "band_gap": r.band_gap,
            "e_above_hull": r.e_above_hull,
            "source": r.source,
            "cif": st.to(fmt="cif"),
            "supercell": list(reps),
            "n_atoms_supercell": n_super,
            "min_width": float(widths.min()),
        })
    if not rows:
        reasons = "; ".join(x.reason for x in rejected[:3])
        raise InputError(f"no usable structures from source {s.source!r}" + (f" ({reasons})" if reasons else ""))
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise InputError(f"duplicate structure ids: {', '.join(dup)}")
    df = pd.DataFrame(rows)
    split = split_by_composition(df["reduced_formula"].tolist(), s.test_fraction, s.val_fraction, settings.seed)
    df["split"] = df["reduced_formula"].map(split)
    # Order: by split, then cheapest supercell first, so MD caps pick the smallest cells.
    order = {"train": 0, "val": 1, "test": 2}
    df = df.assign(_o=df["split"].map(order)).sort_values(["_o", "n_atoms_supercell", "id"]).drop(columns="_o")
    df = df.reset_index(drop=True)
    run_md = df["split"].isin(md.splits)
    cap = md.max_structures
    if cap is not None:
        rank = df.groupby("split").cumcount()
        limit = df["split"].map(lambda s: cap.get(s, len(df)) if isinstance(cap, dict) else cap)
        run_md &= rank < limit
    df["run_md"] = run_md.to_numpy()
    df["chunk"] = (np.arange(len(df)) // md.chunk_size).astype(np.int32)
    return df, rejected, extra
