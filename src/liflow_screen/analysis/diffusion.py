"""Self-diffusion with kinisi (Bayesian MSD fit) on a coarse lag grid.

Conventions (as everywhere in the package): positions ``pos`` (F, n, 3) in Å, **unwrapped**
Cartesian; ``times_ps`` (F,) in ps; ``numbers`` (n,) atomic numbers; ``cell`` (3, 3) Å with lattice
vectors as rows; MSD in Å², diffusion coefficients in cm²/s, temperatures in K, energies in eV,
conductivity in S/cm.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import numpy as np

from ..core.errors import InputError
from .displacement import _as_cell, as_replicas, species_mask, frame_step_ps

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
    pos: np.ndarray | list[np.ndarray],
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

    Replicas (``pos`` a list of (F, n, 3) trajectories from the same start, or (R, F, n, 3)): one
    posterior from all of them jointly, as kinisi's ``dtype='identical'`` does: each replica's
    drift-corrected displacements become extra particles (framework drift removed per replica);
    replicas are never joined in time. Trajectories are cut to the shortest replica.

    Frame 0 is used once. kinisi 2.1's own ASE/pymatgen parsers prepend a copy of the first frame,
    so that ``calculate_msd`` adds to every lag one observation spanning one frame less (biased low at
    the longest lags); ``_unwrapped_parser_class`` takes the frames as given, and
    tests/unit/test_replicas.py checks kinisi's MSD here against an independent multi-origin MSD.

    Returns a dict: ``D`` (posterior median), ``D_low``, ``D_high`` (2.5 / 97.5 percentiles),
    ``D_mean``, ``constrained``, ``note``, ``method`` ("kinisi"), ``start_dt_ps``, ``n_dt``,
    ``n_atoms``. No other estimator ever stands in: if kinisi raises, or its posterior is
    unconstrained (interval not > 0 or wider than KINISI_MAX_SPAN), ``constrained`` is False, the
    values are NaN (D_high keeps kinisi's 97.5 % quantile when there is one) and ``note`` says why.
    Bad input raises InputError before any fitting.
    """
    reps = as_replicas(pos)
    x = reps[0]
    c = _as_cell(cell)
    t = np.asarray(times_ps, dtype=np.float64)
    if t.ndim == 1 and t.shape[0] > x.shape[0]:
        t = t[: x.shape[0]]  # replicas cut to the shortest
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
           "n_atoms": int(mask.sum()), "n_replicas": len(reps)}
    try:
        samples = _kinisi_samples(reps, c, nums, species, step, lags, start, n_samples, seed, drift_correction)
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


def kinisi_parser(reps: list[np.ndarray], cell: np.ndarray, numbers: np.ndarray, species: str, step: float,
                  lags: np.ndarray, drift_correction: bool = True) -> Any:
    """A kinisi parser of unwrapped replica trajectories (Å, frames ``step`` ps apart) on the lag grid
    ``lags`` (frames): one parser per replica, their drift-corrected displacements of ``species``
    concatenated as extra particles (what kinisi's analyzers do for ``dtype='identical'``)."""
    import scipp as sc

    parser_cls = _unwrapped_parser_class()
    mask = species_mask(numbers, species)
    spec_idx = sc.array(dims=["particle"], values=np.flatnonzero(mask))
    drift_idx = sc.array(dims=["particle"], values=np.flatnonzero(~mask) if drift_correction else np.array([], int))
    dt = sc.array(dims=["time interval"], values=lags.astype(np.float64) * step, unit="ps")
    parsers = []
    for x in reps:
        coords = sc.array(dims=["time", "particle", "dimension"], values=x, unit=sc.units.angstrom)
        latt = sc.array(dims=["time", "dimension1", "dimension2"],
                        values=np.broadcast_to(cell, (x.shape[0], 3, 3)).copy(), unit=sc.units.angstrom)
        parsers.append(parser_cls(coords=coords, latt=latt, time_step=sc.scalar(step, unit="ps"),
                                  step_skip=sc.scalar(1, unit=sc.units.dimensionless), dt=dt,
                                  specie_indices=spec_idx, drift_indices=drift_idx))
    p = parsers[0]
    if len(parsers) > 1:
        p.displacements = sc.concat([q.displacements for q in parsers], "particle")
    return p


def _kinisi_samples(reps: list[np.ndarray], cell: np.ndarray, numbers: np.ndarray, species: str, step: float,
                    lags: np.ndarray, start: float, n_samples: int, seed: int,
                    drift_correction: bool) -> np.ndarray:
    """Posterior samples of D* (cm²/s) from kinisi for unwrapped replica trajectories (pooled)."""
    import scipp as sc
    from kinisi.analyze import DiffusionAnalyzer
    from kinisi.displacement import calculate_msd

    parser = kinisi_parser(reps, cell, numbers, species, step, lags, drift_correction)
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
