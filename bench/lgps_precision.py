"""D* and E_A of the LGPS rollouts in each arithmetic precision (``bench_rollout.py --traj-out``).

Reads the npz of ``bench_rollout.py`` (150-step rollouts of the 200-atom LGPS cell at 650, 900, 1150
and 1400 K with the published P_LGPS + C_LGPS_0.1, one batch per precision: fp32, tf32, bf16, same
noise keys), analyses every trajectory with the pipeline's own per-trajectory analysis
(``report.trajectory.analyze_trajectory``: resolved-or-bound rule, kinisi D* of Li with its 95 %
interval, sanity flags) and fits E_A with ``analysis.arrhenius_fit`` over the resolved, non-diverged,
frame-intact temperatures, as ``bench_lgps.py`` does. Writes ``results/bench/lgps_precision_<device>.json``
with, per precision and temperature, D* and whether it lies inside the FP32 95 % interval (and the
FP32 median inside its), and E_A with its interval.

Usage: ``python bench/lgps_precision.py TRAJ.npz [--out results/bench/lgps_precision_cuda.json]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from liflow_screen.analysis import arrhenius_fit
from liflow_screen.core.settings import Settings
from liflow_screen.io.files import versions, write_json_atomic
from liflow_screen.report.trajectory import analyze_trajectory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("traj", type=Path)
    ap.add_argument("--out", type=Path, default=Path("results/bench/lgps_precision_cuda.json"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    f = np.load(args.traj)
    numbers, cell, temps = f["numbers"], f["cell"], [float(t) for t in f["temperatures"]]
    dt_ps = float(f["delta_tau_ps"])
    n = len(numbers)
    acfg = Settings.defaults().analysis
    out: dict = {"source": str(args.traj), "delta_tau_ps": dt_ps, "temperatures_K": temps, "precisions": {}}
    for p in ("fp32", "tf32", "bf16"):
        key = f"{p}/positions"
        if key not in f:
            continue
        pos_all = f[key]
        rows = []
        for k, T in enumerate(temps):
            pos = pos_all[:, k * n:(k + 1) * n].astype(np.float64)
            # a diverged graph's frames repeat its last good frame: keep the distinct ones
            last = len(pos) - 1
            while last > 0 and np.array_equal(pos[last], pos[last - 1]):
                last -= 1
            pos = pos[:last + 1]
            r = analyze_trajectory(pos, np.arange(len(pos)) * dt_ps, numbers, cell, acfg, seed=args.seed)
            rows.append({"T_K": T, "n_frames": len(pos), "complete": last == len(pos_all) - 1,
                         "D_method": r["D_method"], "D": r.get("D_li"), "D_low": r.get("D_li_low"),
                         "D_high": r.get("D_li_high"), "frame_melted": bool(r["frame_melted"]),
                         "li_molten": bool(r["li_molten"])})
        use = [r for r in rows if r["D_method"] == "kinisi" and r["complete"] and not r["frame_melted"]]
        fit = (arrhenius_fit(np.array([r["T_K"] for r in use]), np.array([r["D"] for r in use]),
                             np.array([r["D_low"] for r in use]), np.array([r["D_high"] for r in use]))
               if len(use) >= 2 else None)
        out["precisions"][p] = {"per_T": rows, "arrhenius_T": [r["T_K"] for r in use],
                                "E_A_eV": None if fit is None else [fit["E_A"], fit["E_A_low"], fit["E_A_high"]]}
    ref = {r["T_K"]: r for r in out["precisions"].get("fp32", {}).get("per_T", [])}
    for p, res in out["precisions"].items():
        for r in res["per_T"]:
            b = ref.get(r["T_K"])
            if p == "fp32" or b is None or r["D_method"] != "kinisi" or b["D_method"] != "kinisi":
                continue
            r["inside_fp32_interval"] = bool(b["D_low"] <= r["D"] <= b["D_high"])
            r["fp32_inside_its_interval"] = bool(r["D_low"] <= b["D"] <= r["D_high"])
            r["ratio_to_fp32"] = r["D"] / b["D"]
    out["versions"] = versions()
    write_json_atomic(args.out, out)
    for p, res in out["precisions"].items():
        e = res["E_A_eV"]
        print(p, "E_A", None if e is None else f"{e[0]:.3f} ({e[1]:.3f}-{e[2]:.3f})", "from", res["arrhenius_T"])
        for r in res["per_T"]:
            print(f"   {r['T_K']:6.0f} K {r['D_method']:>12} D={r['D']} [{r['D_low']}, {r['D_high']}] frames {r['n_frames']}"
                  f" melted={r['frame_melted']} inside_fp32={r.get('inside_fp32_interval')}")


if __name__ == "__main__":
    main()
