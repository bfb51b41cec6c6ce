"""Trajectory analysis: MSD, kinisi self-diffusion, Arrhenius fits, Nernst–Einstein, RDF, metrics.

Pure functions on numpy arrays. Conventions (as everywhere in the package):
positions ``pos`` (F, n, 3) in Å, **unwrapped** Cartesian; ``times_ps`` (F,) in ps;
``numbers`` (n,) atomic numbers; ``cell`` (3, 3) Å with lattice vectors as rows;
MSD in Å², diffusion coefficients in cm²/s, temperatures in K, energies in eV,
conductivity in S/cm.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import InputError

from .constants import A2_PER_PS_TO_CM2_PER_S, E_CHARGE, K_B_EV, K_B_J  # noqa: F401 (re-exported)


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------

def _as_traj(pos: np.ndarray) -> np.ndarray:
    arr = np.asarray(pos, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise InputError(f"positions must have shape (frames, atoms, 3), got {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InputError(f"positions must have at least one frame and one atom, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InputError("positions contain NaN or infinite values")
    return arr


def _as_mask(mask: np.ndarray | Sequence[bool], n: int) -> np.ndarray:
    m = np.asarray(mask, dtype=bool)
    if m.shape != (n,):
        raise InputError(f"atom mask must have shape ({n},), got {m.shape}")
    if not m.any():
        raise InputError("atom mask selects no atoms")
    return m


def _as_cell(cell: np.ndarray) -> np.ndarray:
    c = np.asarray(cell, dtype=np.float64)
    if c.shape == (9,):
        c = c.reshape(3, 3)
    if c.shape != (3, 3) or not np.all(np.isfinite(c)):
        raise InputError(f"cell must be a finite (3, 3) matrix in Å, got shape {c.shape}")
    if abs(np.linalg.det(c)) < 1e-6:
        raise InputError("cell is singular (zero volume)")
    return c


def species_mask(numbers: np.ndarray, species: str | int | None) -> np.ndarray:
    """Boolean mask of atoms of ``species`` (symbol such as ``"Li"`` or atomic number); None = all."""
    from ase.data import atomic_numbers

    nums = np.asarray(numbers, dtype=int)
    if species is None:
        return np.ones(nums.shape, dtype=bool)
    if isinstance(species, str):
        if species not in atomic_numbers:
            raise InputError(f"unknown chemical symbol {species!r}")
        z = atomic_numbers[species]
    else:
        z = int(species)
    return nums == z


def frame_step_ps(times_ps: np.ndarray, rtol: float = 1e-3) -> float:
    """The (uniform) spacing of saved frames, ps; InputError if the times are not evenly spaced."""
    t = np.asarray(times_ps, dtype=np.float64)
    if t.ndim != 1 or t.size < 2:
        raise InputError("need at least two frame times to define a time step")
    d = np.diff(t)
    step = float(np.median(d))
    if step <= 0 or not np.allclose(d, step, rtol=rtol, atol=1e-6):
        raise InputError(f"frame times are not evenly spaced (steps between {d.min():g} and {d.max():g} ps)")
    return step


# --------------------------------------------------------------------------------------------
# mean squared displacement
# --------------------------------------------------------------------------------------------

def msd_single_origin(pos: np.ndarray, mask: np.ndarray | Sequence[bool]) -> np.ndarray:
    """Eq. (12): MSD_S(τ_k) = mean_{i∈S} |x_{k,i} − x_{0,i}|², Å², for every frame k (shape (F,)).

    ``pos`` (F, n, 3) unwrapped Å; ``mask`` (n,) selects the species group S.
    """
    x = _as_traj(pos)
    m = _as_mask(mask, x.shape[1])
    d = x[:, m] - x[0, m]
    return np.einsum("fij,fij->f", d, d) / m.sum()


def msd_multi_origin(pos: np.ndarray, mask: np.ndarray | Sequence[bool],
                     max_lag: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MSD averaged over all time origins, Å², by the FFT (Wiener–Khinchin) algorithm.

    MSD(m) = mean_{i∈S} mean_{k=0}^{F−1−m} |x_{k+m,i} − x_{k,i}|² for lags m = 0..max_lag frames
    (default F−1). Returns ``(lags, msd)``; multiply ``lags`` by the frame step for ps.
    Cost O(n F log F) instead of the O(n F²) double loop.
    """
    x = _as_traj(pos)
    m = _as_mask(mask, x.shape[1])
    n_frames = x.shape[0]
    if max_lag is None:
        max_lag = n_frames - 1
    if not 0 <= max_lag <= n_frames - 1:
        raise InputError(f"max_lag must be in [0, {n_frames - 1}], got {max_lag}")
    r = x[:, m] - x[0, m]  # (F, s, 3); a constant shift per atom leaves the MSD unchanged
    n_sel = r.shape[1]
    # S1(m) = (1/(F-m)) sum_{k=0}^{F-1-m} (|r_{k+m}|^2 + |r_k|^2), from prefix sums of |r_k|^2.
    sq = np.einsum("fij,fij->f", r, r)  # summed over selected atoms
    csum = np.concatenate([[0.0], np.cumsum(sq)])
    lags = np.arange(n_frames)
    counts = n_frames - lags
    head = csum[counts]                      # sum_{k=0}^{F-1-m} |r_k|^2
    tail = csum[n_frames] - csum[lags]       # sum_{k=m}^{F-1} |r_k|^2
    s1 = (head + tail) / counts
    # S2(m) = (1/(F-m)) sum_k r_k . r_{k+m}, an autocorrelation, by zero-padded FFT.
    nfft = 1 << int(math.ceil(math.log2(2 * n_frames)))
    f = np.fft.rfft(r, n=nfft, axis=0)
    acf = np.fft.irfft((f * f.conj()).real.sum(axis=(1, 2)), n=nfft)[:n_frames]
    s2 = acf / counts
    msd = (s1 - 2.0 * s2) / n_sel
    msd[0] = 0.0
    msd = np.maximum(msd, 0.0)  # round-off at the ~1e-12 level
    return lags[: max_lag + 1], msd[: max_lag + 1]


