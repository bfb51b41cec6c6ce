"""Benchmark: kinisi D* per trajectory with the coarse dt grid vs kinisi's default (every lag).

Trajectory: 100 atoms (40 Li Brownian with D = 0.5 Å²/ps, 60 nearly immobile frame atoms),
2,501 frames at 10 fs (25 ps), unwrapped, as saved by the MD stage. Target: <= 5 s per
trajectory with the coarse grid. The default grid (2,500 lags) runs in a child process that is
stopped after ``--timeout`` seconds and then reported as a timeout.

    python bench/bench_kinisi.py [--out results/bench/kinisi.json] [--timeout 120] [--repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import numpy as np

from liflow_screen import analysis as an
from liflow_screen.io.files import provenance, write_json_atomic

N_LI, N_FRAME, N_FRAMES, DT_PS, D_TRUE = 40, 60, 2501, 0.01, 0.5  # D in Å²/ps


def make_trajectory(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unwrapped positions (F, 100, 3) Å, times (F,) ps, numbers, cell (12 Å cube)."""
    rng = np.random.default_rng(seed)
    n = N_LI + N_FRAME
    steps = rng.normal(0.0, np.sqrt(2 * D_TRUE * DT_PS), (N_FRAMES - 1, n, 3))
    steps[:, N_LI:] *= 0.05
    pos = np.concatenate([np.zeros((1, n, 3)), np.cumsum(steps, axis=0)]) + rng.uniform(0, 12.0, (1, n, 3))
    numbers = np.array([3] * N_LI + [16] * N_FRAME)
    return pos.astype(np.float32), np.arange(N_FRAMES) * DT_PS, numbers, np.eye(3) * 12.0


def _default_grid_worker(queue: Any) -> None:
    pos, t, numbers, cell = make_trajectory()
    x = pos.astype(np.float64)
    lags = np.arange(1, N_FRAMES)  # kinisi's default dt: every multiple of the frame step
    lag_t = lags * DT_PS
    start = float(lag_t[an.diffusion._start_index(lag_t, None, float(lag_t[-1]))])
    t0 = time.perf_counter()
    samples = an.diffusion._kinisi_samples(x, cell, numbers, "Li", DT_PS, lags, start, 1000, 0, True)
    queue.put({"seconds": time.perf_counter() - t0, "D_cm2_s": float(np.median(samples)),
               "n_dt": int(lags.size)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/bench/kinisi.json")
    ap.add_argument("--timeout", type=float, default=120.0, help="s allowed for the default grid")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-dt", type=int, default=20)
    args = ap.parse_args()

    pos, t, numbers, cell = make_trajectory()
    coarse = []
    res: dict[str, Any] = {}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        res = an.kinisi_diffusion(pos, t, numbers, cell, n_dt=args.n_dt, n_samples=1000, seed=0)
        coarse.append(time.perf_counter() - t0)
    print(f"coarse grid ({res['n_dt']} lags): {np.median(coarse):.2f} s median of {coarse}; "
          f"D = {res['D']:.3e} [{res['D_low']:.3e}, {res['D_high']:.3e}] cm2/s (true {D_TRUE * 1e-4:.1e})")

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_default_grid_worker, args=(queue,))
    t0 = time.perf_counter()
    proc.start()
    proc.join(args.timeout)
    if proc.is_alive():
        proc.terminate()
        proc.join()
        default: dict[str, Any] = {"status": "timeout", "timeout_s": args.timeout,
                                   "n_dt": N_FRAMES - 1}
        print(f"default grid ({N_FRAMES - 1} lags): timeout after {args.timeout:.0f} s")
    else:
        default = {"status": "ok", **queue.get(timeout=5)} if proc.exitcode == 0 else \
            {"status": f"failed (exit code {proc.exitcode})", "wall_s": time.perf_counter() - t0}
        print(f"default grid: {default}")

    record = {
        "trajectory": {"atoms": N_LI + N_FRAME, "li": N_LI, "frames": N_FRAMES, "frame_step_fs": DT_PS * 1000,
                       "duration_ps": (N_FRAMES - 1) * DT_PS, "D_true_cm2_s": D_TRUE * 1e-4},
        "coarse": {"n_dt": res["n_dt"], "seconds_per_trajectory": float(np.median(coarse)),
                   "seconds_all": coarse, "D_cm2_s": res["D"], "D_low": res["D_low"], "D_high": res["D_high"],
                   "method": res["method"], "mcmc_samples": 1000},
        "default": default,
        "target_seconds": 5.0,
        "meets_target": bool(np.median(coarse) <= 5.0),
        "provenance": provenance({"bench": "kinisi", "n_dt": args.n_dt, "timeout_s": args.timeout}),
    }
    out = Path(args.out)
    write_json_atomic(out, record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
