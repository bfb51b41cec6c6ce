"""Rollout throughput of the batched LiFlow engine on CPU or CUDA, beside the reference-style loop.

One command per device: ``python bench/bench_rollout.py --device cuda|cpu`` writes
``results/bench/rollout_<device>.json``:

* ``sweep``: structure-ps per second for G = 1 ... 2048 (CUDA) or 1, 8, 32 (CPU) copies of the
  112-atom LiFePO4 cell (pymatgen's bundled LiFePO4, 2x2x1, rattled 0.05 Å) at 600-1200 K, with the
  published universal Propagator + Corrector shipped with the package, 10 + 10 flow steps per 1-ps
  step. The first step (CUDA-graph capture, allocator warm-up) is not timed: s/step is the median of
  the following steps, each measured to the step's host sync;
* ``variants``: the same at one batch size with the engine's switches: not compiled (with and without
  CUDA graphs), TF32, BF16;
* ``lgps``: atom-ps per second on the 200-, 3,200- and 25,600-atom LGPS cells (``geometry.tile`` of
  the 200-atom 2x2x1 cell of ``bench_lgps.py``) and the wall time of 1 ns (1,000 steps) of the
  200-atom cell, with the published LGPS models when given (``--lgps-models``), else the universal;
* ``precision``: the per-step deviation of TF32 and BF16 from FP32 (same state, same noise) and,
  with the LGPS models, 150-step LGPS rollouts at 650-1400 K in each precision, whose frames go to
  ``--traj-out`` (``bench/lgps_precision.py`` turns them into D* with kinisi and E_A);
* ``neighbour_list``: the batched cell list against vesin per structure (one call per graph);
* ``reference_style_loop``: one structure at a time, ase's CPU neighbour list rebuilt for every
  model call, geometry recomputed at every flow step (what the published ``FlowSimulator`` does),
  in the same run; on CPU also interleaved ratios, and with ``--old-src`` the previous engine (a
  checkout's ``src``) in subprocesses, interleaved with this one;
* peak device memory of each run.

Cells come from ``bench/data/bench_cells.npz`` (``bench/make_bench_cells.py``): no pymatgen needed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from liflow_screen.core.geometry import radius_graph_pbc, radius_graph_pbc_vesin, tile
from liflow_screen.io.files import versions, write_json_atomic
from liflow_screen.flow.graph import make_batch
from liflow_screen.flow.painn import FlowModel
from liflow_screen.flow.training import load_flow, prior_sigma_for
from liflow_screen.flow.engine import rollout

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CELLS = HERE / "data" / "bench_cells.npz"
TEMPERATURES = (600.0, 800.0, 1000.0, 1200.0)
LGPS_TEMPS = (650.0, 900.0, 1150.0, 1400.0)
DEFAULT_SHARED = REPO.parent / "shared" / "liflow-reference"


# ----------------------------------------------------------------------------- inputs
def load_cells() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{name: (numbers, positions Å, cell Å)} of the benchmark cells."""
    if not CELLS.is_file():
        raise SystemExit(f"{CELLS} is missing: run python bench/make_bench_cells.py")
    f = np.load(CELLS)
    return {n: (f[f"{n}/numbers"], f[f"{n}/positions"], f[f"{n}/cell"]) for n in ("lifepo4", "lgps")}


def universal_models(device: str) -> tuple[FlowModel, FlowModel]:
    """The published universal P + C as shipped with the package (project format)."""
    from liflow_screen.flow.published import shipped_model

    p, c = shipped_model("P_universal"), shipped_model("C_universal")
    if p is None or c is None:
        raise SystemExit("the shipped universal models are missing from the package")
    return load_flow(p, device).eval(), load_flow(c, device).eval()


