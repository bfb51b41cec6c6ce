"""Input checks, mean squared displacement, whether diffusion is resolved (vibrational plateau,
excess MSD, hop length, site occupancy, framework melting) and the log-MSD metrics of Table 1.

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

from ..core.constants import A2_PER_PS_TO_CM2_PER_S
from ..core.errors import InputError

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


def as_replicas(pos: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """Replica trajectories of one (structure, T): an (F, n, 3) array (one replica), an (R, F, n, 3)
    array or a sequence of (F_r, n, 3) arrays, as float64 (F, n, 3) arrays cut to the shortest F (Å).
    Replicas are independent trajectories from the same start; pooled statistics treat their atoms
    as extra particles (never as a continuation in time)."""
    if isinstance(pos, np.ndarray) and pos.ndim == 3:
        return [_as_traj(pos)]
    reps = [_as_traj(p) for p in pos]
    if not reps:
        raise InputError("no replica trajectories")
    if len({r.shape[1] for r in reps}) != 1:
        raise InputError("replicas have different atom counts")
    f = min(r.shape[0] for r in reps)
    return [r[:f] for r in reps]


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


def excess_msd(pos: np.ndarray | Sequence[np.ndarray], times_ps: np.ndarray, mask: np.ndarray | Sequence[bool],
               plateau_ps: float = PLATEAU_PS) -> dict[str, float]:
    """MSD in excess of the vibrational plateau, measured from the trajectory itself.

    With the multi-origin MSD(lag) of the atoms in ``mask``: plateau = MSD at the first lag >=
    ``plateau_ps`` (at least one frame), end = MSD at the full length; excess = end - plateau (Å²)
    over ``tau_obs_ps`` = length - plateau lag. Returns plateau, end, excess (Å²), tau_obs_ps,
    plateau_lag_ps. Fewer than two usable lags give NaN excess and tau_obs_ps 0. ``pos``: one
    trajectory or its replicas (:func:`as_replicas`; the MSD is pooled over their atoms).
    """
    reps = as_replicas(pos)
    x = reps[0]
    m = _as_mask(mask, x.shape[1])
    t = np.asarray(times_ps, dtype=np.float64)[: x.shape[0]]
    nan = {"plateau": math.nan, "end": math.nan, "excess": math.nan, "tau_obs_ps": 0.0, "plateau_lag_ps": math.nan}
    if x.shape[0] < 3:
        return nan
    step = frame_step_ps(t)
    lags = msd_multi_origin(x, m)[0]
    msd = np.mean([msd_multi_origin(r, m)[1] for r in reps], axis=0)
    k = max(1, int(math.ceil(plateau_ps / step - 1e-9)))
    if k >= lags[-1]:
        return nan
    return {"plateau": float(msd[k]), "end": float(msd[-1]), "excess": float(msd[-1] - msd[k]),
            "tau_obs_ps": float((lags[-1] - k) * step), "plateau_lag_ps": float(k * step)}


def hop_length(positions: np.ndarray, cell: np.ndarray, numbers: np.ndarray, z: int, cutoff: float = 8.0) -> float:
    """Shortest distance (Å) between two atoms (or periodic images) of element ``z`` in a structure:
    the shortest site-to-site jump available to it (``cutoff`` if none is closer)."""
    from ..core.geometry import shortest_distance

    mask = np.asarray(numbers) == int(z)
    if not mask.any():
        return math.nan
    return shortest_distance(positions, cell, mask, cutoff=cutoff)


def diffusion_resolution(pos: np.ndarray | Sequence[np.ndarray], times_ps: np.ndarray,
                         mask: np.ndarray | Sequence[bool], hop_A: float, plateau_ps: float = PLATEAU_PS
                         ) -> dict[str, Any]:
    """Whether a trajectory (or its replicas, pooled) resolves diffusion of the atoms in ``mask``, and
    the bound if it does not.

    Rule: resolved when the MSD in excess of the vibrational plateau (:func:`excess_msd`) reaches
    one hop length squared, excess >= a², with a = ``hop_A`` (Å): on average one jump per atom. Then
    D* can be fitted. Otherwise the trajectory only bounds it: fewer than one hop-length² of excess
    MSD in tau_obs means D* < a² / (6 tau_obs) (the "hop" resolution bound, cm²/s).
    Returns resolved, excess (Å²), plateau (Å²), tau_obs_ps, hop_A, bound (cm²/s: the resolution
    floor a² / (6 tau_obs), also given when resolved), reason. Replicas pool their atoms: the excess
    is their mean, less noisy than one trajectory's, but the floor only falls with tau_obs.
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