def mobility_rate(pos: np.ndarray, times_ps: np.ndarray, mask: np.ndarray | Sequence[bool]) -> float:
    """Mobility of the atoms in ``mask``, Å²/ps: the least-squares slope of the multi-origin MSD
    over the later half of the time lags, τ_max/2 <= lag <= τ_max (τ_max = the trajectory length).

    This is the prior-class label of the pipeline (slow = rate < ``dataset.slow_threshold``, 0.1
    Å²/ps, the paper's MSD/τ threshold at τ = 25 ps). Unlike MSD/τ it does not depend on τ for a
    vibrating crystal: the vibrational plateau (reached within a fraction of a ps) has zero slope, so
    a non-diffusing group is slow at 1.5 ps as at 25 ps, while a diffusing one gives 6 D*.
    With two frames (one lag) it falls back to MSD/τ. NaN for an empty mask.
    """
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return math.nan
    x = _as_traj(pos)
    t = np.asarray(times_ps, dtype=np.float64)
    if t.shape != (x.shape[0],) or x.shape[0] < 2:
        raise InputError("mobility_rate needs at least two frames and one time per frame")
    step = frame_step_ps(t)
    lags, msd = msd_multi_origin(x, m)
    if lags[-1] < 2:
        return float(msd[-1] / (lags[-1] * step))
    half = lags >= lags[-1] / 2.0
    lt = lags[half] * step
    return float(np.polyfit(lt, msd[half], 1)[0])


# --------------------------------------------------------------------------------------------
# is diffusion resolved? vibrational plateau, excess MSD, hop length, resolution bound
# --------------------------------------------------------------------------------------------

