"""Replica trajectories: kinisi's MSD on our unwrapped parser (no repeated frame 0), one D* posterior
from several replicas (known-answer hopping), the replica scatter test, molecular anions judged by
their centres, and rank intervals / p_ranked / ρ intervals from joint posterior draws."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from liflow_screen import analysis as an
from liflow_screen.analysis.diffusion import coarse_lag_grid, kinisi_parser
from liflow_screen.core.constants import A2_PER_PS_TO_CM2_PER_S
from liflow_screen.report.trajectory import replica_scatter

N_LI, N_FR, FRAMES, L = 16, 16, 26, 10.0
NUMS = np.array([3] * N_LI + [16] * N_FR)
CELL = np.eye(3) * L
TIMES = np.arange(FRAMES, dtype=float)  # ps


def hopping(rng: np.random.Generator, rate: float = 1.0, a: float = 2.0) -> np.ndarray:
    """Li hop ±a Å along x, y or z at ``rate`` per ps (Poisson), frames 1 ps apart, with 0.1 Å
    thermal noise; the framework only vibrates. D* = rate a² / 6 (Å²/ps), exactly."""
    dirs = np.vstack([np.eye(3), -np.eye(3)]) * a
    hops = rng.poisson(rate, (FRAMES - 1, N_LI))
    steps = np.zeros((FRAMES - 1, N_LI, 3))
    for k in range(1, int(hops.max()) + 1):
        steps += dirs[rng.integers(0, 6, (FRAMES - 1, N_LI))] * (hops >= k)[..., None]
    pos = np.repeat(rng.uniform(0, L, (1, N_LI + N_FR, 3)), FRAMES, axis=0)
    pos[:, :N_LI] += np.concatenate([np.zeros((1, N_LI, 3)), np.cumsum(steps, axis=0)])
    return pos + rng.normal(0, 0.1, pos.shape)


def _kinisi_msd(parser) -> np.ndarray:
    from kinisi.displacement import calculate_msd

    return np.asarray(calculate_msd(parser, progress=False)["da"].values)


def test_kinisi_msd_is_the_multi_origin_msd_of_the_pooled_replicas() -> None:
    """kinisi's MSD on our parser (two replicas as extra particles, framework drift removed per
    replica) equals an independent multi-origin MSD averaged over the replicas, lag by lag."""
    rng = np.random.default_rng(3)
    reps = [hopping(rng) for _ in range(2)]
    lags = coarse_lag_grid(FRAMES, 12)
    got = _kinisi_msd(kinisi_parser(reps, CELL, NUMS, "Li", 1.0, lags))
    li = NUMS == 3
    want = np.mean([an.msd_multi_origin(an.remove_framework_drift(r, ~li), li)[1] for r in reps], axis=0)[lags]
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_repeated_first_frame_biases_kinisi_msd_low() -> None:
    """kinisi 2.1's ASE / pymatgen parsers put frame 0 in twice; calculate_msd then adds, at every lag
    m, one observation spanning m − 1 frames. On a ballistic trajectory x_k = k v (exact MSD m² v²)
    that gives [(m − 1)² + (F − m) m²] / (F − m + 1) v² (F frames): we pass the frames once and
    get m² v² exactly."""
    v = np.array([0.3, 0.0, 0.0])
    x = np.zeros((FRAMES, 2, 3))
    x[:, 0] = np.arange(FRAMES)[:, None] * v  # one moving "Li", one still framework atom
    nums = np.array([3, 16])
    lags = np.arange(1, FRAMES)
    ours = _kinisi_msd(kinisi_parser([x], CELL, nums, "Li", 1.0, lags, drift_correction=False))
    m = lags[: ours.size]  # (kinisi drops the last lag: one particle gives one observation there)
    assert ours.size >= FRAMES - 2
    np.testing.assert_allclose(ours, m**2 * 0.09, rtol=1e-12)
    dup = np.concatenate([x[:1], x])  # what kinisi's own parsers build
    theirs = _kinisi_msd(kinisi_parser([dup], CELL, nums, "Li", 1.0, lags, drift_correction=False))
    F = FRAMES
    m = lags[: theirs.size]
    np.testing.assert_allclose(theirs, ((m - 1) ** 2 + (F - m) * m**2) / (F - m + 1) * 0.09, rtol=1e-12)
    assert np.all(theirs[1:ours.size] < ours[1:]) and theirs[ours.size - 1] < 0.98 * ours[-1]


def test_four_replicas_halve_the_interval_and_cover_the_truth() -> None:
    """Hopping with a known D*: one posterior from 4 replicas is about half as wide (in ln D) as one
    replica's and covers the truth in (nearly) every trial, with no bias in its median."""
    d_true = 1.0 * 2.0**2 / 6 * A2_PER_PS_TO_CM2_PER_S
    rng = np.random.default_rng(1)
    ratios, cover4, log_err = [], 0, []
    n_trials = 8
    for _ in range(n_trials):
        one = an.kinisi_diffusion(hopping(rng), TIMES, NUMS, CELL, n_samples=500)
        four = an.kinisi_diffusion([hopping(rng) for _ in range(4)], TIMES, NUMS, CELL, n_samples=500)
        assert four["n_replicas"] == 4 and four["constrained"]
        ratios.append(math.log(four["D_high"] / four["D_low"]) / math.log(one["D_high"] / one["D_low"]))
        cover4 += four["D_low"] <= d_true <= four["D_high"]
        log_err.append(math.log(four["D"] / d_true))
    assert 0.35 < float(np.median(ratios)) < 0.7, ratios
    assert cover4 >= n_trials - 1, cover4           # 95 % intervals: P(<= 6 of 8) = 0.6 %
    assert abs(float(np.mean(log_err))) < 0.15      # no bias in the pooled median


