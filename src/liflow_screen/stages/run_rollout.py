"""Stage ``rollout``: batched LiFlow rollouts (Algorithm 1) of one chunk of structures at every
rollout temperature, with the prior class of each (selector, pilot or fixed) recorded.

Units: Å, ps, K. Every output is written atomically with provenance.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..io import layout, schema
from ..core import seeds
from ..core.constants import LI_Z
from ..core.errors import InputError, SchemaError
from ..io.files import provenance
from ..flow.selection import selector_predictions

log = logging.getLogger(__name__)


def rollout_chunk_rows(manifest: pd.DataFrame, chunk: int, chunk_size: int) -> pd.DataFrame:
    """Manifest rows of rollout chunk ``chunk`` (blocks of ``chunk_size`` in manifest order)."""
    sub = manifest.iloc[chunk * chunk_size:(chunk + 1) * chunk_size]
    if sub.empty:
        raise InputError(f"rollout chunk {chunk} is empty (manifest has {len(manifest)} rows, chunk size {chunk_size})")
    return sub


#: Pilot rates within this factor of the threshold flag the class choice as uncertain.
PILOT_UNCERTAIN_FACTOR = 2.0




def rolled_out_structures(structs: pd.DataFrame, ids: list[str], reps: list[int] | tuple[int, ...]) -> pd.DataFrame:
    """STRUCTURES rows (indexed by id) of the cells the rollouts start from: each structure's
    relaxed supercell repeated ``reps`` = (n_a, n_b, n_c) times (rollout.supercell; Å)."""
    from ..core.geometry import tile

    sub = structs.loc[ids].copy()
    if tuple(reps) == (1, 1, 1):
        return sub
    for col in ("numbers", "positions", "cell"):
        sub[col] = sub[col].astype(object)
    for sid in ids:
        s = sub.loc[sid]
        z, pos, cell = tile(np.asarray(s["numbers"]), np.asarray(s["positions"], float).reshape(-1, 3),
                            np.asarray(s["cell"], float).reshape(3, 3), reps)
        sub.at[sid, "numbers"], sub.at[sid, "positions"] = z.tolist(), pos.reshape(-1).tolist()
        sub.at[sid, "cell"] = cell.reshape(-1).tolist()
        sub.at[sid, "n_atoms"], sub.at[sid, "n_li"] = len(z), int((z == LI_Z).sum())
    return sub


def _graph(structs: pd.DataFrame, batch: list[tuple[str, float, str]], device: Any):
    """GraphBatch of the cells (``structs`` rows) of ``batch`` [(id, T K, split)]."""
    from ..flow.graph import make_batch

    sts = [structs.loc[j[0]] for j in batch]
    return make_batch([np.asarray(s["numbers"]) for s in sts], [np.asarray(s["positions"]).reshape(-1, 3) for s in sts],
                      [np.asarray(s["cell"]).reshape(3, 3) for s in sts], [j[1] for j in batch], device=device)


#: Atoms per batched graph on CPU when rollout.batch_atoms is null (a few thousand atoms keep the
#: per-step Python overhead small against the model's work; memory is ~0.5 MB per atom).
CPU_BATCH_ATOMS = 4096
#: Edges per atom a CUDA batch is sized for (~45 in the benchmark cells, with headroom); each edge
#: costs rollout.BYTES_PER_EDGE in each of the two models' CUDA-graph pools.
CUDA_EDGES_PER_ATOM = 64
#: At most 65,536 atoms per CUDA batch: past ~180k atoms (~8M edges) the (E, 256) message tensors pass
#: 2^31 elements and torch.compile's 64-bit-indexed kernels ran 4x slower per structure (H200).
CUDA_MAX_BATCH_ATOMS = 1 << 16


def batch_atom_budget(cfg_value: int | None, device: Any) -> int:
    """Atoms per batched graph: rollout.batch_atoms if set; else on CUDA half the free device
    memory at 2 x CUDA_EDGES_PER_ATOM x BYTES_PER_EDGE per atom (at most CUDA_MAX_BATCH_ATOMS: 512 x 112-atom cells gave
    the best structure-ps/s on an H200), on CPU CPU_BATCH_ATOMS."""
    if cfg_value is not None:
        return int(cfg_value)
    import torch

    from ..flow.engine import BYTES_PER_EDGE

    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        per_atom = 2 * CUDA_EDGES_PER_ATOM * BYTES_PER_EDGE
        return int(min(max(free // 2 // per_atom, 1024), CUDA_MAX_BATCH_ATOMS))
    return CPU_BATCH_ATOMS


def pack_batches(jobs: list[tuple[str, float, str]], n_atoms: dict[str, int], atom_budget: int,
                 max_structures: int | None = None) -> list[list[tuple[str, float, str]]]:
    """Group (structure, T, split) jobs into batches of at most ``atom_budget`` atoms (and at most
    ``max_structures`` jobs): jobs sorted by cell size (then id, T), so structures of similar size
    share a batch; a cell larger than the budget gets a batch of its own. Deterministic."""
    order = sorted(jobs, key=lambda j: (n_atoms[j[0]], j[0], j[1]))
    batches: list[list[tuple[str, float, str]]] = []
    cur: list[tuple[str, float, str]] = []
    used = 0
    for j in order:
        n = n_atoms[j[0]]
        if cur and (used + n > atom_budget or (max_structures is not None and len(cur) >= max_structures)):
            batches.append(cur)
            cur, used = [], 0
        cur.append(j)
        used += n
    if cur:
        batches.append(cur)
    return batches


def _rollout_batches(cfg: dict[str, Any], prop: Any, corr: Any, structs: pd.DataFrame,
                     jobs: list[tuple[str, float, str]], classes: dict[tuple[str, int], tuple[bool, bool]],
                     n_steps: int, stream: int, device: Any, on_frame: Any = None):
    """Yield (batch, RolloutResult, wall s) for ``jobs`` packed into batches of at most
    rollout.batch_atoms atoms (see :func:`pack_batches`, :func:`batch_atom_budget`).

    ``stream``: ``seeds.ROLLOUT`` or ``seeds.PILOT``, the child of each (seed, structure, T)
    sequence the prior draws come from (independent of batching, chunking and device).
    ``on_frame(batch, ptr, frame, positions, good)``: stream every frame (``ptr``: the batch's atom
    offsets; see ``rollout.rollout``).
    """
    import torch

    from ..flow.training import prior_sigma_for
    from ..flow.engine import rollout

    rc = cfg["rollout"]
    regressor = prop.liflow_meta["prior"]["kind"] == "none"
    budget = batch_atom_budget(rc.get("batch_atoms"), device)
    n_atoms = {sid: int(len(structs.loc[sid]["numbers"])) for sid in {j[0] for j in jobs}}
    batches = pack_batches(jobs, n_atoms, budget, rc.get("batch_structures"))
    if batches:
        log.info("%d (structure, T) pairs in %d batches of <= %d atoms (%s)", len(jobs), len(batches), budget,
                 ", ".join(str(sum(n_atoms[j[0]] for j in b)) for b in batches[:20]) + (" ..." if len(batches) > 20
                                                                                       else ""))
    for batch in batches:
        g = _graph(structs, batch, device)
        cls = [classes.get((j[0], int(round(j[1]))), (True, True)) for j in batch]
        li_slow = torch.as_tensor([c[0] for c in cls], device=device)
        fr_slow = torch.as_tensor([c[1] for c in cls], device=device)
        sig_p = (torch.zeros(g.pos.shape[0], device=device) if regressor
                 else prior_sigma_for(g, prop.liflow_meta["prior"], li_slow, fr_slow))
        sig_c = prior_sigma_for(g, corr.liflow_meta["prior"], li_slow, fr_slow) if corr is not None else None
        keys = torch.tensor([seeds.rollout_key(int(cfg["seed"]), sid, T, stream) for sid, T, _ in batch],
                            dtype=torch.long)
        t0 = time.perf_counter()
        ptr = g.ptr.tolist()
        sink = None if on_frame is None else (lambda f, x, ok, batch=batch, ptr=ptr: on_frame(batch, ptr, f, x, ok))
        res = rollout(prop, corr, g, sig_p, sig_c, n_steps, int(rc["n_flow"]), keys,
                      max_step_displacement=float(rc["max_step_displacement"]), retries=int(rc["retries"]),
                      regressor=regressor, progress=sink is not None, corrector_every=int(rc["corrector_every"]),
                      n_flow_corrector=rc["n_flow_corrector"], on_frame=sink, precision=str(rc["precision"]),
                      compile=rc["compile"])
        wall = time.perf_counter() - t0
        log.info("batch of %d pairs, %d atoms: %d steps in %.1f s (%.3f s per step, %.1f structure-steps/s)",
                 len(batch), g.pos.shape[0], n_steps, wall, wall / n_steps, len(batch) * n_steps / max(wall, 1e-9))
        yield batch, res, wall


def choose_prior_classes(cfg: dict[str, Any], method: str, prop: Any, corr: Any, structs: pd.DataFrame,
                         jobs: list[tuple[str, float, str]], selector: str | Path | None, device: Any,
                         source: str, labels: pd.DataFrame | None = None) -> pd.DataFrame:
    """The adaptive-prior class (li_slow, frame_slow) of every job, as schema.PRIORS rows.

    * ``selector``: the prior-selector classifier trained on this run's MD (P(slow) >= 0.5);
    * ``pilot``: a ``rollout.pilot_steps``-step rollout with the LARGE Li prior (and the small frame
      prior); Li is classified by the same rule as the MD labels: slow if its mobility rate (slope
      of the multi-origin MSD over the later half, Å²/ps) < ``dataset.slow_threshold``. The frame
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
    thr = float(cfg["dataset"]["slow_threshold"])
    n_pilot = int(cfg["rollout"]["pilot_steps"])
    large = {k: (False, True) for k in key}
    dt_ps = float(prop.liflow_meta.get("delta_tau_ps") or cfg["dataset"]["delta_tau_ps"])
    for batch, res, wall in _rollout_batches(cfg, prop, corr, structs, jobs, large, n_pilot, seeds.PILOT, device):
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
    return pd.DataFrame(rows, columns=[f.name for f in schema.PRIORS])