def lgps_models(folder: Path | None, device: str) -> tuple[FlowModel, FlowModel, str] | None:
    """P_LGPS + C_LGPS_0.1: imported .pt files in ``folder``, else imported from the .ckpt files
    there or in ../shared; None when neither exists."""
    from liflow_screen.flow.published import import_checkpoint

    for base in [folder, DEFAULT_SHARED]:
        if base is None:
            continue
        if (base / "P_LGPS.pt").is_file() and (base / "C_LGPS_0.1.pt").is_file():
            return (load_flow(base / "P_LGPS.pt", device).eval(), load_flow(base / "C_LGPS_0.1.pt", device).eval(),
                    "published P_LGPS + C_LGPS_0.1")
        if (base / "P_LGPS.ckpt").is_file():
            tmp = Path(tempfile.mkdtemp())
            import_checkpoint(base / "P_LGPS.ckpt", tmp / "P_LGPS.pt")
            import_checkpoint(base / "C_LGPS_0.1.ckpt", tmp / "C_LGPS_0.1.pt")
            return (load_flow(tmp / "P_LGPS.pt", device).eval(), load_flow(tmp / "C_LGPS_0.1.pt", device).eval(),
                    "published P_LGPS + C_LGPS_0.1")
    return None


def graph(cell: tuple[np.ndarray, np.ndarray, np.ndarray], n: int, device: str, temps=TEMPERATURES):
    z, x, c = cell
    return make_batch([z] * n, [x] * n, [c] * n, [temps[k % len(temps)] for k in range(n)], device=device)


def sigmas(prop: FlowModel, corr: FlowModel, g) -> tuple[torch.Tensor, torch.Tensor]:
    """Prior widths (Å) of the models' own priors; adaptive classes: Li and frame slow (LiFePO4)."""
    slow = torch.ones(g.n_graphs, dtype=torch.bool, device=g.pos.device)
    return (prior_sigma_for(g, prop.liflow_meta["prior"], slow, slow),
            prior_sigma_for(g, corr.liflow_meta["prior"], slow, slow))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- the batched engine