#: Lag (ps) by which a crystal's vibrational MSD has reached its plateau (a few vibrational periods of
#: 0.05-0.2 ps); the MSD at this lag (or at the first saved frame after it) is the trajectory's plateau.
PLATEAU_PS = 0.5
#: Li-sublattice melting: a Li atom is "on a site" within this fraction of the Li hop length of an
#: initial Li site; the sublattice counts as molten when fewer than MOLTEN_OCCUPANCY of Li positions are.
SITE_RADIUS_FRACTION = 1.0 / 3.0
MOLTEN_OCCUPANCY = 0.5
#: Off-site Li can still be a crystal's Li: in a superionic conductor Li hops into sites that were
#: vacant in frame 0 (LGPS: 20 Li over 28 partially occupied sites). What sets a liquid apart is
#: continuous motion: Gaussian displacements, non-Gaussian parameter α2 ≈ 0 at ~1 ps; jumps
#: between sites give α2 clearly > 0. The lag (ps) and the α2 below which Li motion counts as
#: continuous:
NON_GAUSSIAN_LAG_PS = 1.0
CONTINUOUS_ALPHA2 = 0.3
#: Framework melting / collapse: an element's excess MSD reaching this fraction of its site spacing, squared
#: (on average halfway to the nearest equivalent site: no longer on its own).
FRAME_MELT_FRACTION = 0.5


def excess_msd(pos: np.ndarray, times_ps: np.ndarray, mask: np.ndarray | Sequence[bool],
               plateau_ps: float = PLATEAU_PS) -> dict[str, float]:
    """MSD in excess of the vibrational plateau, measured from the trajectory itself.

    With the multi-origin MSD(lag) of the atoms in ``mask``: plateau = MSD at the first lag >=
    ``plateau_ps`` (at least one frame), end = MSD at the full length; excess = end - plateau (Å²)
    over ``tau_obs_ps`` = length - plateau lag. Returns plateau, end, excess (Å²), tau_obs_ps,
    plateau_lag_ps. Fewer than two usable lags give NaN excess and tau_obs_ps 0.
    """
    x = _as_traj(pos)
    m = _as_mask(mask, x.shape[1])
    t = np.asarray(times_ps, dtype=np.float64)
    nan = {"plateau": math.nan, "end": math.nan, "excess": math.nan, "tau_obs_ps": 0.0, "plateau_lag_ps": math.nan}
    if x.shape[0] < 3:
        return nan
    step = frame_step_ps(t)
    lags, msd = msd_multi_origin(x, m)
    k = max(1, int(math.ceil(plateau_ps / step - 1e-9)))
    if k >= lags[-1]:
        return nan
    return {"plateau": float(msd[k]), "end": float(msd[-1]), "excess": float(msd[-1] - msd[k]),
            "tau_obs_ps": float((lags[-1] - k) * step), "plateau_lag_ps": float(k * step)}


def hop_length(positions: np.ndarray, cell: np.ndarray, numbers: np.ndarray, z: int, cutoff: float = 8.0) -> float:
    """Shortest distance (Å) between two atoms (or periodic images) of element ``z`` in a structure:
    the shortest site-to-site jump available to it (``cutoff`` if none is closer)."""
    from .geometry import shortest_distance

    mask = np.asarray(numbers) == int(z)
    if not mask.any():
        return math.nan
    return shortest_distance(positions, cell, mask, cutoff=cutoff)


