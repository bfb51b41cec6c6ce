"""Tests of liflow_screen.analysis against independent computations (loops, closed forms)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from liflow_screen import analysis as an
from liflow_screen.core import config
from liflow_screen.core.errors import InputError
from conftest import make_settings


def _random_walk(seed: int, n_frames: int, n_li: int, n_frame: int, d_li: float, dt: float,
                 box: float = 10.0, frame_scale: float = 0.05) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brownian Li (D = d_li Å²/ps) among nearly immobile frame atoms; unwrapped positions (Å)."""
    rng = np.random.default_rng(seed)
    n = n_li + n_frame
    steps = rng.normal(0.0, math.sqrt(2.0 * d_li * dt), (n_frames - 1, n, 3))
    steps[:, n_li:] *= frame_scale
    pos = np.concatenate([np.zeros((1, n, 3)), np.cumsum(steps, axis=0)]) + rng.uniform(0, box, (1, n, 3))
    numbers = np.array([3] * n_li + [8] * n_frame)
    return pos, np.arange(n_frames) * dt, numbers


# ------------------------------------------------------------------ MSD

def test_msd_single_origin_matches_loop():
    pos, _, numbers = _random_walk(1, 30, 5, 7, 0.3, 0.1)
    mask = numbers == 3
    got = an.msd_single_origin(pos, mask)
    want = np.zeros(30)
    for k in range(30):
        acc = 0.0
        for i in np.flatnonzero(mask):
            acc += float(np.sum((pos[k, i] - pos[0, i]) ** 2))
        want[k] = acc / mask.sum()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_frames", [2, 17, 64])
def test_msd_multi_origin_matches_loop(n_frames):
    pos, _, numbers = _random_walk(2, n_frames, 4, 6, 0.5, 0.1)
    mask = numbers == 8
    lags, got = an.msd_multi_origin(pos, mask)
    assert lags.tolist() == list(range(n_frames))
    want = np.zeros(n_frames)
    for m in range(n_frames):
        vals = []
        for k in range(n_frames - m):
            for i in np.flatnonzero(mask):
                vals.append(float(np.sum((pos[k + m, i] - pos[k, i]) ** 2)))
        want[m] = np.mean(vals)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)
    lags5, part = an.msd_multi_origin(pos, mask, max_lag=1)
    assert lags5.tolist() == [0, 1] and part.shape == (2,)


def test_msd_rejects_bad_input():
    with pytest.raises(InputError):
        an.msd_single_origin(np.zeros((3, 4, 2)), np.ones(4, bool))
    with pytest.raises(InputError):
        an.msd_single_origin(np.zeros((3, 4, 3)), np.zeros(4, bool))
    with pytest.raises(InputError):
        an.msd_multi_origin(np.zeros((3, 4, 3)), np.ones(4, bool), max_lag=5)


# ------------------------------------------------------------------ kinisi

def test_kinisi_recovers_brownian_diffusivity():
    d_true = 0.5  # Å²/ps = 5e-5 cm²/s
    pos, t, numbers = _random_walk(0, 1001, 32, 32, d_true, 0.02)
    res = an.kinisi_diffusion(pos, t, numbers, np.eye(3) * 10.0, n_dt=20, n_samples=500, seed=0)
    want = d_true * 1e-4
    assert res["method"] == "kinisi", res
    assert res["n_dt"] <= 20
    assert res["D_low"] < res["D"] < res["D_high"]
    assert abs(res["D"] / want - 1) < 0.2
    assert res["D_low"] <= want <= res["D_high"]


