"""One trajectory's analysis row (no file I/O): MSDs (Eq. 12, Å²), hop length and vibrational
plateau, resolved-or-bound Li diffusivity (kinisi, cm²/s), sanity flags and the RDF (Eq. 14).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import analysis as an
from ..core.errors import InputError
from ..core.settings import AnalysisSettings
from .tables import CURVE_POINTS


#: Replica medians that scatter more than their intervals allow (χ² of ln D* about their weighted
#: mean, p below this) widen the pooled interval by the Birge ratio sqrt(χ²/dof).
REPLICA_SCATTER_P = 0.01


def replica_scatter(D: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[float, float]:
    """(p, Birge ratio) of resolved replica D* medians (cm²/s) against their 95 % intervals: χ² of
    ln D about the inverse-variance weighted mean with σ = (ln hi − ln lo)/(2·1.96), dof = n − 1.
    (NaN, 1) with fewer than two resolved replicas."""
    from scipy import stats

    ok = np.isfinite(D) & np.isfinite(lo) & np.isfinite(hi) & (lo > 0) & (hi > lo)
    if ok.sum() < 2:
        return math.nan, 1.0
    y = np.log(D[ok])
    sig = (np.log(hi[ok]) - np.log(lo[ok])) / (2 * 1.959964)
    w = 1 / sig**2
    chi2 = float(np.sum(w * (y - np.sum(w * y) / np.sum(w)) ** 2))
    dof = int(ok.sum()) - 1
    return float(stats.chi2.sf(chi2, dof)), math.sqrt(max(chi2 / dof, 1.0))


def li_resolution(reps: list[np.ndarray], times_ps: np.ndarray, numbers: np.ndarray, cell: np.ndarray,
                  hop: float | None = None) -> tuple[dict[str, Any], list[np.ndarray], float]:
    """Whether the replicas of one (structure, T) jointly resolve Li diffusion
    (:func:`analysis.diffusion_resolution` on positions relative to the framework, hop length a from
    frame 0 unless given, Å). Returns (the resolution dict, the drift-removed replicas, a in Å). The
    rollout stage's extension rounds and the analysis use this one test."""
    nums = np.asarray(numbers, dtype=int)
    li = an.species_mask(nums, "Li")
    c = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    hop = an.hop_length(reps[0][0], c, nums, 3) if hop is None else hop
    xf = [an.remove_framework_drift(r, ~li) for r in reps]
    return an.diffusion_resolution(xf, times_ps, li, hop), xf, hop