def diffusion_resolution(pos: np.ndarray, times_ps: np.ndarray, mask: np.ndarray | Sequence[bool],
                         hop_A: float, plateau_ps: float = PLATEAU_PS) -> dict[str, Any]:
    """Whether a trajectory resolves diffusion of the atoms in ``mask``, and the bound if it does not.

    Rule: resolved when the MSD in excess of the vibrational plateau (:func:`excess_msd`) reaches
    one hop length squared, excess >= a², with a = ``hop_A`` (Å): on average one jump per atom. Then
    D* can be fitted. Otherwise the trajectory only bounds it: fewer than one hop-length² of excess
    MSD in tau_obs means D* < a² / (6 tau_obs) (the "hop" resolution bound, cm²/s).
    Returns resolved, excess (Å²), plateau (Å²), tau_obs_ps, hop_A, bound (cm²/s), reason.
    """
    e = excess_msd(pos, times_ps, mask, plateau_ps)
    out = {"resolved": False, "excess": e["excess"], "plateau": e["plateau"], "tau_obs_ps": e["tau_obs_ps"],
           "hop_A": float(hop_A), "bound": math.nan, "reason": ""}
    if not (e["tau_obs_ps"] > 0 and math.isfinite(e["excess"])):
        out["reason"] = f"trajectory too short to pass its {plateau_ps:g} ps vibrational plateau"
        return out
    out["bound"] = float(hop_A) ** 2 / (6.0 * e["tau_obs_ps"]) * A2_PER_PS_TO_CM2_PER_S
    if e["excess"] >= float(hop_A) ** 2:
        out["resolved"] = True
    else:
        out["reason"] = (f"MSD excess {e['excess']:.3g} Å² over the {e['plateau']:.3g} Å² plateau < one hop "
                         f"a² = {hop_A ** 2:.3g} Å² in {e['tau_obs_ps']:.3g} ps")
    return out


def site_occupancy(pos: np.ndarray, cell: np.ndarray, mask: np.ndarray | Sequence[bool], radius_A: float,
                   first: float = 0.5) -> float:
    """Fraction of positions of the ``mask`` atoms, over the last ``1 - first`` of the frames, that lie
    within ``radius_A`` Å of one of their species' sites in frame 0 (periodic minimum image)."""
    x = _as_traj(pos)
    m = _as_mask(mask, x.shape[1])
    c = _as_cell(cell)
    inv = np.linalg.inv(c)
    sites = x[0, m]
    hits, total = 0, 0
    for frame in x[int(math.floor(first * (x.shape[0] - 1))) + 1:] if x.shape[0] > 1 else x:
        d = frame[m][:, None, :] - sites[None, :, :]            # (n, sites, 3)
        f = d @ inv
        d = (f - np.round(f)) @ c
        near = (np.einsum("abk,abk->ab", d, d).min(axis=1) <= radius_A ** 2)
        hits += int(near.sum())
        total += near.size
    return hits / total if total else math.nan


def remove_framework_drift(pos: np.ndarray, frame_mask: np.ndarray | Sequence[bool]) -> np.ndarray:
    """Positions (F, N, 3) Å with the framework's mean displacement from frame 0 subtracted from every
    atom (the drift correction kinisi applies to D*). With the total centre of mass fixed, diffusing Li
    move the framework's centre the other way (by M_Li/M_frame times the Li centre's displacement);
    site, melting and resolution tests are about motion relative to the framework. Unchanged when
    there are no framework atoms."""
    x = _as_traj(pos)
    m = _as_mask(frame_mask, x.shape[1])
    if not m.any():
        return x
    drift = (x[:, m] - x[:1, m]).mean(axis=1)                  # (F, 3)
    return x - drift[:, None, :]


def non_gaussian_parameter(pos: np.ndarray, times_ps: np.ndarray, mask: np.ndarray | Sequence[bool],
                           lag_ps: float = NON_GAUSSIAN_LAG_PS) -> float:
    """Non-Gaussian parameter α2 = 3⟨Δr⁴⟩ / (5⟨Δr²⟩²) − 1 of the ``mask`` atoms' displacements over
    the smallest lag >= ``lag_ps`` (ps), averaged over every time origin (Rahman 1964).

    0 for Gaussian displacements (harmonic vibration, continuous Brownian motion); clearly > 0 when
    atoms jump between sites and rest in between. NaN when the trajectory is shorter than the lag.
    """
    x = _as_traj(pos)
    m = _as_mask(mask, x.shape[1])
    step = frame_step_ps(np.asarray(times_ps, dtype=np.float64))
    k = max(1, int(math.ceil(lag_ps / step - 1e-6)))
    if k >= x.shape[0] or not m.any():
        return math.nan
    d = x[k:, m] - x[:-k, m]
    r2 = np.einsum("tak,tak->ta", d, d)
    m2 = float(r2.mean())
    return 3.0 * float((r2 ** 2).mean()) / (5.0 * m2 ** 2) - 1.0 if m2 > 0 else math.nan


