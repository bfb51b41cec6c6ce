"""Stage ``analyze``: the analysis table of one chunk's trajectories (exactly the frame files given).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..io import schema
from ..core.errors import InputError
from ..io.files import atomic_path, provenance
from ..core.settings import Settings
from ..report.tables import ANALYSIS_COLUMNS, load_status, load_structures, status_lookup
from ..report.trajectory import analyze_trajectory


def run(
    frame_files: Sequence[str | os.PathLike[str]],
    structures: pd.DataFrame | str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    settings: Settings | None = None,
    status: pd.DataFrame | str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    ids: Iterable[str] | None = None,
    sources: Iterable[str] | None = None,
    temperatures: Iterable[float] | None = None,
    diffusion: bool = True,
) -> pd.DataFrame:
    """Analyse every (structure, temperature, source) trajectory in a frame dataset, its replicas
    jointly (``report.trajectory.analyze_trajectory``); write Parquet.

    ``frame_files`` are FRAMES files (a chunk's ``frames_T<K>.parquet`` or dataset parts, see
    :func:`schema.open_frames`), MD and rollouts alike, and nothing else is read; ``structures`` the STRUCTURES table (numbers, cell of the relaxed supercell);
    ``status`` the STATUS rows (``stable`` = status "ok"; a trajectory without a status row counts
    as ok). ``ids`` / ``sources`` / ``temperatures`` restrict the work (a chunk). The table (columns
    :data:`ANALYSIS_COLUMNS`) is written atomically to ``out_path`` with provenance and returned.
    ``settings``: the run's (``analysis`` section and ``seed``); None = the schema defaults.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    settings = settings if settings is not None else Settings.defaults()
    structs = load_structures(structures)
    stat = status_lookup(load_status(status))
    ds = schema.open_frames(frame_files)
    allkeys = ds.to_table(columns=["id", "source", "temperature", "split", "replica"]).to_pandas().drop_duplicates()
    replicas = allkeys.groupby(["id", "temperature", "source"])["replica"].apply(lambda r: sorted(set(r))).to_dict()
    keys = allkeys.drop(columns="replica").drop_duplicates()
    if ids is not None:
        keys = keys[keys["id"].isin(set(ids))]
    if sources is not None:
        keys = keys[keys["source"].isin(set(sources))]
    if temperatures is not None:
        keys = keys[keys["temperature"].isin({int(round(float(T))) for T in temperatures})]
    keys = keys.sort_values(["id", "temperature", "source"]).reset_index(drop=True)
    missing = sorted(set(keys["id"]) - set(structs.index))
    if missing:
        raise InputError(f"trajectories of structures missing from the structures table: {', '.join(missing[:5])}")
    rows: list[dict[str, Any]] = []
    for k in keys.itertuples(index=False):
        s = structs.loc[k.id]
        numbers = np.asarray(s["numbers"], dtype=int)
        cell = np.asarray(s["cell"], dtype=np.float64).reshape(3, 3)
        trajs = [schema.read_trajectory(ds, k.id, k.temperature, k.source, replica=int(r))
                 for r in replicas[(k.id, k.temperature, k.source)]]
        pos = [p for p, _ in trajs]
        times = min((tt for _, tt in trajs), key=len)
        if pos[0].shape[1] != numbers.size:
            raise InputError(f"{k.id} at {k.temperature} K ({k.source}): {pos[0].shape[1]} atoms in frames, "
                             f"{numbers.size} in the structure")
        # chunk folders carry no split partition: the structures table is the authority
        split = k.split if isinstance(k.split, str) else str(s["split"])
        row = {"id": str(k.id), "temperature": int(k.temperature), "split": split, "source": str(k.source)}
        row.update(analyze_trajectory(pos if len(pos) > 1 else pos[0], times, numbers, cell, settings.analysis,
                                      diffusion=diffusion, seed=settings.seed))
        st, _reason = stat.get((row["id"], row["temperature"], row["source"]), ("ok", ""))
        row["status"] = st
        row["stable"] = st == "ok"
        rows.append(row)
    df = pd.DataFrame(rows, columns=list(ANALYSIS_COLUMNS))
    table = pa.Table.from_pandas(df, preserve_index=False)
    prov = provenance(settings, stage="analysis", n_trajectories=len(df), frame_files=[str(f) for f in frame_files])
    table = table.replace_schema_metadata({b"liflow_kind": b"analysis",
                                           schema.META_KEY: json.dumps(prov, default=str).encode()})
    with atomic_path(out_path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return df
