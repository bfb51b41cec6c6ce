"""Benchmark of the MLIP stages: batched MD and relaxation (md/batched.py) against the ASE loop.

Writes ``results/bench/md_<device>.json``. Model: MACE-MP-0 small, its weights from the mace cache
(or ``--model``) when present, else the same architecture with random weights (the cost is the
architecture's, not the weights'); float32. Cells: Li2O 2x2x2 conventional (96 atoms), each
structure rattled differently, NVT 1 fs at 600-1200 K, frames every 10 steps.

For each size N (``--sizes``, default 1, 8, 64 on CPU and 1, 8, 64, 256 on CUDA), in interleaved
rounds (``--rounds``; the figures are the best round, the spread is kept):

- MD: atom-steps/s of ONE batch of N trajectories (``batched.run_batch``: one batched step; the
  model is one call on CUDA, one per structure of ~100 atoms on CPU, see ``batched.CPU_MODEL_ATOMS``)
  and of the ASE loop (``integrate.run_trajectory``, NoseHooverChainNVT, one structure at a time)
  over min(N, ``--ase-structures``) structures (its rate per structure does not depend on N);
- relaxation: atom-steps/s of ``batched.relax_batch`` (FIRE + Fréchet cell filter) on N strained
  cells for ``--relax-steps`` steps (fmax 1e-6 eV/Å, so nothing converges early) and of ASE's
  FIRE(FrechetCellFilter) (``relax.relax``) one by one.

Also: the paper's MD set (4,186 structures x 4 T x 25,000 steps; ~100 atoms each is assumed) in
device-hours at the batched rate of N = 64. CPU runs use torch's deterministic kernels, as the md
stage does.

Usage: ``python bench/bench_md.py --device cpu|cuda [--sizes 1,8,64] [--steps 20] [--rounds 2]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ase.build import bulk

from liflow_screen.core.runtime import deterministic_torch, retain_freed_memory
from liflow_screen.core.settings import MDSettings
from liflow_screen.io.files import write_json_atomic
from liflow_screen.md import batched, integrate
from liflow_screen.md import potentials as P
from liflow_screen.md.relax import relax

#: The paper's MD set: structures x temperatures x steps (Appendix C), and an assumed mean cell size.
PAPER_TRAJECTORIES, PAPER_STEPS, PAPER_ATOMS = 4186 * 4, 25_000, 100


def cells(n: int, seed: int = 0) -> list:
    out = []
    for k in range(n):
        a = bulk("Li2O", "fluorite", a=4.62, cubic=True).repeat((2, 2, 2))
        a.rattle(0.03, seed=seed + k)
        out.append(a)
    return out


def strained(n: int) -> list:
    out = []
    for k, a in enumerate(cells(n, seed=1000)):
        a.set_cell(a.cell.array * (1.0 + 0.01 * ((k % 5) - 2)), scale_atoms=True)
        out.append(a)
    return out


def md_settings(steps: int) -> MDSettings:
    steps = max(10, steps - steps % 10)
    return dataclasses.replace(MDSettings.defaults(), timestep_fs=1.0, duration_ps=steps / 1000.0, save_every=10,
                               max_step_displacement=50.0, max_temperature_factor=1e6)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_batched_md(pot: P.Potential, n: int, steps: int) -> float:
    s = md_settings(steps)
    jobs = [batched.MDJob(f"s{k}", a, 600.0 + 200 * (k % 4)) for k, a in enumerate(cells(n))]
    sync(pot.device)
    t0 = time.perf_counter()
    res = batched.run_batch(jobs, pot, s, seed=0)
    sync(pot.device)
    wall = time.perf_counter() - t0
    assert all(r.status == "ok" for r in res), [r.reason for r in res if r.status != "ok"]
    n_steps = (s.n_frames - 1) * s.save_every
    return sum(len(j.atoms) for j in jobs) * n_steps / wall


def time_ase_md(pot: P.Potential, n: int, steps: int) -> float:
    s = md_settings(steps)
    calc = P.EnergyForcesCalculator(pot)
    atoms = cells(n)
    sync(pot.device)
    t0 = time.perf_counter()
    for k, a in enumerate(atoms):
        res = integrate.run_trajectory(f"s{k}", a, 600.0 + 200 * (k % 4), s, calc, seed=0)
        assert res.status == "ok", res.reason
    sync(pot.device)
    wall = time.perf_counter() - t0
    n_steps = (s.n_frames - 1) * s.save_every
    return sum(len(a) for a in atoms) * n_steps / wall


def time_batched_relax(pot: P.Potential, n: int, steps: int) -> float:
    atoms = strained(n)
    sync(pot.device)
    t0 = time.perf_counter()
    out = batched.relax_batch(atoms, pot, fmax=1e-6, steps=steps, cell=True)
    sync(pot.device)
    wall = time.perf_counter() - t0
    assert all(st == "not_converged" for _, st in out), [st for _, st in out]
    return sum(len(a) for a in atoms) * (steps + 1) / wall


def time_ase_relax(pot: P.Potential, n: int, steps: int) -> float:
    atoms = strained(n)
    sync(pot.device)
    t0 = time.perf_counter()
    for a in atoms:
        _, st = relax(a, pot, fmax=1e-6, steps=steps, cell=True)
        assert st == "not_converged", st
    sync(pot.device)
    wall = time.perf_counter() - t0
    return sum(len(a) for a in atoms) * (steps + 1) / wall


def load_model(device: str, model: str | None, tmp: Path) -> tuple[P.Potential, str]:
    try:
        path = P.resolve_mace_mp_small(model, allow_download=False)
        what = f"MACE-MP-0 small weights ({path.name})"
    except Exception:  # noqa: BLE001 - offline and no cache: same architecture, random weights
        path = P.save_mace_model(P.build_random_mace("small", seed=0), tmp / "small.model")
        what = "MACE-MP-0 small architecture, random weights (no cached weights)"
    pot = P.load_potential(MDSettings.defaults(potential="mace-file", model_path=str(path)), device=device)
    return pot, what


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", default=None, help="comma-separated structure counts (default 1,8,64 cpu; 1,8,64,256 cuda)")
    ap.add_argument("--steps", type=int, default=20, help="MD steps per timing (a multiple of 10)")
    ap.add_argument("--relax-steps", type=int, default=10)
    ap.add_argument("--ase-structures", type=int, default=2, help="structures the ASE loop runs per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--model", default=None, help="a MACE-MP-0 small file (default: the mace cache)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc_tuned = retain_freed_memory()  # as the md stage does, for both engines
    sizes = [int(x) for x in (args.sizes or ("1,8,64" if args.device == "cpu" else "1,8,64,256")).split(",")]
    out_path = Path(args.out or f"results/bench/md_{args.device}.json")
    t_start = time.perf_counter()
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    report: dict = {
        "machine": {"device": args.device, "gpu": gpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(), "loadavg_start": os.getloadavg(),
                    "malloc_retains_freed_memory": malloc_tuned},
        "cells": "Li2O 2x2x2 conventional (96 atoms), rattled; NVT Nose-Hoover chain, 1 fs, 600-1200 K",
        "steps": args.steps, "relax_steps": args.relax_steps, "rounds": args.rounds, "sizes": {},
    }
    with tempfile.TemporaryDirectory() as tmp, deterministic_torch(args.device == "cpu"):
        pot, what = load_model(args.device, args.model, Path(tmp))
        report["model"] = what
        # warm-up: kernels, e3nn code generation, allocator; every batch size once (energy+forces, +stress)
        time_ase_md(pot, 1, 10)
        time_ase_relax(pot, 1, 1)
        for n in sizes:
            systems = P.Systems.from_atoms(cells(n), pot.device)
            batched._Evaluator(pot)(systems)       # as the engine calls the model (on CPU: in groups)
            batched._Evaluator(pot, stress=True)(systems)
        rounds: dict[int, dict[str, list[float]]] = {n: {"md_batched": [], "md_ase": [], "relax_batched": [],
                                                          "relax_ase": []} for n in sizes}
        for r in range(args.rounds):
            ase_md = time_ase_md(pot, args.ase_structures, args.steps)
            ase_relax = time_ase_relax(pot, args.ase_structures, args.relax_steps)
            for n in sizes:
                rounds[n]["md_ase"].append(ase_md)
                rounds[n]["relax_ase"].append(ase_relax)
                rounds[n]["md_batched"].append(time_batched_md(pot, n, args.steps))
                rounds[n]["relax_batched"].append(time_batched_relax(pot, n, args.relax_steps))
                print(f"round {r} N={n}: md {rounds[n]['md_batched'][-1]:.0f} vs ASE {ase_md:.0f} atom-steps/s; "
                      f"relax {rounds[n]['relax_batched'][-1]:.0f} vs ASE {ase_relax:.0f}", file=sys.stderr, flush=True)
    for n in sizes:
        r = rounds[n]
        md_b, md_a, rx_b, rx_a = max(r["md_batched"]), max(r["md_ase"]), max(r["relax_batched"]), max(r["relax_ase"])
        report["sizes"][str(n)] = {
            "md_batched_atom_steps_per_s": md_b, "md_ase_atom_steps_per_s": md_a, "md_speedup": md_b / md_a,
            "relax_batched_atom_steps_per_s": rx_b, "relax_ase_atom_steps_per_s": rx_a, "relax_speedup": rx_b / rx_a,
            "md_speedup_per_round": [b / a for b, a in zip(r["md_batched"], r["md_ase"])],
            "relax_speedup_per_round": [b / a for b, a in zip(r["relax_batched"], r["relax_ase"])],
            "rounds": r,
        }
    ref = str(64) if 64 in sizes else str(max(sizes))
    rate = report["sizes"][ref]["md_batched_atom_steps_per_s"]
    total = PAPER_TRAJECTORIES * PAPER_STEPS * PAPER_ATOMS
    report["paper_md_set"] = {
        "atom_steps": total, "assumed_atoms_per_structure": PAPER_ATOMS, "at_batch_size": int(ref),
        f"{args.device}_hours_batched": total / rate / 3600,
        f"{args.device}_hours_ase_loop": total / report["sizes"][ref]["md_ase_atom_steps_per_s"] / 3600,
    }
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - t_start
    write_json_atomic(out_path, report)
    print(f"wrote {out_path} in {report['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