def test_replica_scatter_widens_only_when_replicas_disagree() -> None:
    D = np.array([1.0, 1.1, 0.9]) * 1e-5
    p, birge = replica_scatter(D, D * 0.7, D / 0.7)
    assert p > 0.5 and birge == 1.0
    D2 = np.array([1.0, 4.0, 0.25]) * 1e-5
    p2, birge2 = replica_scatter(D2, D2 * 0.9, D2 / 0.9)
    # χ² by hand: σ = ln(1/0.81)/(2·1.96), ln D about their (equal-weight) mean
    sig = math.log(1 / 0.81) / (2 * 1.959964)
    y = np.log(D2)
    chi2 = float(np.sum(((y - y.mean()) / sig) ** 2))
    assert p2 < 1e-6 and birge2 == pytest.approx(math.sqrt(chi2 / 2))
    assert math.isnan(replica_scatter(D[:1], D[:1] * 0.7, D[:1] / 0.7)[0])


def test_rotating_borohydride_is_not_a_melted_framework() -> None:
    """LiBH4-like toy: BH4 tetrahedra (B–H 1.2 Å) reorient by rotational diffusion (~0.35 rad per
    frame) while B stays on its site: the H excess MSD (~2 Å² over the plateau) reads as melting when
    H counts as framework; judged by the anion centres the framework is intact. If B itself wanders
    off, it is melted either way."""
    rng = np.random.default_rng(0)
    a, n_b = 6.0, 8
    sites = np.array([[i, j, k] for i in range(2) for j in range(2) for k in range(2)], float) * a / 2 + 0.5
    tet = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], float) / math.sqrt(3) * 1.2
    li = sites + a / 4
    nums = np.array([5] * n_b + [1] * 4 * n_b + [3] * n_b)
    cell = np.eye(3) * a
    t = np.arange(30) * 1.0

    def small_rotations(angle: float) -> np.ndarray:
        axis = rng.normal(size=(n_b, 3))
        axis /= np.linalg.norm(axis, axis=1, keepdims=True)
        k = np.zeros((n_b, 3, 3))
        k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
        k = k - k.transpose(0, 2, 1)
        return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k  # Rodrigues

    def frames(b_walk: float) -> np.ndarray:
        out, b, q = [], sites.copy(), np.repeat(np.eye(3)[None], n_b, axis=0)
        for f in range(len(t)):
            if f:
                b = b + rng.normal(0, b_walk, b.shape)
                q = small_rotations(0.35) @ q
            h = (b[:, None, :] + np.einsum("bij,kj->bki", q, tet)).reshape(-1, 3)
            out.append(np.vstack([b + rng.normal(0, 0.05, b.shape), h, li + rng.normal(0, 0.1, li.shape)]))
        return np.stack(out)

    frame = nums != 3
    rotating = frames(0.0)
    assert an.framework_melt_ratio(rotating, t, nums, cell, frame) < 0.2
    # the old test (H as framework atoms of their own) would have called it melted
    _, _, fm = an.molecular_centres([rotating], cell, nums, frame)
    assert fm.sum() == n_b and not fm[nums == 1].any()
    h_only = an.excess_msd(rotating, t, nums == 1)["excess"] / (0.5 * an.hop_length(rotating[0], cell, nums, 1)) ** 2
    assert h_only > 1.0
    assert an.framework_melt_ratio(frames(0.6), t, nums, cell, frame) > 1.0


def _analysis_rows(sid: str, d_by_T: dict[int, float], floor: float = 2e-6) -> list[dict]:
    """Analysis-table rows of one structure: resolved D* (cm²/s, ±30 % intervals) or bounds."""
    rows = []
    for T, d in d_by_T.items():
        resolved = d > floor
        rows.append({"id": sid, "temperature": T, "split": "test", "source": "liflow:published",
                     "n_frames": 26, "duration_ps": 25.0, "D_li": d if resolved else math.nan,
                     "D_li_low": d * 0.7 if resolved else math.nan, "D_li_high": d / 0.7 if resolved else math.nan,
                     "D_li_bound": math.nan if resolved else floor, "D_li_floor": floor,
                     "D_method": "kinisi" if resolved else "bound:hop", "status": "ok", "frame_melted": False,
                     "li_molten": False, "n_replicas": 2, "replica_D": [d, d], "replica_D_low": [d * 0.6, d * 0.6],
                     "replica_D_high": [d / 0.6, d / 0.6], "replica_D_bound": [math.nan, math.nan],
                     "D_scatter_p": 0.9})
    return rows


