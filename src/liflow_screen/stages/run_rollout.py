"""Stage ``rollout``: batched LiFlow rollouts (Algorithm 1) of one chunk of structures at every
rollout temperature, with the prior class of each (selector, pilot or fixed) recorded.

Units: Å, ps, K. Every output is written atomically with provenance.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..io import layout, schema
from ..core import seeds
from ..core.errors import InputError, SchemaError
from ..io.files import provenance
from ..core.settings import Settings
from ..flow.batching import replica_of, rolled_out_structures, rollout_batches
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

    Every (structure, T) pair has ``rollout.replicas`` independent trajectories (replica r from
    ``seeds.replica_stream(r)``); all are packed by size into batched graphs of at most
    ``rollout.batch_atoms`` atoms (and ``rollout.batch_structures`` trajectories, if set). Starts
    from the relaxed supercell (repeated ``rollout.supercell`` times); works without reference MD.
    Pairs still unresolved after ``rollout.n_steps`` continue while ``rollout.max_steps`` and the
    budget allow (:func:`extend_unresolved`). Structures whose relaxation failed, or holding an
    element outside the model's element table, get a status row naming the reason. Frames stream to
    frames_T<K>.parquet per temperature as they are made (without extension rounds memory does not
    grow with the number of steps; with them every frame is also kept for the resolution test,
    ~12 bytes per atom and frame); also writes status.parquet
    (schema.FRAMES / STATUS), priors.parquet (schema.PRIORS: the prior class of each rollout and
    how it was chosen) and structures.parquet (the cells rolled out, for the analysis).
    ``labels_path``: the dataset's labels (rollout.prior_selection: labels).
    """
    from ..flow.training import load_flow
    from ..flow.engine import frame_rows
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
    extend = rc.max_total_steps > rc.n_steps
    kept: dict[tuple, list[np.ndarray]] = {}  # frames of every replica, for the extension rounds' test

    def write_frame(batch: list[tuple], ptr: list[int], frame: int, x: np.ndarray, good: np.ndarray) -> None:
        ids, ts = [j[0] for j in batch], [j[1] for j in batch]
        live = [k for k in range(len(batch)) if good[k]]
        for row in frame_rows(frame, x, ptr, live, ids, ts, source, dt_ps, replicas=[replica_of(j) for j in batch]):
            writers[row.pop("temperature")].write([row])
        if extend:
            for k in live:
                kept.setdefault(batch[k], []).append(np.array(x[ptr[k]:ptr[k + 1]], dtype=np.float32))

    state: dict[tuple, dict[str, Any]] = {}
    rjobs = [(sid, T, split, r) for sid, T, split in jobs for r in range(rc.replicas)]

    def run_round(round_jobs: list[tuple], n: int, start_step: int = 0) -> None:
        start = {j: state[j]["last"] for j in round_jobs} if start_step else None
        for batch, res, wall in rollout_batches(settings, prop, corr, cells, round_jobs, classes, n, seeds.ROLLOUT,
                                                device, on_frame=write_frame, start=start, start_step=start_step):
            ptr = res.ptr.tolist()
            for k, j in enumerate(batch):
                st = state.setdefault(j, {"steps": 0, "wall": 0.0, "diverged": False, "reason": ""})
                st["steps"] += int(res.n_ok_steps[k])
                st["wall"] += wall / len(batch)
                st["last"] = res.positions[-1, ptr[k]:ptr[k + 1]].numpy().copy()
                if bool(res.diverged[k]):
                    st["diverged"], st["reason"] = True, res.reason[k]
            log.info("rollout %s chunk %d: %d (structure, T, replica) trajectories of %d steps from step %d "
                     "(%.1f s for %d)", variant, chunk, len(batch), n, start_step, wall, len(batch))

    try:
        run_round(rjobs, rc.n_steps)
        if extend:
            extend_unresolved(settings, jobs, state, kept, cells, dt_ps, run_round,
                              share=len(rows) / max(len(manifest), 1))
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for w in writers.values():
        w.close()
    for j in rjobs:
        st = state[j]
        status_rows.append(schema.status_row(j[0], j[1], j[2], source, "diverged" if st["diverged"] else "ok",
                                             st["reason"], st["steps"] + 1, st["steps"] * dt_ps, st["wall"],
                                             replica=j[3]))
    schema.write_rows(status_rows, out / layout.STATUS, "status", prov=prov)
    schema.write_rows(priors, out / layout.PRIORS, "priors", prov=prov)
    schema.write_rows(cells.reset_index(), out / layout.STRUCTURES, "structures", prov=prov)
    n_div = sum(r["status"] == "diverged" for r in status_rows)
    return {"pairs": len(jobs), "trajectories": len(rjobs), "diverged": n_div}


