"""Table-1 metrics of LiFlow rollouts against reference MD at one common τ, and the agreement of
the rollouts' prior classes with the MD labels (no file I/O).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .. import analysis as an
from .tables import LIFLOW_PREFIX, MD_SOURCE


def msd_at(curve_t: Sequence[float], curve: Sequence[float], t: float) -> float:
    tt = np.asarray(curve_t, dtype=np.float64)
    yy = np.asarray(curve, dtype=np.float64)
    if tt.size == 0 or t > tt[-1] + 1e-6:
        return math.nan
    return float(np.interp(t, tt, yy))


def liflow_variants(df: pd.DataFrame) -> list[str]:
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
    variants = liflow_variants(df)
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
                li_r.append(msd_at(a["msd_t_ps"], a["msd_li_curve"], tc))
                li_g.append(msd_at(b["msd_t_ps"], b["msd_li_curve"], tc))
                fr_r.append(msd_at(a["msd_t_ps"], a["msd_frame_curve"], tc))
                fr_g.append(msd_at(b["msd_t_ps"], b["msd_frame_curve"], tc))
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
