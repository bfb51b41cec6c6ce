"""Benchmark: dataset bytes per atom-frame, and pair-sampling throughput vs training consumption.

Uses an existing dataset (default: results/dataset from the default workflow run, real MD);
with --fabricate, builds a paper-like one (112-atom cells, 25 ps at 10 fs, thermal-vibration
random walks) in a scratch folder. Training consumption is read from results/bench/train.json
(steps/s x batch size) when present. Writes results/bench/dataset.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from liflow_screen.core.settings import Settings

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def fabricate(root: Path, n_struct: int = 8, n_atoms: int = 112, n_frames: int = 2501, seed: int = 0) -> dict:
    """MD-like chunk outputs: positions = lattice + thermal noise (σ 0.1 Å) + Li random walk."""
    from liflow_screen.core import config
    from liflow_screen.io import layout, schema
    from liflow_screen.stages import run_dataset as dataset_stage

    rng = np.random.default_rng(seed)
    cfg = Settings.defaults(md={"temperatures": [800], "timestep_fs": 1.0, "save_every": 10, "duration_ps": 25.0})
    cdir = layout.chunk_dir(root / "md", 0)
    srows, status, frames, man = [], [], [], []
    for s in range(n_struct):
        sid = f"fab-{s}"
        numbers = np.array([3] * (n_atoms // 4) + [16] * (n_atoms - n_atoms // 4))
        cell = np.eye(3) * 11.0
        x0 = rng.uniform(0, 11, size=(n_atoms, 3))
        walk = np.cumsum(rng.normal(size=(n_frames, n_atoms, 3)) * 0.02, axis=0) * (numbers == 3)[None, :, None]
        pos = (x0[None] + walk + rng.normal(size=(n_frames, n_atoms, 3)) * 0.1).astype(np.float32)
        srows.append({"id": sid, "reduced_formula": f"LiS{s}", "split": "train", "numbers": numbers.tolist(),
                      "cell": cell.reshape(-1).tolist(), "positions": x0.reshape(-1).tolist(), "n_atoms": n_atoms,
                      "n_li": int((numbers == 3).sum()), "desc_li": [0.0], "desc_frame": [0.0], "energy": 0.0,
                      "relax_status": "ok"})
        status.append({"id": sid, "temperature": 800, "split": "train", "source": "md", "status": "ok", "reason": "",
                       "n_frames": n_frames, "duration_ps": 25.0, "wall_s": 0.0})
        frames += [{"id": sid, "source": "md", "frame": f, "time_ps": np.float32(f * 0.01), "positions": pos[f].reshape(-1),
                    "energy": 0.0, "temperature_inst": np.float32(800)} for f in range(n_frames)]
        man.append({"id": sid, "formula": "x", "reduced_formula": f"LiS{s}", "n_atoms": n_atoms, "li_fraction": 0.25,
                    "band_gap": None, "e_above_hull": None, "source": "bench", "cif": "", "supercell": [1, 1, 1],
                    "n_atoms_supercell": n_atoms, "min_width": 11.0, "split": "train", "chunk": 0, "run_md": True})
    schema.write_rows(srows, cdir / "structures.parquet", "structures")
    schema.write_rows(status, cdir / "status.parquet", "status")
    schema.write_rows(frames, layout.frames_file(cdir, 800), "frames")
    schema.write_rows(man, root / "manifest.parquet", "manifest")
    dataset_stage.run(cfg, root / "manifest.parquet",
                  [cdir / layout.STRUCTURES, cdir / layout.STATUS, layout.frames_file(cdir, 800)], root / "dataset")
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, default=REPO / "results" / "dataset")
    ap.add_argument("--config", type=Path, default=REPO / "results" / "config.resolved.yaml")
    ap.add_argument("--fabricate", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "dataset.json")
    args = ap.parse_args()
    from liflow_screen.core import config
    from liflow_screen.dataset import loader as dataset
    from liflow_screen.io.files import provenance, write_json_atomic

    with tempfile.TemporaryDirectory(prefix="liflow-ds-") as tmp:
        if args.fabricate or not (args.dataset / "labels.parquet").exists():
            cfg = fabricate(Path(tmp))
            root, kind = Path(tmp) / "dataset", "fabricated (8 x 112 atoms, 2501 frames, 800 K)"
        else:
            cfg = Settings.load(args.config)
            root, kind = args.dataset, f"workflow dataset {args.dataset}"
        bpaf = dataset.bytes_per_atom_frame(root)
        t0 = time.perf_counter()
        trajs = dataset.load_trajectories(root, ["train", "val", "test"])
        load_s = time.perf_counter() - t0
        src = dataset.ParquetPairSource(trajs, cfg.delta_tau_frames)
        rng = np.random.default_rng(0)
        batch = 16
        n_batches = 2000
        t0 = time.perf_counter()
        for _ in range(n_batches):
            src.sample(batch, rng)
        pairs_per_s = n_batches * batch / (time.perf_counter() - t0)
    consumption = None
    train_json = REPO / "results" / "bench" / "train.json"
    if train_json.exists():
        tj = json.loads(train_json.read_text())
        sps = tj.get("steps_per_s") or tj.get("train_steps_per_s")
        if sps:
            consumption = float(sps) * int(tj.get("batch_size", batch))
    rec = {
        "dataset": kind,
        "bytes_per_atom_frame": round(bpaf, 3),
        "raw_float32_bytes_per_atom_frame": 12,
        "ratio_to_raw": round(bpaf / 12.0, 3),
        "load_s": round(load_s, 2),
        "pair_sampling_pairs_per_s": round(pairs_per_s, 1),
        "training_consumption_pairs_per_s": None if consumption is None else round(consumption, 1),
        "sampling_over_consumption": None if consumption is None else round(pairs_per_s / consumption, 1),
        "provenance": provenance(cfg, bench="dataset"),
    }
    write_json_atomic(args.out, rec)
    print(json.dumps({k: v for k, v in rec.items() if k != "provenance"}, indent=2))


if __name__ == "__main__":
    main()