def extend_unresolved(settings: Settings, jobs: list[tuple[str, float, str]], state: dict[tuple, dict[str, Any]],
                      kept: dict[tuple, list[np.ndarray]], cells: pd.DataFrame, dt_ps: float, run_round: Any,
                      share: float) -> dict[str, float]:
    """Extension rounds: every (structure, T) whose replicas jointly still do not resolve Li diffusion
    (``report.trajectory.li_resolution``, the analysis' own test) and none of which diverged continues
    from its last frame for ``rollout.extend_steps`` more Δτ steps (same trajectory, same seed stream),
    hottest temperature first, until it is resolved, reaches ``rollout.max_steps`` or this chunk's
    ``share`` of ``rollout.extend_budget_ps`` (structure-ps, every replica counting) is spent.
    ``run_round(jobs, n_steps, start_step)`` runs one round. Returns spent / budget, structure-ps."""
    from ..report.trajectory import li_resolution

    rc = settings.rollout
    budget = math.inf if rc.extend_budget_ps is None else float(rc.extend_budget_ps) * share
    round_steps = rc.extend_steps or rc.n_steps
    spent, n_round = 0.0, 0
    resolved: dict[tuple[str, float], bool] = {}
    while True:
        cands = []
        for sid, T, split in jobs:
            reps = [(sid, T, split, r) for r in range(rc.replicas)]
            if any(state[j]["diverged"] for j in reps) or state[reps[0]]["steps"] >= rc.max_total_steps:
                continue
            if (sid, T) not in resolved:
                trajs = [np.stack(kept[j]) for j in reps]
                t = np.arange(min(len(x) for x in trajs)) * dt_ps
                c = cells.loc[sid]
                res, _, _ = li_resolution(trajs, t, np.asarray(c["numbers"]), np.asarray(c["cell"]))
                resolved[(sid, T)] = bool(res["resolved"])
            if not resolved[(sid, T)]:
                cands.append((sid, T, split, state[reps[0]]["steps"]))
        cands.sort(key=lambda c: (-c[1], c[0]))  # hottest first: bounds tighten where diffusion is fastest
        chosen: dict[tuple[int, int], list[tuple]] = {}
        for sid, T, split, steps in cands:
            n = min(round_steps, rc.max_total_steps - steps)
            cost = rc.replicas * n * dt_ps
            if spent + cost > budget + 1e-9:
                continue
            spent += cost
            chosen.setdefault((steps, n), []).extend((sid, T, split, r) for r in range(rc.replicas))
            resolved.pop((sid, T), None)  # test again after the round
        if not chosen:
            break
        n_round += 1
        log.info("extension round %d: %d unresolved (structure, T) continue (%s); %.0f of %s structure-ps spent",
                 n_round, sum(len(v) for v in chosen.values()) // rc.replicas,
                 ", ".join(f"{T:g} K" for T in sorted({j[1] for v in chosen.values() for j in v}, reverse=True)),
                 spent, f"{budget:.0f}" if math.isfinite(budget) else "unlimited")
        for (steps, n), group in sorted(chosen.items()):
            run_round(group, n, steps)
    return {"spent_ps": spent, "budget_ps": budget}