def site_occupancy(pos: np.ndarray | Sequence[np.ndarray], cell: np.ndarray, mask: np.ndarray | Sequence[bool],
                   radius_A: float, first: float = 0.5) -> float:
    """Fraction of positions of the ``mask`` atoms, over the last ``1 - first`` of the frames, that lie
    within ``radius_A`` Å of one of their species' sites in frame 0 (periodic minimum image); pooled
    over replicas (:func:`as_replicas`), each judged against its own frame 0."""
    c = _as_cell(cell)
    inv = np.linalg.inv(c)
    hits, total = 0, 0
    for x in as_replicas(pos):
        m = _as_mask(mask, x.shape[1])
        sites = x[0, m]
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


def non_gaussian_parameter(pos: np.ndarray | Sequence[np.ndarray], times_ps: np.ndarray,
                           mask: np.ndarray | Sequence[bool], lag_ps: float = NON_GAUSSIAN_LAG_PS) -> float:
    """Non-Gaussian parameter α2 = 3⟨Δr⁴⟩ / (5⟨Δr²⟩²) − 1 of the ``mask`` atoms' displacements over
    the smallest lag >= ``lag_ps`` (ps), averaged over every time origin (Rahman 1964).

    0 for Gaussian displacements (harmonic vibration, continuous Brownian motion); clearly > 0 when
    atoms jump between sites and rest in between. NaN when the trajectory is shorter than the lag.
    Replicas (:func:`as_replicas`) pool their displacements.
    """
    reps = as_replicas(pos)
    m = _as_mask(mask, reps[0].shape[1])
    step = frame_step_ps(np.asarray(times_ps, dtype=np.float64)[: reps[0].shape[0]])
    k = max(1, int(math.ceil(lag_ps / step - 1e-6)))
    if k >= reps[0].shape[0] or not m.any():
        return math.nan
    r2 = np.concatenate([np.einsum("tak,tak->ta", x[k:, m] - x[:-k, m], x[k:, m] - x[:-k, m]) for x in reps])
    m2 = float(r2.mean())
    return 3.0 * float((r2 ** 2).mean()) / (5.0 * m2 ** 2) - 1.0 if m2 > 0 else math.nan


def framework_melt_ratio(pos: np.ndarray | Sequence[np.ndarray], times_ps: np.ndarray, numbers: np.ndarray,
                         cell: np.ndarray, frame_mask: np.ndarray | Sequence[bool], plateau_ps: float = PLATEAU_PS
                         ) -> float:
    """max over frame elements e of excess MSD_e / (FRAME_MELT_FRACTION · a_e)², with a_e the shortest
    e–e distance in frame 0 (Å). >= 1: on average the element's atoms have left their sites (halfway to
    the nearest equivalent site and beyond): the framework melted or collapsed. NaN if no frame atoms.
    Molecular anions (BH4⁻, AlH6³⁻, NH2⁻, ...: :func:`molecular_centres`) are judged by their centres,
    so that their rotation, which moves the ligand H by ~1 Å, is not read as melting. Replicas
    (:func:`as_replicas`) pool their atoms."""
    reps = as_replicas(pos)
    nums = np.asarray(numbers, dtype=int)
    fm = np.asarray(frame_mask, dtype=bool)
    reps, nums, fm = molecular_centres(reps, cell, nums, fm)
    x = reps[0]
    ratios = []
    for z in sorted(set(nums[fm].tolist())):
        m = fm & (nums == z)
        a = hop_length(x[0], cell, nums, z)
        e = excess_msd(reps, times_ps, m, plateau_ps)
        if math.isfinite(e["excess"]) and a > 0:
            ratios.append(e["excess"] / (FRAME_MELT_FRACTION * a) ** 2)
    return float(max(ratios)) if ratios else math.nan


