"""Parity plots (rollout vs MD, at the metrics τ) and Arrhenius plots (ranked structures only).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import analysis as an
from ..io.files import atomic_path
from .metrics import liflow_variants, msd_at
from .tables import LIFLOW_PREFIX, MD_SOURCE


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
    variants = liflow_variants(df)
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
                    xs.append(msd_at(a["msd_t_ps"], a[col], tc))
                    ys.append(msd_at(b["msd_t_ps"], b[col], tc))
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


def _point_labels(rows: pd.DataFrame) -> list[str]:
    """Point labels of the literature plot: a validation-panel compound by its panel name (β- and
    γ-Li3PS4 stay apart, LGPS reads Li10GeP2S12), any other row (a user CIF) by its formula."""
    from ..structures.panel import display_names

    names = display_names()
    return [names.get(i, f) for i, f in zip(rows["id"].astype(str), rows["formula"].astype(str))]


def literature_plot(ranking: pd.DataFrame, literature: pd.DataFrame, spearman: pd.DataFrame, path: Path,
                    prov: dict[str, Any], target_T: float = 300.0) -> Path:
    """Predicted σ(``target_T``) against the literature room-temperature σ (S/cm), log-log.

    Ranked rows: posterior median with its 95 % interval (bar) and the ranking quantity, the 2.5 %
    quantile (open circle). Unresolved rows have no σ: they are drawn as open triangles on a strip
    below every prediction, at their literature σ, because the Spearman comparison ranks them below
    every resolved row. Rows without a literature value, or excluded from the comparison (no rollout,
    unstable, non-Arrhenius), are not drawn; the title gives ρ of the ranking quantity with n and its
    bootstrap 95 % interval (every row by its status) and ρ over resolved rows only
    (:func:`report.spearman.spearman_vs_literature`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tgt = f"{round(target_T)}K"
    lit = literature.set_index(literature["id"].astype(str))["sigma_rt_S_cm"]
    rk = ranking[ranking["id"].astype(str).isin(lit.index)] if len(ranking) else ranking
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    med_col, lo_col, hi_col, q_col = (f"sigma_{tgt}_S_cm", f"sigma_{tgt}_S_cm_low", f"sigma_{tgt}_S_cm_high",
                                      f"sigma_{tgt}_S_cm_rankq")
    ranked = rk[rk["status"] == "ranked"] if len(rk) else rk
    slow = rk[rk["status"] == "unresolved"] if len(rk) else rk
    ys = []
    if len(ranked):
        x = lit.loc[ranked["id"].astype(str)].to_numpy(float)
        y = ranked[med_col].to_numpy(float)
        lo, hi = ranked[lo_col].to_numpy(float), ranked[hi_col].to_numpy(float)
        ax.errorbar(x, y, yerr=[np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)], fmt="o", color="C0", capsize=3,
                    label=f"ranked: median, 95 % interval (n={len(ranked)})")
        ax.scatter(x, ranked[q_col].to_numpy(float), marker="o", facecolors="none", edgecolors="C0", s=30,
                   label="ranked by: 2.5 % quantile")
        for xi, yi, name in zip(x, y, _point_labels(ranked)):
            ax.annotate(name, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ys = [v for v in np.concatenate([y, lo, ranked[q_col].to_numpy(float)]) if np.isfinite(v) and v > 0]
    lit_all = lit.loc[rk["id"].astype(str)].to_numpy(float) if len(rk) else np.array([])
    floor = (min(ys) / 30.0) if ys else (np.nanmin(lit_all) / 30.0 if lit_all.size else 1e-12)
    if len(slow):
        x = lit.loc[slow["id"].astype(str)].to_numpy(float)
        ax.scatter(x, np.full(x.shape, floor), marker="v", facecolors="none", edgecolors="C3", s=40,
                   label=f"unresolved: ranked below every resolved row (n={len(slow)})")
        for xi, name in zip(x, _point_labels(slow)):
            ax.annotate(name, (xi, floor), fontsize=6, rotation=90, xytext=(0, -4), textcoords="offset points",
                        ha="center", va="top", color="C3")
        ax.axhline(floor * 3.0, color="0.7", lw=0.6, ls=":")
    if lit_all.size:
        lo_ax = min(np.nanmin(lit_all), floor) / 10.0
        hi_ax = max(np.nanmax(lit_all), max(ys) if ys else 1e-2) * 10.0
        ax.plot([lo_ax, hi_ax], [lo_ax, hi_ax], "k--", lw=0.8, label="y = x")
        ax.set_xlim(lo_ax, hi_ax)
        ax.set_ylim(floor / 30.0, hi_ax)
    else:
        ax.text(0.5, 0.5, "no screened structure has a literature value\n(structures.source: panel compares)",
                transform=ax.transAxes, ha="center", va="center", fontsize=10, color="0.3")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("literature σ at room temperature (S/cm)")
    ax.set_ylabel(f"LiFlow σ({target_T:g} K), Nernst–Einstein (S/cm)")

    def _rho(subset: str) -> str:
        if spearman is None or not len(spearman):
            return "ρ: n/a"
        s = spearman[(spearman["comparison"] == "liflow_vs_literature") & (spearman["quantity"] == q_col)
                     & (spearman["subset"] == subset)]
        if not len(s):
            return "ρ: n/a"
        r = s.iloc[0]
        if not np.isfinite(float(r["rho"])):
            return f"ρ: n/a (n = {int(r['n'])})"
        return f"ρ = {float(r['rho']):.2f} [{float(r['rho_low']):.2f}, {float(r['rho_high']):.2f}], n = {int(r['n'])}"

    ax.set_title(f"Spearman, all by status: {_rho('all_by_status')}\nresolved only: {_rho('resolved')}",
                 fontsize=9)
    if len(rk):
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    _savefig(fig, path, prov)
    plt.close(fig)
    return path