def timed(prop: FlowModel, corr: FlowModel, g, n_steps: int, device: str, **engine: Any) -> dict[str, Any]:
    """One rollout of ``n_steps`` >= 2 steps; per-step wall times from the frame callback (each step
    ends with the engine's host sync). The first step (captures, warm-up) is reported apart."""
    sp, sc = sigmas(prop, corr, g)
    keys = torch.arange(2 * g.n_graphs, dtype=torch.long).reshape(-1, 2)
    stamps: list[float] = []
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    res = rollout(prop, corr, g, sp, sc, n_steps=n_steps, n_flow=10, generator=keys,
                  on_frame=lambda f, x, ok: stamps.append(time.perf_counter()), **engine)
    wall = time.perf_counter() - t0
    steps = np.diff(stamps)  # stamps[0] is frame 0
    per = float(np.median(steps[1:])) if len(steps) > 1 else float(steps[0])
    n_atoms = int(g.pos.shape[0])
    out = {"n_structures": g.n_graphs, "n_atoms": n_atoms, "n_steps": n_steps, "wall_s": wall,
           "first_step_s": float(steps[0]), "s_per_step": per, "s_per_step_runs": [float(s) for s in steps[1:]],
           "structure_ps_per_s": g.n_graphs / per, "atom_ps_per_s": n_atoms / per,
           "all_steps_completed": bool((res.n_ok_steps == n_steps).all()), "n_diverged": int(res.diverged.sum())}
    if device == "cuda":
        out["peak_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return out


#: (output path, whole report): ``safe`` rewrites the JSON after every measurement, so a run cut
#: short by a time limit still leaves what it measured.
_PARTIAL: list[Any] = []


def safe(label: str, fn, report: dict, key: str) -> Any:
    """Run one measurement; record its error instead of losing the whole run."""
    t = time.perf_counter()
    try:
        val = fn()
    except Exception as exc:  # noqa: BLE001 - a benchmark records what failed and goes on
        val = {"error": f"{type(exc).__name__}: {exc}"}
    print(f"[{time.perf_counter() - t:6.1f} s] {label}: {json.dumps(val, default=str)[:400]}", flush=True)
    report[key] = val
    if _PARTIAL:
        write_json_atomic(_PARTIAL[0], {**_PARTIAL[1], "partial": True})
    return val


# ----------------------------------------------------------------------------- reference-style loop
def reference_forward(model: FlowModel, d: torch.Tensor, t: float, g, edge_index: torch.Tensor,
                      shift: torch.Tensor) -> torch.Tensor:
    """The same function as ``model.forward``, computed the published implementation's way:
    both geometries' edge vectors, lengths and radial features recomputed at every call, one
    filter matmul per geometry and layer, whole-graph (unchunked) out-of-place edge tensors."""
    i, j = edge_index
    x1, x2 = g.pos, g.pos + d
    vec1 = x1[j] - x1[i] + shift
    vec2 = x2[j] - x2[i] + shift
    len1, len2 = torch.linalg.vector_norm(vec1, dim=-1), torch.linalg.vector_norm(vec2, dim=-1)
    unit1, unit2 = vec1 / (len1[:, None] + 1e-8), vec2 / (len2[:, None] + 1e-8)
    (rbf1, fc1), (rbf2, fc2) = model.radial_embedding(len1), model.radial_embedding(len2)
    tt = torch.full((g.n_graphs,), t, device=d.device)
    cont = torch.cat([model.time_embedding(tt), model.temp_embedding(g.temperature / model.ref_temp)], dim=-1)
    s = model.atom_embedding(model.element_index(g.numbers)) + cont[g.batch]
    v = d[..., None] * model.linear_v.weight[:, 0]
    feat = model.features
    for message, update in zip(model.messages, model.updates):
        w = message.linear_W(rbf1) * fc1[:, None] + message.linear_W(rbf2) * fc2[:, None]
        x = message.mlp_phi(s)[j] * w
        fs, fvv, fvs1, fvs2 = torch.split(x, feat, dim=-1)
        msg = v[j] * fvv[:, None] + fvs1[:, None] * unit1[..., None] + fvs2[:, None] * unit2[..., None]
        s = s + torch.zeros_like(s).index_add(0, i, fs)
        v = v + torch.zeros_like(v).index_add(0, i, msg)
        s, v = update(s, v)
    return model.output_block(s, v)


def reference_step(prop: FlowModel, corr: FlowModel, cell, x0: np.ndarray, temperature: float, n_flow: int,
                   rng: np.random.Generator, sig_p: np.ndarray, sig_c: np.ndarray, device: str) -> np.ndarray:
    """One Δτ step for one structure, the reference way; returns new positions (numpy, Å)."""
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    z, _, c = cell
    atoms = Atoms(numbers=z, positions=x0, cell=c, pbc=True)
    masses = atoms.get_masses()

    def flow(model: FlowModel, x_cond: np.ndarray, d: np.ndarray) -> np.ndarray:
        a = atoms.copy()
        a.set_positions(x_cond)
        ii, jj, ss = neighbor_list("ijS", a, model.cutoff)  # CPU list, rebuilt for every model call
        g = make_batch([z], [x_cond], [c], [temperature], device=device)
        edge_index = torch.as_tensor(np.stack([ii, jj]), dtype=torch.long, device=device)
        shift = torch.as_tensor(ss @ c, dtype=torch.float32, device=device)
        dt = torch.as_tensor(d, dtype=torch.float32, device=device)
        with torch.no_grad():
            for i in range(n_flow):  # geometry features recomputed at every flow step
                dt = dt + reference_forward(model, dt, i / n_flow, g, edge_index, shift) / n_flow
        return dt.cpu().numpy().astype(np.float64)  # copied back to numpy between calls

    d = flow(prop, x0, rng.normal(size=x0.shape) * sig_p[:, None])
    x_tilde = x0 + d
    x1 = x_tilde + flow(corr, x_tilde, rng.normal(size=x0.shape) * sig_c[:, None])
    com = lambda x: (masses[:, None] * x).sum(0) / masses.sum()  # noqa: E731
    return x1 - com(x1) + com(x0)


def check_reference_forward(model: FlowModel, cell, device: str) -> float:
    """Max |reference_forward - model.forward| / max |model.forward| (both paths compute one model)."""
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    z, x, c = cell
    g = make_batch([z], [x], [c], [900.0], device=device)
    ii, jj, ss = neighbor_list("ijS", Atoms(numbers=z, positions=x, cell=c, pbc=True), model.cutoff)
    d = 0.1 * torch.randn(len(z), 3, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        ref = reference_forward(model, d, 0.3, g, torch.as_tensor(np.stack([ii, jj]), dtype=torch.long, device=device),
                                torch.as_tensor(ss @ c, dtype=torch.float32, device=device))
        ours = model(d, torch.tensor([0.3], device=device), g)
    return float((ref - ours).abs().max() / ours.abs().max())


def time_reference(prop: FlowModel, corr: FlowModel, cell, n_struct: int, n_steps: int, n_flow: int,
                   device: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    for k in range(n_struct):
        temp = TEMPERATURES[k % len(TEMPERATURES)]
        g = graph(cell, 1, device, (temp,))
        sig_p, sig_c = (s.cpu().numpy().astype(np.float64) for s in sigmas(prop, corr, g))
        x = cell[1].copy()
        for _ in range(n_steps):
            x = reference_step(prop, corr, cell, x, temp, n_flow, rng, sig_p, sig_c, device)
    wall = time.perf_counter() - t0
    return {"n_structures": n_struct, "n_steps": n_steps, "wall_s": wall, "structure_ps_per_s": n_struct * n_steps / wall}


# ----------------------------------------------------------------------------- pieces
def nl_timing(cell, sizes: list[int], device: str) -> dict[str, Any]:
    """Seconds per call: the batched cell list (one call) vs vesin graph by graph; same edges."""
    out = {}
    for n in sizes:
        g = graph(cell, n, device)
        row: dict[str, Any] = {}
        for name, fn in (("batched_cell_list", radius_graph_pbc), ("vesin_per_graph", radius_graph_pbc_vesin)):
            try:
                fn(g.pos, g.cell, g.batch, 5.0, g.ptr)
                sync(device)
                ts = []
                for _ in range(3):
                    t = time.perf_counter()
                    e, _ = fn(g.pos, g.cell, g.batch, 5.0, g.ptr)
                    sync(device)
                    ts.append(time.perf_counter() - t)
                row[name] = {"s_per_call": min(ts), "n_edges": int(e.shape[1])}
            except Exception as exc:  # noqa: BLE001
                row[name] = {"error": f"{type(exc).__name__}: {exc}"}
        out[str(n)] = row
    return out


def precision_deviation(prop, corr, cell, device: str, n: int = 8) -> dict[str, Any]:
    """Max and RMS deviation (Å) of one step and of 10 steps from FP32 (same start, same noise)."""
    g = graph(cell, n, device)
    sp, sc = sigmas(prop, corr, g)
    keys = torch.arange(2 * n).reshape(-1, 2)
    runs = {p: rollout(prop, corr, g, sp, sc, n_steps=10, n_flow=10, generator=keys, precision=p).positions
            for p in ("fp32", "tf32", "bf16")}
    step1 = (runs["fp32"][1] - runs["fp32"][0]).norm(dim=-1)
    out: dict[str, Any] = {"n_structures": n, "fp32_rms_step_A": float(step1.pow(2).mean().sqrt())}
    for p in ("tf32", "bf16"):
        dev1 = (runs[p][1] - runs["fp32"][1]).norm(dim=-1)
        dev10 = (runs[p][10] - runs["fp32"][10]).norm(dim=-1)
        out[p] = {"step1_max_A": float(dev1.max()), "step1_rms_A": float(dev1.pow(2).mean().sqrt()),
                  "step10_max_A": float(dev10.max()), "step10_rms_A": float(dev10.pow(2).mean().sqrt())}
    return out


def lgps_precision_trajectories(models, cell, device: str, n_steps: int, path: Path | None) -> dict[str, Any]:
    """150-step rollouts of the 200-atom LGPS cell at 650-1400 K in each precision (one batch each);
    frames saved (float32) for the kinisi analysis (``bench/lgps_precision.py``)."""
    prop, corr, name = models
    g = graph(cell, len(LGPS_TEMPS), device, LGPS_TEMPS)
    fast = torch.zeros(g.n_graphs, dtype=torch.bool, device=device)
    sp = prior_sigma_for(g, prop.liflow_meta["prior"], fast, fast)
    sc = prior_sigma_for(g, corr.liflow_meta["prior"], fast, fast)
    from liflow_screen.core import seeds

    keys = torch.tensor([seeds.rollout_key(0, "LGPS-2x2x1", T, seeds.ROLLOUT) for T in LGPS_TEMPS])
    arrays: dict[str, np.ndarray] = {"numbers": cell[0], "cell": cell[2], "temperatures": np.array(LGPS_TEMPS),
                                     "delta_tau_ps": np.array(float(prop.liflow_meta.get("delta_tau_ps") or 1.0))}
    out: dict[str, Any] = {"models": name, "n_steps": n_steps}
    for p in ("fp32", "tf32", "bf16"):
        t = time.perf_counter()
        res = rollout(prop, corr, g, sp, sc, n_steps=n_steps, n_flow=10, generator=keys, precision=p,
                      max_step_displacement=1000.0, retries=0)
        out[p] = {"wall_s": time.perf_counter() - t, "n_ok_steps": res.n_ok_steps.tolist()}
        arrays[f"{p}/positions"] = res.positions.numpy().astype(np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **arrays)
        out["trajectories"] = str(path)
    return out


# ----------------------------------------------------------------------------- CPU: old engine, interleaved
WORKER = r"""
import json, sys, time, numpy as np, torch
torch.set_num_threads(int(sys.argv[3]))
from liflow_screen.flow.graph import make_batch
from liflow_screen.flow.training import load_flow, prior_sigma_for
from liflow_screen.flow.engine import rollout
f = np.load(sys.argv[1]); n, steps = [int(x) for x in sys.argv[2].split(",")]
z, x, c = f["lifepo4/numbers"], f["lifepo4/positions"], f["lifepo4/cell"]
T = (600.0, 800.0, 1000.0, 1200.0)
g = make_batch([z] * n, [x] * n, [c] * n, [T[k % 4] for k in range(n)])
p, q = load_flow(sys.argv[4]), load_flow(sys.argv[5])
slow = torch.ones(n, dtype=torch.bool)
sp, sc = prior_sigma_for(g, p.liflow_meta["prior"], slow, slow), prior_sigma_for(g, q.liflow_meta["prior"], slow, slow)
gens = [torch.Generator().manual_seed(k) for k in range(n)]
rollout(p, q, g, sp, sc, n_steps=1, n_flow=10, generator=gens)  # warm-up
t = time.perf_counter(); rollout(p, q, g, sp, sc, n_steps=steps, n_flow=10, generator=gens)
print(json.dumps({"structure_ps_per_s": n * steps / (time.perf_counter() - t)}))
"""


def engine_worker(src: Path, n: int, steps: int, threads: int) -> float:
    """structure-ps/s of the engine in checkout ``src`` (a subprocess), shipped universal models."""
    from liflow_screen.flow.published import shipped_model

    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", WORKER, str(CELLS), f"{n},{steps}", str(threads),
                          str(shipped_model("P_universal")), str(shipped_model("C_universal"))],
                         capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode:
        raise RuntimeError(out.stderr[-800:])
    return float(json.loads(out.stdout.strip().splitlines()[-1])["structure_ps_per_s"])


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="default results/bench/rollout_<device>.json")
    ap.add_argument("--sizes", default=None, help="structures per batch, e.g. 1,8,32 (default by device)")
    ap.add_argument("--variant-size", type=int, default=None, help="batch size of the engine-switch variants")
    ap.add_argument("--lgps-models", type=Path, default=None, help="folder with P_LGPS(.pt|.ckpt), C_LGPS_0.1")
    ap.add_argument("--traj-out", type=Path, default=None, help="npz of the LGPS precision trajectories")
    ap.add_argument("--old-src", type=Path, default=None, help="CPU: a checkout's src/ of the previous engine")
    ap.add_argument("--reference-repo", type=Path, default=None,
                    help="CPU: exported tree of learningmatter-mit/liflow (bench/reference_flowsim.py): time the "
                         "authors' own FlowSimulator in the same interleaved runs")
    ap.add_argument("--repeats", type=int, default=3, help="CPU: interleaved repeats")
    ap.add_argument("--threads", type=int, default=1, help="CPU: torch intra-op threads")
    ap.add_argument("--quick", action="store_true", help="fewer and shorter runs (smoke test)")
    ap.add_argument("--skip-precision", action="store_true", help="leave out the precision measurements")
    ap.add_argument("--lgps-compile", action="store_true", help="CUDA: also time the LGPS cells without compile")
    args = ap.parse_args()
    dev = args.device
    cuda = dev == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    torch.set_num_threads(args.threads if not cuda else max(1, os.cpu_count() or 1))
    out_path = args.out or REPO / "results" / "bench" / f"rollout_{dev}.json"
    t_start = time.perf_counter()
    cells = load_cells()
    lfp, lgps = cells["lifepo4"], cells["lgps"]
    prop, corr = universal_models(dev)
    sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes else
             ([1, 8, 32, 128, 512, 2048] if cuda else [1, 8, 32]))
    if args.quick:
        sizes = sizes[:3]
    report: dict[str, Any] = {
        "description": "LiFlow rollout throughput: structure-ps per second (1 ps per Δτ step, 10 Propagator + 10 "
                       "Corrector evaluations per step), published universal P + C shipped with the package",
        "structure": {"lifepo4": "pymatgen LiFePO4.json 2x2x1, 112 atoms, rattled 0.05 Å",
                      "lgps": "ordered Li10GeP2S12 (bench_lgps.py) 2x2x1, 200 atoms; tiles of it"},
        "machine": {"device": dev, "platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "versions": versions()}
    _PARTIAL[:] = [out_path, report]
    if cuda:
        p = torch.cuda.get_device_properties(0)
        report["machine"].update({"gpu": p.name, "gpu_memory_GiB": p.total_memory / 2**30,
                                  "cuda": torch.version.cuda, "sm_count": p.multi_processor_count})

    # 1. the engine agrees with itself across paths
    def parity() -> dict[str, Any]:
        out: dict[str, Any] = {"reference_forward_rel_err": max(check_reference_forward(prop, lfp, dev),
                                                                check_reference_forward(corr, lfp, dev))}
        if cuda:
            pc, cc = universal_models("cpu")
            g_cpu, g_dev = graph(lfp, 2, "cpu"), graph(lfp, 2, dev)
            d = 0.1 * torch.randn(g_cpu.pos.shape, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                a = pc(d, torch.tensor([0.3, 0.6]), g_cpu)
                b = prop(d.to(dev), torch.tensor([0.3, 0.6], device=dev), g_dev).cpu()
            out["cpu_vs_cuda_forward_max_abs_A"] = float((a - b).abs().max())
            g8 = graph(lfp, 8, dev)
            sp, sc = sigmas(prop, corr, g8)
            keys = torch.arange(16).reshape(8, 2)
            ra = rollout(prop, corr, g8, sp, sc, n_steps=3, n_flow=10, generator=keys, cuda_graphs=True)
            rb = rollout(prop, corr, g8, sp, sc, n_steps=3, n_flow=10, generator=keys, cuda_graphs=False)
            out["cuda_graph_vs_eager_3_steps_max_abs_A"] = float((ra.positions - rb.positions).abs().max())
        return out

    safe("parity", parity, report, "parity")

    # 2. throughput sweep (default engine: fp32, CUDA graphs and torch.compile on CUDA). Batches past
    # 1,024 structures run last: their edge tensors pass 2^31 elements, so torch.compile builds
    # 64-bit-indexed kernels, and those were then picked for the smaller calls after them (measured)
    sweep: dict[str, Any] = {}

    def run_sweep(ns: list[int]) -> None:
        for n in ns:
            steps = 3 if args.quick else (6 if n <= 128 else 4)
            safe(f"sweep G={n}", lambda n=n, steps=steps: timed(prop, corr, graph(lfp, n, dev), steps, dev), sweep,
                 str(n))

    run_sweep([n for n in sizes if n <= 1024])
    report["sweep"] = sweep
    ok = {k: v for k, v in sweep.items() if "structure_ps_per_s" in v}
    best = max(ok, key=lambda k: ok[k]["structure_ps_per_s"]) if ok else None
    report["best"] = {"n_structures": int(best), **ok[best]} if best else None

    # 3. engine switches at one batch size
    vsize = args.variant_size or (int(best) if best and cuda else (8 if not cuda else 512))
    variants: dict[str, Any] = {}
    switches = {"fp32_not_compiled": dict(compile=False), "fp32_not_compiled_no_cuda_graphs":
                dict(compile=False, cuda_graphs=False), "tf32": dict(precision="tf32"), "bf16": dict(precision="bf16")}
    if not cuda:
        switches = {"edge_chunk_2048": dict(edge_chunk=2048), "whole_graph_no_chunks": dict(edge_chunk=None)}
    for name, kw in switches.items():
        safe(f"variant {name} G={vsize}", lambda kw=kw: timed(prop, corr, graph(lfp, vsize, dev), 3 if args.quick else 5,
                                                              dev, **kw), variants, name)
    report["variants"] = {"n_structures": vsize, **variants}

    # 4. LGPS sizes and 1 ns of 200 atoms (LGPS models when available)
    lg = lgps_models(args.lgps_models, dev)
    lp, lc, lname = lg if lg is not None else (prop, corr, "published universal P + C (LGPS models not given)")
    lgps_out: dict[str, Any] = {"models": lname}
    modes = [("", {})] + ([("_not_compiled", {"compile": False})] if cuda and args.lgps_compile else [])
    for suffix, kw in modes:
        for label, reps, steps in (("200", (1, 1, 1), 1000 if not args.quick else 20), ("3200", (2, 2, 4), 20),
                                   ("25600", (4, 4, 8), 6)):
            if not cuda and label != "200":
                steps = 2
            if not cuda and label == "200":
                steps = 4
            z, x, c = tile(*lgps, reps)
            safe(f"LGPS {label} atoms{suffix}", lambda z=z, x=x, c=c, steps=steps, kw=kw: timed(
                lp, lc, graph((z, x, c), 1, dev, (900.0,)), steps, dev, **kw), lgps_out, label + suffix)
    for suffix, _ in modes:
        r200 = lgps_out.get("200" + suffix, {})
        if "wall_s" in r200 and r200["n_steps"] == 1000:
            lgps_out["wall_s_per_ns_200_atoms" + suffix] = r200["wall_s"]
            lgps_out["wall_s_per_ns_200_atoms_after_first_step" + suffix] = r200["wall_s"] - r200["first_step_s"]
        elif "s_per_step" in r200:
            lgps_out["wall_s_per_ns_200_atoms_extrapolated" + suffix] = 1000 * r200["s_per_step"]
    report["lgps"] = lgps_out

    # 5. precision
    if not args.skip_precision:
        safe("precision deviation", lambda: precision_deviation(prop, corr, lfp, dev), report, "precision")
    if lg is not None and (cuda or not args.quick) and not args.skip_precision:
        safe("LGPS precision trajectories", lambda: lgps_precision_trajectories(
            lg, lgps, dev, 150 if not args.quick else 10, args.traj_out), report, "lgps_precision")

    # 6. neighbour lists
    safe("neighbour list", lambda: nl_timing(lfp, [8, 512] if cuda else [8, 32], dev), report, "neighbour_list")

    # 7. reference-style loop (same run) and, on CPU, interleaved ratios / the previous engine
    def reference() -> dict[str, Any]:
        time_reference(prop, corr, lfp, 1, 1, 10, dev)  # warm-up
        runs = [time_reference(prop, corr, lfp, 1, 2 if cuda else 1, 10, dev) for _ in range(2 if cuda else 1)]
        return {"structure_ps_per_s": statistics.median(r["structure_ps_per_s"] for r in runs), "runs": runs,
                "method": "one structure at a time (as the published FlowSimulator): ase neighbour list on the "
                          "CPU for every Propagator and Corrector integration; both geometries' features "
                          "recomputed at every flow step, unchunked; numpy copies between calls"}

    safe("reference-style loop", reference, report, "reference_style_loop")
    run_sweep([n for n in sizes if n > 1024])
    ok = {k: v for k, v in sweep.items() if "structure_ps_per_s" in v}
    best = max(ok, key=lambda k: ok[k]["structure_ps_per_s"]) if ok else None
    report["best"] = {"n_structures": int(best), **ok[best]} if best else None
    ref = report["reference_style_loop"]
    if "structure_ps_per_s" in ref:
        report["speedup_vs_reference_style"] = {k: v["structure_ps_per_s"] / ref["structure_ps_per_s"]
                                                for k, v in ok.items()}
    if not cuda:
        def interleaved() -> dict[str, Any]:
            """R, B1, B8, B32, (old 8), R, ...: each batched run over the mean of the reference runs around it."""
            refs = [time_reference(prop, corr, lfp, 1, 1, 10, dev)["structure_ps_per_s"]]
            fsim = None
            if args.reference_repo is not None:
                sys.path.insert(0, str(HERE))
                from reference_flowsim import load_reference, time_flowsimulator

                fsim = load_reference(repo=args.reference_repo, ckpt_dir=DEFAULT_SHARED)
                time_flowsimulator(fsim, *lfp, temperature_K=800.0, n_steps=1)  # warm-up
            fsim_runs: list[float] = []
            runs: dict[str, list[float]] = {str(n): [] for n in sizes}
            old: dict[str, list[float]] = {str(n): [] for n in sizes if n >= 8}
            new_sub: dict[str, list[float]] = {k: [] for k in old}
            for _ in range(args.repeats):
                for n in sizes:
                    runs[str(n)].append(timed(prop, corr, graph(lfp, n, dev), 3 if n <= 8 else 2, dev)["structure_ps_per_s"])
                    if args.old_src is not None and str(n) in old:
                        old[str(n)].append(engine_worker(args.old_src, n, 2, args.threads))
                        new_sub[str(n)].append(engine_worker(REPO / "src", n, 2, args.threads))
                refs.append(time_reference(prop, corr, lfp, 1, 1, 10, dev)["structure_ps_per_s"])
                if fsim is not None:
                    fsim_runs.append(time_flowsimulator(fsim, *lfp, temperature_K=800.0, n_steps=1)["structure_ps_per_s"])
            res: dict[str, Any] = {"reference_runs": refs}
            if fsim_runs:
                res["flowsimulator_runs"] = fsim_runs
                res["flowsimulator_source"] = f"{args.reference_repo} (learningmatter-mit/liflow e6fc475, imported)"
            for n, rs in runs.items():
                ratios = [r / statistics.mean(refs[k:k + 2]) for k, r in enumerate(rs)]
                res[n] = {"structure_ps_per_s_runs": rs, "ratio_vs_reference_runs": ratios,
                          "ratio_vs_reference_median": statistics.median(ratios),
                          "ratio_spread": [min(ratios), max(ratios)]}
                if fsim_runs:  # each batched run over the FlowSimulator run of the same repeat
                    fr = [r / f for r, f in zip(rs, fsim_runs)]
                    res[n].update({"ratio_vs_flowsimulator_runs": fr, "ratio_vs_flowsimulator_median": statistics.median(fr),
                                   "ratio_vs_flowsimulator_spread": [min(fr), max(fr)]})
            if args.old_src is not None:
                res["previous_engine"] = {
                    n: {"old_structure_ps_per_s_runs": old[n], "new_structure_ps_per_s_runs": new_sub[n],
                        "new_over_old_runs": [a / b for a, b in zip(new_sub[n], old[n])],
                        "new_over_old_median": statistics.median(a / b for a, b in zip(new_sub[n], old[n]))}
                    for n in old}
                res["previous_engine_source"] = str(args.old_src)
            return res

        safe("interleaved CPU ratios", interleaved, report, "interleaved")

    report["bench_wall_s"] = time.perf_counter() - t_start
    write_json_atomic(out_path, report)
    print(f"wrote {out_path} in {report['bench_wall_s']:.0f} s")


if __name__ == "__main__":
    main()
