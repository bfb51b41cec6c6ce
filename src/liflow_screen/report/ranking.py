"""ranking.csv rows: per-temperature resolved D* or bounds with their method and flags, censored
Arrhenius fits (resolved temperatures as data, unresolved ones as upper bounds), σ(300 K) by
Nernst–Einstein, ranks only for what was resolved, by a conservative posterior quantile (no file I/O).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from .. import analysis as an
from ..core.constants import LI_Z
from ..core.errors import InputError
from .metrics import liflow_variants
from .tables import LIFLOW_PREFIX, MD_SOURCE, load_structures


def _uncertain_map(flags: pd.DataFrame | Mapping[str, bool] | None) -> dict[str, bool] | None:
    if flags is None:
        return None
    if isinstance(flags, pd.DataFrame):
        if "id" not in flags.columns or "uncertain" not in flags.columns:
            raise InputError("prior-class flags need columns 'id' and 'uncertain'")
        return {str(k): bool(v) for k, v in flags.groupby("id")["uncertain"].any().items()}
    return {str(k): bool(v) for k, v in flags.items()}


def ranking_source(df: pd.DataFrame, variant: str | None) -> str:
    """The trajectory source that ranks: liflow:<variant> if given; else liflow:adaptive, else the
    first LiFlow variant; "md" only when there are no rollouts at all."""
    variants = liflow_variants(df)
    if variant is not None:
        src = variant if variant.startswith(LIFLOW_PREFIX) or variant == MD_SOURCE else LIFLOW_PREFIX + variant
        if src not in set(df["source"]):
            raise InputError(f"no trajectories of source {src!r} in the analysis table")
        return src
    if variants:
        return LIFLOW_PREFIX + "adaptive" if LIFLOW_PREFIX + "adaptive" in variants else variants[0]
    return MD_SOURCE


#: What the ranking sorts by (descending): the 2.5 % posterior quantile of σ(target_T), so that the
#: least certain extrapolation does not land on top; the median is given beside it.
RANK_QUANTITY = "2.5 % quantile of the σ({T}) posterior (censored Arrhenius fit)"


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
    n_draws: int = 4000,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """One row per structure: ranked candidates first (by the conservative 2.5 % posterior quantile of
    σ(target_T), S/cm, descending: column sigma_<target>K_S_cm_rankq), then every other structure,
    unranked, with the reason.

    Predictions come from the LiFlow ``variant`` (see :func:`ranking_source`). Per temperature:
    D_pred_<T>K[_low|_high] (kinisi median and 95 % interval, only where Li diffusion was resolved),
    D_pred_<T>K_bound (upper bound where it was not), D_method_<T>K (analysis.D_METHODS), flags_<T>K
    (why the point is not in the fit: unresolved, diverged, frame_melted, li_molten, md_melts_from_<T>K).
    A structure is ranked only when >= 2 temperatures have resolved, stable, non-melted trajectories
    (below the temperature at which its reference MD melts, if any) and the censored Arrhenius fit
    (:func:`analysis.arrhenius_fit_censored`: those resolved D* as Gaussian data in ln D, the upper
    bounds of temperatures whose only flag is ``unresolved`` as censored data, 0 < E_A < 2 eV) finds a
    consistent line; bounds add constraints, they do not replace resolved points, and flagged
    (unstable, melted) temperatures stay out entirely. Then E_A_eV[_low|_high] (posterior median and
    95 % interval), D_<target>K[_low|_high] and sigma_<target>K_S_cm[_low|_high] (Nernst–Einstein with
    the relaxed cell's Li density; median and 95 % interval) and sigma_<target>K_S_cm_rankq (the
    ranking quantity, the 2.5 % quantile, named in ``rank_by``) are given, else they stay empty
    (E_A_eV of an unranked row with >= 2 usable temperatures is the resolved points' weighted fit).
    arrhenius_T / arrhenius_bound_T list the temperatures used as data / as bounds;
    arrhenius_p_value is the fit's consistency p-value. A fit with no consistent line makes the row
    ``non-Arrhenius`` with a reason naming the temperatures.
    Reference MD where present: D_ref_<T>K (resolved kinisi D* or empty) and D_ref_method_<T>K.
    duration_<T>K_ps: how long the trajectories at T ran (extension rounds make some longer);
    resolution_<T>K: the Li MSD excess in hop lengths squared (>= 1 resolved: how near the threshold);
    n_replicas: independent trajectories per temperature, pooled in each D*.

    Rank intervals: ``n_draws`` joint posterior draws of σ(target_T), one line per ranked row from its
    censored fit (independent rows, ``numpy.random.default_rng([seed, structure key])``), ranked
    within each draw: rank_low / rank_high are the 2.5 / 97.5 % quantiles of each row's rank, and
    rank_text reads "4 (3–9)". p_ranked: the fraction of the same draws whose line lies above the
    resolution floor (``D_li_floor``, a²/(6 τ_obs)) at two or more of the temperatures that could
    enter the fit, i.e. how likely a rerun is to resolve enough temperatures to rank the row at all.
    Returns the table and the Arrhenius fit of each ranked structure (for the plots; with
    ``sigma_draws``, S/cm, the draws of σ(target_T)).
    """
    from ..core.seeds import structure_key

    structs = load_structures(structures_table)
    df = analysis_table
    src = ranking_source(df, variant)
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
        n_li = int(np.sum(nums == LI_Z))
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
                        f"D_method_{c}": str(r["D_method"]), f"flags_{c}": ";".join(flags),
                        f"duration_{c}_ps": float(r.get("duration_ps", math.nan)),
                        f"resolution_{c}": _resolution_ratio(r),
                        f"D_pred_{c}_replicas": replica_text(r),
                        f"D_pred_{c}_scatter_p": float(r.get("D_scatter_p", math.nan))})
            row["n_replicas"] = max(int(row.get("n_replicas", 0)), int(r.get("n_replicas", 1) or 1))
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
        # bounds: temperatures whose only objection is "unresolved" (no flagged trajectory enters)
        bound_T = [T for T in temps if bad.get(T) == ["unresolved"]
                   and np.isfinite(float(g.loc[T, "D_li_bound"])) and float(g.loc[T, "D_li_bound"]) > 0]
        fit = None
        if len(use_T) >= 2:
            gu, gb = g.loc[use_T], g.loc[bound_T]
            fit = an.arrhenius_fit_censored(
                np.asarray(use_T, float), gu["D_li"].to_numpy(float), gu["D_li_low"].to_numpy(float),
                gu["D_li_high"].to_numpy(float), np.asarray(bound_T, float), gb["D_li_bound"].to_numpy(float),
                target_T=target_T, n_draws=n_draws, rng=np.random.default_rng([int(seed), structure_key(sid)]))
        row.update({"arrhenius_T": ";".join(str(T) for T in use_T), "arrhenius_n_T": len(use_T),
                    "arrhenius_bound_T": ";".join(str(T) for T in bound_T) if fit is not None else "",
                    "arrhenius_p_value": fit["p_value"] if fit is not None else math.nan})
        for key in ("E_A_eV", "E_A_eV_low", "E_A_eV_high", f"D_{tgt}", f"D_{tgt}_low", f"D_{tgt}_high",
                    f"sigma_{tgt}_S_cm", f"sigma_{tgt}_S_cm_low", f"sigma_{tgt}_S_cm_high", f"sigma_{tgt}_S_cm_rankq"):
            row[key] = math.nan
        ranked = bool(fit is not None and fit["status"] == "ok" and np.isfinite(fit["D_target_low"]))
        if fit is not None:  # unranked: the resolved points' own weighted fit, for information
            ro = fit["resolved_only"]
            row.update({"E_A_eV": ro["E_A"], "E_A_eV_low": ro["E_A_low"], "E_A_eV_high": ro["E_A_high"]})
        if ranked:
            fits[sid] = fit
            row.update({"E_A_eV": fit["E_A"], "E_A_eV_low": fit["E_A_low"], "E_A_eV_high": fit["E_A_high"]})
            for key, dval in (("", fit["D_target"]), ("_low", fit["D_target_low"]), ("_high", fit["D_target_high"])):
                row[f"D_{tgt}{key}"] = dval
                row[f"sigma_{tgt}_S_cm{key}"] = (an.nernst_einstein_conductivity(dval, n_li, volume, target_T)
                                                 if np.isfinite(dval) else math.nan)
            row[f"sigma_{tgt}_S_cm_rankq"] = row[f"sigma_{tgt}_S_cm_low"]
            row["status"] = "ranked"
            if n_draws > 0:
                e_d, a_d = fit["draws_E_A"], fit["draws_ln_D0"]
                fit["sigma_draws"] = an.nernst_einstein_conductivity(np.exp(a_d - e_d / (an.K_B_EV * target_T)),
                                                                     n_li, volume, target_T)
                row["p_ranked"] = _p_ranked(e_d, a_d, g, use_T + bound_T)
        else:
            row["status"], row["reason"] = _unranked_reason(sid, g, temps, bad, fit, status, src)
        row["rank_by"] = RANK_QUANTITY.format(T=f"{target_T:g} K")
        row["prior_class_uncertain"] = pd.NA if uncertain is None else bool(uncertain.get(sid, False))
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return pd.DataFrame(columns=["rank", "id", "formula", "split", "source", "status", "reason"]), fits
    out["prior_class_uncertain"] = out["prior_class_uncertain"].astype("boolean")
    sig = f"sigma_{tgt}_S_cm_rankq"
    order = {"ranked": 0, "unresolved": 1, "non-Arrhenius": 1, "unstable": 2, "no rollout": 3}
    out["_grp"] = out["status"].map(lambda x: order.get(x, 3))
    out["_sig"] = -out[sig].fillna(-np.inf)
    out = out.sort_values(["_grp", "_sig", "id"], kind="mergesort").drop(columns=["_grp", "_sig"])
    ranked_mask = out["status"] == "ranked"
    out.insert(0, "rank", pd.array([i + 1 if ok else pd.NA for i, ok in enumerate(ranked_mask)], dtype="Int64"))
    out = out.reset_index(drop=True)
    _rank_intervals(out, fits, n_draws)
    front = ["rank", "rank_text", "rank_low", "rank_high", "p_ranked"]
    return out[front + [c for c in out.columns if c not in front]], fits


def _resolution_ratio(r: Mapping[str, Any]) -> float:
    """Li MSD excess over the vibrational plateau in units of the hop length squared (>= 1: resolved;
    ``analysis.diffusion_resolution``): how far a trajectory is from the resolution threshold."""
    excess, hop = float(r.get("li_msd_excess", math.nan)), float(r.get("li_hop_A", math.nan))
    return excess / hop**2 if math.isfinite(excess) and math.isfinite(hop) and hop > 0 else math.nan


def replica_text(r: Mapping[str, Any]) -> str:
    """Each replica's own D* (cm²/s) as "median [low–high]" or its bound as "<bound", ";"-separated
    (empty for a single trajectory)."""
    rd = r.get("replica_D")
    D = [] if rd is None or (isinstance(rd, float) and math.isnan(rd)) else list(rd)
    if len(D) < 2:
        return ""
    lo, hi, b = list(r["replica_D_low"]), list(r["replica_D_high"]), list(r["replica_D_bound"])
    parts = []
    for k in range(len(D)):
        if np.isfinite(D[k]):
            parts.append(f"{D[k]:.3g} [{lo[k]:.3g}–{hi[k]:.3g}]")
        elif np.isfinite(b[k]):
            parts.append(f"<{b[k]:.3g}")
        else:
            parts.append("none")
    return "; ".join(parts)


def _p_ranked(e_draws: np.ndarray, lnd0_draws: np.ndarray, g: pd.DataFrame, temps: list[int]) -> float:
    """Fraction of posterior line draws (E_A eV, ln D0) above the resolution floor D_li_floor (cm²/s)
    at >= 2 of ``temps`` (K; rows of ``g`` indexed by temperature)."""
    above = np.zeros(e_draws.size, dtype=int)
    n_T = 0
    for T in temps:
        floor = float(g.loc[T, "D_li_floor"]) if "D_li_floor" in g.columns else math.nan
        if not (math.isfinite(floor) and floor > 0):
            continue
        n_T += 1
        above += (lnd0_draws - e_draws / (an.K_B_EV * T)) > math.log(floor)
    return float(np.mean(above >= 2)) if n_T >= 2 else math.nan


def _rank_intervals(out: pd.DataFrame, fits: dict[str, dict[str, Any]], n_draws: int) -> None:
    """rank_low, rank_high (95 % of each ranked row's rank over joint σ draws) and rank_text, in place."""
    out["rank_low"] = pd.array([pd.NA] * len(out), dtype="Int64")
    out["rank_high"] = pd.array([pd.NA] * len(out), dtype="Int64")
    out["rank_text"] = ""
    if "p_ranked" not in out.columns:
        out["p_ranked"] = math.nan
    idx = [i for i in out.index if out.at[i, "status"] == "ranked" and "sigma_draws" in fits.get(out.at[i, "id"], {})]
    if not idx or n_draws <= 0:
        out.loc[out["status"] == "ranked", "rank_text"] = out.loc[out["status"] == "ranked", "rank"].astype(str)
        return
    from scipy import stats

    draws = np.stack([fits[out.at[i, "id"]]["sigma_draws"] for i in idx])   # (ranked rows, draws)
    ranks = stats.rankdata(-draws, axis=0, method="min")                     # 1 = highest σ in the draw
    lo = np.percentile(ranks, 2.5, axis=1, method="lower").astype(int)
    hi = np.percentile(ranks, 97.5, axis=1, method="higher").astype(int)
    for k, i in enumerate(idx):
        out.at[i, "rank_low"], out.at[i, "rank_high"] = int(lo[k]), int(hi[k])
        out.at[i, "rank_text"] = f"{int(out.at[i, 'rank'])} ({lo[k]}–{hi[k]})"


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
    if fit is not None:  # >= 2 usable temperatures, but no consistent Arrhenius line
        return "non-Arrhenius", str(fit["reason"]) or f"no finite σ from {fit['n_points']} temperatures"
    usable = [T for T in temps if T not in bad]
    parts = [f"{T} K: {','.join(bad[T])}" for T in temps if T in bad]
    unstable = [any(x not in ("unresolved", "no trajectory") for x in f) for f in bad.values()]
    grp = "unstable" if all(unstable) else "unresolved"
    return grp, (f"usable (resolved, stable, non-melted) at {len(usable)} of {len(temps)} temperatures, "
                 f"2 needed for an Arrhenius fit; " + "; ".join(parts))


def diffusivity_by_source(analysis_table: pd.DataFrame, structures_table: pd.DataFrame,
                          status_table: pd.DataFrame | None = None, target_T: float = 300.0) -> pd.DataFrame:
    """D*(T) and the Arrhenius E_A of every structure from EVERY trajectory source side by side (the
    reference or user MD, each LiFlow variant): one row per (structure, source), the per-source
    columns of :func:`compute_ranking` (D_<T>K[_low|_high|_bound], D_method_<T>K, flags_<T>K,
    E_A_eV[_low|_high] (posterior median and 95 % interval of the censored fit for ``fitted`` rows),
    arrhenius_T, arrhenius_bound_T, status, reason), with no ranks; only the (structure, source) pairs
    that have trajectories."""
    keep_prefix = ("D_pred_", "D_method_", "flags_", "duration_")
    parts = []
    for src in sorted(set(analysis_table["source"])):
        sub = analysis_table[analysis_table["source"] == src]
        rk, _ = compute_ranking(sub, structures_table, status_table, None, target_T, src)
        rk = rk[rk["id"].isin(set(sub["id"]))]  # only structures with trajectories of this source
        cols = ["id", "formula", "source"] + [c for c in rk.columns if c.startswith(keep_prefix)] + [
            "arrhenius_T", "arrhenius_n_T", "arrhenius_bound_T", "E_A_eV", "E_A_eV_low", "E_A_eV_high", "status",
            "reason"]
        parts.append(rk[[c for c in cols if c in rk.columns]].rename(
            columns=lambda c: "D_" + c[len("D_pred_"):] if c.startswith("D_pred_") else c))
    if not parts:
        return pd.DataFrame(columns=["id", "formula", "source", "E_A_eV", "status", "reason"])
    out = pd.concat(parts, ignore_index=True)
    out["status"] = out["status"].replace({"ranked": "fitted"})
    return out.sort_values(["id", "source"], kind="mergesort").reset_index(drop=True)
