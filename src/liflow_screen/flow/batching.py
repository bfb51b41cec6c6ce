"""Batched rollouts of many (structure, T) pairs: cells packed by size into graphs of at most a
budget of atoms, each batch rolled out by :func:`.engine.rollout` with its own counter-based noise
keys (a structure's trajectory does not depend on its batch, chunk or device).

Jobs are ``(structure id, T in K, split)`` tuples, or ``(structure id, T, split, replica)`` for the
replicas of a rollout (``rollout.replicas``; a 3-tuple is replica 0); cells are STRUCTURES rows
indexed by id (Å).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pandas as pd

from ..core import seeds
from ..core.constants import LI_Z
from ..core.settings import Settings

log = logging.getLogger(__name__)


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


def replica_of(job: tuple) -> int:
    """Replica index of a job (0 for a 3-tuple)."""
    return int(job[3]) if len(job) > 3 else 0


def graph_of(structs: pd.DataFrame, batch: list[tuple], device: Any,
             positions: dict[tuple, np.ndarray] | None = None):
    """GraphBatch of the cells (``structs`` rows) of ``batch`` [(id, T K, split[, replica])]; a job in
    ``positions`` starts from those (n, 3) Å instead of the cell's own (a continued trajectory)."""
    from .graph import make_batch

    sts = [structs.loc[j[0]] for j in batch]
    pos = [np.asarray(positions[j] if positions is not None and j in positions else s["positions"]).reshape(-1, 3)
           for j, s in zip(batch, sts)]
    return make_batch([np.asarray(s["numbers"]) for s in sts], pos,
                      [np.asarray(s["cell"]).reshape(3, 3) for s in sts], [j[1] for j in batch], device=device)


#: Atoms per batched graph on CPU when rollout.batch_atoms is null (a few thousand atoms keep the
#: per-step Python overhead small against the model's work; memory is ~0.5 MB per atom).
CPU_BATCH_ATOMS = 4096
#: Edges per atom a CUDA batch is sized for (~45 in the benchmark cells, with headroom); each edge
#: costs engine.BYTES_PER_EDGE in each of the two models' CUDA-graph pools.
CUDA_EDGES_PER_ATOM = 64
#: At most 65,536 atoms per CUDA batch: past ~180k atoms (~8M edges) the (E, 256) message tensors pass
#: 2^31 elements and torch.compile's 64-bit-indexed kernels ran 4x slower per structure (H200).
CUDA_MAX_BATCH_ATOMS = 1 << 16