def test_kinisi_keeps_large_jumps_between_frames():
    """1-ps frames with > half-cell jumps (as in rollouts): no minimum-image re-unwrapping."""
    d_true = 5.0  # Å²/ps; per-frame steps ~ 3 Å per axis in a 6 Å box
    pos, t, numbers = _random_walk(3, 26, 40, 40, d_true, 1.0, box=6.0)
    cell = np.eye(3) * 6.0
    assert np.abs(np.diff(pos[:, :40], axis=0)).max() > 3.0  # jumps beyond half the box exist
    res = an.kinisi_diffusion(pos, t, numbers, cell, n_dt=20, n_samples=300, seed=1)
    # independent estimate: least squares of the exact multi-origin MSD on the same unwrapped data
    lags, msd = an.msd_multi_origin(pos, numbers == 3)
    use = lags * 1.0 >= res["start_dt_ps"]
    d_ls = np.polyfit(lags[use] * 1.0, msd[use], 1)[0] / 6 * 1e-4
    assert res["method"] == "kinisi" and res["constrained"]
    assert abs(res["D"] / d_ls - 1) < 0.25
    assert abs(res["D"] / (d_true * 1e-4) - 1) < 0.35
    # the same data wrapped into the cell and re-unwrapped by minimum image loses the long jumps
    frac = pos @ np.linalg.inv(cell)
    d = np.diff(frac - np.floor(frac), axis=0)
    mic = np.concatenate([pos[:1], pos[:1] + np.cumsum((d - np.round(d)) @ cell, axis=0)])
    wrong = an.msd_single_origin(mic, numbers == 3)[-1]
    assert wrong < 0.7 * an.msd_single_origin(pos, numbers == 3)[-1]


def test_kinisi_failure_gives_no_number(monkeypatch):
    """No other estimator stands in for kinisi: a failure is recorded, not replaced."""
    pos, t, numbers = _random_walk(4, 200, 8, 8, 0.5, 0.05)

    def boom(*args, **kwargs):
        raise RuntimeError("sampler exploded")

    monkeypatch.setattr(an.diffusion, "_kinisi_samples", boom)
    res = an.kinisi_diffusion(pos, t, numbers, np.eye(3) * 10.0)
    assert res["method"] == "kinisi" and not res["constrained"]
    assert "sampler exploded" in res["note"]
    assert all(math.isnan(res[k]) for k in ("D", "D_low", "D_high"))


def test_kinisi_rejects_bad_input():
    pos, t, numbers = _random_walk(5, 10, 2, 2, 0.5, 0.1)
    with pytest.raises(InputError):
        an.kinisi_diffusion(pos[:3], t[:3], numbers, np.eye(3) * 10)
    t_bad = t.copy()
    t_bad[5] += 0.05
    with pytest.raises(InputError):
        an.kinisi_diffusion(pos, t_bad, numbers, np.eye(3) * 10)
    with pytest.raises(InputError):
        an.kinisi_diffusion(pos, t, np.full(4, 8), np.eye(3) * 10)


# ------------------------------------------------------------------ Arrhenius / Nernst–Einstein

def test_arrhenius_recovers_activation_energy_weighted():
    rng = np.random.default_rng(7)
    e_a, d0 = 0.25, 1e-3  # eV, cm²/s
    T = np.array([600.0, 800.0, 1000.0, 1200.0])
    sig = 0.1  # relative noise in ln D
    d_true = d0 * np.exp(-e_a / (an.K_B_EV * T))
    d = d_true * np.exp(rng.normal(0, sig, T.size))
    lo, hi = d * np.exp(-1.96 * sig), d * np.exp(1.96 * sig)
    fit = an.arrhenius_fit(T, d, lo, hi, target_T=300.0)
    assert fit["method"] == "wls"
    assert fit["E_A_low"] < e_a < fit["E_A_high"]
    assert abs(fit["E_A"] - e_a) < 0.05
    assert fit["extrapolated"] is True
    d300 = d0 * np.exp(-e_a / (an.K_B_EV * 300.0))
    assert fit["D_target_low"] < d300 < fit["D_target_high"]


