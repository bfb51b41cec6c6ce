"""Stage ``rollout``: batched LiFlow rollouts (Algorithm 1) of one chunk of structures at every
rollout temperature, with the prior class of each (selector, pilot or fixed) recorded.

Units: Å, ps, K. Every output is written atomically with provenance.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..io import layout, schema
from ..core import seeds
from ..core.errors import InputError, SchemaError
from ..io.files import provenance
from ..core.settings import Settings
from ..flow.batching import rolled_out_structures, rollout_batches
from ..flow.selection import choose_prior_classes

log = logging.getLogger(__name__)


def rollout_chunk_rows(manifest: pd.DataFrame, chunk: int, chunk_size: int) -> pd.DataFrame:
    """Manifest rows of rollout chunk ``chunk`` (blocks of ``chunk_size`` in manifest order)."""
    sub = manifest.iloc[chunk * chunk_size:(chunk + 1) * chunk_size]
    if sub.empty:
        raise InputError(f"rollout chunk {chunk} is empty (manifest has {len(manifest)} rows, chunk size {chunk_size})")
    return sub


def run(settings: Settings, manifest_path: str | Path, structures_path: str | Path, selector: str | Path | None,
        propagator: str | Path, corrector: str | Path | None, variant: str, chunk: int,
        out_dir: str | Path, labels_path: str | Path | None = None) -> dict[str, int]:
    """LiFlow rollouts (Algorithm 1) for every structure of a chunk at every rollout temperature.

    (structure, T) pairs are packed by size into batched graphs of at most ``rollout.batch_atoms``
    atoms (and ``rollout.batch_structures`` pairs, if set). Starts
    from the relaxed supercell (repeated ``rollout.supercell`` times); works without reference MD.
    Structures whose relaxation failed, or holding an element outside the model's element table,
    get a status row naming the reason. Frames stream to frames_T<K>.parquet per temperature as
    they are made (memory does not grow with the number of steps); also writes status.parquet
    (schema.FRAMES / STATUS), priors.parquet (schema.PRIORS: the prior class of each rollout and
    how it was chosen) and structures.parquet (the cells rolled out, for the analysis).
    ``labels_path``: the dataset's labels (rollout.prior_selection: labels).
    """
    from ..flow.training import load_flow
    from ..flow.engine import frame_rows, rollout_status_rows
    from ..core.runtime import resolve_device

    rc = settings.rollout
    device = resolve_device(rc.device, key="rollout.device")
    manifest = schema.read_df(manifest_path, "manifest")
    rows = rollout_chunk_rows(manifest, chunk, rc.chunk_size)
    structs = schema.read_df(structures_path, "structures").set_index("id")
    temps = list(settings.rollout_temperatures)
    prop = load_flow(propagator, device)
    corr = load_flow(corrector, device) if corrector else None
    dt_ps = float(prop.liflow_meta.get("delta_tau_ps") or settings.dataset.delta_tau_ps)
    source = f"liflow:{variant}"
    status_rows: list[dict[str, Any]] = []
    jobs: list[tuple[str, float, str]] = []

    def skip(sid: str, split: str, status: str, reason: str) -> None:
        status_rows.extend(schema.status_row(sid, T, split, source, status, reason) for T in temps)

    for r in rows.itertuples():
        if r.id not in structs.index:
            raise SchemaError(f"structure {r.id} of the manifest is missing from {structures_path}")
        st = structs.loc[r.id]
        if str(st["relax_status"]).startswith("failed"):
            skip(r.id, r.split, "relax_failed", str(st["relax_status"]))
            continue
        missing = sorted(set(prop.unsupported_elements(st["numbers"]))
                         | set(corr.unsupported_elements(st["numbers"]) if corr is not None else []))
        if missing:
            skip(r.id, r.split, "unsupported_element",
                 f"element{'s' if len(missing) > 1 else ''} {', '.join(missing)} not in the element table of "
                 f"{Path(propagator).name}{' / ' + Path(corrector).name if corrector else ''}")
            continue
        if str(st["relax_status"]).startswith("skipped"):  # never relaxed: not a starting point
            skip(r.id, r.split, "relax_skipped", str(st["relax_status"]))
            continue
        jobs += [(r.id, T, r.split) for T in temps]
    labels = schema.read_df(labels_path, "labels") if labels_path else None
    cells = rolled_out_structures(structs, sorted({j[0] for j in jobs}), rc.supercell)
    # the prior class is a property of the material: chosen on the relaxed cell, not the supercell
    priors = choose_prior_classes(settings, rc.prior_selection, prop, corr, structs, jobs, selector, device,
                                  source, labels)
    classes = {(p.id, int(p.temperature)): (bool(p.li_slow), bool(p.frame_slow)) for p in priors.itertuples()}
    prov = provenance(settings, stage="rollout", variant=variant, chunk=int(chunk),
                      propagator=str(propagator), corrector=str(corrector) if corrector else None)
    out = Path(out_dir)
    writers = {int(round(T)): schema.StreamingWriter(layout.frames_file(out, T), "frames", prov=prov) for T in temps}

    def write_frame(batch: list[tuple[str, float, str]], ptr: list[int], frame: int, x: np.ndarray,
                    good: np.ndarray) -> None:
        ids, ts = [j[0] for j in batch], [j[1] for j in batch]
        for row in frame_rows(frame, x, ptr, [k for k in range(len(batch)) if good[k]], ids, ts, source, dt_ps):
            writers[row.pop("temperature")].write([row])

    done = 0
    try:
        batches = rollout_batches(settings, prop, corr, cells, jobs, classes, rc.n_steps, seeds.ROLLOUT, device,
                                  on_frame=write_frame)
        for batch, res, wall in batches:
            ids, ts = [j[0] for j in batch], [j[1] for j in batch]
            status_rows += rollout_status_rows(res, ids, ts, source, dt_ps, split=[j[2] for j in batch], wall_s=wall)
            done += len(batch)
            log.info("rollout %s chunk %d: %d/%d pairs done (%.1f s for %d)", variant, chunk, done, len(jobs), wall,
                     len(batch))
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for w in writers.values():
        w.close()
    schema.write_rows(status_rows, out / layout.STATUS, "status", prov=prov)
    schema.write_rows(priors, out / layout.PRIORS, "priors", prov=prov)
    schema.write_rows(cells.reset_index(), out / layout.STRUCTURES, "structures", prov=prov)
    n_div = sum(r["status"] == "diverged" for r in status_rows)
    return {"pairs": len(jobs), "diverged": n_div}