def framework_melt_ratio(pos: np.ndarray, times_ps: np.ndarray, numbers: np.ndarray, cell: np.ndarray,
                         frame_mask: np.ndarray | Sequence[bool], plateau_ps: float = PLATEAU_PS) -> float:
    """max over frame elements e of excess MSD_e / (FRAME_MELT_FRACTION · a_e)², with a_e the shortest
    e–e distance in frame 0 (Å). >= 1: on average the element's atoms have left their sites (halfway to
    the nearest equivalent site and beyond): the framework melted or collapsed. NaN if no frame atoms."""
    x = _as_traj(pos)
    nums = np.asarray(numbers, dtype=int)
    fm = np.asarray(frame_mask, dtype=bool)
    ratios = []
    for z in sorted(set(nums[fm].tolist())):
        m = fm & (nums == z)
        a = hop_length(x[0], cell, nums, z)
        e = excess_msd(x, times_ps, m, plateau_ps)
        if math.isfinite(e["excess"]) and a > 0:
            ratios.append(e["excess"] / (FRAME_MELT_FRACTION * a) ** 2)
    return float(max(ratios)) if ratios else math.nan


# --------------------------------------------------------------------------------------------
# self-diffusion: kinisi (Bayesian) with a coarse dt grid
# --------------------------------------------------------------------------------------------

def coarse_lag_grid(n_frames: int, n_dt: int) -> np.ndarray:
    """At most ``n_dt`` distinct integer frame lags, evenly spaced from 1 to ``n_frames − 1``."""
    if n_frames < 2:
        raise InputError("need at least two frames for a lag grid")
    n_dt = max(2, int(n_dt))
    return np.unique(np.round(np.linspace(1, n_frames - 1, min(n_dt, n_frames - 1))).astype(int))


def _start_index(lag_times: np.ndarray, start_dt_ps: float | None, duration: float, min_points: int = 3) -> int:
    """Index of the first grid point of the diffusive regime (at least ``min_points`` points kept)."""
    if start_dt_ps is None:
        start_dt_ps = max(0.1 * duration, float(lag_times[0]))
    idx = int(np.searchsorted(lag_times, start_dt_ps - 1e-9))
    return max(0, min(idx, lag_times.size - min_points))


def _ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    lo, med, hi = np.percentile(samples, [50 * (1 - level), 50.0, 50 * (1 + level)])
    return float(lo), float(med), float(hi)


@functools.lru_cache(maxsize=1)
def _unwrapped_parser_class() -> type:
    """A kinisi ``Parser`` that takes unwrapped Cartesian coordinates as they are.

    kinisi's own parsers (ASE, pymatgen, MDAnalysis) read *fractional* coordinates and rebuild
    the trajectory by applying the minimum-image convention to frame-to-frame differences, and
    prepend a copy of the first frame. Both break LiFlow rollouts, whose saved frames are 1 ps
    apart and can move an atom by more than half a cell. This subclass keeps everything else of
    kinisi (framework drift correction, MSD variances, the Bayesian regression) and replaces
    only the displacement reconstruction by the exact ``x_{k+1} − x_0`` of the unwrapped input.
    """
    import scipp as sc
    from kinisi.parser import Parser

    class UnwrappedParser(Parser):
        @staticmethod
        def _exact(coords: Any, lattice: Any) -> Any:  # noqa: ARG004 - signature of kinisi
            vals = coords.values[1:] - coords.values[:1]
            return sc.array(dims=["obs", "particle", "dimension"], values=vals, unit=coords.unit)

        orthorhombic_calculate_displacements = _exact
        non_orthorhombic_calculate_displacements = _exact

        def get_indices(self, structure: Any, specie: Any) -> tuple[Any, Any]:
            # ``structure`` is the array of atomic numbers, ``specie`` a symbol or atomic number
            mask = species_mask(np.asarray(structure), specie)
            return (sc.array(dims=["particle"], values=np.flatnonzero(mask)),
                    sc.array(dims=["particle"], values=np.flatnonzero(~mask)))

        def get_drift_indices(self, structure: Any, specie_indices: Any) -> Any:
            keep = np.setdiff1d(np.arange(len(structure)), specie_indices.values)
            return sc.array(dims=["particle"], values=keep)

    return UnwrappedParser


