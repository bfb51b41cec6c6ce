"""Arrhenius fits (two-point, weighted, censored with resolution bounds) and Nernst–Einstein conductivity.

Conventions (as everywhere in the package): positions ``pos`` (F, n, 3) in Å, **unwrapped**
Cartesian; ``times_ps`` (F,) in ps; ``numbers`` (n,) atomic numbers; ``cell`` (3, 3) Å with lattice
vectors as rows; MSD in Å², diffusion coefficients in cm²/s, temperatures in K, energies in eV,
conductivity in S/cm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..core.constants import E_CHARGE, K_B_EV, K_B_J
from ..core.errors import InputError

# --------------------------------------------------------------------------------------------
# Arrhenius fit and Nernst–Einstein conductivity
# --------------------------------------------------------------------------------------------

def arrhenius_fit(
    temps_K: Sequence[float] | np.ndarray,
    D: Sequence[float] | np.ndarray,
    D_low: Sequence[float] | np.ndarray | None = None,
    D_high: Sequence[float] | np.ndarray | None = None,
    target_T: float = 300.0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Fit ln D = ln D0 − E_A/(k_B T); E_A in eV, D and D0 in the units of ``D`` (cm²/s).

    With intervals (``D_low``, ``D_high``, read as 95 % intervals symmetric in ln D) the fit is
    weighted least squares with σ_lnD = (ln D_high − ln D_low)/(2·1.96); its covariance is
    scaled by the reduced χ² when that exceeds 1 (Birge ratio) and intervals use the normal
    quantile. Without intervals it is ordinary least squares with Student-t intervals (n − 2
    degrees of freedom; none for two temperatures). Non-finite or non-positive D are dropped.

    Returns E_A, E_A_low, E_A_high (eV), D0, ln_D0, D_target, D_target_low, D_target_high at
    ``target_T`` (K), n_points, T_min, T_max, method ("wls" | "ols"), chi2_red, and
    ``extrapolated`` (True when target_T lies outside [T_min, T_max], e.g. always for 300 K).
    """
    from scipy import stats

    T = np.asarray(temps_K, dtype=np.float64)
    d = np.asarray(D, dtype=np.float64)
    if T.shape != d.shape or T.ndim != 1:
        raise InputError("temps_K and D must be 1-D arrays of equal length")
    if np.any(T <= 0):
        raise InputError("temperatures must be positive (K)")
    ok = np.isfinite(d) & (d > 0)
    weighted = D_low is not None and D_high is not None
    if weighted:
        lo = np.asarray(D_low, dtype=np.float64)
        hi = np.asarray(D_high, dtype=np.float64)
        if lo.shape != d.shape or hi.shape != d.shape:
            raise InputError("D_low and D_high must match D in shape")
        ok &= np.isfinite(lo) & np.isfinite(hi) & (lo > 0) & (hi > lo)
    out: dict[str, Any] = {"E_A": math.nan, "E_A_low": math.nan, "E_A_high": math.nan, "D0": math.nan,
                           "ln_D0": math.nan, "D_target": math.nan, "D_target_low": math.nan,
                           "D_target_high": math.nan, "target_T": float(target_T), "n_points": int(ok.sum()),
                           "T_min": float(T[ok].min()) if ok.any() else math.nan,
                           "T_max": float(T[ok].max()) if ok.any() else math.nan,
                           "method": "wls" if weighted else "ols", "chi2_red": math.nan,
                           "extrapolated": True}
    if ok.any():
        out["extrapolated"] = bool(target_T < out["T_min"] - 1e-9 or target_T > out["T_max"] + 1e-9)
    if ok.sum() < 2 or np.unique(T[ok]).size < 2:
        return out
    x = 1.0 / (K_B_EV * T[ok])
    y = np.log(d[ok])
    X = np.column_stack([np.ones_like(x), -x])  # y = ln D0 - E_A * x
    n = x.size
    if weighted:
        sig = (np.log(hi[ok]) - np.log(lo[ok])) / (2.0 * stats.norm.ppf(0.5 + level / 2))
        w = 1.0 / sig**2
        A = X.T @ (w[:, None] * X)
        cov = np.linalg.inv(A)
        beta = cov @ (X.T @ (w * y))
        resid = y - X @ beta
        if n > 2:
            chi2 = float(np.sum(w * resid**2) / (n - 2))
            out["chi2_red"] = chi2
            cov = cov * max(1.0, chi2)
        q = float(stats.norm.ppf(0.5 + level / 2))
    else:
        beta, *_ = np.linalg.lstsq(X, y, rcond=None)
        resid = y - X @ beta
        if n > 2:
            s2 = float(resid @ resid / (n - 2))
            cov = s2 * np.linalg.inv(X.T @ X)
            q = float(stats.t.ppf(0.5 + level / 2, n - 2))
        else:
            cov = np.full((2, 2), np.nan)
            q = math.nan
    ln_d0, e_a = float(beta[0]), float(beta[1])
    se_e = math.sqrt(cov[1, 1]) if np.isfinite(cov[1, 1]) else math.nan
    xt = 1.0 / (K_B_EV * target_T)
    g = np.array([1.0, -xt])
    yt = ln_d0 - e_a * xt
    se_t = math.sqrt(float(g @ cov @ g)) if np.all(np.isfinite(cov)) else math.nan
    out.update({"E_A": e_a, "E_A_low": e_a - q * se_e, "E_A_high": e_a + q * se_e, "ln_D0": ln_d0,
                "D0": math.exp(ln_d0), "D_target": math.exp(yt), "D_target_low": math.exp(yt - q * se_t),
                "D_target_high": math.exp(yt + q * se_t)})
    return out