def batch_atom_budget(batch_atoms: int | None, device: Any) -> int:
    """Atoms per batched graph: rollout.batch_atoms if set; else on CUDA half the free device
    memory at 2 x CUDA_EDGES_PER_ATOM x BYTES_PER_EDGE per atom (at most CUDA_MAX_BATCH_ATOMS: 512 x 112-atom cells gave
    the best structure-ps/s on an H200), on CPU CPU_BATCH_ATOMS."""
    if batch_atoms is not None:
        return int(batch_atoms)
    import torch

    from .engine import BYTES_PER_EDGE

    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        per_atom = 2 * CUDA_EDGES_PER_ATOM * BYTES_PER_EDGE
        return int(min(max(free // 2 // per_atom, 1024), CUDA_MAX_BATCH_ATOMS))
    return CPU_BATCH_ATOMS


def pack(sizes: list[int], max_items: int, atom_budget: int) -> list[list[int]]:
    """Indices of items with ``sizes`` (atoms) grouped, in input order, into batches of at most
    ``max_items`` items and ``atom_budget`` atoms (an item larger than the budget gets a batch of its
    own). The one greedy packer of rollouts and of batched MD / relaxation."""
    batches: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i, n in enumerate(sizes):
        if cur and (used + n > atom_budget or len(cur) >= max_items):
            batches.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        batches.append(cur)
    return batches


def pack_batches(jobs: list[tuple[str, float, str]], n_atoms: dict[str, int], atom_budget: int,
                 max_structures: int | None = None) -> list[list[tuple[str, float, str]]]:
    """Group (structure, T, split) jobs into batches of at most ``atom_budget`` atoms (and at most
    ``max_structures`` jobs): jobs sorted by cell size (then id, T), so structures of similar size
    share a batch; a cell larger than the budget gets a batch of its own. Deterministic."""
    order = sorted(jobs, key=lambda j: (n_atoms[j[0]], j[0], j[1], replica_of(j)))
    groups = pack([n_atoms[j[0]] for j in order], max_structures or len(order) or 1, atom_budget)
    return [[order[i] for i in g] for g in groups]


def rollout_batches(settings: Settings, prop: Any, corr: Any, structs: pd.DataFrame,
                     jobs: list[tuple[str, float, str]], classes: dict[tuple[str, int], tuple[bool, bool]],
                     n_steps: int, stream: int, device: Any, on_frame: Any = None,
                     start: dict[tuple, np.ndarray] | None = None, start_step: int = 0):
    """Yield (batch, RolloutResult, wall s) for ``jobs`` packed into batches of at most
    rollout.batch_atoms atoms (see :func:`pack_batches`, :func:`batch_atom_budget`).

    ``stream``: ``seeds.ROLLOUT`` or ``seeds.PILOT``, the child of each (seed, structure, T)
    sequence the prior draws come from (independent of batching, chunking and device); a rollout
    job's replica r draws from ``seeds.replica_stream(r)``.
    ``on_frame(batch, ptr, frame, positions, good)``: stream every frame (``ptr``: the batch's atom
    offsets; see ``flow.engine.rollout``).
    ``start`` {job: (n, 3) Å} and ``start_step``: continue trajectories from their last frame, after
    ``start_step`` steps already made (same seed stream; see ``flow.engine.rollout``).
    """
    import torch

    from .engine import rollout
    from .training import prior_sigma_for

    rc = settings.rollout
    regressor = prop.liflow_meta["prior"]["kind"] == "none"
    budget = batch_atom_budget(rc.batch_atoms, device)
    n_atoms = {sid: int(len(structs.loc[sid]["numbers"])) for sid in {j[0] for j in jobs}}
    batches = pack_batches(jobs, n_atoms, budget, rc.batch_structures)
    if batches:
        log.info("%d (structure, T) pairs in %d batches of <= %d atoms (%s)", len(jobs), len(batches), budget,
                 ", ".join(str(sum(n_atoms[j[0]] for j in b)) for b in batches[:20]) + (" ..." if len(batches) > 20
                                                                                       else ""))
    for batch in batches:
        g = graph_of(structs, batch, device, start)
        cls = [classes.get((j[0], int(round(j[1]))), (True, True)) for j in batch]
        li_slow = torch.as_tensor([c[0] for c in cls], device=device)
        fr_slow = torch.as_tensor([c[1] for c in cls], device=device)
        sig_p = (torch.zeros(g.pos.shape[0], device=device) if regressor
                 else prior_sigma_for(g, prop.liflow_meta["prior"], li_slow, fr_slow))
        sig_c = prior_sigma_for(g, corr.liflow_meta["prior"], li_slow, fr_slow) if corr is not None else None
        keys = torch.tensor([seeds.rollout_key(settings.seed, j[0], j[1],
                                               *(seeds.replica_stream(replica_of(j)) if stream == seeds.ROLLOUT
                                                 else (stream,)))
                             for j in batch], dtype=torch.long)
        t0 = time.perf_counter()
        ptr = g.ptr.tolist()
        sink = None if on_frame is None else (lambda f, x, ok, batch=batch, ptr=ptr: on_frame(batch, ptr, f, x, ok))
        res = rollout(prop, corr, g, sig_p, sig_c, n_steps, rc.n_flow, keys,
                      max_step_displacement=rc.max_step_displacement, retries=rc.retries,
                      regressor=regressor, progress=sink is not None, corrector_every=rc.corrector_every,
                      n_flow_corrector=rc.n_flow_corrector, on_frame=sink, precision=rc.precision,
                      compile=rc.compile, start_step=start_step)
        wall = time.perf_counter() - t0
        log.info("batch of %d pairs, %d atoms: %d steps in %.1f s (%.3f s per step, %.1f structure-steps/s)",
                 len(batch), g.pos.shape[0], n_steps, wall, wall / n_steps, len(batch) * n_steps / max(wall, 1e-9))
        yield batch, res, wall
