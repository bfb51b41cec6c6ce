"""Benchmark of the reference MD stage: cost per MD step, share outside the model, batching.

Writes ``results/bench/md.json``. For each potential (CHGNet 0.3.0 from its wheel, a random MACE
with MACE-MP-0 small's hyper-parameters, a tiny random MACE) on a 96-atom Li2O cell:

- ``ms_per_step`` and ``atom_steps_per_s`` of NVT Nosé–Hoover MD through ``md.integrate.run_trajectory``;
- ``outside_model_share``: fraction of the step time spent outside the model's forward (+ force
  backward) call: integrator, neighbour list / graph construction, data conversion, frame I/O;
- for the MACE models, lock-step batched MD of ``--batch`` structures vs one-by-one: throughput
  ratio and the max position difference between the two runs (Å).

Usage: ``python bench/bench_md.py [--steps 20] [--batch 4] [--threads N] [--out results/bench/md.json]``.
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

from liflow_screen.md import integrate, lockstep
from liflow_screen.md import potentials as P
from liflow_screen.io.files import write_json_atomic
from liflow_screen.core.settings import MDSettings


class ModelTimer:
    """Accumulates wall time spent inside ``module.forward`` (forces included: MACE and CHGNet
    compute them by autograd inside forward). Wraps the bound method, because CHGNet's
    ``predict_graph`` calls ``self.forward`` directly and so bypasses module hooks."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.total = 0.0
        self.calls = 0
        self._module = module
        inner = module.forward

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - t0
                self.calls += 1

        module.forward = timed

    def remove(self) -> None:
        del self._module.forward  # back to the class method


def li2o(rep=(2, 2, 2)):
    return bulk("Li2O", "fluorite", a=4.62, cubic=True).repeat(rep)


def settings_for(steps: int, save_every: int = 5) -> MDSettings:
    """MD settings running ``steps`` 1-fs steps (a multiple of save_every)."""
    steps = max(save_every, steps - steps % save_every)
    return dataclasses.replace(MDSettings.defaults(), timestep_fs=1.0, duration_ps=steps / 1000.0,
                               save_every=save_every, max_step_displacement=50.0, max_temperature_factor=1e6)


def bench_step(pot: P.Potential, atoms, steps: int) -> dict:
    calc = P.EnergyForcesCalculator(pot)
    integrate.run_trajectory("warmup", atoms, 600.0, settings_for(5), calc, seed=0)  # e3nn codegen, allocator warm-up
    timer = ModelTimer(pot.model)
    s = settings_for(steps)
    n_steps = (s.n_frames - 1) * s.save_every
    t0 = time.perf_counter()
    res = integrate.run_trajectory("bench", atoms, 600.0, s, calc, seed=0)
    wall = time.perf_counter() - t0
    timer.remove()
    return {
        "n_atoms": len(atoms), "steps": n_steps, "status": res.status,
        "ms_per_step": 1000 * wall / n_steps,
        "atom_steps_per_s": len(atoms) * n_steps / wall,
        "model_calls": timer.calls,
        "model_ms_per_step": 1000 * timer.total / n_steps,
        "outside_model_share": 1.0 - timer.total / wall,
    }


def bench_batched(pot: P.Potential, structures: list, steps: int, batch: int) -> dict:
    s = settings_for(steps)
    jobs = [lockstep.MDJob(f"s{i}", a, 600.0 + 100 * i) for i, a in enumerate(structures)]
    lockstep.run_trajectories(jobs[:batch], pot, settings_for(5), 0, batch_size=batch)  # warm-up batched shapes
    t0 = time.perf_counter()
    serial = lockstep.run_trajectories(jobs, pot, s, 0, batch_size=1)
    t_serial = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = lockstep.run_trajectories(jobs, pot, s, 0, batch_size=batch)
    t_batched = time.perf_counter() - t0
    diff = max(float(np.abs(b.positions.astype(np.float64) - a.positions).max()) for a, b in zip(serial, batched))
    n_steps = (s.n_frames - 1) * s.save_every
    atoms_total = sum(len(a) for a in structures)
    return {
        "structures": len(structures), "atoms_each": [len(a) for a in structures], "batch_size": batch,
        "steps": n_steps, "one_by_one_s": t_serial, "batched_s": t_batched,
        "one_by_one_atom_steps_per_s": atoms_total * n_steps / t_serial,
        "batched_atom_steps_per_s": atoms_total * n_steps / t_batched,
        "throughput_ratio": t_serial / t_batched,
        "max_position_diff_A": diff,
        "statuses": sorted({r.status for r in serial + batched}),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="MD steps per timing run")
    ap.add_argument("--batch", type=int, default=4, help="structures in the batched comparison")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared 2-core machine more threads only "
                         "add spin-wait contention for ~100-atom graphs; 0 = torch's default)")
    ap.add_argument("--out", default="results/bench/md.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    out: dict = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "gpu": torch.cuda.is_available(),
                    "loadavg_start": os.getloadavg()},
        "cell": "Li2O fluorite 2x2x2 conventional (96 atoms), NVT Nose-Hoover 600 K, 1 fs, frames every 5 steps",
        "potentials": {}, "batched": {},
    }
    big = li2o()
    small_cells = [li2o((2, 1, 1)) for _ in range(args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        pots = {"chgnet": P.load_potential(MDSettings.defaults(potential="chgnet"), device="cpu")}
        for size in ("small", "tiny"):
            path = P.save_mace_model(P.build_random_mace(size, seed=0), Path(tmp) / f"{size}.model")
            pots[f"mace-random-{size}"] = P.load_potential(MDSettings.defaults(potential="mace-file", model_path=str(path)),
                                                           device="cpu")
        for name, pot in pots.items():
            out["potentials"][name] = bench_step(pot, big, args.steps)
            print(name, out["potentials"][name], file=sys.stderr)
        for name in ("mace-random-small", "mace-random-tiny", "chgnet"):
            out["batched"][name] = bench_batched(pots[name], small_cells, args.steps, args.batch)
            print(name, "batched", out["batched"][name], file=sys.stderr)
    out["machine"]["loadavg_end"] = os.getloadavg()
    out["wall_s"] = time.perf_counter() - t_start
    write_json_atomic(args.out, out)
    print(f"wrote {args.out} in {out['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
