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
    "D_li", "D_li_low", "D_li_high", "D_method", "D_note",
    "rdf", "rdf_r_max", "status", "stable",
)
NUMERIC_COLUMNS = ("duration_ps", "msd_li", "msd_frame", "D_li", "D_li_low", "D_li_high", "rdf_r_max")


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
    """Analysis of one trajectory: final MSDs (Å²), MSD curves, kinisi D* of Li (cm²/s), RDF.

    ``analysis_cfg`` is the ``analysis`` section of the config (kinisi_n_dt, kinisi_samples,
    rdf_rmax, rdf_bins, rdf_discard). D* is NaN with ``D_method`` "insufficient_frames" for
    fewer than 4 frames and "skipped" when ``diffusion`` is False.
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
    msd_li_curve = an.msd_single_origin(x, li)
    msd_fr_curve = an.msd_single_origin(x, frame) if frame.any() else np.full(n_frames, np.nan)
    idx = np.unique(np.linspace(0, n_frames - 1, min(CURVE_POINTS, n_frames)).round().astype(int))
    row: dict[str, Any] = {
        "n_frames": int(n_frames),
        "duration_ps": float(t[-1] - t[0]) if n_frames > 1 else 0.0,
        "msd_li": float(msd_li_curve[-1]),
        "msd_frame": float(msd_fr_curve[-1]),
        "msd_t_ps": (t[idx] - t[0]).tolist(),
        "msd_li_curve": msd_li_curve[idx].tolist(),
        "msd_frame_curve": msd_fr_curve[idx].tolist(),
        "D_li": math.nan, "D_li_low": math.nan, "D_li_high": math.nan, "D_method": "skipped", "D_note": "",
    }
    if diffusion and n_frames < 4:
        row["D_method"] = "insufficient_frames"
    elif diffusion:
        res = an.kinisi_diffusion(x, t, nums, cell, species="Li", n_dt=int(analysis_cfg["kinisi_n_dt"]),
                                  n_samples=int(analysis_cfg["kinisi_samples"]), seed=seed)
        row.update({"D_li": res["D"], "D_li_low": res["D_low"], "D_li_high": res["D_high"],
                    "D_method": res["method"], "D_note": res.get("note", "")})
    _, g = an.rdf(x, nums, cell, r_max=float(analysis_cfg["rdf_rmax"]), n_bins=int(analysis_cfg["rdf_bins"]),
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


def compute_metrics(analysis_table: pd.DataFrame, status_table: pd.DataFrame | None = None,
                    metric_splits: Sequence[str] = ("test",)) -> pd.DataFrame:
    """Rows (temperature, model variant) with the paper's Table-1 metrics.

    Reference = MD trajectories (source "md") of structures in ``metric_splits``; each rollout is
    compared with the MD of the same structure and temperature at the common time
    min(τ_ref, τ_gen) (interpolated MSD curves). Columns: temperature, model,
    log_msd_li_mae, log_msd_li_spearman, log_msd_frame_mae, rdf_mae, stable_pct, n (paired
    trajectories), n_rollouts, note. NaN with a note when there is no reference.
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
            common = sorted(set(ref.index) & set(gen.index))
            li_r, li_g, fr_r, fr_g, rdf_err = [], [], [], [], []
            for sid in common:
                a, b = ref.loc[sid], gen.loc[sid]
                tc = min(float(a["duration_ps"]), float(b["duration_ps"]))
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
            note = ""
            if ref.empty:
                note = f"no reference MD for {'/'.join(sorted(splits))} structures at {T} K"
            elif not common:
                note = f"no structure has both reference MD and {v} rollouts at {T} K"
            rows.append({
                "temperature": T, "model": v[len(LIFLOW_PREFIX):],
                "log_msd_li_mae": li["mae"], "log_msd_li_spearman": li["spearman"],
                "log_msd_frame_mae": fr["mae"],
                "rdf_mae": float(np.mean(rdf_err)) if rdf_err else math.nan,
                "stable_pct": 100.0 * n_ok / n_roll if n_roll else math.nan,
                "n": int(li["n"]), "n_rollouts": int(n_roll), "note": note,
            })
    cols = ["temperature", "model", "log_msd_li_mae", "log_msd_li_spearman", "log_msd_frame_mae", "rdf_mae",
            "stable_pct", "n", "n_rollouts", "note"]
    return pd.DataFrame(rows, columns=cols)


