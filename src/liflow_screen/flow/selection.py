"""The adaptive prior's class of each (structure, T): prior-selector inference (P(slow) of the Li
and frame groups from the relaxed structures' descriptors) and the strategies of
``rollout.prior_selection`` (selector, pilot rollouts, dataset labels, fixed) in
:func:`choose_prior_classes`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core import seeds
from ..core.constants import LI_Z
from ..core.errors import InputError, SchemaError
from ..core.settings import Settings
from ..io import schema
from .batching import rollout_batches

log = logging.getLogger(__name__)

GROUPS = ("li", "frame")


#: P(slow) within this distance of 0.5 flags a (structure, T) as classifier-uncertain.
UNCERTAIN_BAND = 0.15


def desc_matrix(structs: pd.DataFrame, ids: list[str], col: str) -> np.ndarray:
    """(M, F) descriptors for ``ids``; rows of structures without descriptors (or empty group) are NaN."""
    lens = {len(v) for v in structs[col] if v is not None and len(v)}
    if not lens:
        raise SchemaError(f"no structure has {col} descriptors")
    if len(lens) > 1:
        raise SchemaError(f"{col} descriptors have different lengths {sorted(lens)}")
    width = lens.pop()
    out = np.full((len(ids), width), np.nan, dtype=np.float64)
    for k, sid in enumerate(ids):
        v = structs.at[sid, col]
        if v is not None and len(v) == width:
            out[k] = np.asarray(v, dtype=np.float64)
    return out


def selector_inputs(structs: pd.DataFrame, ids: list[str]) -> dict[str, np.ndarray]:
    return {"li": desc_matrix(structs, ids, "desc_li"), "frame": desc_matrix(structs, ids, "desc_frame")}


def selector_predictions(selector_path: str | Path, structs: pd.DataFrame, pairs: list[tuple[str, float]]) -> pd.DataFrame:
    """Predictions for (id, T) pairs: columns id, temperature, p_slow_li, p_slow_frame, li_slow,
    frame_slow, uncertain (P(slow) of either group within UNCERTAIN_BAND of 0.5)."""
    from .classifier import PriorSelector

    sel = PriorSelector.load(selector_path)
    ids = [p[0] for p in pairs]
    temps = np.array([p[1] for p in pairs], dtype=np.float64)
    st = structs if structs.index.name == "id" else structs.set_index("id")
    x = selector_inputs(st, ids)
    out = pd.DataFrame({"id": ids, "temperature": [int(round(t)) for t in temps]})
    for g in GROUPS:
        out[f"p_slow_{g}"] = sel.predict_proba(g, x[g], temps)
        out[f"{g}_slow"] = sel.predict_slow(g, x[g], temps)
    unc = np.zeros(len(out), bool)
    for g in GROUPS:
        p = out[f"p_slow_{g}"].to_numpy()
        unc |= np.isfinite(p) & (np.abs(p - 0.5) < UNCERTAIN_BAND)
    out["uncertain"] = unc
    return out


def slow_map(preds: pd.DataFrame) -> dict[tuple[str, int], tuple[bool, bool]]:
    return {(r.id, int(r.temperature)): (bool(r.li_slow), bool(r.frame_slow)) for r in preds.itertuples()}


# --------------------------------------------------------------------------- prior-class strategies
#: Pilot rates within this factor of the threshold flag the class choice as uncertain.
PILOT_UNCERTAIN_FACTOR = 2.0


def choose_prior_classes(settings: Settings, method: str, prop: Any, corr: Any, structs: pd.DataFrame,
                         jobs: list[tuple[str, float, str]], selector: str | Path | None, device: Any,
                         source: str, labels: pd.DataFrame | None = None) -> pd.DataFrame:
    """The adaptive-prior class (li_slow, frame_slow) of every job, as schema.PRIORS rows.

    * ``selector``: the prior-selector classifier trained on this run's MD (P(slow) >= 0.5);
    * ``pilot``: a ``rollout.pilot_steps``-step rollout with the LARGE Li prior (and the small frame
      prior); Li is classified by the same rule as the MD labels: slow if its mobility rate (slope
      of the multi-origin MSD over the later half, Å²/ps) < ``dataset.slow_threshold``, and fast at
      every temperature above one where it is fast (:func:`monotone_in_temperature`: mobility does
      not fall with T; one 6-ps pilot is noisy, and a wrong "slow" there freezes every replica). The frame
      gets the small prior: a pilot with the large frame prior is self-fulfilling (the flow turns a
      wide prior into wide displacements: LiCl's frame "diffused" at 600 K), and a melting frame is
      a sanity flag of its own, not something to screen with;
    * ``labels``: the dataset's own MSD label of the structure (``labels``, schema.LABELS) at the
      nearest labelled temperature (single-material models, paper Appendix D.4);
    * ``fast`` / ``slow``: that class for every group.
    A non-adaptive Propagator prior has no classes (method "none").
    """
    from ..analysis import mobility_rate

    rows = []
    key = [(sid, int(round(T))) for sid, T, _ in jobs]
    base = {"source": source, "p_slow_li": np.nan, "p_slow_frame": np.nan, "pilot_rate_li": np.nan,
            "pilot_rate_frame": np.nan, "uncertain": False}
    if prop.liflow_meta["prior"]["kind"] != "adaptive":
        method = "none"
    if method in ("none", "fast", "slow"):
        slow = method != "fast"
        return pd.DataFrame([{**base, "id": sid, "temperature": T, "method": method, "li_slow": slow,
                              "frame_slow": slow} for sid, T in key], columns=[f.name for f in schema.PRIORS])
    if method == "selector":
        if selector is None:
            raise InputError("rollout.prior_selection is 'selector' but no prior selector was given (--selector)")
        preds = selector_predictions(selector, structs.reset_index(), [(j[0], j[1]) for j in jobs])
        for (sid, T), p in zip(key, preds.itertuples(index=False)):
            rows.append({**base, "id": sid, "temperature": T, "method": "selector", "li_slow": bool(p.li_slow),
                         "frame_slow": bool(p.frame_slow), "p_slow_li": p.p_slow_li, "p_slow_frame": p.p_slow_frame,
                         "uncertain": bool(p.uncertain)})
        return pd.DataFrame(rows, columns=[f.name for f in schema.PRIORS])
    if method == "labels":
        if labels is None or labels.empty:
            raise InputError("rollout.prior_selection is 'labels' but no dataset labels were given (--labels)")
        for sid, T in key:
            mine = labels[labels["id"] == sid]
            if mine.empty:
                raise InputError(f"rollout.prior_selection 'labels': structure {sid} has no labelled trajectory")
            lab = mine.iloc[int(np.argmin(np.abs(mine["temperature"].to_numpy(float) - T)))]
            rows.append({**base, "id": sid, "temperature": T, "method": f"labels@{int(lab['temperature'])}K",
                         "li_slow": bool(lab["slow_li"]), "frame_slow": bool(lab["slow_frame"])})
        return pd.DataFrame(rows, columns=[f.name for f in schema.PRIORS])
    if method != "pilot":
        raise InputError(f"unknown rollout.prior_selection {method!r}")
    thr = settings.dataset.slow_threshold
    n_pilot = settings.rollout.pilot_steps
    large = {k: (False, True) for k in key}
    dt_ps = float(prop.liflow_meta.get("delta_tau_ps") or settings.dataset.delta_tau_ps)
    for batch, res, wall in rollout_batches(settings, prop, corr, structs, jobs, large, n_pilot, seeds.PILOT, device):
        for k, (sid, T, _) in enumerate(batch):
            traj = res.trajectory(k).astype(np.float64)
            li = np.asarray(structs.loc[sid]["numbers"]) == LI_Z
            times = np.arange(traj.shape[0]) * dt_ps
            # a pilot that diverged before 2 steps cannot be classified: keep the large prior
            r_li = mobility_rate(traj, times, li) if traj.shape[0] > 2 else np.nan
            r_fr = mobility_rate(traj, times, ~li) if traj.shape[0] > 2 and (~li).any() else np.nan
            unc = bool(res.diverged[k]) or bool(np.isfinite(r_li) and thr / PILOT_UNCERTAIN_FACTOR <= r_li
                                                 <= thr * PILOT_UNCERTAIN_FACTOR)
            rows.append({**base, "id": sid, "temperature": int(round(T)), "method": "pilot",
                         "li_slow": bool(np.isfinite(r_li) and r_li < thr), "frame_slow": True,
                         "pilot_rate_li": r_li, "pilot_rate_frame": r_fr, "uncertain": unc})
        log.info("pilot rollouts: %d pairs (%.1f s)", len(batch), wall)
    return monotone_in_temperature(pd.DataFrame(rows, columns=[f.name for f in schema.PRIORS]))


def monotone_in_temperature(priors: pd.DataFrame) -> pd.DataFrame:
    """Pilot classes made monotone in T per structure: Li found fast (``li_slow`` False) at some
    temperature is fast at every higher one; a class raised so gets method "pilot:monotone" and is
    flagged ``uncertain`` (its own pilot said slow)."""
    out = priors.copy()
    for sid, g in out.groupby("id"):
        fast_from = g.loc[~g["li_slow"].astype(bool), "temperature"]
        if fast_from.empty:
            continue
        raise_ = g.index[(g["temperature"] > fast_from.min()) & g["li_slow"].astype(bool)]
        if len(raise_):
            out.loc[raise_, "li_slow"] = False
            out.loc[raise_, "method"] = "pilot:monotone"
            out.loc[raise_, "uncertain"] = True
            log.info("pilot: %s fast at %d K, so fast at %s K too", sid, int(fast_from.min()),
                     ", ".join(str(int(t)) for t in out.loc[raise_, "temperature"]))
    return out
