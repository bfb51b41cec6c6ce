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


def analyze_trajectory(
    pos: np.ndarray,
    times_ps: np.ndarray,
    numbers: np.ndarray,
    cell: np.ndarray,
    analysis: AnalysisSettings,
    diffusion: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Analysis of one trajectory (frame 0 = the relaxed structure): final MSDs (Å²), MSD curves,
    whether Li diffusion is resolved, kinisi D* of Li (cm²/s) or an upper bound, sanity flags, RDF.

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
    x = np.asarray(pos, dtype=np.float64)
    t = np.asarray(times_ps, dtype=np.float64)
    nums = np.asarray(numbers, dtype=int)
    if x.ndim != 3 or x.shape[1] != nums.size:
        raise InputError(f"trajectory has {x.shape[1] if x.ndim == 3 else '?'} atoms, structure has {nums.size}")
    li = an.species_mask(nums, "Li")
    if not li.any():
        raise InputError("structure contains no Li atoms")
    frame = ~li
    n_frames = x.shape[0]
    c = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    msd_li_curve = an.msd_single_origin(x, li)
    msd_fr_curve = an.msd_single_origin(x, frame) if frame.any() else np.full(n_frames, np.nan)
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
    }
    if n_frames >= 3:
        # resolution, site and melting tests relative to the framework (as kinisi's D*)
        xf = an.remove_framework_drift(x, frame)
        res = an.diffusion_resolution(xf, t, li, hop)
        row.update({"li_msd_plateau": res["plateau"], "li_msd_excess": res["excess"],
                    "li_tau_obs_ps": res["tau_obs_ps"], "li_resolved": bool(res["resolved"])})
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
        kin = an.kinisi_diffusion(x, t, nums, c, species="Li", n_dt=analysis.kinisi_n_dt,
                                  n_samples=analysis.kinisi_samples, seed=seed)
        if kin["constrained"]:
            row.update({"D_li": kin["D"], "D_li_low": kin["D_low"], "D_li_high": kin["D_high"], "D_method": "kinisi"})
        elif math.isfinite(kin["D_high"]):
            row.update({"D_method": "bound:kinisi", "D_li_bound": kin["D_high"], "D_note": kin["note"]})
        else:
            row.update({"D_method": "failed", "D_note": kin["note"]})
    _, g = an.rdf(x, nums, c, r_max=analysis.rdf_rmax, n_bins=analysis.rdf_bins,
                  discard=analysis.rdf_discard)
    row["rdf"] = g.tolist()
    row["rdf_r_max"] = analysis.rdf_rmax
    return row