# --------------------------------------------------------------------------------------------
# ranking
# --------------------------------------------------------------------------------------------

def _uncertain_map(flags: pd.DataFrame | Mapping[str, bool] | None) -> dict[str, bool] | None:
    if flags is None:
        return None
    if isinstance(flags, pd.DataFrame):
        if "id" not in flags.columns or "uncertain" not in flags.columns:
            raise InputError("classifier flags need columns 'id' and 'uncertain'")
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


def compute_ranking(
    analysis_table: pd.DataFrame,
    structures_table: pd.DataFrame,
    status_table: pd.DataFrame | None = None,
    classifier_uncertain_flags: pd.DataFrame | Mapping[str, bool] | None = None,
    target_T: float = 300.0,
    variant: str | None = None,
) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """One row per structure, sorted by predicted σ(target_T) (S/cm, descending, NaN last).

    Predictions come from the LiFlow ``variant`` (source "liflow:<variant>"; default "adaptive"
    when present, else the first variant; "md" only when there are no rollouts at all). Columns:
    rank, id, formula, split, source, n_li, volume_A3, D_pred_<T>K[_low|_high] (cm²/s, kinisi
    median and 95 % interval), E_A_eV[_low|_high], D_<target>K[_low|_high], sigma_<target>K_S_cm
    [_low|_high] (Nernst–Einstein from the relaxed structure's Li density), D_ref_<T>K[_low|_high]
    where reference MD exists, flags diverged, extrapolated_temperature, classifier_uncertain,
    non_arrhenius (E_A <= 0: no extrapolation, σ left empty), and
    ``status`` (ok | diverged | the reason a structure has no prediction, e.g. a failed relaxation;
    such structures are listed last). Also returns the Arrhenius fit of each structure (for the plots).
    """
    structs = load_structures(structures_table)
    df = analysis_table
    src = _ranking_source(df, variant)
    pred = df[df["source"] == src]
    ref = df[df["source"] == MD_SOURCE]
    temps = sorted({int(t) for t in pred["temperature"]})
    ref_temps = sorted({int(t) for t in ref["temperature"]})
    uncertain = _uncertain_map(classifier_uncertain_flags)
    status = status_table if status_table is not None and len(status_table) else None
    tgt = _tcol(round(target_T))
    rows, fits = [], {}
    for sid, g in pred.groupby("id", sort=True):
        if sid not in structs.index:
            raise InputError(f"structure {sid!r} is missing from the structures table")
        s = structs.loc[sid]
        nums = np.asarray(s["numbers"], dtype=int)
        cell = np.asarray(s["cell"], dtype=np.float64).reshape(3, 3)
        volume = float(abs(np.linalg.det(cell)))
        n_li = int(np.sum(nums == 3))
        row: dict[str, Any] = {"id": sid, "formula": s.get("reduced_formula", ""),
                               "split": s.get("split", g["split"].iloc[0]), "source": src,
                               "n_li": n_li, "volume_A3": volume}
        g = g.set_index("temperature")
        for T in temps:
            r = g.loc[T] if T in g.index else None
            row[f"D_pred_{_tcol(T)}"] = float(r["D_li"]) if r is not None else math.nan
            row[f"D_pred_{_tcol(T)}_low"] = float(r["D_li_low"]) if r is not None else math.nan
            row[f"D_pred_{_tcol(T)}_high"] = float(r["D_li_high"]) if r is not None else math.nan
        fit = an.arrhenius_fit(g.index.to_numpy(float), g["D_li"].to_numpy(float), g["D_li_low"].to_numpy(float),
                               g["D_li_high"].to_numpy(float), target_T=target_T)
        fits[sid] = fit
        row.update({"E_A_eV": fit["E_A"], "E_A_eV_low": fit["E_A_low"], "E_A_eV_high": fit["E_A_high"],
                    "arrhenius_n_T": fit["n_points"], f"D_{tgt}": fit["D_target"],
                    f"D_{tgt}_low": fit["D_target_low"], f"D_{tgt}_high": fit["D_target_high"]})
        # A non-positive activation energy (D falling with T) is not thermally activated diffusion:
        # extrapolating it to target_T would rank noise first, so no D(target_T) / σ is given.
        non_arrhenius = bool(np.isfinite(fit["E_A"]) and fit["E_A"] <= 0)
        if non_arrhenius:
            for key in ("", "_low", "_high"):
                row[f"D_{tgt}{key}"] = math.nan
        row["non_arrhenius"] = non_arrhenius
        for key, dval in (("", row[f"D_{tgt}"]), ("_low", row[f"D_{tgt}_low"]), ("_high", row[f"D_{tgt}_high"])):
            row[f"sigma_{tgt}_S_cm{key}"] = (an.nernst_einstein_conductivity(dval, n_li, volume, target_T)
                                             if np.isfinite(dval) else math.nan)
        rs = ref[ref["id"] == sid].set_index("temperature")
        for T in ref_temps:
            r = rs.loc[T] if T in rs.index else None
            row[f"D_ref_{_tcol(T)}"] = float(r["D_li"]) if r is not None else math.nan
            row[f"D_ref_{_tcol(T)}_low"] = float(r["D_li_low"]) if r is not None else math.nan
            row[f"D_ref_{_tcol(T)}_high"] = float(r["D_li_high"]) if r is not None else math.nan
        if status is not None:
            st = status[(status["id"] == sid) & (status["source"] == src)]
            diverged = bool((st["status"] == "diverged").any()) or bool((g["status"] == "diverged").any())
        else:
            diverged = bool((g["status"] == "diverged").any())
        row["diverged"] = diverged
        row["extrapolated_temperature"] = bool(fit["extrapolated"])
        row["classifier_uncertain"] = (pd.NA if uncertain is None else bool(uncertain.get(sid, False)))
        row["status"] = ("diverged" if diverged else
                         f"non-Arrhenius (E_A = {fit['E_A']:.3f} eV <= 0)" if non_arrhenius else "ok")
        rows.append(row)
    # Structures without any generated trajectory (e.g. relaxation failed) still get a row, unranked
    # by conductivity (NaN) and with the reason, so the CSV accounts for every input structure.
    seen = {r["id"] for r in rows}
    for sid in sorted(set(structs.index) - seen):
        s = structs.loc[sid]
        reason = "no generated trajectory"
        if status is not None:
            st = status[(status["id"] == sid) & (status["source"] == src) & (status["status"] != "ok")]
            if len(st):
                reason = f"{st['status'].iloc[0]}: {st['reason'].iloc[0]}"
        rows.append({"id": sid, "formula": s.get("reduced_formula", ""), "split": s.get("split", ""), "source": src,
                     "n_li": int(np.sum(np.asarray(s["numbers"]) == 3)), "diverged": False, "non_arrhenius": False,
                     "extrapolated_temperature": False,
                     "classifier_uncertain": pd.NA if uncertain is None else bool(uncertain.get(sid, False)),
                     "status": reason})
    out = pd.DataFrame(rows)
    if out.empty:
        base = ["rank", "id", "formula", "split", "source", "n_li", "volume_A3", "E_A_eV", "E_A_eV_low",
                "E_A_eV_high", "arrhenius_n_T", f"D_{tgt}", f"D_{tgt}_low", f"D_{tgt}_high", f"sigma_{tgt}_S_cm",
                f"sigma_{tgt}_S_cm_low", f"sigma_{tgt}_S_cm_high", "diverged", "non_arrhenius", "extrapolated_temperature",
                "classifier_uncertain"]
        return pd.DataFrame(columns=base), fits
    out["classifier_uncertain"] = out["classifier_uncertain"].astype("boolean")
    out = out.sort_values(f"sigma_{tgt}_S_cm", ascending=False, na_position="last", kind="mergesort")
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out.reset_index(drop=True), fits


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------

