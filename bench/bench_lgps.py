"""LGPS check against the paper (section 4.3, Table 2) with the authors' published LGPS models.

1. Cell: pymatgen's bundled Li10GeP2S12 is partially occupied (Li 8f/4d-like sites at 0.64-0.69,
   the Ge/P 4d site half Ge half P). It is ordered with pymatgen's
   OrderDisorderedStructureTransformation (oxidation states Li+ Ge4+ P5+ S2-, lowest Ewald energy
   first) in its 50-atom cell, then repeated 2 x 2 x 1 (200 atoms), as the paper's AIMD cell size.
   The AIMD cell itself (its Li arrangement, lattice at temperature) is not available here.
2. Models: ``P_LGPS.ckpt`` and ``C_LGPS_0.1.ckpt`` imported with ``flow.published.import_checkpoint``
   (Δτ = 1.005 ps = 670 x 1.5 fs; their own priors: Li 10x, frame 0.5x scaled Maxwell-Boltzmann for
   the Propagator, 0.1x for the Corrector; no classifier needed, both Li classes use scale 10).
3. Rollouts: 150 steps (~151 ps) at 650, 900, 1150 and 1400 K in one batch, 10 + 10 flow steps,
   no retries (as the reference inference), seeds from ``liflow_screen.core.seeds``.
4. Analysis: the pipeline's own per-trajectory analysis (``report.trajectory.analyze_trajectory``:
   resolved-or-bound rule, kinisi D* of Li with 95 % interval, sanity flags) and its weighted
   Arrhenius fit (``analysis.arrhenius_fit``) -> E_A with 95 % interval, next to the paper's
   Table 2 (LiFlow 0.185 eV, 95 % CI 0.181-0.190; AIMD 0.192 eV).
5. Long rollout: 1,000 steps (~1 ns) of the 200-atom cell at 900 K, frames streamed to Parquet as the
   pipeline's rollout stage does (``schema.StreamingWriter``), timed, with the peak memory of the
   process and D*(900 K) from the whole nanosecond.
6. Large cell: ``--big-steps`` steps of the 4 x 4 x 4 supercell of the 50-atom cell (3,200 atoms, the
   paper's large LGPS cell), timed and extrapolated to 1,000 steps. The paper used a Corrector trained
   with σ_max = 0.2 Å there; only ``C_LGPS_0.1`` is published, so this times the 0.1 one.
   Both beside the paper's Table 3 (48 s for 1 ns of the 200-atom cell, on a GPU).

Writes ``results/bench/lgps.json``. Usage:
``python bench/bench_lgps.py [--published ../shared/liflow-reference] [--steps 150] [--long-steps 1000]
[--big-steps 10] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from liflow_screen.io import schema
from liflow_screen.core import seeds
from liflow_screen.analysis import arrhenius_fit
from liflow_screen.core.settings import Settings
from liflow_screen.io.files import versions, write_json_atomic
from liflow_screen.flow.graph import make_batch
from liflow_screen.flow.published import import_checkpoint
from liflow_screen.flow.training import load_flow, prior_sigma_for
from liflow_screen.report.trajectory import analyze_trajectory
from liflow_screen.flow.engine import frame_rows, rollout

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PUBLISHED = REPO.parent / "shared" / "liflow-reference"
TEMPS = [650.0, 900.0, 1150.0, 1400.0]
PAPER = {"liflow_E_A_eV": 0.185, "liflow_E_A_ci95": [0.181, 0.190], "aimd_E_A_eV": 0.192,
         "table3_gpu_s_per_ns_200_atoms": 48.0}


def ordered_lgps() -> tuple[object, dict[str, object]]:
    """The lowest-Ewald-energy ordering of pymatgen's bundled (disordered) Li10GeP2S12 cell."""
    from pymatgen.transformations.standard_transformations import OrderDisorderedStructureTransformation
    from pymatgen.util.testing import PymatgenTest

    s = PymatgenTest.get_structure("Li10GeP2S12")
    s.add_oxidation_state_by_element({"Li": 1, "Ge": 4, "P": 5, "S": -2})
    t0 = time.perf_counter()
    ranked = OrderDisorderedStructureTransformation(algo=OrderDisorderedStructureTransformation.ALGO_FAST).apply_transformation(
        s, return_ranked_list=5)
    best = ranked[0]
    ordered = best["structure"]
    ordered.remove_oxidation_states()
    info = {"source": "pymatgen util/structures/Li10GeP2S12.json (partially occupied)",
            "method": "OrderDisorderedStructureTransformation(ALGO_FAST), Li+ Ge4+ P5+ S2-, lowest Ewald energy",
            "ewald_energy_eV": float(best["energy"]), "n_candidates_ranked": len(ranked),
            "runner_up_ewald_energies_eV": [float(r["energy"]) for r in ranked[1:]],
            "formula": ordered.composition.formula, "n_atoms": len(ordered),
            "lattice_A": [float(x) for x in ordered.lattice.abc], "ordering_s": time.perf_counter() - t0}
    return ordered, info