#: Censored Arrhenius fit defaults (see :func:`arrhenius_fit_censored`).
#: Physical range of the flat prior on E_A, eV.
ARRHENIUS_E_A_RANGE: tuple[float, float] = (0.0, 2.0)
#: Range of the flat prior on ln D0 (D0 in cm²/s): 1e-13 to 3e6 cm²/s, far wider than any solid.
ARRHENIUS_LN_D0_RANGE: tuple[float, float] = (-30.0, 15.0)
#: Floor on σ_lnD of a resolved point (5 % in D): kinisi intervals of long runs can be narrower
#: than the model error of one rollout.
ARRHENIUS_SIGMA_FLOOR_LN: float = 0.05
#: Softness s of an upper bound, in ln D: P(unresolved | D) = Φ((ln b − ln D)/s). A true D = b
#: leaves a trajectory unresolved half the time, D = 2 b 8 %, D = 3 b 1.4 %.
ARRHENIUS_BOUND_SIGMA_LN: float = 0.5
#: A row is non-Arrhenius when the deviance of the best admissible line has p below this.
ARRHENIUS_P_MIN: float = 1e-3


def _weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs: Sequence[float]) -> list[float]:
    """Quantiles ``qs`` (0–1) of a discrete distribution (``values`` with ``weights``), linearly
    interpolated between cell midpoints of the cumulative weight."""
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    c = np.cumsum(w)
    c = (c - 0.5 * w) / c[-1]
    return [float(np.interp(q, c, v)) for q in qs]


def _fmt_T(T: np.ndarray) -> str:
    """Temperatures (K) as '600, 800'."""
    return ", ".join(f"{t:g}" for t in sorted(np.asarray(T, dtype=np.float64)))