def test_arrhenius_ols_exact_and_interval():
    T = np.array([500.0, 700.0, 900.0, 1100.0, 1300.0])
    d = 2e-3 * np.exp(-0.4 / (an.K_B_EV * T))
    fit = an.arrhenius_fit(T, d, target_T=700.0)
    assert fit["method"] == "ols"
    assert fit["E_A"] == pytest.approx(0.4, rel=1e-9)
    assert fit["D0"] == pytest.approx(2e-3, rel=1e-9)
    assert fit["D_target"] == pytest.approx(d[1], rel=1e-9)
    assert fit["extrapolated"] is False
    # noisy data: the interval is the Student-t one from the residuals (compare with scipy)
    from scipy import stats

    dn = d * np.array([1.1, 0.9, 1.05, 0.97, 1.02])
    fit = an.arrhenius_fit(T, dn)
    lr = stats.linregress(1 / (an.K_B_EV * T), np.log(dn))
    q = stats.t.ppf(0.975, T.size - 2)
    assert fit["E_A"] == pytest.approx(-lr.slope, rel=1e-9)
    assert fit["E_A_high"] - fit["E_A"] == pytest.approx(q * lr.stderr, rel=1e-6)


def test_arrhenius_needs_two_temperatures():
    fit = an.arrhenius_fit([800.0, 900.0], [1e-5, float("nan")])
    assert math.isnan(fit["E_A"]) and fit["n_points"] == 1


def test_nernst_einstein_hand_computation():
    # 4 Li in a 100 Å^3 cell: n = 4e22 cm^-3; D = 1e-6 cm²/s at 300 K
    # sigma = 4e22 * (1.602176634e-19)^2 * 1e-6 / (1.380649e-23 * 300) = 0.24794... S/cm
    hand = 4e22 * 1.602176634e-19**2 * 1e-6 / (1.380649e-23 * 300.0)
    assert hand == pytest.approx(0.2479, rel=1e-3)
    assert an.nernst_einstein_conductivity(1e-6, 4, 100.0, 300.0) == pytest.approx(hand, rel=1e-12)
    assert an.nernst_einstein_conductivity(1e-6, 4, 100.0, 300.0, charge=2) == pytest.approx(4 * hand)
    with pytest.raises(InputError):
        an.nernst_einstein_conductivity(1e-6, 4, 0.0, 300.0)


# ------------------------------------------------------------------ RDF

