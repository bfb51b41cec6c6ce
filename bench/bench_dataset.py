"""Benchmark: training's pair source at growing dataset sizes: peak memory and pairs/s.

Builds paper-shaped datasets (Appendix C: 112-atom cells, 25 ps saved every 10 fs = 2,501 frames,
4 temperatures; positions = lattice + thermal noise + Li random walk) through the real dataset stage,
at 1x, 4x and 16x a base number of structures, then, for each, in a FRESH process (so that peak RSS
is that size's alone): opens ``StreamingPairSource`` over the train split, draws batches of 16 pairs
as training does, and records peak RSS (ru_maxrss), pairs/s, the time to open (index) and what the
in-memory loader that preceded it held (float32 positions of the split: 12 bytes per atom-frame).
Frames are read with pread from the positions sidecars; the page cache is warm after the build
(the files were just written), which is the steady state of a training job whose dataset fits in
the node's memory; a dataset larger than that reads from disk at the device's random-read rate.

Consumption by training for the ratio: the LiFlow authors' ~20 steps/s at batch 16 on one RTX A5000
(paper, 45-70k steps in 40-60 min: 320 pairs/s). Writes results/bench/dataset.json.

    .venv/bin/python bench/bench_dataset.py [--base 4] [--sizes 1 4 16]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

N_ATOMS, N_FRAMES, TEMPS = 112, 2501, (600, 800, 1000, 1200)
AUTHORS_PAIRS_PER_S = 20 * 16  # ~20 steps/s at batch 16 (the paper's training times)


def settings():
    from liflow_screen.core.settings import Settings

    return Settings.defaults(md={"temperatures": list(TEMPS), "timestep_fs": 1.0, "save_every": 10, "duration_ps": 25.0})


def fabricate(root: Path, n_struct: int, per_chunk: int = 4, seed: int = 0) -> None:
    """MD-like chunk outputs of ``n_struct`` structures (``per_chunk`` per MD chunk), all in the train
    split, then the dataset stage over them (``root/dataset``)."""
    from liflow_screen.io import layout, schema
    from liflow_screen.stages import run_dataset

    rng = np.random.default_rng(seed)
    cfg = settings()
    numbers = np.array([3] * (N_ATOMS // 4) + [16] * (N_ATOMS - N_ATOMS // 4))
    man, files = [], []
    for c0 in range(0, n_struct, per_chunk):
        chunk = c0 // per_chunk
        cdir = layout.chunk_dir(root / "md", chunk)
        srows, status = [], []
        frames: dict[int, list[dict]] = {T: [] for T in TEMPS}
        for s in range(c0, min(n_struct, c0 + per_chunk)):
            sid = f"fab-{s:05d}"
            x0 = rng.uniform(0, 11, size=(N_ATOMS, 3))
            srows.append({"id": sid, "reduced_formula": f"LiS{s}", "split": "train", "numbers": numbers.tolist(),
                          "cell": (np.eye(3) * 11.0).reshape(-1).tolist(), "positions": x0.reshape(-1).tolist(),
                          "n_atoms": N_ATOMS, "n_li": int((numbers == 3).sum()), "desc_li": [0.0], "desc_frame": [0.0],
                          "energy": 0.0, "relax_status": "ok"})
            for T in TEMPS:
                walk = np.cumsum(rng.normal(size=(N_FRAMES, N_ATOMS, 3)).astype(np.float32) * 0.02, axis=0)
                pos = x0[None] + walk * (numbers == 3)[None, :, None] + rng.normal(size=walk.shape).astype(np.float32) * 0.1
                pos = pos.astype(np.float32)
                frames[T] += [{"id": sid, "source": "md", "frame": f, "time_ps": np.float32(f * 0.01),
                               "positions": pos[f].reshape(-1), "energy": 0.0, "temperature_inst": np.float32(T)}
                              for f in range(N_FRAMES)]
                status.append({"id": sid, "temperature": T, "split": "train", "source": "md", "status": "ok",
                               "reason": "", "n_frames": N_FRAMES, "duration_ps": 25.0, "wall_s": 0.0})
            man.append({"id": sid, "formula": "x", "reduced_formula": f"LiS{s}", "n_atoms": N_ATOMS, "li_fraction": 0.25,
                        "band_gap": None, "e_above_hull": None, "source": "bench", "cif": "", "supercell": [1, 1, 1],
                        "n_atoms_supercell": N_ATOMS, "min_width": 11.0, "split": "train", "chunk": chunk,
                        "run_md": True})
        schema.write_rows(srows, cdir / layout.STRUCTURES, "structures")
        schema.write_rows(status, cdir / layout.STATUS, "status")
        files += [cdir / layout.STRUCTURES, cdir / layout.STATUS]
        for T in TEMPS:
            schema.write_rows(frames[T], layout.frames_file(cdir, T), "frames")
            files.append(layout.frames_file(cdir, T))
    schema.write_rows(man, root / "md" / "manifest.parquet", "manifest")
    run_dataset.run(cfg, root / "md" / "manifest.parquet", files, root / "dataset")
    shutil.rmtree(root / "md")  # only the dataset is measured


def measure(dataset: Path, batches: int) -> dict:
    """In this process: open the source, draw ``batches`` batches of 16; peak RSS and rates."""
    from liflow_screen.dataset.loader import StreamingPairSource

    cfg = settings()
    t0 = time.perf_counter()
    src = StreamingPairSource.open(dataset, ["train"], cfg.delta_tau_frames)
    open_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    for _ in range(20):  # warm-up (imports, first files)
        src.sample(16, rng)
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(batches):
            src.sample(16, rng)
        rates.append(batches * 16 / (time.perf_counter() - t0))
    return {"open_s": round(open_s, 3), "pairs_per_s": round(float(np.median(rates)), 1),
            "pairs_per_s_spread": [round(min(rates), 1), round(max(rates), 1)],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "frame_reads": src.raw.reads, "trajectories": len(src.trajs), "pairs": len(src)}


def _measure_fresh(dataset: Path, batches: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", str(dataset), "--batches", str(batches)],
                         capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=int, default=4, help="structures at size 1x (x 4 temperatures)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "dataset.json")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.batches)))
        return
    from liflow_screen.dataset.loader import bytes_per_atom_frame
    from liflow_screen.io.files import provenance, write_json_atomic

    rows = []
    with tempfile.TemporaryDirectory(prefix="liflow-ds-") as tmp:
        for k in args.sizes:
            root = Path(tmp) / f"x{k}"
            n = args.base * k
            t0 = time.perf_counter()
            fabricate(root, n)
            build_s = time.perf_counter() - t0
            ds = root / "dataset"
            disk = sum(f.stat().st_size for f in (ds / "frames").rglob("*.parquet"))
            atom_frames = n * len(TEMPS) * N_FRAMES * N_ATOMS
            m = _measure_fresh(ds, args.batches)
            side = sum(f.stat().st_size for f in (ds / "frames").rglob("*.f32"))
            rows.append({"size": f"{k}x", "structures": n, "trajectories": n * len(TEMPS), "atom_frames": atom_frames,
                         "frames_parquet_mb": round(disk / 1e6, 1), "positions_sidecars_mb": round(side / 1e6, 1),
                         "bytes_per_atom_frame": round(bytes_per_atom_frame(ds), 3),
                         "in_memory_loader_mb": round(atom_frames * 12 / 1e6, 1),
                         "build_s": round(build_s, 1), **m})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(root)
    slowest = min(r["pairs_per_s"] for r in rows)
    rec = {
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()}), 1 thread",
        "sizes": rows,
        **{f"peak_rss_{r['size']}_mb": r["peak_rss_mb"] for r in rows},
        "peak_rss_ratio_largest_to_smallest": round(rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"], 3),
        "in_memory_loader_ratio_largest_to_smallest": round(rows[-1]["in_memory_loader_mb"] / rows[0]["in_memory_loader_mb"], 1),
        "authors_gpu_consumption_pairs_per_s": AUTHORS_PAIRS_PER_S,
        "pairs_per_s_min": slowest,
        "pairs_per_s_over_authors_gpu_consumption": round(slowest / AUTHORS_PAIRS_PER_S, 1),
        "provenance": provenance(settings(), bench="dataset"),
    }
    write_json_atomic(args.out, rec)
    print(json.dumps({k: v for k, v in rec.items() if k not in ("provenance", "sizes")}, indent=2))


if __name__ == "__main__":
    main()
