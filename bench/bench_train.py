"""Benchmark: LiFlow Propagator training throughput on this machine -> results/bench/train.json.

Table A2 model (64 features, 20 Bessel functions, 3 layers, 5 Å cutoff, 0.5 Å offset), batch 16,
~100-atom cells (rock-salt LiF 2x2x3 supercell, 96 atoms, a = 4.03 Å; a dense crystal, so the
edge count per atom is at the high end of Li electrolytes). Displacements are synthetic
(Gaussian, Li 0.8 Å, F 0.2 Å): the cost of a training step does not depend on their values.

Measures (1) the pure optimizer step (batch build + radius graph + forward + backward + Adam)
after warm-up, and (2) end-to-end ``train_flow`` steps/s (including one validation and the
checkpoint writes). Usage: ``python bench/bench_train.py [--steps 20] [--out results/bench/train.json]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from liflow_screen.core import config
from liflow_screen.io.files import provenance, write_json_atomic
from liflow_screen.flow.training import (
    ListPairSource,
    Pair,
    _model_from_settings,
    _prior_settings,
    build_batch,
    flow_loss,
    train_flow,
)
from liflow_screen.core.settings import Settings

A = 4.03
FRAC = np.array([[0, 0, 0], [0, .5, .5], [.5, 0, .5], [.5, .5, 0],
                 [.5, .5, .5], [.5, 0, 0], [0, .5, 0], [0, 0, .5]])
Z = np.array([3, 3, 3, 3, 9, 9, 9, 9])
REPS = (2, 2, 3)


def lif_supercell() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(numbers (96,), positions (96,3) Å, cell (3,3) Å) of the LiF 2x2x3 supercell."""
    shifts = np.array([[i, j, k] for i in range(REPS[0]) for j in range(REPS[1]) for k in range(REPS[2])])
    frac = (FRAC[None] + shifts[:, None]).reshape(-1, 3)
    return np.tile(Z, len(shifts)), frac * A, np.diag(np.array(REPS, float) * A)


def make_pairs(n: int, seed: int) -> list[Pair]:
    rng = np.random.default_rng(seed)
    z, pos, cell = lif_supercell()
    sig = np.where(z == 3, 0.8, 0.2)[:, None]
    out = []
    for k in range(n):
        x0 = pos + rng.normal(0, 0.05, pos.shape)
        x1 = x0 + rng.normal(size=pos.shape) * sig
        temp = float(rng.choice([600.0, 1000.0]))
        out.append(Pair(f"LiF96-{k}", z, cell, x0.astype(np.float32), x1.astype(np.float32), temp,
                        bool(rng.random() < 0.5), True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps (after 3 warm-up steps)")
    ap.add_argument("--out", default="results/bench/train.json")
    args = ap.parse_args()

    cfg = Settings.defaults(train={"device": "auto", "val_every": args.steps, "val_batches": 1})
    tcfg = cfg.train
    pairs = make_pairs(64, seed=0)
    prior = _prior_settings("propagator", "adaptive", tcfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = _model_from_settings(tcfg, cfg.seed).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    rng = np.random.default_rng(1)
    gen = torch.Generator().manual_seed(1)
    load0 = os.getloadavg()

    def one_step() -> float:
        batch = [pairs[int(i)] for i in rng.integers(0, len(pairs), tcfg.batch_size)]
        b = build_batch(batch, "propagator", prior, gen).to(device)
        loss = flow_loss(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        return float(loss.detach())

    for _ in range(3):
        one_step()
    b = build_batch(pairs[:tcfg.batch_size], "propagator", prior, gen)
    n_edges = model.to("cpu").condition(b.g).n_edges
    model.to(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        one_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        summary = train_flow("propagator", "adaptive", cfg, ListPairSource(pairs), ListPairSource(pairs[:16]),
                             Path(tmp), max_steps=args.steps, progress=False)

    n_atoms = int(lif_supercell()[0].shape[0])
    result = {
        "what": "LiFlow Propagator training step (adaptive prior), Table A2 model, batch 16",
        "cell": f"LiF rock salt {REPS[0]}x{REPS[1]}x{REPS[2]} supercell",
        "atoms_per_cell": n_atoms,
        "atoms_per_batch": n_atoms * tcfg.batch_size,
        "edges_per_batch": n_edges,
        "mean_neighbours": n_edges / (n_atoms * tcfg.batch_size),
        "batch_size": tcfg.batch_size,
        "params": model.n_parameters(),
        "paper_params_approx": 175_000,
        "step_s_median": float(np.median(times)),
        "step_s_mean": float(np.mean(times)),
        "steps_per_s": 1.0 / float(np.median(times)),
        "timed_steps": args.steps,
        "train_flow_steps_per_s": summary["steps_per_s"],
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": load0,
        "note": "2-core CPU shared with other jobs; figures are a single run, not a controlled benchmark",
        "provenance": provenance(cfg),
    }
    write_json_atomic(args.out, result)
    print({k: result[k] for k in ("params", "steps_per_s", "step_s_median", "train_flow_steps_per_s",
                                  "mean_neighbours", "torch_threads", "loadavg_at_start")})


if __name__ == "__main__":
    main()