def _structures(ids: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"id": ids, "reduced_formula": ids, "split": "test",
                         "numbers": [[3] * 8 + [16] * 8] * len(ids), "cell": [list((np.eye(3) * 8).ravel())] * len(ids)})


def _line(E: float, d1000: float) -> dict[int, float]:
    from liflow_screen.core.constants import K_B_EV

    return {T: d1000 * math.exp(-E / K_B_EV * (1 / T - 1 / 1000)) for T in (600, 800, 1000, 1200)}


def test_rank_intervals_p_ranked_and_posterior_rho() -> None:
    """Three well separated compounds rank 1-2-3 with intervals that are exactly their ranks; two that
    are the same within error share a rank interval; p_ranked ≈ 1 far above the floors and < 1 for
    a row that just clears them; spearman.csv's posterior interval of ρ brackets ρ."""
    from liflow_screen.report.ranking import compute_ranking
    from liflow_screen.report.spearman import spearman_vs_literature

    lines = {"a": _line(0.2, 1e-4), "b": _line(0.2, 1e-5 * 1.05), "c": _line(0.2, 1e-5),
             "e": _line(0.8, 2e-6 * 1.2)}
    df = pd.DataFrame([r for sid, ln in lines.items() for r in _analysis_rows(sid, ln)])
    rk, fits = compute_ranking(df, _structures(list(lines)), seed=0, n_draws=2000)
    rk = rk.set_index("id")
    assert rk.loc["a", "rank"] == 1 and (rk.loc["a", "rank_low"], rk.loc["a", "rank_high"]) == (1, 1)
    assert rk.loc["a", "rank_text"] == "1 (1–1)"
    assert {rk.loc["b", "rank"], rk.loc["c", "rank"]} == {2, 3}
    assert (rk.loc["b", "rank_low"], rk.loc["b", "rank_high"]) == (2, 3) == (rk.loc["c", "rank_low"],
                                                                          rk.loc["c", "rank_high"])
    for sid in rk.index[rk["status"] == "ranked"]:
        assert rk.loc[sid, "rank_low"] <= rk.loc[sid, "rank"] <= rk.loc[sid, "rank_high"]
        assert rk.loc[sid, "duration_600K_ps"] == 25.0 and rk.loc[sid, "n_replicas"] == 2
    assert rk.loc["a", "p_ranked"] > 0.99
    # "e" clears the 2e-6 floor at 1200 K and 1000 K only, barely: a rerun may well not resolve it
    assert rk.loc["e", "status"] == "ranked" and 0.05 < rk.loc["e", "p_ranked"] < 0.95
    assert "[" in rk.loc["a", "D_pred_1000K_replicas"]
    lit = pd.DataFrame({"id": list(lines), "sigma_rt_S_cm": [1e-2, 1e-3, 2e-3, 1e-9]})
    sp = spearman_vs_literature(rk.reset_index(), lit,
                                sigma_draws={k: f["sigma_draws"] for k, f in fits.items()})
    row = sp[(sp["quantity"] == "sigma_300K_S_cm") & (sp["subset"] == "resolved")].iloc[0]
    assert row["rho_post_low"] - 1e-9 <= row["rho"] <= row["rho_post_high"] + 1e-9
    assert row["rho_post_low"] < row["rho_post_high"]  # b and c swap in some draws
    assert sp[sp["quantity"] == "D_star_cm2_s"]["rho_post_low"].isna().all()


def test_pilot_classes_monotone_in_temperature() -> None:
    """A pilot that finds Li fast at 800 K makes it fast at 1000 and 1200 K even where that pilot said
    slow (seen: Li6PS5Cl's 1000 K pilot, 0.06 Å²/ps, froze both replicas); slow below stays slow."""
    from liflow_screen.flow.selection import monotone_in_temperature

    rows = [{"id": "a", "temperature": T, "method": "pilot", "li_slow": s, "uncertain": False}
            for T, s in ((600, True), (800, False), (1000, True), (1200, False))]
    rows += [{"id": "b", "temperature": T, "method": "pilot", "li_slow": True, "uncertain": False} for T in (600, 1200)]
    out = monotone_in_temperature(pd.DataFrame(rows)).set_index(["id", "temperature"])
    assert out["li_slow"].tolist() == [True, False, False, False, True, True]
    assert out.loc[("a", 1000), "method"] == "pilot:monotone" and bool(out.loc[("a", 1000), "uncertain"])
    assert out.loc[("a", 600), "method"] == "pilot" and not bool(out.loc[("a", 600), "uncertain"])
