"""Spearman rank correlations with bootstrap intervals (no file I/O): LiFlow's predicted σ(300 K) and
D*(T) against literature room-temperature conductivities, and LiFlow's log MSD against reference MD
per temperature (Table 1's ρ).

Output schema (:data:`SPEARMAN_COLUMNS`): comparison ("liflow_vs_literature" | "liflow_vs_md"),
source (the LiFlow trajectory source), quantity, temperature_K, subset, n, rho, rho_low, rho_high
(bootstrap ``level`` interval over compounds), rho_post_low, rho_post_high (``level`` interval of ρ
over joint posterior draws of the predictions: σ(300 K) rows only, from the ranking's draws), p_value
(scipy's t approximation; no correction for ties), note.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .metrics import compute_metrics, msd_at
from .tables import LIFLOW_PREFIX, MD_SOURCE

SPEARMAN_COLUMNS = ["comparison", "source", "quantity", "temperature_K", "subset", "n", "rho", "rho_low",
                    "rho_high", "rho_post_low", "rho_post_high", "p_value", "note"]
#: Subsets of the literature comparison: every screened row by its status, or resolved rows only.
SUBSET_ALL, SUBSET_RESOLVED = "all_by_status", "resolved"
#: Bootstrap defaults: resamples of the (prediction, reference) pairs and the seed of their generator.
N_BOOT, BOOT_SEED = 2000, 0


def status_ranks(values: Sequence[float] | np.ndarray, slow: Sequence[bool] | np.ndarray) -> np.ndarray:
    """Average ranks (1 = slowest) of predictions where the ``slow`` rows (unresolved: only an upper
    bound) count as slower than every resolved row and tie among themselves; ``values`` of the slow
    rows are ignored, the others must be finite."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64).copy()
    s = np.asarray(slow, dtype=bool)
    if v.shape != s.shape or v.ndim != 1:
        raise ValueError("values and slow must be 1-D of equal length")
    if not np.all(np.isfinite(v[~s])):
        raise ValueError("resolved values must be finite")
    v[s] = -np.inf
    return stats.rankdata(v, method="average")