def run(cfg: dict[str, Any], manifest_path: str | Path, structures_path: str | Path, selector: str | Path | None,
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
    from ..core import config as cfgmod
    from ..flow.training import load_flow
    from ..flow.engine import frame_rows, rollout_status_rows
    from ..core.runtime import resolve_device

    rc = cfg["rollout"]
    device = resolve_device(rc["device"], key="rollout.device")
    manifest = schema.read_df(manifest_path, "manifest")
    rows = rollout_chunk_rows(manifest, chunk, int(rc["chunk_size"]))
    structs = schema.read_df(structures_path, "structures").set_index("id")
    temps = cfgmod.rollout_temperatures(cfg)
    prop = load_flow(propagator, device)
    corr = load_flow(corrector, device) if corrector else None
    dt_ps = float(prop.liflow_meta.get("delta_tau_ps") or cfg["dataset"]["delta_tau_ps"])
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
    cells = rolled_out_structures(structs, sorted({j[0] for j in jobs}), rc["supercell"])
    # the prior class is a property of the material: chosen on the relaxed cell, not the supercell
    priors = choose_prior_classes(cfg, rc["prior_selection"], prop, corr, structs, jobs, selector, device, source,
                                  labels)
    classes = {(p.id, int(p.temperature)): (bool(p.li_slow), bool(p.frame_slow)) for p in priors.itertuples()}
    prov = provenance(cfg, stage="rollout", variant=variant, chunk=int(chunk),
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
        batches = _rollout_batches(cfg, prop, corr, cells, jobs, classes, int(rc["n_steps"]), seeds.ROLLOUT, device,
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