def arrhenius_fit_censored(
    temps_K: Sequence[float] | np.ndarray,
    D: Sequence[float] | np.ndarray,
    D_low: Sequence[float] | np.ndarray,
    D_high: Sequence[float] | np.ndarray,
    bound_temps_K: Sequence[float] | np.ndarray = (),
    bounds: Sequence[float] | np.ndarray = (),
    target_T: float = 300.0,
    level: float = 0.95,
    E_A_range: tuple[float, float] = ARRHENIUS_E_A_RANGE,
    ln_D0_range: tuple[float, float] = ARRHENIUS_LN_D0_RANGE,
    sigma_floor_ln: float = ARRHENIUS_SIGMA_FLOOR_LN,
    bound_sigma_ln: float = ARRHENIUS_BOUND_SIGMA_LN,
    p_min: float = ARRHENIUS_P_MIN,
    n_grid: tuple[int, int] = (801, 401),
    n_draws: int = 0,
    rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """Bayesian Arrhenius fit ln D(T) = ln D0 − E_A/(k_B T) with upper bounds as censored data.

    Units: T in K, D, bounds and D0 in cm²/s, E_A in eV (k_B from :mod:`liflow_screen.core.constants`).

    Likelihood. A resolved point (``temps_K``, ``D`` with its ``level`` interval ``D_low``–``D_high``,
    read as symmetric in ln D as in :func:`arrhenius_fit`) is Gaussian in ln D with
    σ = max((ln D_high − ln D_low)/(2 z), ``sigma_floor_ln``), z = 1.96 at level 0.95. An upper bound b at a temperature
    where diffusion was not resolved (``bound_temps_K``, ``bounds``: "D* < b") is a censored
    observation, P = Φ((ln b − μ(T))/s) with s = ``bound_sigma_ln`` (the bound is soft: a true D
    near b can still leave a trajectory unresolved). Points with non-finite or non-positive values
    (or intervals with D_high <= D_low) are dropped.

    Prior: flat in E_A on ``E_A_range`` (default 0–2 eV, both ends excluded) and flat in ln D0 on
    ``ln_D0_range``. Posterior: evaluated on a deterministic grid (no random numbers) in (E_A, a),
    a = ln D at the weighted-mean 1/(k_B T) of the resolved points (there a and E_A are uncorrelated
    in the Gaussian part); a coarse pass finds where the posterior lives (log density within 30 of
    its maximum), a fine ``n_grid`` = (n_E, n_a) pass of equal cells gives the weights. Quantiles are
    weighted quantiles over the cells: E_A, ln D0 and D(``target_T``) are reported as posterior
    median and central ``level`` interval (D_target_low is the 2.5 % quantile at level 0.95, the
    conservative value used for ranking).

    Consistency. The deviance of the best admissible line, Σ r_i² over resolved points plus
    Σ −2 ln Φ(z_j) over bounds, is compared with χ² of max(n_resolved − 2, 1) degrees of freedom (a
    bound that is met adds ≈ 0; with two resolved points held fixed, a line that must exceed a bound
    by more than ×3.7 at s = 0.5 is rejected at p_min = 1e-3). If p < ``p_min`` no admissible line agrees with both the resolved
    values and the bounds (typically a superionic / phase transition inside the simulated range, an
    E_A outside the prior range, or resolved points off one line): ``status`` is "non-Arrhenius" and
    ``reason`` names the temperatures that disagree; the posterior numbers are still given but must
    not be extrapolated. With no usable resolved point ``status`` is "insufficient".

    Assumptions: one activation energy over the whole range (and down to ``target_T``); independent
    errors; no Birge rescaling (unlike :func:`arrhenius_fit`, scatter beyond the intervals is a
    failed consistency test, not a wider interval).

    kinisi (``kinisi.arrhenius.Arrhenius``) fits the same line by MCMC from D* posteriors but has no
    censored likelihood, hence this function; both agree where every temperature is resolved
    (tests/unit/test_arrhenius_censored.py).

    Returns a dict with the keys of :func:`arrhenius_fit` (E_A, E_A_low, E_A_high, D0, ln_D0,
    D_target, D_target_low, D_target_high, target_T, n_points, T_min, T_max over resolved and bound
    temperatures, method "censored-grid", extrapolated) plus status ("ok" | "non-Arrhenius" |
    "insufficient"), reason, n_bounds, bound_T, resolved_T, level, deviance, deviance_max, p_value,
    E_A_map, ln_D0_map (best admissible line), conflicts (temperatures, K, that disagree) and
    resolved_only (:func:`arrhenius_fit` of the resolved points alone). With ``n_draws`` > 0 also
    ``draws_E_A`` (eV) and ``draws_ln_D0`` (ln cm²/s): that many posterior draws of the line (grid
    cells drawn by their mass from ``rng``, uniform within the cell), for joint statements over
    several fits (rank intervals).
    """
    from scipy import special, stats

    T = np.asarray(temps_K, dtype=np.float64)
    d = np.asarray(D, dtype=np.float64)
    lo = np.asarray(D_low, dtype=np.float64)
    hi = np.asarray(D_high, dtype=np.float64)
    Tb = np.asarray(bound_temps_K, dtype=np.float64).reshape(-1)
    b = np.asarray(bounds, dtype=np.float64).reshape(-1)
    if T.ndim != 1 or not (T.shape == d.shape == lo.shape == hi.shape):
        raise InputError("temps_K, D, D_low and D_high must be 1-D arrays of equal length")
    if Tb.shape != b.shape:
        raise InputError("bound_temps_K and bounds must have equal length")
    if np.any(T <= 0) or np.any(Tb <= 0) or target_T <= 0:
        raise InputError("temperatures must be positive (K)")
    if not (E_A_range[0] < E_A_range[1] and ln_D0_range[0] < ln_D0_range[1]):
        raise InputError("E_A_range and ln_D0_range must be (low, high) with low < high")
    if not (0 < level < 1) or sigma_floor_ln <= 0 or bound_sigma_ln <= 0:
        raise InputError("level must lie in (0, 1); sigma_floor_ln and bound_sigma_ln must be > 0")
    ok = np.isfinite(d) & np.isfinite(lo) & np.isfinite(hi) & (d > 0) & (lo > 0) & (hi > lo)
    okb = np.isfinite(b) & (b > 0)
    T, d, lo, hi, Tb, b = T[ok], d[ok], lo[ok], hi[ok], Tb[okb], b[okb]
    qz = float(stats.norm.ppf(0.5 + level / 2))
    all_T = np.concatenate([T, Tb])
    out: dict[str, Any] = {
        "status": "insufficient", "reason": "", "E_A": math.nan, "E_A_low": math.nan, "E_A_high": math.nan,
        "D0": math.nan, "ln_D0": math.nan, "D_target": math.nan, "D_target_low": math.nan,
        "D_target_high": math.nan, "target_T": float(target_T), "level": float(level), "n_points": int(T.size),
        "n_bounds": int(Tb.size), "resolved_T": [float(t) for t in T], "bound_T": [float(t) for t in Tb],
        "T_min": float(all_T.min()) if all_T.size else math.nan,
        "T_max": float(all_T.max()) if all_T.size else math.nan, "method": "censored-grid",
        "extrapolated": True, "deviance": math.nan, "deviance_max": math.nan, "p_value": math.nan,
        "E_A_map": math.nan, "ln_D0_map": math.nan, "conflicts": [],
        "resolved_only": arrhenius_fit(T, d, lo, hi, target_T=target_T, level=level),
    }
    if all_T.size:
        out["extrapolated"] = bool(target_T < out["T_min"] - 1e-9 or target_T > out["T_max"] + 1e-9)
    if T.size == 0:
        out["reason"] = "no resolved temperature: bounds alone do not fix an Arrhenius line"
        return out

    # data in x = 1/(k_B T) (1/eV), y = ln D; pivot x_ref = weighted mean of resolved x
    x, xb, xt = 1.0 / (K_B_EV * T), 1.0 / (K_B_EV * Tb), 1.0 / (K_B_EV * target_T)
    y, yb = np.log(d), np.log(b)
    sig = np.maximum((np.log(hi) - np.log(lo)) / (2.0 * qz), sigma_floor_ln)
    w = 1.0 / sig**2
    x_ref = float(np.sum(w * x) / np.sum(w))
    a_hat, s_a = float(np.sum(w * y) / np.sum(w)), float(1.0 / math.sqrt(np.sum(w)))

    def terms(E: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-point deviance terms on a grid: resolved r² (..., n) and bound −2 ln Φ (..., m)."""
        r = (y - (a[..., None] - E[..., None] * (x - x_ref))) / sig
        z = (yb - (a[..., None] - E[..., None] * (xb - x_ref))) / bound_sigma_ln
        return r**2, -2.0 * special.log_ndtr(z)

    def log_post(e_lo: float, e_hi: float, a_lo: float, a_hi: float, n_e: int, n_a: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cell-centre grid (E, a) and the log posterior (−deviance/2, −inf outside the ln D0 prior)."""
        E = e_lo + (np.arange(n_e) + 0.5) * (e_hi - e_lo) / n_e
        a = a_lo + (np.arange(n_a) + 0.5) * (a_hi - a_lo) / n_a
        EE, AA = np.meshgrid(E, a, indexing="ij")
        r2, cb = terms(EE, AA)
        lp = -0.5 * (r2.sum(-1) + cb.sum(-1))
        ln_d0 = AA + EE * x_ref
        lp = np.where((ln_d0 > ln_D0_range[0]) & (ln_d0 < ln_D0_range[1]), lp, -np.inf)
        return EE, AA, lp

    e_lo, e_hi = float(E_A_range[0]), float(E_A_range[1])
    a_lo, a_hi = a_hat - 12.0 * s_a, a_hat + 12.0 * s_a
    EE, AA, lp = log_post(e_lo, e_hi, a_lo, a_hi, 401, 241)
    if not np.isfinite(lp).any():
        out["status"] = "non-Arrhenius"
        out["reason"] = (f"no line with {e_lo:g} < E_A < {e_hi:g} eV and ln D0 in {ln_D0_range} passes near the "
                         f"resolved D* at {_fmt_T(T)} K")
        out["conflicts"] = sorted(float(t) for t in T)
        return out
    live = lp > np.max(lp) - 30.0
    de, da = (e_hi - e_lo) / 401, (a_hi - a_lo) / 241
    box = (max(e_lo, float(EE[live].min()) - 2 * de), min(e_hi, float(EE[live].max()) + 2 * de),
           max(a_lo, float(AA[live].min()) - 2 * da), min(a_hi, float(AA[live].max()) + 2 * da))
    EE, AA, lp = (v.ravel() for v in log_post(*box, int(n_grid[0]), int(n_grid[1])))
    wts = np.exp(lp - np.max(lp))  # equal cells: the weights are the posterior mass
    i_best = int(np.argmax(lp))
    # best admissible line = maximum likelihood (flat prior) on the grid
    r2, cb = terms(EE[i_best], AA[i_best])
    dev = float(r2.sum() + cb.sum())
    dof = max(int(T.size) - 2, 1)
    q_lo, q_hi = 0.5 - level / 2, 0.5 + level / 2
    e_q = _weighted_quantiles(EE, wts, (q_lo, 0.5, q_hi))
    lnd0_q = _weighted_quantiles(AA + EE * x_ref, wts, (0.5,))
    lnt_q = _weighted_quantiles(AA - EE * (xt - x_ref), wts, (q_lo, 0.5, q_hi))
    p = float(stats.chi2.sf(dev, dof))
    if n_draws > 0:
        gen = rng if rng is not None else np.random.default_rng(0)
        cells = gen.choice(EE.size, size=int(n_draws), p=wts / wts.sum())
        ce = (box[1] - box[0]) / int(n_grid[0])
        ca = (box[3] - box[2]) / int(n_grid[1])
        e_d = EE[cells] + (gen.random(int(n_draws)) - 0.5) * ce
        a_d = AA[cells] + (gen.random(int(n_draws)) - 0.5) * ca
        out["draws_E_A"], out["draws_ln_D0"] = e_d, a_d + e_d * x_ref
    out.update({"E_A": e_q[1], "E_A_low": e_q[0], "E_A_high": e_q[2], "ln_D0": lnd0_q[0],
                "D0": math.exp(lnd0_q[0]), "D_target": math.exp(lnt_q[1]), "D_target_low": math.exp(lnt_q[0]),
                "D_target_high": math.exp(lnt_q[2]), "deviance": dev,
                "deviance_max": float(stats.chi2.isf(p_min, dof)), "p_value": p,
                "E_A_map": float(EE[i_best]), "ln_D0_map": float(AA[i_best] + EE[i_best] * x_ref)})
    if p >= p_min:
        out["status"] = "ok"
        return out
    # name what disagrees: terms of the best line >= 4 (a 2σ miss), else the largest two
    items = [(float(r2[i]), float(T[i]), f"resolved {T[i]:g} K off by {math.sqrt(r2[i]):.1f}σ") for i in range(T.size)]
    mu_b = AA[i_best] - EE[i_best] * (xb - x_ref)
    items += [(float(cb[j]), float(Tb[j]), f"bound at {Tb[j]:g} K exceeded ×{math.exp(mu_b[j] - yb[j]):.3g}")
              for j in range(Tb.size) if mu_b[j] > yb[j]]
    items.sort(key=lambda t: -t[0])
    worst = [it for it in items if it[0] >= 4.0] or items[:2]
    out["conflicts"] = sorted({it[1] for it in worst})
    reason = (f"no Arrhenius line with {e_lo:g} < E_A < {e_hi:g} eV fits the resolved D* at {_fmt_T(T)} K"
              + (f" and the bounds at {_fmt_T(Tb)} K" if Tb.size else "")
              + f" (deviance {dev:.1f} > {out['deviance_max']:.1f}, p = {p:.1e}); best line: "
              + ", ".join(it[2] for it in worst))
    ro = out["resolved_only"]
    if np.isfinite(ro["E_A"]) and Tb.size:
        over = [(float(t), math.exp(ro["ln_D0"] - ro["E_A"] / (K_B_EV * t) - yy)) for t, yy in zip(Tb, yb)]
        over = [(t, f) for t, f in over if f > math.exp(2.0 * bound_sigma_ln) and t < T.min()]
        if over:
            t0, f0 = max(over)  # the highest exceeded bound: the transition lies just above it
            above = float(T[T > t0].min())
            reason += (f"; the resolved points alone (E_A = {ro['E_A']:.3g} eV) exceed the bound at {t0:g} K "
                       f"×{f0:.3g}: a transition between {t0:g} and {above:g} K?")
    out["status"], out["reason"] = "non-Arrhenius", reason
    return out


def nernst_einstein_conductivity(D_cm2_s: float | np.ndarray, n_li: int, volume_A3: float, T: float,
                                 charge: float = 1.0) -> float | np.ndarray:
    """Nernst–Einstein ionic conductivity σ = n q² D / (k_B T), S/cm.

    ``n_li`` carriers in a cell of ``volume_A3`` Å³ (number density n in cm⁻³), q = charge · e in C,
    D in cm²/s, k_B in J/K, T in K. Uncorrelated-ion (tracer) approximation, Haven ratio 1.
    """
    if volume_A3 <= 0 or T <= 0:
        raise InputError("volume (Å³) and temperature (K) must be positive")
    n_per_cm3 = n_li / (volume_A3 * 1e-24)
    q = charge * E_CHARGE
    return n_per_cm3 * q**2 * np.asarray(D_cm2_s, dtype=np.float64) / (K_B_J * T) if np.ndim(D_cm2_s) \
        else float(n_per_cm3 * q**2 * float(D_cm2_s) / (K_B_J * T))
