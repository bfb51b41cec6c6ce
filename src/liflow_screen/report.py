"""Analysis and ranking reports: per-trajectory analysis tables, Table-1 metrics, plots, ranking.

Two stages:

* :func:`analyze_trajectories` reads trajectories (Parquet frame dataset, reference MD and
  LiFlow rollouts alike) and writes one analysis row per (structure, temperature, source):
  final MSDs (Eq. 12, Å²), MSD curves, kinisi D* of Li with its 95 % credible interval (cm²/s),
  the RDF (Eq. 14) and the trajectory status.
* :func:`write_reports` turns analysis tables into ``metrics.csv`` (the layout of the paper's
  Table 1), parity plots, Arrhenius plots and ``ranking.csv`` (candidates ranked by the
  Nernst–Einstein conductivity extrapolated to ``analysis.target_temperature``).

Every output is written atomically and carries provenance (a ``*.provenance.json`` next to
each CSV, Parquet key-value metadata, PNG text metadata).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import analysis as an
from . import config as config_mod
from . import schema
from .errors import InputError, SchemaError
from .io import atomic_path, provenance, write_json_atomic

MD_SOURCE = "md"
LIFLOW_PREFIX = "liflow:"
CURVE_POINTS = 101  # MSD curve samples stored per trajectory (incl. t = 0 and the last frame)

#: Columns of an analysis table (one row per trajectory).
ANALYSIS_COLUMNS = (
    "id", "temperature", "split", "source", "n_frames", "duration_ps",
    "msd_li", "msd_frame", "msd_t_ps", "msd_li_curve", "msd_frame_curve",
    "li_hop_A", "li_msd_plateau", "li_msd_excess", "li_tau_obs_ps", "li_resolved",
    "D_li", "D_li_low", "D_li_high", "D_li_bound", "D_method", "D_note",
    "li_site_occupancy", "li_molten", "frame_melt_ratio", "frame_melted",
    "rdf", "rdf_r_max", "status", "stable",
)
NUMERIC_COLUMNS = ("duration_ps", "msd_li", "msd_frame", "li_hop_A", "li_msd_plateau", "li_msd_excess",
                   "li_tau_obs_ps", "D_li", "D_li_low", "D_li_high", "D_li_bound", "li_site_occupancy",
                   "frame_melt_ratio", "rdf_r_max")
#: D_method values: how each D* number (or bound) was obtained.
D_METHODS = {
    "kinisi": "resolved diffusion; kinisi posterior median and 95 % credible interval",
    "bound:hop": "not resolved (Li MSD excess over its plateau < one hop length squared); D_li_bound = a²/(6 τ_obs)",
    "bound:kinisi": "MSD excess resolved but kinisi's posterior unconstrained; D_li_bound = its 97.5 % quantile",
    "failed": "kinisi failed; no number",
    "insufficient_frames": "fewer than 4 frames",
    "skipped": "diffusion analysis not requested",
}


# --------------------------------------------------------------------------------------------
# loading helpers
# --------------------------------------------------------------------------------------------

def _cfg(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    return config_mod.validate(dict(cfg or {}))


def load_structures(structures: pd.DataFrame | str | os.PathLike[str]) -> pd.DataFrame:
    """The STRUCTURES table (relaxed supercells) as a DataFrame indexed by id."""
    df = structures if isinstance(structures, pd.DataFrame) else schema.read_df(structures, "structures")
    for col in ("id", "numbers", "cell"):
        if col not in df.columns:
            raise SchemaError(f"structures table is missing column {col!r}")
    if df["id"].duplicated().any():
        raise InputError(f"structures table has duplicate ids: {sorted(set(df['id'][df['id'].duplicated()]))[:5]}")
    return df.set_index("id", drop=False)


def load_status(status: pd.DataFrame | str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None
                ) -> pd.DataFrame:
    """STATUS rows from a DataFrame, one file or several files (empty frame for None)."""
    cols = [f.name for f in schema.STATUS]
    if status is None:
        return pd.DataFrame(columns=cols)
    if isinstance(status, pd.DataFrame):
        return status
    paths = [status] if isinstance(status, (str, os.PathLike)) else list(status)
    frames = [schema.read_df(p, "status") for p in paths]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


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


def _status_lookup(status: pd.DataFrame) -> dict[tuple[str, int, str], tuple[str, str]]:
    out: dict[tuple[str, int, str], tuple[str, str]] = {}
    for r in status.itertuples(index=False):
        out[(str(r.id), int(r.temperature), str(r.source))] = (str(r.status), str(r.reason or ""))
    return out


# --------------------------------------------------------------------------------------------
# per-trajectory analysis
# --------------------------------------------------------------------------------------------

def analyze_trajectory(
    pos: np.ndarray,
    times_ps: np.ndarray,
    numbers: np.ndarray,
    cell: np.ndarray,
    analysis_cfg: Mapping[str, Any],
    diffusion: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Analysis of one trajectory (frame 0 = the relaxed structure): final MSDs (Å²), MSD curves,
    whether Li diffusion is resolved, kinisi D* of Li (cm²/s) or an upper bound, sanity flags, RDF.

    * Li diffusion is *resolved* when the Li MSD in excess of its vibrational plateau reaches one hop
      length squared (a = shortest Li–Li distance of frame 0; :func:`analysis.diffusion_resolution`).
      Only then is kinisi run; otherwise D_li_bound = a²/(6 τ_obs) (method "bound:hop").
    * li_molten: fewer than half of the Li positions (second half of the trajectory) within a/3 of an
      initial Li site (:func:`analysis.site_occupancy`): a liquid-like Li sublattice.
    * frame_melted: some frame element's excess MSD reached (a_e/2)², a_e its shortest same-element
      distance (:func:`analysis.framework_melt_ratio`): the framework melted or came apart.

    ``analysis_cfg`` is the ``analysis`` config section (kinisi_n_dt, kinisi_samples, rdf_rmax,
    rdf_bins, rdf_discard).
    """
    x = np.asarray(pos, dtype=np.float64)
    t = np.asarray(times_ps, dtype=np.float64)
    nums = np.asarray(numbers, dtype=int)
    if x.ndim != 3 or x.shape[1] != nums.size:
        raise InputError(f"trajectory has {x.shape[1] if x.ndim == 3 else '?'} atoms, structure has {nums.size}")
    li = an.species_mask(nums, "Li")
    if not li.any():
        raise InputError("structure contains no Li atoms")
    frame = ~li
    n_frames = x.shape[0]
    c = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    msd_li_curve = an.msd_single_origin(x, li)
    msd_fr_curve = an.msd_single_origin(x, frame) if frame.any() else np.full(n_frames, np.nan)
    idx = np.unique(np.linspace(0, n_frames - 1, min(CURVE_POINTS, n_frames)).round().astype(int))
    hop = an.hop_length(x[0], c, nums, 3)
    row: dict[str, Any] = {
        "n_frames": int(n_frames),
        "duration_ps": float(t[-1] - t[0]) if n_frames > 1 else 0.0,
        "msd_li": float(msd_li_curve[-1]),
        "msd_frame": float(msd_fr_curve[-1]),
        "msd_t_ps": (t[idx] - t[0]).tolist(),
        "msd_li_curve": msd_li_curve[idx].tolist(),
        "msd_frame_curve": msd_fr_curve[idx].tolist(),
        "li_hop_A": hop, "li_msd_plateau": math.nan, "li_msd_excess": math.nan, "li_tau_obs_ps": 0.0,
        "li_resolved": False,
        "D_li": math.nan, "D_li_low": math.nan, "D_li_high": math.nan, "D_li_bound": math.nan,
        "D_method": "skipped", "D_note": "",
        "li_site_occupancy": math.nan, "li_molten": False, "frame_melt_ratio": math.nan, "frame_melted": False,
    }
    if n_frames >= 3:
        res = an.diffusion_resolution(x, t, li, hop)
        row.update({"li_msd_plateau": res["plateau"], "li_msd_excess": res["excess"],
                    "li_tau_obs_ps": res["tau_obs_ps"], "li_resolved": bool(res["resolved"])})
        occ = an.site_occupancy(x, c, li, an.SITE_RADIUS_FRACTION * hop)
        row.update({"li_site_occupancy": occ, "li_molten": bool(occ < an.MOLTEN_OCCUPANCY)})
        if frame.any():
            ratio = an.framework_melt_ratio(x, t, nums, c, frame)
            row.update({"frame_melt_ratio": ratio, "frame_melted": bool(np.isfinite(ratio) and ratio >= 1.0)})
    if diffusion and n_frames < 4:
        row["D_method"] = "insufficient_frames"
    elif diffusion and not row["li_resolved"]:
        row.update({"D_method": "bound:hop", "D_li_bound": res["bound"], "D_note": res["reason"]})
    elif diffusion:
        kin = an.kinisi_diffusion(x, t, nums, c, species="Li", n_dt=int(analysis_cfg["kinisi_n_dt"]),
                                  n_samples=int(analysis_cfg["kinisi_samples"]), seed=seed)
        if kin["constrained"]:
            row.update({"D_li": kin["D"], "D_li_low": kin["D_low"], "D_li_high": kin["D_high"], "D_method": "kinisi"})
        elif math.isfinite(kin["D_high"]):
            row.update({"D_method": "bound:kinisi", "D_li_bound": kin["D_high"], "D_note": kin["note"]})
        else:
            row.update({"D_method": "failed", "D_note": kin["note"]})
    _, g = an.rdf(x, nums, c, r_max=float(analysis_cfg["rdf_rmax"]), n_bins=int(analysis_cfg["rdf_bins"]),
                  discard=float(analysis_cfg["rdf_discard"]))
    row["rdf"] = g.tolist()
    row["rdf_r_max"] = float(analysis_cfg["rdf_rmax"])
    return row


