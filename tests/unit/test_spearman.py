"""Known-answer tests of the Spearman reports (``liflow_screen.report.spearman``) on synthetic tables:
a monotone set gives ρ = 1, unresolved rows tie below every resolved one (rank vectors by hand),
excluded rows are counted, and the MD comparison reproduces Table 1's ρ with a bootstrap interval.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from liflow_screen.report.metrics import compute_metrics
from liflow_screen.report.spearman import (
    SPEARMAN_COLUMNS,
    bootstrap_spearman,
    spearman_vs_literature,
    spearman_vs_md,
    status_ranks,
)


def _ranking(rows: list[tuple[str, str, float, float | None, str, str]]) -> pd.DataFrame:
    """Ranking-like rows: (id, status, σ(300 K) median S/cm, D*(800 K) cm²/s or None, D_method, flags)."""
    out = []
    for sid, status, sig, d, method, flags in rows:
        out.append({"id": sid, "source": "liflow:adaptive", "status": status, "sigma_300K_S_cm": sig,
                    "sigma_300K_S_cm_rankq": sig / 10 if math.isfinite(sig) else math.nan,
                    "D_pred_800K": math.nan if d is None else d, "D_method_800K": method, "flags_800K": flags})
    return pd.DataFrame(out)


def test_monotone_set_gives_rho_one_with_an_interval():
    sig = np.logspace(-7, -2, 8)
    rk = _ranking([(f"s{i}", "ranked", float(s), float(s) * 1e3, "kinisi", "") for i, s in enumerate(sig)])
    lit = pd.DataFrame({"id": [f"s{i}" for i in range(8)], "sigma_rt_S_cm": sig * 3.0})
    out = spearman_vs_literature(rk, lit)
    assert list(out.columns) == SPEARMAN_COLUMNS
    assert set(out["quantity"]) == {"sigma_300K_S_cm", "sigma_300K_S_cm_rankq", "D_star_cm2_s"}
    assert set(out["subset"]) == {"all_by_status", "resolved"} and len(out) == 6
    assert (out["n"] == 8).all() and (out["rho"] == 1.0).all()
    assert (out["rho_low"] == 1.0).all() and (out["rho_high"] == 1.0).all()
    assert (out["p_value"] < 1e-3).all()
    assert (out.loc[out["quantity"] == "D_star_cm2_s", "temperature_K"] == 800.0).all()
    assert (out.loc[out["quantity"] != "D_star_cm2_s", "temperature_K"] == 300.0).all()
    # reversed literature order: ρ = −1
    lit_rev = lit.assign(sigma_rt_S_cm=sig[::-1])
    assert (spearman_vs_literature(rk, lit_rev)["rho"] == -1.0).all()


def test_bootstrap_interval_is_seeded_and_holds_rho():
    rng = np.random.default_rng(0)
    x = rng.normal(size=20)
    y = x + rng.normal(scale=1.0, size=20)
    a = bootstrap_spearman(x, y, n_boot=2000, seed=5)
    b = bootstrap_spearman(x, y, n_boot=2000, seed=5)
    assert a == b and a["n"] == 20 and a["n_boot_used"] == 2000
    assert a["rho"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert -1.0 <= a["rho_low"] < a["rho"] < a["rho_high"] <= 1.0
    assert math.isnan(bootstrap_spearman([1.0, 2.0], [2.0, 1.0])["rho"])      # n < 3
    assert math.isnan(bootstrap_spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])["rho"])  # constant side


def test_status_ranks_by_hand():
    # resolved values 3, 1, 2 and two unresolved rows: the unresolved share the bottom ranks 1 and 2
    r = status_ranks([3.0, math.nan, 1.0, math.nan, 2.0], [False, True, False, True, False])
    assert r.tolist() == [5.0, 1.5, 3.0, 1.5, 4.0]
    # ties among resolved values average too
    assert status_ranks([2.0, 2.0, 1.0], [False, False, True]).tolist() == [2.5, 2.5, 1.0]
    with pytest.raises(ValueError):
        status_ranks([math.nan, 1.0], [False, False])


def test_unresolved_rows_tie_slowest_and_exclusions_are_counted():
    """a, b, c ranked; d, e unresolved (slower than every resolved row, tied); f unstable and g without a
    rollout are excluded; h has no literature value; i is in the literature but not in the ranking.
    Rank vectors by hand: prediction [a, b, c, d, e] = [5, 4, 3, 1.5, 1.5], literature [4, 5, 3, 1, 2]:
    ρ = 8.5 / √(9.5 · 10); resolved only: [3, 2, 1] vs [2, 3, 1], ρ = 0.5."""
    rk = _ranking([
        ("a", "ranked", 1e-2, 1e-5, "kinisi", ""),
        ("b", "ranked", 1e-3, 1e-6, "kinisi", ""),
        ("c", "ranked", 1e-4, 1e-7, "kinisi", ""),
        ("d", "unresolved", math.nan, None, "bound:hop", "unresolved"),
        ("e", "unresolved", math.nan, None, "bound:hop", "unresolved"),
        ("f", "unstable", math.nan, 1e-4, "kinisi", "frame_melted"),
        ("g", "no rollout", math.nan, None, "", "no trajectory"),
        ("h", "ranked", 1e-5, 1e-8, "kinisi", ""),
    ])
    lit = pd.DataFrame({"id": list("abcdefgi"),
                        "sigma_rt_S_cm": [1e-3, 1e-2, 1e-4, 1e-6, 1e-5, 1e-7, 1e-1, 1e-2]})
    out = spearman_vs_literature(rk, lit, n_boot=500, seed=1).set_index(["quantity", "subset"])
    hand_all = 8.5 / math.sqrt(9.5 * 10.0)
    assert hand_all == pytest.approx(stats.spearmanr([5, 4, 3, 1.5, 1.5], [4, 5, 3, 1, 2]).statistic)
    for q in ("sigma_300K_S_cm", "sigma_300K_S_cm_rankq", "D_star_cm2_s"):
        allr, res = out.loc[(q, "all_by_status")], out.loc[(q, "resolved")]
        assert allr["n"] == 5 and allr["rho"] == pytest.approx(hand_all), q
        assert res["n"] == 3 and res["rho"] == pytest.approx(0.5), q
        assert allr["rho_low"] <= allr["rho"] <= allr["rho_high"]
        assert "3 resolved, 2 unresolved tied slowest" in allr["note"]
        assert "no literature value 1" in allr["note"] and "not in the ranking 1" in allr["note"]
        assert "unresolved 2" in res["note"]
    assert "no rollout 1" in out.loc[("sigma_300K_S_cm", "all_by_status"), "note"]
    assert "unstable 1" in out.loc[("sigma_300K_S_cm", "all_by_status"), "note"]
    assert "flagged frame_melted 1" in out.loc[("D_star_cm2_s", "all_by_status"), "note"]


def _analysis_table(n: int = 6, T: int = 800) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """MD and LiFlow rows of n test structures with linear MSD curves (Å², slope = rate), plus one train
    structure that must be ignored."""
    rng = np.random.default_rng(2)
    md_rate = np.logspace(-2, 1, n)
    gen_rate = md_rate * np.exp(rng.normal(0.0, 1.0, n))
    rows = []
    t_md, t_gen = np.linspace(0.0, 10.0, 11), np.linspace(0.0, 30.0, 31)
    for i in range(n + 1):
        split = "test" if i < n else "train"
        for src, t, rate in (("md", t_md, md_rate[i % n]), ("liflow:adaptive", t_gen, gen_rate[i % n])):
            rows.append({"id": f"s{i}", "source": src, "temperature": T, "split": split,
                         "duration_ps": float(t[-1]), "msd_t_ps": t, "msd_li_curve": 0.1 + rate * t,
                         "msd_frame_curve": 0.05 + 0.0 * t, "rdf": np.ones(10), "rdf_r_max": 5.0,
                         "stable": True, "frame_melted": False})
    return pd.DataFrame(rows), md_rate, gen_rate


def test_spearman_vs_md_reproduces_table1_rho_with_interval():
    df, md_rate, gen_rate = _analysis_table()
    out = spearman_vs_md(df, n_boot=1000, seed=0)
    m = compute_metrics(df, None, ("test",))
    assert list(out.columns) == SPEARMAN_COLUMNS and len(out) == len(m) == 1
    r = out.iloc[0]
    assert r["comparison"] == "liflow_vs_md" and r["source"] == "liflow:adaptive" and r["subset"] == "test"
    assert r["temperature_K"] == 800.0 and r["quantity"] == "log_msd_li"
    assert r["n"] == 6 and r["rho"] == pytest.approx(m["log_msd_li_spearman"].iloc[0])
    # by hand: at the common τ = 10 ps the MSD order is the rate order
    assert r["rho"] == pytest.approx(stats.spearmanr(0.1 + 10 * md_rate, 0.1 + 10 * gen_rate).statistic)
    assert -1.0 <= r["rho_low"] <= r["rho"] <= r["rho_high"] <= 1.0
    assert "tau = 10 ps" in r["note"]
    # no reference MD: nothing to compare
    assert spearman_vs_md(df[df["source"] != "md"]).empty
