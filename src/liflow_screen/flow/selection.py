"""Prior-selector inference: P(slow) of the Li and frame groups of (structure, T) pairs from the
relaxed structures' descriptors, and the adaptive-prior classes they imply.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..core.errors import SchemaError

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