def analyze_trajectories(
    frames_root: str | os.PathLike[str],
    structures: pd.DataFrame | str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    cfg: Mapping[str, Any] | None = None,
    status: pd.DataFrame | str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    ids: Iterable[str] | None = None,
    sources: Iterable[str] | None = None,
    temperatures: Iterable[float] | None = None,
    diffusion: bool = True,
) -> pd.DataFrame:
    """Analyse every (structure, temperature, source) trajectory in a frame dataset; write Parquet.

    ``frames_root`` is a partitioned FRAMES dataset (``temperature=*/split=*/*.parquet``), MD and
    rollouts alike; ``structures`` the STRUCTURES table (numbers, cell of the relaxed supercell);
    ``status`` the STATUS rows (``stable`` = status "ok"; a trajectory without a status row counts
    as ok). ``ids`` / ``sources`` / ``temperatures`` restrict the work (a chunk). The table (columns
    :data:`ANALYSIS_COLUMNS`) is written atomically to ``out_path`` with provenance and returned.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    full = _cfg(cfg)
    acfg = full["analysis"]
    structs = load_structures(structures)
    stat = _status_lookup(load_status(status))
    ds = schema.open_frames(frames_root)
    keys = ds.to_table(columns=["id", "source", "temperature", "split"]).to_pandas().drop_duplicates()
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
        pos, times = schema.read_trajectory(ds, k.id, k.temperature, k.source)
        if pos.shape[1] != numbers.size:
            raise InputError(f"{k.id} at {k.temperature} K ({k.source}): {pos.shape[1]} atoms in frames, "
                             f"{numbers.size} in the structure")
        # chunk folders carry no split partition: the structures table is the authority
        split = k.split if isinstance(k.split, str) else str(s["split"])
        row = {"id": str(k.id), "temperature": int(k.temperature), "split": split, "source": str(k.source)}
        row.update(analyze_trajectory(pos, times, numbers, cell, acfg, diffusion=diffusion,
                                      seed=int(full["seed"])))
        st, _reason = stat.get((row["id"], row["temperature"], row["source"]), ("ok", ""))
        row["status"] = st
        row["stable"] = st == "ok"
        rows.append(row)
    df = pd.DataFrame(rows, columns=list(ANALYSIS_COLUMNS))
    table = pa.Table.from_pandas(df, preserve_index=False)
    prov = provenance(full, stage="analysis", n_trajectories=len(df), frames_root=str(frames_root))
    table = table.replace_schema_metadata({b"liflow_kind": b"analysis",
                                           schema.META_KEY: json.dumps(prov, default=str).encode()})
    with atomic_path(out_path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return df


# --------------------------------------------------------------------------------------------
# metrics (Table 1)
# --------------------------------------------------------------------------------------------

def _msd_at(curve_t: Sequence[float], curve: Sequence[float], t: float) -> float:
    tt = np.asarray(curve_t, dtype=np.float64)
    yy = np.asarray(curve, dtype=np.float64)
    if tt.size == 0 or t > tt[-1] + 1e-6:
        return math.nan
    return float(np.interp(t, tt, yy))


def _variants(df: pd.DataFrame) -> list[str]:
    return sorted(s for s in df["source"].unique() if str(s).startswith(LIFLOW_PREFIX))


#: metrics.csv warns when fewer structures than this are compared, or τ spans fewer Δτ steps.
MIN_METRIC_PAIRS = 3
MIN_METRIC_STEPS = 3


def compute_metrics(analysis_table: pd.DataFrame, status_table: pd.DataFrame | None = None,
                    metric_splits: Sequence[str] = ("test",), tau_ps: float | None = None,
                    delta_tau_ps: float = 1.0) -> pd.DataFrame:
    """Rows (temperature, model variant) with the paper's Table-1 metrics.

    Reference = MD trajectories (source "md") of structures in ``metric_splits``. Every rollout is
    compared with the MD of the same structure and temperature at ONE common time τ per row
    (``tau_ps``, else the longest τ that every compared trajectory reaches), from the single-origin
    MSD curves (Eq. 12). Columns: temperature, model, tau_ps, n (compared structures),
    log_msd_li_mae, log_msd_li_spearman, log_msd_frame_mae, rdf_mae, stable_pct (the paper's: rollouts
    that completed every step without NaN / divergence), phys_stable_pct (also no framework melting or
    collapse), n_rollouts, warning (n < 3, or τ spanning fewer than 3 Δτ), note.
    """
    df = analysis_table
    splits = set(metric_splits)
    variants = _variants(df)
    temps = sorted({int(t) for t in df.loc[df["source"].isin(variants), "temperature"]})
    status = status_table if status_table is not None and len(status_table) else None
    rows = []
    for T in temps:
        ref = df[(df["source"] == MD_SOURCE) & (df["temperature"] == T) & df["split"].isin(splits)]
        ref = ref.set_index("id")
        for v in variants:
            gen = df[(df["source"] == v) & (df["temperature"] == T) & df["split"].isin(splits)].set_index("id")
            if status is not None:
                st = status[(status["source"] == v) & (status["temperature"] == T) & status["split"].isin(splits)]
                n_roll, n_ok = len(st), int((st["status"] == "ok").sum())
            else:
                n_roll, n_ok = len(gen), int(gen["stable"].sum())
            if gen.empty and n_roll == 0:
                continue  # this variant was not rolled out at this temperature
            n_phys = int((gen["stable"].astype(bool) & ~gen["frame_melted"].astype(bool)).sum())
            common = sorted(set(ref.index) & set(gen.index))
            tc = float(tau_ps) if tau_ps is not None else (
                min(min(float(ref.loc[i, "duration_ps"]), float(gen.loc[i, "duration_ps"])) for i in common)
                if common else math.nan)
            li_r, li_g, fr_r, fr_g, rdf_err = [], [], [], [], []
            for sid in common:
                a, b = ref.loc[sid], gen.loc[sid]
                li_r.append(_msd_at(a["msd_t_ps"], a["msd_li_curve"], tc))
                li_g.append(_msd_at(b["msd_t_ps"], b["msd_li_curve"], tc))
                fr_r.append(_msd_at(a["msd_t_ps"], a["msd_frame_curve"], tc))
                fr_g.append(_msd_at(b["msd_t_ps"], b["msd_frame_curve"], tc))
                ga, gb = np.asarray(a["rdf"], float), np.asarray(b["rdf"], float)
                if ga.size == gb.size and ga.size >= 2 and float(a["rdf_r_max"]) == float(b["rdf_r_max"]):
                    dr = float(a["rdf_r_max"]) / ga.size
                    rdf_err.append(an.rdf_mae(ga, gb, (np.arange(ga.size) + 0.5) * dr))
            li = an.log_msd_metrics(np.array(li_r, float), np.array(li_g, float))
            fr = an.log_msd_metrics(np.array(fr_r, float), np.array(fr_g, float))
            note, warn = "", []
            if ref.empty:
                note = f"no reference MD for {'/'.join(sorted(splits))} structures at {T} K"
            elif not common:
                note = f"no structure has both reference MD and {v} rollouts at {T} K"
            if int(li["n"]) < MIN_METRIC_PAIRS:
                warn.append(f"n = {int(li['n'])} < {MIN_METRIC_PAIRS}: not comparable with the paper's Table 1")
            if math.isfinite(tc) and tc < MIN_METRIC_STEPS * delta_tau_ps - 1e-9:
                warn.append(f"τ = {tc:g} ps spans fewer than {MIN_METRIC_STEPS} Δτ ({delta_tau_ps:g} ps)")
            rows.append({
                "temperature": T, "model": v[len(LIFLOW_PREFIX):], "tau_ps": tc, "n": int(li["n"]),
                "log_msd_li_mae": li["mae"], "log_msd_li_spearman": li["spearman"],
                "log_msd_frame_mae": fr["mae"],
                "rdf_mae": float(np.mean(rdf_err)) if rdf_err else math.nan,
                "stable_pct": 100.0 * n_ok / n_roll if n_roll else math.nan,
                "phys_stable_pct": 100.0 * n_phys / n_roll if n_roll else math.nan,
                "n_rollouts": int(n_roll), "warning": "; ".join(warn), "note": note,
            })
    cols = ["temperature", "model", "tau_ps", "n", "log_msd_li_mae", "log_msd_li_spearman", "log_msd_frame_mae",
            "rdf_mae", "stable_pct", "phys_stable_pct", "n_rollouts", "warning", "note"]
    return pd.DataFrame(rows, columns=cols)


# --------------------------------------------------------------------------------------------
# ranking
# --------------------------------------------------------------------------------------------

def _uncertain_map(flags: pd.DataFrame | Mapping[str, bool] | None) -> dict[str, bool] | None:
    if flags is None:
        return None
    if isinstance(flags, pd.DataFrame):
        if "id" not in flags.columns or "uncertain" not in flags.columns:
            raise InputError("prior-class flags need columns 'id' and 'uncertain'")
        return {str(k): bool(v) for k, v in flags.groupby("id")["uncertain"].any().items()}
    return {str(k): bool(v) for k, v in flags.items()}


def _ranking_source(df: pd.DataFrame, variant: str | None) -> str:
    """The trajectory source that ranks: liflow:<variant> if given; else liflow:adaptive, else the
    first LiFlow variant; "md" only when there are no rollouts at all."""
    variants = _variants(df)
    if variant is not None:
        src = variant if variant.startswith(LIFLOW_PREFIX) or variant == MD_SOURCE else LIFLOW_PREFIX + variant
        if src not in set(df["source"]):
            raise InputError(f"no trajectories of source {src!r} in the analysis table")
        return src
    if variants:
        return LIFLOW_PREFIX + "adaptive" if LIFLOW_PREFIX + "adaptive" in variants else variants[0]
    return MD_SOURCE


def _tcol(T: int) -> str:
    return f"{int(T)}K"


def md_melting_temperatures(analysis_table: pd.DataFrame) -> dict[str, int]:
    """Per structure, the lowest temperature (K) at which its reference MD's framework melted or came
    apart (``frame_melted``); structures whose MD never did are absent."""
    md = analysis_table[(analysis_table["source"] == MD_SOURCE) & analysis_table["frame_melted"].astype(bool)]
    return {str(k): int(v) for k, v in md.groupby("id")["temperature"].min().items()}


def trajectory_flags(r: Mapping[str, Any], md_melt_T: int | None) -> list[str]:
    """Why a trajectory cannot enter an Arrhenius fit (empty list: it can)."""
    flags = []
    if str(r["status"]) != "ok":
        flags.append(str(r["status"]))
    if bool(r["frame_melted"]):
        flags.append("frame_melted")
    if bool(r["li_molten"]):
        flags.append("li_molten")
    if md_melt_T is not None and int(r["temperature"]) >= md_melt_T:
        flags.append(f"md_melts_from_{md_melt_T}K")
    if r["D_method"] != "kinisi":
        flags.append("unresolved" if str(r["D_method"]).startswith("bound") else str(r["D_method"]))
    return flags


def compute_ranking(
    analysis_table: pd.DataFrame,
    structures_table: pd.DataFrame,
    status_table: pd.DataFrame | None = None,
    prior_flags: pd.DataFrame | Mapping[str, bool] | None = None,
    target_T: float = 300.0,
    variant: str | None = None,
) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """One row per structure: ranked candidates first (by σ(target_T), S/cm, descending), then every
    other structure, unranked, with the reason.

    Predictions come from the LiFlow ``variant`` (see :func:`_ranking_source`). Per temperature:
    D_pred_<T>K[_low|_high] (kinisi median and 95 % interval, only where Li diffusion was resolved),
    D_pred_<T>K_bound (upper bound where it was not), D_method_<T>K (analysis.D_METHODS), flags_<T>K
    (why the point is not in the fit: unresolved, diverged, frame_melted, li_molten, md_melts_from_<T>K).
    A structure is ranked only when >= 2 temperatures have resolved, stable, non-melted trajectories
    (below the temperature at which its reference MD melts, if any) and their Arrhenius fit has
    E_A > 0: then E_A_eV[_low|_high], D_<target>K[_low|_high] and sigma_<target>K_S_cm[_low|_high]
    (Nernst–Einstein with the relaxed cell's Li density) are given, else they stay empty.
    Reference MD where present: D_ref_<T>K (resolved kinisi D* or empty) and D_ref_method_<T>K.
    Returns the table and the Arrhenius fit of each ranked structure (for the plots).
    """
    structs = load_structures(structures_table)
    df = analysis_table
    src = _ranking_source(df, variant)
    pred = df[df["source"] == src]
    ref = df[df["source"] == MD_SOURCE]
    temps = sorted({int(t) for t in pred["temperature"]})
    ref_temps = sorted({int(t) for t in ref["temperature"]})
    melt = md_melting_temperatures(df)
    uncertain = _uncertain_map(prior_flags)
    status = status_table if status_table is not None and len(status_table) else None
    tgt = _tcol(round(target_T))
    rows, fits = [], {}
    for sid in sorted(structs.index):
        s = structs.loc[sid]
        nums = np.asarray(s["numbers"], dtype=int)
        volume = float(abs(np.linalg.det(np.asarray(s["cell"], dtype=np.float64).reshape(3, 3))))
        n_li = int(np.sum(nums == 3))
        row: dict[str, Any] = {"id": sid, "formula": s.get("reduced_formula", ""), "split": s.get("split", ""),
                               "source": src, "n_li": n_li, "volume_A3": volume, "status": "", "reason": ""}
        g = pred[pred["id"] == sid].set_index("temperature")
        use_T, bad = [], {}
        for T in temps:
            c = _tcol(T)
            r = g.loc[T] if T in g.index else None
            if r is None:
                row.update({f"D_pred_{c}": math.nan, f"D_pred_{c}_low": math.nan, f"D_pred_{c}_high": math.nan,
                            f"D_pred_{c}_bound": math.nan, f"D_method_{c}": "", f"flags_{c}": "no trajectory"})
                bad[T] = ["no trajectory"]
                continue
            flags = trajectory_flags({**r, "temperature": T}, melt.get(sid))
            row.update({f"D_pred_{c}": float(r["D_li"]), f"D_pred_{c}_low": float(r["D_li_low"]),
                        f"D_pred_{c}_high": float(r["D_li_high"]), f"D_pred_{c}_bound": float(r["D_li_bound"]),
                        f"D_method_{c}": str(r["D_method"]), f"flags_{c}": ";".join(flags)})
            if flags:
                bad[T] = flags
            else:
                use_T.append(T)
        rs = ref[ref["id"] == sid].set_index("temperature")
        for T in ref_temps:
            r = rs.loc[T] if T in rs.index else None
            row[f"D_ref_{_tcol(T)}"] = float(r["D_li"]) if r is not None else math.nan
            row[f"D_ref_{_tcol(T)}_bound"] = float(r["D_li_bound"]) if r is not None else math.nan
            row[f"D_ref_method_{_tcol(T)}"] = str(r["D_method"]) if r is not None else ""
        row["md_melts_from_K"] = melt.get(sid, math.nan)
        gu = g.loc[use_T] if use_T else None
        fit = (an.arrhenius_fit(np.asarray(use_T, float), gu["D_li"].to_numpy(float), gu["D_li_low"].to_numpy(float),
                                gu["D_li_high"].to_numpy(float), target_T=target_T) if len(use_T) >= 2 else None)
        row.update({"arrhenius_T": ";".join(str(T) for T in use_T), "arrhenius_n_T": len(use_T)})
        for key in ("E_A_eV", "E_A_eV_low", "E_A_eV_high", f"D_{tgt}", f"D_{tgt}_low", f"D_{tgt}_high",
                    f"sigma_{tgt}_S_cm", f"sigma_{tgt}_S_cm_low", f"sigma_{tgt}_S_cm_high"):
            row[key] = math.nan
        ranked = bool(fit is not None and np.isfinite(fit["E_A"]) and fit["E_A"] > 0 and np.isfinite(fit["D_target"]))
        if fit is not None:
            row.update({"E_A_eV": fit["E_A"], "E_A_eV_low": fit["E_A_low"], "E_A_eV_high": fit["E_A_high"]})
        if ranked:
            fits[sid] = fit
            for key, dval in (("", fit["D_target"]), ("_low", fit["D_target_low"]), ("_high", fit["D_target_high"])):
                row[f"D_{tgt}{key}"] = dval
                row[f"sigma_{tgt}_S_cm{key}"] = (an.nernst_einstein_conductivity(dval, n_li, volume, target_T)
                                                 if np.isfinite(dval) else math.nan)
            row["status"] = "ranked"
        else:
            row["status"], row["reason"] = _unranked_reason(sid, g, temps, bad, fit, status, src)
        row["prior_class_uncertain"] = pd.NA if uncertain is None else bool(uncertain.get(sid, False))
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return pd.DataFrame(columns=["rank", "id", "formula", "split", "source", "status", "reason"]), fits
    out["prior_class_uncertain"] = out["prior_class_uncertain"].astype("boolean")
    sig = f"sigma_{tgt}_S_cm"
    order = {"ranked": 0, "unresolved": 1, "non-Arrhenius": 1, "unstable": 2, "no rollout": 3}
    out["_grp"] = out["status"].map(lambda x: order.get(x, 3))
    out["_sig"] = -out[sig].fillna(-np.inf)
    out = out.sort_values(["_grp", "_sig", "id"], kind="mergesort").drop(columns=["_grp", "_sig"])
    ranked_mask = out["status"] == "ranked"
    out.insert(0, "rank", pd.array([i + 1 if ok else pd.NA for i, ok in enumerate(ranked_mask)], dtype="Int64"))
    return out.reset_index(drop=True), fits


def _unranked_reason(sid: str, g: pd.DataFrame, temps: list[int], bad: dict[int, list[str]],
                     fit: dict[str, Any] | None, status: pd.DataFrame | None, src: str) -> tuple[str, str]:
    """(status, reason) of a structure that cannot be ranked."""
    if g.empty:
        reason = "no generated trajectory"
        if status is not None:
            st = status[(status["id"] == sid) & (status["source"] == src) & (status["status"] != "ok")]
            if len(st):
                reason = f"{st['status'].iloc[0]}: {st['reason'].iloc[0]}"
        return "no rollout", reason
    if fit is not None:  # >= 2 usable temperatures, but E_A <= 0
        return "non-Arrhenius", f"E_A = {fit['E_A']:.3f} eV <= 0 from {fit['n_points']} temperatures: not extrapolated"
    usable = [T for T in temps if T not in bad]
    parts = [f"{T} K: {','.join(bad[T])}" for T in temps if T in bad]
    unstable = [any(x not in ("unresolved", "no trajectory") for x in f) for f in bad.values()]
    grp = "unstable" if all(unstable) else "unresolved"
    return grp, (f"usable (resolved, stable, non-melted) at {len(usable)} of {len(temps)} temperatures, "
                 f"2 needed for an Arrhenius fit; " + "; ".join(parts))


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------

def _savefig(fig: Any, path: Path, prov: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, metadata={"Description": json.dumps(prov, default=str)})


def parity_plots(analysis_table: pd.DataFrame, metrics: pd.DataFrame, out_dir: Path, prov: dict[str, Any],
                 metric_splits: Sequence[str] = ("test",)) -> list[Path]:
    """One PNG per temperature: log10 MSD_Li and MSD_frame (Å²), reference MD vs each variant, at
    the common τ of that row of ``metrics`` (:func:`compute_metrics`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = analysis_table
    variants = _variants(df)
    temps = sorted({int(t) for t in df.loc[df["source"].isin(variants), "temperature"]})
    paths = []
    for T in temps:
        fig, axes = plt.subplots(1, 2, figsize=(9, 4.3))
        ref = df[(df["source"] == MD_SOURCE) & (df["temperature"] == T) & df["split"].isin(metric_splits)]
        ref = ref.set_index("id")
        any_pts = False
        for ax, (label, col) in zip(axes, (("Li", "msd_li_curve"), ("frame", "msd_frame_curve"))):
            for v in variants:
                gen = df[(df["source"] == v) & (df["temperature"] == T)].set_index("id")
                mrow = metrics[(metrics["temperature"] == T) & (metrics["model"] == v[len(LIFLOW_PREFIX):])]
                tc = float(mrow["tau_ps"].iloc[0]) if len(mrow) else math.nan
                xs, ys = [], []
                for sid in sorted(set(ref.index) & set(gen.index)):
                    a, b = ref.loc[sid], gen.loc[sid]
                    xs.append(_msd_at(a["msd_t_ps"], a[col], tc))
                    ys.append(_msd_at(b["msd_t_ps"], b[col], tc))
                xa, ya = np.asarray(xs, float), np.asarray(ys, float)
                ok = np.isfinite(xa) & np.isfinite(ya) & (xa > 0) & (ya > 0)
                if ok.any():
                    any_pts = True
                    ax.scatter(np.log10(xa[ok]), np.log10(ya[ok]), s=14, alpha=0.75,
                               label=f"{v[len(LIFLOW_PREFIX):]} (n={int(ok.sum())}, τ = {tc:g} ps)")
            lim = ax.get_xlim() if any_pts else (-2.0, 3.0)
            lo, hi = min(lim[0], ax.get_ylim()[0]), max(lim[1], ax.get_ylim()[1])
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ax.set_xlabel(f"log10 MSD$_{{{label}}}$ reference MD (Å²)")
            ax.set_ylabel(f"log10 MSD$_{{{label}}}$ LiFlow (Å²)")
            ax.set_title(f"{label}, {T} K")
            if any_pts:
                ax.legend(fontsize=8, loc="upper left")
            else:
                ax.text(0.5, 0.5, f"no {'/'.join(metric_splits)} structures\nwith reference MD at {T} K",
                        transform=ax.transAxes, ha="center", va="center", fontsize=10, color="0.3",
                        bbox={"facecolor": "white", "edgecolor": "0.7"})
        fig.tight_layout()
        path = out_dir / "parity" / f"parity_{T}K.png"
        _savefig(fig, path, prov)
        plt.close(fig)
        paths.append(path)
    return paths


def arrhenius_plots(ranking: pd.DataFrame, fits: Mapping[str, Mapping[str, Any]], analysis_table: pd.DataFrame,
                    out_dir: Path, prov: dict[str, Any], top_n: int, target_T: float) -> list[Path]:
    """Arrhenius plots (D* vs 1000/T) of the top ranked candidates: fitted points with their 95 %
    intervals (filled), upper bounds of unresolved or flagged temperatures (open, downward), the
    reference MD likewise, and the fit with its extrapolation to ``target_T``: exactly what the
    ranking table holds (unranked structures get no plot and no extrapolation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    df = analysis_table
    ranked = ranking[(ranking["status"] == "ranked") & ranking["id"].isin(fits)]
    for r in ranked.head(int(top_n)).itertuples(index=False):
        fit = fits[r.id]
        used = {int(T) for T in str(r.arrhenius_T).split(";") if T}
        fig, ax = plt.subplots(figsize=(5.4, 4.3))
        for src, marker, color in ((r.source, "o", "C0"), (MD_SOURCE, "s", "C3")):
            g = df[(df["id"] == r.id) & (df["source"] == src)].sort_values("temperature")
            if g.empty or (src == MD_SOURCE and r.source == MD_SOURCE):
                continue
            label = "reference MD" if src == MD_SOURCE else src
            T = g["temperature"].to_numpy(int)
            fitted = np.array([t in used for t in T]) if src == r.source else (g["D_method"] == "kinisi").to_numpy()
            y = g["D_li"].to_numpy(float)
            if fitted.any():
                lo, hi = g["D_li_low"].to_numpy(float)[fitted], g["D_li_high"].to_numpy(float)[fitted]
                ax.errorbar(1000.0 / T[fitted], y[fitted], yerr=[y[fitted] - lo, hi - y[fitted]], fmt=marker,
                            color=color, capsize=3, label=f"{label} (fitted)" if src == r.source else label)
            b = g["D_li_bound"].to_numpy(float)
            other = ~fitted & np.isfinite(np.where(np.isfinite(b), b, y))
            if other.any():
                yb = np.where(np.isfinite(b), b, y)[other]
                ax.scatter(1000.0 / T[other], yb, marker="v", facecolors="none", edgecolors=color,
                           label=f"{label}: bound or excluded")
        tt = np.linspace(target_T, fit["T_max"], 100)
        ax.plot(1000.0 / tt, np.exp(fit["ln_D0"] - fit["E_A"] / (an.K_B_EV * tt)), "C0-", lw=1,
                label=f"fit E_A = {fit['E_A']:.2f} [{fit['E_A_low']:.2f}, {fit['E_A_high']:.2f}] eV")
        xt = 1000.0 / target_T
        ax.errorbar([xt], [fit["D_target"]], yerr=[[fit["D_target"] - fit["D_target_low"]],
                                                   [fit["D_target_high"] - fit["D_target"]]],
                    fmt="D", color="C2", capsize=3, label=f"extrapolated {target_T:g} K")
        ax.set_yscale("log")
        ax.set_xlabel("1000 / T (1/K)")
        ax.set_ylabel("D* Li (cm²/s)")
        ax.set_title(f"#{r.rank} {r.id} {r.formula}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(r.id))
        path = out_dir / "arrhenius" / f"arrhenius_{int(r.rank):02d}_{safe}.png"
        _savefig(fig, path, prov)
        plt.close(fig)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# all reports
# --------------------------------------------------------------------------------------------

def _write_csv(df: pd.DataFrame, path: Path, prov: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    write_json_atomic(path.with_name(path.stem + ".provenance.json"), prov)


def load_priors(priors: pd.DataFrame | str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None
                ) -> pd.DataFrame:
    """PRIORS rows (prior class of each rollout) from a DataFrame, one file or several files."""
    cols = [f.name for f in schema.PRIORS]
    if priors is None:
        return pd.DataFrame(columns=cols)
    if isinstance(priors, pd.DataFrame):
        return priors
    paths = [priors] if isinstance(priors, (str, os.PathLike)) else list(priors)
    frames = [schema.read_df(p, "priors") for p in paths]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def prior_agreement(priors: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """How often the prior class a rollout used agrees with the reference-MD label of the same
    (structure, T): rows (source, method, temperature) with n and the Li / frame agreement in %.

    ``labels`` are the dataset's MD labels (slow = mobility rate < dataset.slow_threshold).
    """
    cols = ["source", "method", "temperature", "n", "li_agree_pct", "frame_agree_pct", "li_slow_md",
            "li_slow_chosen", "frame_slow_md", "frame_slow_chosen"]
    if priors.empty or labels.empty:
        return pd.DataFrame(columns=cols)
    lab = labels[["id", "temperature", "slow_li", "slow_frame"]].copy()
    lab["temperature"] = lab["temperature"].astype(int)
    pr = priors.copy()
    pr["temperature"] = pr["temperature"].astype(int)
    m = pr.merge(lab, on=["id", "temperature"], how="inner")
    rows = []
    for (src, method, T), g in m.groupby(["source", "method", "temperature"], sort=True):
        li_ok = g["li_slow"].astype(bool) == g["slow_li"].astype(bool)
        fr_ok = g["frame_slow"].astype(bool) == g["slow_frame"].astype(bool)
        rows.append({"source": src, "method": method, "temperature": int(T), "n": int(len(g)),
                     "li_agree_pct": 100.0 * float(li_ok.mean()), "frame_agree_pct": 100.0 * float(fr_ok.mean()),
                     "li_slow_md": int(g["slow_li"].astype(bool).sum()), "li_slow_chosen": int(g["li_slow"].astype(bool).sum()),
                     "frame_slow_md": int(g["slow_frame"].astype(bool).sum()),
                     "frame_slow_chosen": int(g["frame_slow"].astype(bool).sum())})
    return pd.DataFrame(rows, columns=cols)


def write_reports(
    analysis_table: pd.DataFrame | str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    structures_table: pd.DataFrame | str | os.PathLike[str],
    status_table: pd.DataFrame | str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    priors_table: pd.DataFrame | str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    out_dir: str | os.PathLike[str],
    cfg: Mapping[str, Any] | None = None,
    variant: str | None = None,
    metric_splits: Sequence[str] = ("test",),
    labels_table: pd.DataFrame | str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Write metrics.csv, ranking.csv, prior_classes.csv (+ provenance JSON), parity/*.png and
    arrhenius/*.png.

    Inputs are DataFrames or paths (analysis Parquet files, the STRUCTURES Parquet, STATUS and
    PRIORS Parquet files, the dataset's LABELS). ``cfg`` is the run config (``analysis.top_n`` and
    ``analysis.target_temperature`` are used). Everything is computed before the first file is
    written; each file is atomic. Returns the written paths.
    """
    full = _cfg(cfg)
    acfg = full["analysis"]
    df = read_analysis(analysis_table)
    structs = load_structures(structures_table)
    status = load_status(status_table)
    priors = load_priors(priors_table)
    labels = (labels_table if isinstance(labels_table, pd.DataFrame) or labels_table is None
              else schema.read_df(labels_table, "labels"))
    target_T = float(acfg["target_temperature"])
    metrics = compute_metrics(df, status, metric_splits, tau_ps=acfg["metric_tau_ps"],
                              delta_tau_ps=float(full["dataset"]["delta_tau_ps"]))
    src = _ranking_source(df, variant)
    ranking, fits = compute_ranking(df, structs, status, priors[priors["source"] == src] if len(priors) else None,
                                    target_T, variant)
    agreement = prior_agreement(priors, labels if labels is not None else pd.DataFrame())
    out = Path(out_dir)
    prov = provenance(full, stage="report", n_trajectories=int(len(df)), n_structures=int(len(ranking)),
                      metric_splits=list(metric_splits), target_temperature_K=target_T,
                      prediction_source=str(ranking["source"].iloc[0]) if len(ranking) else None)
    _write_csv(metrics, out / "metrics.csv", prov)
    _write_csv(ranking, out / "ranking.csv", prov)
    _write_csv(agreement, out / "prior_classes.csv", prov)
    for sub in ("parity", "arrhenius"):  # declared outputs, even when there is nothing to plot
        (out / sub).mkdir(parents=True, exist_ok=True)
    parity = parity_plots(df, metrics, out, prov, metric_splits)
    arr = arrhenius_plots(ranking, fits, df, out, prov, int(acfg["top_n"]), target_T) if len(ranking) else []
    return {"metrics": out / "metrics.csv", "ranking": out / "ranking.csv", "prior_classes": out / "prior_classes.csv",
            "parity": parity, "arrhenius": arr}