#: kinisi's posterior counts as unconstrained (too little data: the result is not a measurement)
#: when its 95 % interval is not strictly positive or spans more than this factor.
KINISI_MAX_SPAN = 1e3


def kinisi_diffusion(
    pos: np.ndarray,
    times_ps: np.ndarray,
    numbers: np.ndarray,
    cell: np.ndarray,
    species: str = "Li",
    n_dt: int = 20,
    n_samples: int = 1000,
    seed: int = 0,
    start_dt_ps: float | None = None,
    drift_correction: bool = True,
) -> dict[str, Any]:
    """Tracer self-diffusion D* (cm²/s) of ``species`` with a 95 % credible interval (kinisi 2.x).

    kinisi's ``DiffusionAnalyzer`` computes the multi-origin MSD on a coarse grid of at most
    ``n_dt`` time lags (evenly spaced, ps) with its variances and covariances, and samples
    D* = slope / 6 by MCMC (emcee, 32 walkers, ``n_samples`` steps after 500 burn-in) from the
    first lag >= ``start_dt_ps`` (default: 10 % of the trajectory length) on. Coordinates are
    passed unwrapped, exactly (see ``_unwrapped_parser_class``); with ``drift_correction`` the
    mean displacement of the other atoms (the framework) is subtracted, kinisi's default.

    Returns a dict: ``D`` (posterior median), ``D_low``, ``D_high`` (2.5 / 97.5 percentiles),
    ``D_mean``, ``constrained``, ``note``, ``method`` ("kinisi"), ``start_dt_ps``, ``n_dt``,
    ``n_atoms``. No other estimator ever stands in: if kinisi raises, or its posterior is
    unconstrained (interval not > 0 or wider than KINISI_MAX_SPAN), ``constrained`` is False, the
    values are NaN (D_high keeps kinisi's 97.5 % quantile when there is one) and ``note`` says why.
    Bad input raises InputError before any fitting.
    """
    x = _as_traj(pos)
    c = _as_cell(cell)
    t = np.asarray(times_ps, dtype=np.float64)
    if t.shape != (x.shape[0],):
        raise InputError(f"times_ps must have shape ({x.shape[0]},), got {t.shape}")
    if x.shape[0] < 4:
        raise InputError(f"need at least 4 frames to fit a diffusion coefficient, got {x.shape[0]}")
    step = frame_step_ps(t)
    nums = np.asarray(numbers, dtype=int)
    if nums.shape != (x.shape[1],):
        raise InputError(f"numbers must have shape ({x.shape[1]},), got {nums.shape}")
    mask = species_mask(nums, species)
    if not mask.any():
        raise InputError(f"no {species} atoms in the structure")
    lags = coarse_lag_grid(x.shape[0], n_dt)
    lag_times = lags.astype(np.float64) * step
    duration = float((x.shape[0] - 1) * step)
    i0 = _start_index(lag_times, start_dt_ps, duration)
    start = float(lag_times[i0])
    out = {"D": math.nan, "D_low": math.nan, "D_high": math.nan, "D_mean": math.nan, "method": "kinisi",
           "constrained": False, "note": "", "start_dt_ps": start, "n_dt": int(lags.size),
           "n_atoms": int(mask.sum())}
    try:
        samples = _kinisi_samples(x, c, nums, species, step, lags, start, n_samples, seed, drift_correction)
    except Exception as exc:  # kinisi / emcee / scipp failures: no number, the reason recorded
        msg = str(exc).splitlines()[0] if str(exc) else ""
        out["note"] = f"kinisi failed ({type(exc).__name__}: {msg})"
        return out
    lo, med, hi = _ci(samples)
    if not (lo > 0 and hi / lo < KINISI_MAX_SPAN):
        out["D_high"] = hi
        out["note"] = (f"kinisi posterior unconstrained (median {med:.3g}, 95 % [{lo:.3g}, {hi:.3g}] cm2/s)")
        return out
    out.update({"D": med, "D_low": lo, "D_high": hi, "D_mean": float(samples.mean()), "constrained": True})
    return out