def bootstrap_spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, n_boot: int = N_BOOT,
                       seed: int = BOOT_SEED, level: float = 0.95) -> dict[str, float]:
    """Spearman ρ of paired values (ties take average ranks; −inf is allowed and ties at the bottom)
    with a percentile bootstrap interval: ``n_boot`` resamples of the pairs with replacement from
    ``numpy.random.default_rng(seed)``, resamples with a constant side skipped. Returns n, rho,
    rho_low, rho_high, p_value, n_boot_used; ρ is NaN with n < 3 or a constant side."""
    from scipy import stats

    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("x and y must be 1-D of equal length")
    n = int(a.size)
    out = {"n": n, "rho": math.nan, "rho_low": math.nan, "rho_high": math.nan, "p_value": math.nan,
           "n_boot_used": 0}
    if n < 3 or np.unique(a).size < 2 or np.unique(b).size < 2:
        return out
    res = stats.spearmanr(stats.rankdata(a), stats.rankdata(b))
    out["rho"], out["p_value"] = float(res.statistic), float(res.pvalue)
    idx = np.random.default_rng(seed).integers(0, n, size=(int(n_boot), n))
    ra = stats.rankdata(a[idx], axis=1)
    rb = stats.rankdata(b[idx], axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    ok = den > 0
    rho = (ra * rb).sum(1)[ok] / den[ok]
    if rho.size:
        out["rho_low"], out["rho_high"] = (float(q) for q in np.percentile(rho, [50 * (1 - level), 50 * (1 + level)]))
    out["n_boot_used"] = int(rho.size)
    return out


def posterior_spearman(draws: np.ndarray, slow: np.ndarray, ref: np.ndarray, level: float = 0.95
                       ) -> tuple[float, float]:
    """``level`` interval of Spearman ρ between predictions and ``ref`` over posterior draws:
    ``draws`` (rows, n_draws) of the resolved rows' predictions (ignored for ``slow`` rows, which
    tie slowest as in :func:`status_ranks`). (NaN, NaN) with fewer than 3 rows."""
    from scipy import stats

    n = ref.size
    if n < 3 or np.unique(ref).size < 2:
        return math.nan, math.nan
    v = np.where(slow[:, None], -np.inf, draws)
    rx = stats.rankdata(v, axis=0)
    ry = stats.rankdata(ref)
    rx = rx - rx.mean(axis=0, keepdims=True)
    ry = ry - ry.mean()
    den = np.sqrt((rx**2).sum(0) * (ry**2).sum())
    ok = den > 0
    if not ok.any():
        return math.nan, math.nan
    rho = (rx * ry[:, None]).sum(0)[ok] / den[ok]
    lo, hi = np.percentile(rho, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def _temperatures(ranking: pd.DataFrame) -> list[int]:
    """Simulated temperatures (K) named by the ranking's D_method_<T>K columns."""
    return sorted(int(m.group(1)) for c in ranking.columns if (m := re.fullmatch(r"D_method_(\d+)K", str(c))))


def _tiers(ranking: pd.DataFrame, quantity: str, T: int | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per ranking row: the prediction (NaN if none), its tier ("resolved" | "slow" | "excluded") and,
    for excluded rows, why. σ columns: ranked rows are resolved, status ``unresolved`` rows slow, the
    rest (unstable, non-Arrhenius, no rollout) excluded. D* at T: usable resolved trajectories (no
    flag) are resolved, trajectories whose only flag is ``unresolved`` (a bound) slow, flagged ones
    (diverged, melted, no trajectory) excluded, as are rows without rollouts."""
    n = len(ranking)
    status = ranking["status"].astype(str).to_numpy() if "status" in ranking else np.full(n, "")
    if T is None:
        val = pd.to_numeric(ranking[quantity], errors="coerce").to_numpy(float)
        tier = np.where((status == "ranked") & np.isfinite(val) & (val > 0), "resolved",
                        np.where(status == "unresolved", "slow", "excluded"))
        why = [s if t == "excluded" else "" for s, t in zip(status, tier)]
        return val, tier, why
    c = f"{int(T)}K"
    val = pd.to_numeric(ranking.get(f"D_pred_{c}", pd.Series(np.nan, index=ranking.index)),
                        errors="coerce").to_numpy(float)
    flags = ranking.get(f"flags_{c}", pd.Series("", index=ranking.index)).fillna("").astype(str).to_numpy()
    method = ranking.get(f"D_method_{c}", pd.Series("", index=ranking.index)).fillna("").astype(str).to_numpy()
    tier, why = [], []
    for v, f, m, s in zip(val, flags, method, status):
        if s == "no rollout":
            tier.append("excluded"), why.append("no rollout")
        elif f == "" and m == "kinisi" and np.isfinite(v) and v > 0:
            tier.append("resolved"), why.append("")
        elif f == "unresolved":
            tier.append("slow"), why.append("")
        else:
            tier.append("excluded"), why.append(f"flagged {f}" if f and f != "no trajectory" else "no trajectory")
    return val, np.asarray(tier), why


def spearman_vs_literature(ranking: pd.DataFrame, literature: pd.DataFrame, temps: Sequence[int] | None = None,
                           target_T: float = 300.0, n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                           level: float = 0.95, sigma_draws: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Spearman ρ of LiFlow's predictions against literature σ at room temperature (S/cm).

    ``ranking``: :func:`ranking.compute_ranking`'s table; ``literature``: columns id, sigma_rt_S_cm.
    Rows: quantity sigma_<T>K_S_cm (posterior median of σ(``target_T``)) and sigma_<T>K_S_cm_rankq
    (the ranking's 2.5 % quantile) at temperature_K = target_T, and D_star_cm2_s at every simulated
    temperature ``temps`` (K; default: all in the ranking), each for two subsets:
    ``all_by_status`` — every row with a literature value takes part by its status: an unresolved
    (bounded) row counts as slower than every resolved one, tied with the other unresolved rows;
    rows with no rollout (e.g. an element outside the model's table), unstable or non-Arrhenius rows
    (σ), or flagged trajectories (D*) are excluded and counted in ``note``; ``resolved`` — resolved
    rows only. n counts the pairs used; the interval is a bootstrap over pairs (:func:`bootstrap_spearman`).
    ``sigma_draws`` {id: posterior draws of σ(target_T), S/cm} (``compute_ranking``'s fits) give the σ
    rows a second interval, rho_post_low/high, over the predictions' own uncertainty
    (:func:`posterior_spearman`).
    """
    lit = literature[["id", "sigma_rt_S_cm"]].copy()
    lit["id"] = lit["id"].astype(str)
    lit["sigma_rt_S_cm"] = pd.to_numeric(lit["sigma_rt_S_cm"], errors="coerce")
    rk = ranking.copy()
    rk["id"] = rk["id"].astype(str)
    m = rk.merge(lit.drop_duplicates("id"), on="id", how="left")
    ref = m["sigma_rt_S_cm"].to_numpy(float)
    has_ref = np.isfinite(ref) & (ref > 0)
    not_screened = len(set(lit["id"]) - set(rk["id"]))
    source = str(rk["source"].iloc[0]) if "source" in rk and len(rk) else ""
    tgt = f"{round(target_T)}K"
    items: list[tuple[str, int | None, float]] = [
        (q, None, float(target_T)) for q in (f"sigma_{tgt}_S_cm", f"sigma_{tgt}_S_cm_rankq") if q in m.columns]
    items += [("D_star_cm2_s", int(T), float(T)) for T in (temps if temps is not None else _temperatures(rk))]
    rows = []
    for quantity, T, temp_K in items:
        val, tier, why = _tiers(m, quantity, T)
        excl = Counter(w for w, t, h in zip(why, tier, has_ref) if t == "excluded" and h)
        excl["no literature value"] = int(np.sum(~has_ref))
        if not_screened:
            excl["literature compound not in the ranking"] = not_screened
        for subset in (SUBSET_ALL, SUBSET_RESOLVED):
            use = has_ref & ((tier == "resolved") | ((tier == "slow") & (subset == SUBSET_ALL)))
            slow = tier[use] == "slow"
            x = status_ranks(np.where(slow, math.nan, val[use]), slow)
            st = bootstrap_spearman(x, np.log10(ref[use]), n_boot, seed, level)
            post = (math.nan, math.nan)
            ids_use = m["id"].to_numpy()[use]
            if T is None and sigma_draws and all(i in sigma_draws for i, sl in zip(ids_use, slow) if not sl):
                nd = min((len(sigma_draws[i]) for i, sl in zip(ids_use, slow) if not sl), default=0)
                if nd:
                    dr = np.stack([np.asarray(sigma_draws[i][:nd]) if not sl else np.zeros(nd)
                                   for i, sl in zip(ids_use, slow)])
                    post = posterior_spearman(dr, slow, np.log10(ref[use]), level)
            n_res, n_slow = int(np.sum(~slow)), int(np.sum(slow))
            left = {k: v for k, v in excl.items() if v}
            if subset == SUBSET_RESOLVED and np.any(has_ref & (tier == "slow")):
                left["unresolved"] = int(np.sum(has_ref & (tier == "slow")))
            note = f"{n_res} resolved" + (f", {n_slow} unresolved tied slowest" if subset == SUBSET_ALL else "")
            if left:
                note += "; excluded: " + ", ".join(f"{k} {v}" for k, v in sorted(left.items()))
            if st["n"] < 3:
                note += "; n < 3: no ρ"
            rows.append({"comparison": "liflow_vs_literature", "source": source, "quantity": quantity,
                         "temperature_K": temp_K, "subset": subset, "n": st["n"], "rho": st["rho"],
                         "rho_low": st["rho_low"], "rho_high": st["rho_high"], "rho_post_low": post[0],
                         "rho_post_high": post[1], "p_value": st["p_value"], "note": note})
    return pd.DataFrame(rows, columns=SPEARMAN_COLUMNS)


def spearman_vs_md(analysis_table: pd.DataFrame, status_table: pd.DataFrame | None = None,
                   metric_splits: Sequence[str] = ("test",), tau_ps: float | None = None,
                   delta_tau_ps: float = 1.0, n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                   level: float = 0.95) -> pd.DataFrame:
    """Table 1's ρ of log Li MSD, LiFlow vs reference MD, per (temperature, variant), with n and a
    bootstrap interval. ρ, n, τ and the warnings are :func:`metrics.compute_metrics`'s (the same
    structures in ``metric_splits`` at the same common τ, ps); the interval resamples those
    (MD, LiFlow) MSD pairs (Å²). Empty when the table holds no reference MD."""
    df = analysis_table
    if not (df["source"] == MD_SOURCE).any():
        return pd.DataFrame(columns=SPEARMAN_COLUMNS)
    metrics = compute_metrics(df, status_table, metric_splits, tau_ps=tau_ps, delta_tau_ps=delta_tau_ps)
    splits = set(metric_splits)
    rows: list[dict[str, Any]] = []
    for r in metrics.itertuples(index=False):
        sel = df["split"].isin(splits) & (df["temperature"] == r.temperature)
        ref = df[sel & (df["source"] == MD_SOURCE)].set_index("id")
        gen = df[sel & (df["source"] == LIFLOW_PREFIX + r.model)].set_index("id")
        pairs = np.array([(msd_at(ref.loc[i, "msd_t_ps"], ref.loc[i, "msd_li_curve"], r.tau_ps),
                           msd_at(gen.loc[i, "msd_t_ps"], gen.loc[i, "msd_li_curve"], r.tau_ps))
                          for i in sorted(set(ref.index) & set(gen.index))], dtype=np.float64).reshape(-1, 2)
        ok = np.all(np.isfinite(pairs) & (pairs > 0), axis=1)
        st = bootstrap_spearman(np.log10(pairs[ok, 0]), np.log10(pairs[ok, 1]), n_boot, seed, level)
        note = "; ".join(s for s in (f"tau = {r.tau_ps:g} ps", str(r.warning), str(r.note)) if s and s != "nan")
        rows.append({"comparison": "liflow_vs_md", "source": LIFLOW_PREFIX + r.model, "quantity": "log_msd_li",
                     "temperature_K": float(r.temperature), "subset": "/".join(sorted(splits)), "n": int(r.n),
                     "rho": float(r.log_msd_li_spearman), "rho_low": st["rho_low"], "rho_high": st["rho_high"],
                     "rho_post_low": math.nan, "rho_post_high": math.nan, "p_value": st["p_value"], "note": note})
    return pd.DataFrame(rows, columns=SPEARMAN_COLUMNS)