def graph_of(structure, temps: list[float]):
    z = np.array([site.specie.Z for site in structure])
    return make_batch([z] * len(temps), [structure.cart_coords] * len(temps), [structure.lattice.matrix] * len(temps),
                      temps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--published", type=Path, default=DEFAULT_PUBLISHED)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--long-steps", type=int, default=1000, help="steps of the streamed 200-atom rollout at 900 K")
    ap.add_argument("--big-steps", type=int, default=10, help="steps timed on the 4x4x4 (3,200-atom) cell")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "lgps.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    cell, cell_info = ordered_lgps()
    sc = cell * (2, 2, 1)
    print(f"ordered LGPS: {cell_info['formula']} ({cell_info['n_atoms']} atoms), 2x2x1 -> {len(sc)} atoms")

    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for kind, name in (("propagator", "P_LGPS"), ("corrector", "C_LGPS_0.1")):
            out = Path(tmp) / f"{name}.pt"
            import_checkpoint(args.published / f"{name}.ckpt", out)
            models[kind] = load_flow(out)
    prop, corr = models["propagator"], models["corrector"]
    dt_ps = float(prop.liflow_meta["delta_tau_ps"])

    g = graph_of(sc, TEMPS)
    fast = torch.zeros(len(TEMPS), dtype=torch.bool)  # Li "fast" (large) and frame: the LGPS priors are equal
    sp = prior_sigma_for(g, prop.liflow_meta["prior"], fast, fast)
    sc_sigma = prior_sigma_for(g, corr.liflow_meta["prior"], fast, fast)
    gens = [seeds.rollout_key(args.seed, "LGPS-2x2x1", T, seeds.ROLLOUT) for T in TEMPS]
    t0 = time.perf_counter()
    with torch.no_grad():
        res = rollout(prop, corr, g, sp, sc_sigma, args.steps, 10, gens, max_step_displacement=1000.0, retries=0)
    wall = time.perf_counter() - t0
    print(f"rollouts: {args.steps} steps x {len(TEMPS)} temperatures in {wall:.0f} s")

    acfg = Settings.defaults().analysis
    numbers = np.array([site.specie.Z for site in sc])
    per_T = []
    for k, T in enumerate(TEMPS):
        pos = res.trajectory(k)
        times = np.arange(len(pos)) * dt_ps
        row = analyze_trajectory(pos, times, numbers, sc.lattice.matrix, acfg, seed=args.seed)
        per_T.append({"T_K": T, "n_frames": len(pos), "diverged": bool(res.diverged[k]), "D_method": row["D_method"],
                      "D_li_cm2_s": row.get("D_li"), "D_li_low": row.get("D_li_low"), "D_li_high": row.get("D_li_high"),
                      "D_li_bound": row.get("D_li_bound"), "li_msd_excess_A2": row["li_msd_excess"],
                      "li_hop_A": row["li_hop_A"], "li_molten": bool(row["li_molten"]),
                      "li_site_occupancy": row["li_site_occupancy"],
                      "frame_melted": bool(row["frame_melted"])})
        print(f"{T:6.0f} K: {row['D_method']:>12}  D* = {row.get('D_li')}  [{row.get('D_li_low')}, {row.get('D_li_high')}]"
              f"  excess {row['li_msd_excess']:.1f} Å²  flags: li_molten={row['li_molten']} frame_melted={row['frame_melted']}")
    def fit_of(rows: list[dict]) -> dict | None:
        if len(rows) < 2:
            return None
        f = arrhenius_fit(np.array([r["T_K"] for r in rows]), np.array([r["D_li_cm2_s"] for r in rows]),
                          np.array([r["D_li_low"] for r in rows]), np.array([r["D_li_high"] for r in rows]))
        return {k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in f.items()}

    # (1) the pipeline's ranking rule: resolved, not diverged, no frame_melted and no li_molten flag;
    # (2) resolved, not diverged, frame intact (li_molten ignored: see the README on LGPS)
    resolved = [r for r in per_T if r["D_method"] == "kinisi" and not r["diverged"] and not r["frame_melted"]]
    fits = {"pipeline_rule": {"temperatures_K": [r["T_K"] for r in resolved if not r["li_molten"]],
                              "fit": fit_of([r for r in resolved if not r["li_molten"]])},
            "resolved_frame_intact": {"temperatures_K": [r["T_K"] for r in resolved], "fit": fit_of(resolved)}}
    for name, f in fits.items():
        if f["fit"] is not None:
            ft = f["fit"]
            print(f"E_A ({name}) = {ft['E_A']:.3f} eV (95 % {ft['E_A_low']:.3f}-{ft['E_A_high']:.3f}) from "
                  f"{f['temperatures_K']} K; paper: LiFlow 0.185 (0.181-0.190), AIMD 0.192")
        else:
            print(f"E_A ({name}): fewer than 2 usable temperatures ({f['temperatures_K']})")

    # (a) 1,000 steps of one 200-atom cell at 900 K, streamed to Parquet (memory stays flat)
    timing = {}
    g1 = graph_of(sc, [900.0])
    sp1 = prior_sigma_for(g1, prop.liflow_meta["prior"], fast[:1], fast[:1])
    sc1 = prior_sigma_for(g1, corr.liflow_meta["prior"], fast[:1], fast[:1])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "frames_T900.parquet"
        with schema.StreamingWriter(path, "frames") as w:
            def sink(f, x, ok):
                if ok[0]:
                    w.write(frame_rows(f, x, [0, len(sc)], [0], ["LGPS"], [900.0], "liflow:LGPS", dt_ps))
            t1 = time.perf_counter()
            with torch.no_grad():
                long = rollout(prop, corr, g1, sp1, sc1, args.long_steps, 10,
                               [seeds.rollout_key(args.seed, "LGPS-2x2x1-long", 900.0, seeds.ROLLOUT)],
                               max_step_displacement=1000.0, retries=0, on_frame=sink, progress=True)
            wall_long = time.perf_counter() - t1
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        pos = schema.positions_array(schema.read_table(path, "frames").sort_by("frame")).reshape(-1, len(sc), 3)
        file_mb = path.stat().st_size / 1e6
    row = analyze_trajectory(pos, np.arange(len(pos)) * dt_ps, numbers, sc.lattice.matrix, acfg, seed=args.seed)
    timing["200_atoms_long"] = {
        "n_atoms": len(sc), "T_K": 900.0, "steps": args.long_steps, "n_ok_steps": int(long.n_ok_steps[0]),
        "diverged": bool(long.diverged[0]), "wall_s": wall_long, "s_per_step": wall_long / args.long_steps,
        "s_per_1000_steps": 1000 * wall_long / args.long_steps, "parquet_MB": file_mb,
        "peak_rss_MB_before": rss0 / 1024, "peak_rss_MB_after": rss1 / 1024,
        "frames_in_memory_would_be_MB": (args.long_steps + 1) * len(sc) * 12 / 1e6,
        "D_method": row["D_method"], "D_li_cm2_s": row.get("D_li"), "D_li_low": row.get("D_li_low"),
        "D_li_high": row.get("D_li_high"), "li_molten": bool(row["li_molten"]), "frame_melted": bool(row["frame_melted"])}
    print(f"200 atoms, {args.long_steps} steps at 900 K (streamed): {wall_long:.0f} s "
          f"({wall_long / args.long_steps:.2f} s/step), ok steps {int(long.n_ok_steps[0])}, "
          f"D* = {row.get('D_li')} ({row['D_method']}), peak RSS {rss1 / 1024:.0f} MB")
    # (b) the 4x4x4 supercell of the 50-atom cell (3,200 atoms): a few steps, extrapolated
    big = cell * (4, 4, 4)
    gb = graph_of(big, [900.0])
    spb = prior_sigma_for(gb, prop.liflow_meta["prior"], fast[:1], fast[:1])
    scb = prior_sigma_for(gb, corr.liflow_meta["prior"], fast[:1], fast[:1])
    t1 = time.perf_counter()
    with torch.no_grad():
        rb = rollout(prop, corr, gb, spb, scb, args.big_steps, 10,
                     [seeds.rollout_key(args.seed, "LGPS-4x4x4", 900.0, seeds.ROLLOUT)],
                     max_step_displacement=1000.0, retries=0, on_frame=lambda f, x, ok: None, progress=True)
    per = (time.perf_counter() - t1) / args.big_steps
    timing["3200_atoms_4x4x4"] = {"n_atoms": len(big), "steps_timed": args.big_steps, "s_per_step": per,
                                  "s_per_1000_steps_extrapolated": 1000 * per, "n_ok_steps": int(rb.n_ok_steps[0]),
                                  "corrector": "C_LGPS_0.1 (the paper used a sigma_max 0.2 Corrector here)"}
    print(f"3200 atoms (4x4x4): {per:.2f} s per step -> {1000 * per / 3600:.2f} h per 1,000 steps (~1 ns), "
          f"extrapolated from {args.big_steps} steps")
    s_per_step_200 = wall / args.steps

    out = {"description": "LiFlow LGPS check with the published single-material models (paper section 4.3)",
           "cell": cell_info, "supercell": [2, 2, 1], "n_atoms": len(sc), "delta_tau_ps": dt_ps,
           "steps": args.steps, "n_flow": 10, "temperatures_K": TEMPS, "per_temperature": per_T,
           "arrhenius": fits, "paper": PAPER,
           "rollout_wall_s_4_temperatures_batched": wall, "s_per_step_4x200_atoms_batched": s_per_step_200,
           "timing": timing,
           "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                       "platform": platform.platform(), "device": "cpu"},
           "versions": versions(), "bench_wall_s": time.perf_counter() - t_start}
    write_json_atomic(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