def _kinisi_samples(x: np.ndarray, cell: np.ndarray, numbers: np.ndarray, species: str, step: float,
                    lags: np.ndarray, start: float, n_samples: int, seed: int,
                    drift_correction: bool) -> np.ndarray:
    """Posterior samples of D* (cm²/s) from kinisi for an unwrapped trajectory."""
    import scipp as sc
    from kinisi.analyze import DiffusionAnalyzer
    from kinisi.displacement import calculate_msd

    parser_cls = _unwrapped_parser_class()
    n_frames = x.shape[0]
    coords = sc.array(dims=["time", "particle", "dimension"], values=x, unit=sc.units.angstrom)
    latt = sc.array(dims=["time", "dimension1", "dimension2"],
                    values=np.broadcast_to(cell, (n_frames, 3, 3)).copy(), unit=sc.units.angstrom)
    mask = species_mask(numbers, species)
    spec_idx = sc.array(dims=["particle"], values=np.flatnonzero(mask))
    drift_idx = sc.array(dims=["particle"], values=np.flatnonzero(~mask) if drift_correction else np.array([], int))
    dt = sc.array(dims=["time interval"], values=lags.astype(np.float64) * step, unit="ps")
    parser = parser_cls(coords=coords, latt=latt, time_step=sc.scalar(step, unit="ps"),
                        step_skip=sc.scalar(1, unit=sc.units.dimensionless), dt=dt,
                        specie_indices=spec_idx, drift_indices=drift_idx)
    analyzer = DiffusionAnalyzer(parser)
    analyzer._dg = calculate_msd(parser, progress=False)  # what DiffusionAnalyzer.from_ase does
    state = np.random.get_state()  # kinisi seeds numpy's global RNG: restore it afterwards
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analyzer.diffusion(sc.scalar(start, unit="ps"), n_samples=int(n_samples), progress=False,
                               random_state=np.random.RandomState(seed))
    finally:
        np.random.set_state(state)
    samples = np.asarray(analyzer.D.values, dtype=np.float64)
    if samples.size == 0 or not np.all(np.isfinite(samples)):
        raise RuntimeError("kinisi returned no finite samples")
    return samples


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
) -> dict[str, Any]:
    """Bayesian Arrhenius fit ln D(T) = ln D0 − E_A/(k_B T) with upper bounds as censored data.

    Units: T in K, D, bounds and D0 in cm²/s, E_A in eV (k_B from :mod:`liflow_screen.constants`).

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
    resolved_only (:func:`arrhenius_fit` of the resolved points alone).
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


# --------------------------------------------------------------------------------------------
# radial distribution function
# --------------------------------------------------------------------------------------------

def rdf(
    pos: np.ndarray,
    numbers: np.ndarray,
    cell: np.ndarray,
    r_max: float = 5.0,
    n_bins: int = 100,
    discard: float = 0.2,
    pair: tuple[str | None, str | None] | None = None,
    max_frames: int | None = 200,
) -> tuple[np.ndarray, np.ndarray]:
    """Radial distribution function g(r) (Eq. 14), averaged over frames, r in Å.

    g_AB(r) = V / (n_A n_B) · <Σ_{i∈A} Σ_{j∈B, j≠i} δ(r − r_ij)> / (4π r²), histogrammed in
    ``n_bins`` shells up to ``r_max`` (shell volumes exact). ``pair`` None = all atoms (Eq. 14);
    ("Li", "Li") or ("Li", None) (Li – any atom) for species-resolved curves. The first
    ``discard`` fraction of frames is dropped, then at most ``max_frames`` evenly spaced frames
    are used. Periodic pair distances come from :func:`geometry.neighbor_pairs` (vesin, NumPy),
    exact for unwrapped positions and any cutoff. Returns bin centres r and g(r).
    """
    from .geometry import neighbor_pairs

    x = np.asarray(pos, dtype=np.float64)
    if x.ndim == 2:
        x = x[None]
    x = _as_traj(x)
    c = _as_cell(cell)
    nums = np.asarray(numbers, dtype=int)
    if nums.shape != (x.shape[1],):
        raise InputError(f"numbers must have shape ({x.shape[1]},), got {nums.shape}")
    if r_max <= 0 or n_bins < 1:
        raise InputError("r_max must be positive (Å) and n_bins at least 1")
    if not 0.0 <= discard < 1.0:
        raise InputError("discard must be in [0, 1)")
    a_spec, b_spec = (None, None) if pair is None else pair
    ma, mb = species_mask(nums, a_spec), species_mask(nums, b_spec)
    if not ma.any() or not mb.any():
        raise InputError(f"no atoms for RDF pair {pair}")
    frames = x[int(math.floor(discard * x.shape[0])):]
    if max_frames is not None and frames.shape[0] > max_frames:
        frames = frames[np.unique(np.linspace(0, frames.shape[0] - 1, max_frames).round().astype(int))]
    n_f = frames.shape[0]
    edges = np.linspace(0.0, float(r_max), int(n_bins) + 1)
    hist = np.zeros(int(n_bins), dtype=np.float64)
    for frame in frames:
        i, j, dist = neighbor_pairs(frame, c, float(r_max))
        keep = ma[i] & mb[j]
        hist += np.histogram(dist[keep], bins=edges)[0]
    volume = abs(np.linalg.det(c))
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    rho_b = mb.sum() / volume
    g_r = hist / (n_f * ma.sum() * rho_b * shell)
    return 0.5 * (edges[1:] + edges[:-1]), g_r


def rdf_mae(g_ref: np.ndarray, g_gen: np.ndarray, r: np.ndarray) -> float:
    """RDF MAE = (1/r_cut) ∫_0^{r_cut} |ĝ(r) − g(r)| dr on a uniform histogram (bin centres ``r``, Å).

    r_cut is the outer edge of the last bin; the integral is exact for histogrammed g(r).
    """
    a = np.asarray(g_ref, dtype=np.float64)
    b = np.asarray(g_gen, dtype=np.float64)
    rr = np.asarray(r, dtype=np.float64)
    if a.shape != b.shape or a.shape != rr.shape or rr.size < 2:
        raise InputError("g_ref, g_gen and r must be 1-D arrays of the same length (>= 2)")
    dr = np.diff(rr)
    if not np.allclose(dr, dr[0], rtol=1e-6):
        raise InputError("rdf_mae needs uniformly spaced bins")
    r_cut = rr[-1] + 0.5 * dr[0]
    return float(np.sum(np.abs(b - a)) * dr[0] / r_cut)


# --------------------------------------------------------------------------------------------
# log-MSD metrics (Table 1)
# --------------------------------------------------------------------------------------------

def log_msd_metrics(ref: Sequence[float] | np.ndarray, gen: Sequence[float] | np.ndarray) -> dict[str, float]:
    """MAE of log10 MSD (MSD in Å²) and Spearman ρ between reference and generated values.

    Pairs with a non-finite or non-positive value on either side are dropped (``n`` counts the
    pairs used). ρ is NaN with fewer than 2 pairs or a constant side.
    """
    from scipy import stats

    a = np.asarray(ref, dtype=np.float64)
    b = np.asarray(gen, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise InputError("ref and gen must be 1-D arrays of equal length")
    ok = np.isfinite(a) & np.isfinite(b) & (a > 0) & (b > 0)
    la, lb = np.log10(a[ok]), np.log10(b[ok])
    mae = float(np.mean(np.abs(la - lb))) if ok.any() else math.nan
    rho = math.nan
    if ok.sum() >= 2 and np.ptp(la) > 0 and np.ptp(lb) > 0:
        rho = float(stats.spearmanr(la, lb).statistic)
    return {"mae": mae, "spearman": rho, "n": int(ok.sum())}
