"""Analysis-table columns and the readers of the tables the report stage is given (exact files).

Units: Å, Å², ps, K, cm²/s.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..io import schema
from ..core.errors import InputError, SchemaError

MD_SOURCE = "md"


LIFLOW_PREFIX = "liflow:"


CURVE_POINTS = 101  # MSD curve samples stored per trajectory (incl. t = 0 and the last frame)


#: Columns of an analysis table (one row per trajectory).
ANALYSIS_COLUMNS = (
    "id", "temperature", "split", "source", "n_frames", "duration_ps",
    "msd_li", "msd_frame", "msd_t_ps", "msd_li_curve", "msd_frame_curve",
    "li_hop_A", "li_msd_plateau", "li_msd_excess", "li_tau_obs_ps", "li_resolved",
    "D_li", "D_li_low", "D_li_high", "D_li_bound", "D_method", "D_note",
    "li_site_occupancy", "li_alpha2", "li_molten", "frame_melt_ratio", "frame_melted",
    "rdf", "rdf_r_max", "status", "stable",
    "n_replicas", "D_li_floor", "replica_D", "replica_D_low", "replica_D_high", "replica_D_bound", "D_scatter_p",
)


NUMERIC_COLUMNS = ("duration_ps", "msd_li", "msd_frame", "li_hop_A", "li_msd_plateau", "li_msd_excess",
                   "li_tau_obs_ps", "D_li", "D_li_low", "D_li_high", "D_li_bound", "li_site_occupancy", "li_alpha2",
                   "frame_melt_ratio", "rdf_r_max", "D_li_floor", "D_scatter_p")


#: D_method values: how each D* number (or bound) was obtained.
D_METHODS = {
    "kinisi": "resolved diffusion; kinisi posterior median and 95 % credible interval",
    "bound:hop": "not resolved (Li MSD excess over its plateau < one hop length squared); D_li_bound = a²/(6 τ_obs)",
    "bound:kinisi": "MSD excess resolved but kinisi's posterior unconstrained; D_li_bound = its 97.5 % quantile",
    "failed": "kinisi failed; no number",
    "insufficient_frames": "fewer than 4 frames",
    "skipped": "diffusion analysis not requested",
}


def load_structures(structures: pd.DataFrame | str | os.PathLike[str]) -> pd.DataFrame:
    """The STRUCTURES table (relaxed supercells) as a DataFrame indexed by id."""
    df = structures if isinstance(structures, pd.DataFrame) else schema.read_df(structures, "structures")
    for col in ("id", "numbers", "cell"):
        if col not in df.columns:
            raise SchemaError(f"structures table is missing column {col!r}")
    if df["id"].duplicated().any():
        raise InputError(f"structures table has duplicate ids: {sorted(set(df['id'][df['id'].duplicated()]))[:5]}")
    return df.set_index("id", drop=False)


def load_rows(rows: pd.DataFrame | str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
              kind: str) -> pd.DataFrame:
    """Rows of a schema ``kind`` (status, priors) from a DataFrame, one file or several files
    (an empty frame with the schema's columns for None or no files)."""
    cols = [f.name for f in schema.SCHEMAS[kind]]
    if rows is None:
        return pd.DataFrame(columns=cols)
    if isinstance(rows, pd.DataFrame):
        return rows
    paths = [rows] if isinstance(rows, (str, os.PathLike)) else list(rows)
    frames = [schema.read_df(p, kind) for p in paths]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def load_status(status: pd.DataFrame | str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None
                ) -> pd.DataFrame:
    """STATUS rows from a DataFrame, one file or several files (empty frame for None)."""
    return load_rows(status, "status")


def read_analysis(paths: pd.DataFrame | str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> pd.DataFrame:
    """Concatenate analysis tables written by :func:`analyze_trajectories`."""
    if isinstance(paths, pd.DataFrame):
        df = paths
    else:
        items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        parts = []
        for p in items:
            if not Path(p).is_file():
                raise SchemaError(f"{p}: analysis table not found")
            try:
                parts.append(pd.read_parquet(p))
            except Exception as exc:
                raise SchemaError(f"{p}: unreadable analysis table ({type(exc).__name__})") from exc
        df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(ANALYSIS_COLUMNS))
    missing = [c for c in ANALYSIS_COLUMNS if c not in df.columns]
    if missing:
        raise SchemaError(f"analysis table is missing columns: {', '.join(missing)}")
    # all-null columns of one chunk concatenate to object dtype: restore floats
    df = df.copy()
    for c in NUMERIC_COLUMNS:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    dup = df.duplicated(["id", "temperature", "source"])
    if dup.any():
        r = df[dup].iloc[0]
        raise InputError(f"analysis tables overlap: {r['id']} at {r['temperature']} K ({r['source']}) appears twice")
    return df


def status_lookup(status: pd.DataFrame) -> dict[tuple[str, int, str], tuple[str, str]]:
    """(id, T K, source) -> (status, reason) of that trajectory: with replicas, ``ok`` only when every
    replica ended ok, else the first replica's that did not (its reason names the replica)."""
    out: dict[tuple[str, int, str], tuple[str, str]] = {}
    has_replica = "replica" in status.columns
    replicated = has_replica and bool((status["replica"].fillna(0) > 0).any())  # once, not per row
    for r in status.itertuples(index=False):
        key = (str(r.id), int(r.temperature), str(r.source))
        st, why = str(r.status), str(r.reason or "")
        if st != "ok" and replicated:
            rep = int(r.replica) if pd.notna(r.replica) else 0
            why = f"replica {rep}: {why}"
        if key not in out or (out[key][0] == "ok" and st != "ok"):
            out[key] = (st, why)
    return out


def load_priors(priors: pd.DataFrame | str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None
                ) -> pd.DataFrame:
    """PRIORS rows (prior class of each rollout) from a DataFrame, one file or several files."""
    return load_rows(priors, "priors")