def _savefig(fig: Any, path: Path, prov: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, metadata={"Description": json.dumps(prov, default=str)})


def parity_plots(analysis_table: pd.DataFrame, out_dir: Path, prov: dict[str, Any],
                 metric_splits: Sequence[str] = ("test",)) -> list[Path]:
    """One PNG per temperature: log10 MSD_Li and MSD_frame (Å²), reference MD vs each variant."""
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
                xs, ys = [], []
                for sid in sorted(set(ref.index) & set(gen.index)):
                    a, b = ref.loc[sid], gen.loc[sid]
                    tc = min(float(a["duration_ps"]), float(b["duration_ps"]))
                    xs.append(_msd_at(a["msd_t_ps"], a[col], tc))
                    ys.append(_msd_at(b["msd_t_ps"], b[col], tc))
                xa, ya = np.asarray(xs, float), np.asarray(ys, float)
                ok = np.isfinite(xa) & np.isfinite(ya) & (xa > 0) & (ya > 0)
                if ok.any():
                    any_pts = True
                    ax.scatter(np.log10(xa[ok]), np.log10(ya[ok]), s=14, alpha=0.75,
                               label=f"{v[len(LIFLOW_PREFIX):]} (n={int(ok.sum())})")
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
    """Arrhenius plots (ln D* vs 1000/T, with 95 % intervals and the fit) of the top candidates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    df = analysis_table
    for r in ranking[ranking["id"].isin(fits)].head(int(top_n)).itertuples(index=False):
        fit = fits[r.id]
        fig, ax = plt.subplots(figsize=(5.2, 4.2))
        sources = [(r.source, "o", "C0")] + ([(MD_SOURCE, "s", "C3")] if r.source != MD_SOURCE else [])
        for src, marker, color in sources:
            g = df[(df["id"] == r.id) & (df["source"] == src)].sort_values("temperature")
            g = g[np.isfinite(g["D_li"].astype(float)) & (g["D_li"].astype(float) > 0)]
            if g.empty:
                continue
            x = 1000.0 / g["temperature"].to_numpy(float)
            y = g["D_li"].to_numpy(float)
            lo = np.where(np.isfinite(g["D_li_low"]), g["D_li_low"], y)
            hi = np.where(np.isfinite(g["D_li_high"]), g["D_li_high"], y)
            ax.errorbar(x, y, yerr=[np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)], fmt=marker,
                        color=color, capsize=3, label="reference MD" if src == MD_SOURCE else src)
        if np.isfinite(fit["E_A"]):
            tt = np.linspace(min(fit["T_min"], target_T), fit["T_max"], 100)
            ax.plot(1000.0 / tt, np.exp(fit["ln_D0"] - fit["E_A"] / (an.K_B_EV * tt)), "C0-", lw=1,
                    label=f"fit E_A = {fit['E_A']:.2f} [{fit['E_A_low']:.2f}, {fit['E_A_high']:.2f}] eV")
            if np.isfinite(fit["D_target_low"]):
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
    metrics = compute_metrics(df, status, metric_splits)
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
    parity = parity_plots(df, out, prov, metric_splits)
    arr = arrhenius_plots(ranking, fits, df, out, prov, int(acfg["top_n"]), target_T) if len(ranking) else []
    return {"metrics": out / "metrics.csv", "ranking": out / "ranking.csv", "prior_classes": out / "prior_classes.csv",
            "parity": parity, "arrhenius": arr}