#: Ligands of molecular anions: an atom of these elements bonded to a heavier non-Li atom (the centre)
#: moves with it as one rigid unit that rotates (BH4⁻, AlH4⁻, AlH6³⁻, NH2⁻, OH⁻).
MOLECULAR_LIGANDS = (1,)
#: A ligand is bonded to its centre when their distance is below this factor times the sum of the
#: covalent radii (ase.data.covalent_radii): B–H 1.19 Å vs 1.15 x 1.15 Å, Al–H 1.6 vs 1.74.
BOND_FACTOR = 1.3


def molecular_centres(reps: list[np.ndarray], cell: np.ndarray, numbers: np.ndarray, frame_mask: np.ndarray
                      ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Replace each molecular anion by its centre of mass: ligand atoms (:data:`MOLECULAR_LIGANDS`)
    within BOND_FACTOR x the covalent-radius sum of a heavier non-Li atom in frame 0 join that centre;
    the centre atom's trajectory becomes the unit's mass-weighted centre (unwrapped, with each ligand's
    frame-0 minimum-image offset) and the ligands leave the framework mask. Returns (replicas, numbers,
    frame mask); unchanged when there are no such ligands. Units: Å."""
    from ase.data import atomic_masses, covalent_radii

    from ..core.constants import LI_Z

    nums = np.asarray(numbers, dtype=int)
    fm = np.asarray(frame_mask, dtype=bool).copy()
    lig = np.flatnonzero(fm & np.isin(nums, MOLECULAR_LIGANDS))
    heavy = np.flatnonzero(fm & ~np.isin(nums, MOLECULAR_LIGANDS) & (nums != LI_Z))
    if lig.size == 0 or heavy.size == 0:
        return reps, nums, fm
    c = _as_cell(cell)
    inv = np.linalg.inv(c)
    x0 = reps[0][0]
    d = x0[lig][:, None, :] - x0[heavy][None, :, :]
    f = d @ inv
    d = (f - np.round(f)) @ c                                    # (ligands, heavy, 3) minimum image
    dist = np.linalg.norm(d, axis=-1)
    cut = BOND_FACTOR * (covalent_radii[nums[lig]][:, None] + covalent_radii[nums[heavy]][None, :])
    near = np.where(dist < cut, dist, np.inf)
    best = np.argmin(near, axis=1)
    bonded = np.isfinite(near[np.arange(lig.size), best])
    if not bonded.any():
        return reps, nums, fm
    out = []
    for x in reps:
        y = x.copy()
        for hc in np.unique(best[bonded]):
            centre = heavy[hc]
            members = np.flatnonzero(bonded & (best == hc))
            m_c = atomic_masses[nums[centre]]
            m_l = atomic_masses[nums[lig[members]]]
            # ligand j: the centre's frame-0 position + its frame-0 minimum-image offset + its own
            # (unwrapped) motion since frame 0, whatever periodic image its coordinates started in
            pos_l = x[:1, [centre]] + d[members, hc][None] + (x[:, lig[members]] - x[:1, lig[members]])
            y[:, centre] = (m_c * x[:, centre] + np.einsum("j,tjk->tk", m_l, pos_l)) / (m_c + m_l.sum())
        out.append(y)
    fm[lig[bonded]] = False
    return out, nums, fm


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
