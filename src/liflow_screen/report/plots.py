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
from ..io import atomic_path
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