def _rocksalt(a: float, reps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from ase.build import bulk

    atoms = bulk("LiF", "rocksalt", a=a, cubic=True).repeat(reps)
    return atoms.get_positions(), atoms.get_atomic_numbers(), np.array(atoms.get_cell())


def test_rdf_rocksalt_shells_and_coordination():
    a = 4.03
    pos, numbers, cell = _rocksalt(a, 3)
    r, g = an.rdf(pos[None], numbers, cell, r_max=5.0, n_bins=100, discard=0.0)
    dr = r[1] - r[0]
    # rock salt = simple cubic of spacing a/2: shells at (a/2) sqrt(k), k a sum of three squares
    shells = a / 2 * np.sqrt(np.array([1, 2, 3, 4, 5, 6, 8, 9]))
    shells = shells[shells < 5.0]
    expected_bins = set(np.floor(shells / dr).astype(int))
    assert set(np.flatnonzero(g > 0)) == expected_bins
    assert np.flatnonzero(g > 0)[0] == int(a / 2 / dr)  # nothing closer than the Li-F bond a/2
    rho = len(numbers) / abs(np.linalg.det(cell))
    shell_vol = 4 / 3 * np.pi * ((r + dr / 2) ** 3 - (r - dr / 2) ** 3)
    cn = np.cumsum(g * rho * shell_vol)
    assert cn[int(2.3 / dr)] == pytest.approx(6.0)           # 6 nearest neighbours (rock salt)
    assert cn[int(3.0 / dr)] == pytest.approx(18.0)          # + 12 second neighbours
    # species-resolved: Li-F first shell 6, Li-Li first shell 12 at a/sqrt2
    r2, g_lif = an.rdf(pos, numbers, cell, pair=("Li", "F"), discard=0.0)
    rho_f = np.sum(numbers == 9) / abs(np.linalg.det(cell))
    assert np.cumsum(g_lif * rho_f * shell_vol)[int(2.3 / dr)] == pytest.approx(6.0)
    _, g_lili = an.rdf(pos, numbers, cell, pair=("Li", "Li"), discard=0.0)
    assert np.cumsum(g_lili * rho_f * shell_vol)[int(2.3 / dr)] == pytest.approx(0.0)
    assert np.cumsum(g_lili * rho_f * shell_vol)[int(3.0 / dr)] == pytest.approx(12.0)
    _, g_lix = an.rdf(pos, numbers, cell, pair=("Li", None), discard=0.0)
    np.testing.assert_allclose(g_lix, g)  # Li-any equals the total for this symmetric lattice


def test_rdf_ideal_gas_is_one_and_discard_and_unwrapped():
    rng = np.random.default_rng(11)
    n, frames, box = 150, 40, 12.0
    pos = rng.uniform(0, box, (frames, n, 3))
    numbers = np.where(np.arange(n) < 50, 3, 16)
    r, g = an.rdf(pos, numbers, np.eye(3) * box, r_max=5.0, n_bins=25, discard=0.2)
    sel = r > 1.5  # small shells are noisy
    assert abs(g[sel].mean() - (n - 1) / n) < 0.03
    assert np.all(np.abs(g[sel] - 1) < 0.25)
    # lattice translations of single atoms (unwrapped coordinates) do not change g(r)
    shifted = pos + rng.integers(-3, 4, (frames, n, 3)) * box
    _, g2 = an.rdf(shifted, numbers, np.eye(3) * box, r_max=5.0, n_bins=25, discard=0.2)
    np.testing.assert_allclose(g2, g, atol=1e-12)
    # discard drops the first 20 %: only frames 8.. matter
    pos_bad = pos.copy()
    pos_bad[:8] = 0.0  # all atoms on top of each other would ruin g(r) if used
    _, g3 = an.rdf(pos_bad + 1e-9 * np.arange(n)[None, :, None], numbers, np.eye(3) * box, r_max=5.0, n_bins=25)
    np.testing.assert_allclose(g3, g, atol=1e-6)


def test_rdf_mae_integral():
    r = (np.arange(50) + 0.5) * 0.1
    g1 = np.zeros(50)
    g2 = np.zeros(50)
    g2[10:20] = 2.0  # |Δg| = 2 over 1 Å of a 5 Å range -> 0.4
    assert an.rdf_mae(g1, g2, r) == pytest.approx(0.4)
    with pytest.raises(InputError):
        an.rdf_mae(g1, g2[:10], r)


# ------------------------------------------------------------------ metrics

def test_log_msd_metrics():
    ref = np.array([0.1, 1.0, 10.0, 100.0, np.nan])
    gen = np.array([0.2, 1.0, 5.0, 1000.0, 3.0])
    m = an.log_msd_metrics(ref, gen)
    assert m["n"] == 4
    want = np.mean(np.abs(np.log10([0.2, 1.0, 5.0, 1000.0]) - np.log10([0.1, 1.0, 10.0, 100.0])))
    assert m["mae"] == pytest.approx(want)
    assert m["spearman"] == pytest.approx(1.0)
    m2 = an.log_msd_metrics(ref[:4], gen[:4][::-1])
    assert m2["spearman"] == pytest.approx(-1.0)


def _vacancy_lattice_gas(n_frames: int = 31, dt: float = 1.0, rate: float = 0.6, seed: int = 0):
    """Li on 24 of the 64 sites of a simple cubic lattice (a = 3 Å, 12 Å box), hopping at ``rate``
    per ps into vacant neighbour sites only (site exclusion), with 0.15 Å vibration; 64 frame atoms
    on the body centres. A superionic crystal in miniature: the Li sit on sites, but on sites that
    were empty in frame 0. Returns (positions (F, 88, 3) Å, numbers, cell)."""
    rng = np.random.default_rng(seed)
    n, a = 4, 3.0
    sites = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3)
    occ = list(rng.choice(len(sites), 24, replace=False))
    img = np.zeros((24, 3))  # lattice images crossed (unwrapped)
    index = {tuple(s): i for i, s in enumerate(sites)}
    frames = []
    for f in range(n_frames):
        frames.append((sites[occ] + img * n) * a)
        for _ in range(rng.poisson(rate * dt * 24)):
            k = int(rng.integers(24))
            d = np.zeros(3, int)
            d[rng.integers(3)] = rng.choice((-1, 1))
            new = sites[occ[k]] + d
            j = index[tuple(new % n)]
            if j not in occ:
                occ[k], img[k] = j, img[k] + (new // n)
    li = np.stack(frames) + rng.normal(0, 0.15, (n_frames, 24, 3))
    fr = (sites * a + a / 2)[None] + rng.normal(0, 0.08, (n_frames, 64, 3))
    return np.concatenate([li, fr], 1), np.array([3] * 24 + [8] * 64), np.eye(3) * n * a


def test_vacancy_hopping_is_not_a_molten_li_sublattice():
    """Li hopping into sites that were vacant in frame 0 leave their initial sites (occupancy < 0.5,
    which alone would read as a liquid) but move by jumps (α2 >> 0): not li_molten. Continuous
    Brownian Li in the same frame: α2 ≈ 0, li_molten."""
    from liflow_screen.report.trajectory import analyze_trajectory

    cfg = make_settings({}).analysis
    pos, nums, cell = _vacancy_lattice_gas()
    t = np.arange(len(pos)) * 1.0
    li = nums == 3
    assert an.site_occupancy(pos, cell, li, 1.0) < 0.5
    a2 = an.non_gaussian_parameter(pos, t, li)
    assert a2 > 2 * an.CONTINUOUS_ALPHA2
    row = analyze_trajectory(pos, t, nums, cell, cfg, diffusion=False)
    assert row["li_site_occupancy"] < 0.5 and not row["li_molten"] and not row["frame_melted"]
    rng = np.random.default_rng(1)
    brown = pos.copy()
    brown[:, li] = pos[0, li] + np.cumsum(rng.normal(0, np.sqrt(2 * 0.6), (len(pos), 24, 3)), axis=0)
    brown[:, li] -= brown[0, li] - pos[0, li]
    assert abs(an.non_gaussian_parameter(brown, t, li)) < an.CONTINUOUS_ALPHA2 / 2
    assert analyze_trajectory(brown, t, nums, cell, cfg, diffusion=False)["li_molten"]
    # Gaussian displacements: α2 of a pure random walk is 0 within sampling noise, whatever the lag
    walk = np.cumsum(rng.normal(0, 1.0, (200, 50, 3)), axis=0)
    for lag in (1.0, 5.0):
        assert abs(an.non_gaussian_parameter(walk, np.arange(200.0), np.ones(50, bool), lag)) < 0.05


def test_framework_drift_is_not_melting():
    """A rigid framework whose centre drifts (the recoil of diffusing Li when the total centre of mass
    is fixed, as in LiFlow rollouts) is intact: remove_framework_drift takes it out exactly, and the
    melting test sees no excess; the same drift left in would read as a melted framework."""
    from liflow_screen.report.trajectory import analyze_trajectory

    pos, nums, cell = _vacancy_lattice_gas(rate=0.0)
    t = np.arange(len(pos)) * 1.0
    rng = np.random.default_rng(3)
    drift = np.cumsum(rng.normal(0, 0.6, (len(pos), 3)), axis=0)
    drift -= drift[0]
    moved = pos + drift[:, None, :]
    frame = nums != 3
    np.testing.assert_allclose(an.remove_framework_drift(moved, frame), pos, atol=0.1)
    assert an.framework_melt_ratio(moved, t, nums, cell, frame) >= 1.0  # drift alone would flag it
    row = analyze_trajectory(moved, t, nums, cell, make_settings({}).analysis, diffusion=False)
    assert not row["frame_melted"] and row["frame_melt_ratio"] < 0.2 and not row["li_molten"]
    assert not row["li_resolved"]  # the Li only vibrate on their sites