def analyze_trajectory(
    pos: np.ndarray | list[np.ndarray],
    times_ps: np.ndarray,
    numbers: np.ndarray,
    cell: np.ndarray,
    analysis: AnalysisSettings,
    diffusion: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Analysis of one trajectory, or of the replicas of one (structure, T) jointly (frame 0 = the
    relaxed structure): final MSDs (Å²), MSD curves, whether Li diffusion is resolved, kinisi D* of
    Li (cm²/s) or an upper bound, sanity flags, RDF.

    Replicas (``pos`` a list of (F, n, 3) trajectories from the same start, cut to the shortest) are
    pooled as extra particles for every test and for D* (kinisi, ``dtype='identical'``); each
    replica's own D* (or bound) is kept in ``replica_D*`` / ``replica_D_bound``. Where the resolved
    replicas' medians scatter more than their intervals allow (:func:`replica_scatter`, p <
    REPLICA_SCATTER_P) the pooled interval is widened by the Birge ratio, and ``D_note`` says so.

    * Li diffusion is *resolved* when the Li MSD in excess of its vibrational plateau reaches one hop
      length squared (a = shortest Li–Li distance of frame 0; :func:`analysis.diffusion_resolution`).
      Only then is kinisi run; otherwise D_li_bound = a²/(6 τ_obs) (method "bound:hop").
    * li_molten: fewer than half of the Li positions (second half of the trajectory) within a/3 of an
      initial Li site (:func:`analysis.site_occupancy`) AND continuous Li motion: non-Gaussian
      parameter α2 at ~1 ps below ``analysis.CONTINUOUS_ALPHA2`` (:func:`analysis.non_gaussian_parameter`).
      Off-site Li that move by jumps are a superionic crystal's Li hopping into sites empty in
      frame 0 (LGPS), not a liquid.
    * frame_melted: some frame element's excess MSD reached (a_e/2)², a_e its shortest same-element
      distance (:func:`analysis.framework_melt_ratio`): the framework melted or came apart.
    These three tests see positions relative to the framework (:func:`analysis.remove_framework_drift`):
    a framework that only drifts as a whole (its centre recoiling from diffusing Li) is intact.

    ``analysis``: the ``analysis`` settings (kinisi_n_dt, kinisi_samples, rdf_rmax Å, rdf_bins,
    rdf_discard).
    """
    nums = np.asarray(numbers, dtype=int)
    shapes = [np.shape(p) for p in ([pos] if isinstance(pos, np.ndarray) and np.ndim(pos) == 3 else pos)]
    if any(len(sh) != 3 or sh[1] != nums.size for sh in shapes):
        raise InputError(f"trajectory has {shapes[0][1] if len(shapes[0]) == 3 else '?'} atoms, "
                         f"structure has {nums.size}")
    reps = an.as_replicas(pos)
    x = reps[0]
    n_frames = x.shape[0]
    t = np.asarray(times_ps, dtype=np.float64)[:n_frames]
    li = an.species_mask(nums, "Li")
    if not li.any():
        raise InputError("structure contains no Li atoms")
    frame = ~li
    c = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    msd_li_curve = np.mean([an.msd_single_origin(r, li) for r in reps], axis=0)
    msd_fr_curve = (np.mean([an.msd_single_origin(r, frame) for r in reps], axis=0) if frame.any()
                    else np.full(n_frames, np.nan))
    idx = np.unique(np.linspace(0, n_frames - 1, min(CURVE_POINTS, n_frames)).round().astype(int))
    hop = an.hop_length(x[0], c, nums, 3)
    row: dict[str, Any] = {
        "n_frames": int(n_frames),
        "duration_ps": float(t[-1] - t[0]) if n_frames > 1 else 0.0,
        "msd_li": float(msd_li_curve[-1]),
        "msd_frame": float(msd_fr_curve[-1]),
        "msd_t_ps": (t[idx] - t[0]).tolist(),
        "msd_li_curve": msd_li_curve[idx].tolist(),
        "msd_frame_curve": msd_fr_curve[idx].tolist(),
        "li_hop_A": hop, "li_msd_plateau": math.nan, "li_msd_excess": math.nan, "li_tau_obs_ps": 0.0,
        "li_resolved": False,
        "D_li": math.nan, "D_li_low": math.nan, "D_li_high": math.nan, "D_li_bound": math.nan,
        "D_method": "skipped", "D_note": "",
        "li_site_occupancy": math.nan, "li_alpha2": math.nan, "li_molten": False, "frame_melt_ratio": math.nan, "frame_melted": False,
        "n_replicas": len(reps), "D_li_floor": math.nan, "replica_D": [], "replica_D_low": [], "replica_D_high": [],
        "replica_D_bound": [], "D_scatter_p": math.nan,
    }
    if n_frames >= 3:
        # resolution, site and melting tests relative to the framework (as kinisi's D*), per replica
        res, xf, _ = li_resolution(reps, t, nums, c, hop)
        row.update({"li_msd_plateau": res["plateau"], "li_msd_excess": res["excess"],
                    "li_tau_obs_ps": res["tau_obs_ps"], "li_resolved": bool(res["resolved"]),
                    "D_li_floor": res["bound"]})
        occ = an.site_occupancy(xf, c, li, an.SITE_RADIUS_FRACTION * hop)
        a2 = an.non_gaussian_parameter(xf, t, li)
        continuous = not (math.isfinite(a2) and a2 >= an.CONTINUOUS_ALPHA2)
        row.update({"li_site_occupancy": occ, "li_alpha2": a2,
                    "li_molten": bool(occ < an.MOLTEN_OCCUPANCY and continuous)})
        if frame.any():
            ratio = an.framework_melt_ratio(xf, t, nums, c, frame)
            row.update({"frame_melt_ratio": ratio, "frame_melted": bool(np.isfinite(ratio) and ratio >= 1.0)})
    if diffusion and n_frames < 4:
        row["D_method"] = "insufficient_frames"
    elif diffusion and not row["li_resolved"]:
        row.update({"D_method": "bound:hop", "D_li_bound": res["bound"], "D_note": res["reason"]})
    elif diffusion:
        kin = an.kinisi_diffusion(reps, t, nums, c, species="Li", n_dt=analysis.kinisi_n_dt,
                                  n_samples=analysis.kinisi_samples, seed=seed)
        if kin["constrained"]:
            row.update({"D_li": kin["D"], "D_li_low": kin["D_low"], "D_li_high": kin["D_high"], "D_method": "kinisi"})
        elif math.isfinite(kin["D_high"]):
            row.update({"D_method": "bound:kinisi", "D_li_bound": kin["D_high"], "D_note": kin["note"]})
        else:
            row.update({"D_method": "failed", "D_note": kin["note"]})
    if diffusion and n_frames >= 4 and len(reps) > 1:
        _replica_diffusion(row, reps, xf, t, nums, c, li, hop, analysis, seed)
    gs = [an.rdf(r, nums, c, r_max=analysis.rdf_rmax, n_bins=analysis.rdf_bins, discard=analysis.rdf_discard)[1]
          for r in reps]
    g = np.mean(gs, axis=0)
    row["rdf"] = g.tolist()
    row["rdf_r_max"] = analysis.rdf_rmax
    return row


def _replica_diffusion(row: dict[str, Any], reps: list[np.ndarray], xf: list[np.ndarray], t: np.ndarray,
                       nums: np.ndarray, c: np.ndarray, li: np.ndarray, hop: float, analysis: AnalysisSettings,
                       seed: int) -> None:
    """Each replica's own D* (kinisi, where it alone resolves diffusion) or hop bound, cm²/s, into
    ``row``; the scatter test of the resolved medians, widening the pooled interval if they scatter."""
    D, lo, hi, bound = [], [], [], []
    for r, rf in zip(reps, xf):
        res = an.diffusion_resolution(rf, t, li, hop)
        d = l_ = h = b = math.nan
        if res["resolved"]:
            kin = an.kinisi_diffusion(r, t, nums, c, species="Li", n_dt=analysis.kinisi_n_dt,
                                      n_samples=analysis.kinisi_samples, seed=seed)
            if kin["constrained"]:
                d, l_, h = kin["D"], kin["D_low"], kin["D_high"]
            else:
                b = kin["D_high"]
        else:
            b = res["bound"]
        D.append(d), lo.append(l_), hi.append(h), bound.append(b)
    row.update({"replica_D": D, "replica_D_low": lo, "replica_D_high": hi, "replica_D_bound": bound})
    p, birge = replica_scatter(np.asarray(D), np.asarray(lo), np.asarray(hi))
    row["D_scatter_p"] = p
    if row["D_method"] == "kinisi" and math.isfinite(p) and p < REPLICA_SCATTER_P:
        d0 = row["D_li"]
        row["D_li_low"] = d0 * (row["D_li_low"] / d0) ** birge
        row["D_li_high"] = d0 * (row["D_li_high"] / d0) ** birge
        row["D_note"] = (f"replica D* scatter beyond their intervals (p = {p:.1e}): pooled interval widened "
                         f"x{birge:.2f} in ln D")
