"""Time the LiFlow authors' own Propagator training step (their ``FlowModule``), in this process.

What it runs: ``liflow.model.modules.FlowModule`` and ``liflow.data.dataset.TimeDelayedPairDataset``
from GitHub ``learningmatter-mit/liflow`` at commit e6fc475361d046865f12cae1aee11c4f56c48d87 (MIT
License), imported from the exported tree outside this repository exactly as
``bench/reference_flowsim.py`` does (same default location ``<repo>/../liflow-ref``, same torch_scatter
handling, git blob ids checked); it copies none of their code.

Configuration: their ``liflow/config/train.yaml`` (read from the tree) with the overrides of their
``scripts/train_universal.sh`` for ``P_universal`` (task propagate, adaptive Maxwell-Boltzmann prior with
scales [[1, 10], [0.316, 3.16]]): 64 features, 20 radial functions, 3 layers, 77 element rows, r_max
5 Å, r_offset 0.5 Å, velocity prediction, Adam lr 3e-4, gradient clipping at norm 10 (Lightning's
``gradient_clip_val``), batch 16. Weights are a random initialisation (seeded): a step's cost does not
depend on them.

Data: the pairs are written to a temporary directory in their dataset's file layout (element_index.npy,
atomic_numbers.npy, lattice.npy, positions_<T>K.npz with a 2-frame trajectory [x0, x1] per pair) and
read back by their ``TimeDelayedPairDataset`` with ``time_delay_steps=1`` (so each sample is exactly the
pair) and ``in_memory=True`` (their universal config reads the npz from disk on every sample; with their
much longer trajectories that cost is theirs alone and is not reproduced here). Each sample is what their
``get`` builds: the vesin neighbour list of x0 (numpy, CPU), covalent-radius sums, an adaptive-prior
draw, element rows, temperature, lattice. Batches are collated by PyG's ``Collater`` (what their
``DataLoader`` does) and pinned on CUDA.

Timed per step, in two phases: ``data`` = 16 x ``dataset[i]`` + collate (+ pin); in their training this
runs in 32 DataLoader workers, overlapped with the model. ``step`` = the batch's host-to-device copy,
``FlowModule.training_step`` (draws t on the device, interpolates, forward, loss), ``zero_grad``,
``backward``, ``clip_grad_norm_(10)`` and ``Adam.step``, in the order Lightning's automatic
optimisation runs them, under ``torch.set_float32_matmul_precision("high")`` as their ``train.py``
sets it (restored afterwards), then a CUDA synchronise. It does not go through a Lightning ``Trainer``:
``self.log`` is a no-op without one (its warning is silenced), so Lightning's per-step logging and
progress-bar bookkeeping is not counted.

Usage (smoke test): ``OMP_NUM_THREADS=1 python bench/reference_train.py --steps 2``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from reference_flowsim import (  # noqa: E402
    DEFAULT_REFERENCE_REPO,
    DEFAULT_TORCH_SCATTER_SRC,
    REFERENCE_BLOBS,
    REFERENCE_COMMIT,
    _element_index,
    import_reference,
)

# git blob ids at REFERENCE_COMMIT of what the training path imports or reads (their inference code is
# not used here; the rest is REFERENCE_BLOBS)
TRAIN_BLOBS: dict[str, str] = {
    **{f: b for f, b in REFERENCE_BLOBS.items() if f != "liflow/utils/inference.py"},
    "liflow/data/__init__.py": "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391",
    "liflow/data/dataset.py": "f5d88569e469c3dc8c1188525c8eeed919f0b305",
    "liflow/config/train.yaml": "5783f7a60282d331c661c67038eb388e31b5eb85",
    "scripts/train_universal.sh": "913cf8e6a566374e7919a676ac5be2e9c5fbcac4",
}

# the P_universal command line of their scripts/train_universal.sh, as OmegaConf updates of train.yaml
P_UNIVERSAL_OVERRIDES: dict[str, Any] = {
    "task": "propagate",
    "name": "P_universal",
    "data.index_files": ["train_600K.csv", "train_800K.csv", "train_1000K.csv", "train_1200K.csv"],
    "data.sample_weight_comp": True,
    "propagate_prior.class_name": "AdaptiveMaxwellBoltzmannPrior",
    "propagate_prior.params.scale": [[1.0, 10.0], [0.316, 3.16]],
}
MATMUL_PRECISION = "high"  # their liflow/experiment/train.py sets this at import


@contextlib.contextmanager
def _matmul_precision(value: str) -> Iterator[None]:
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ReferenceTrainer:
    """Their FlowModule + optimizer + dataset over ``pairs`` (``liflow_screen.flow.training.Pair``), ready to
    time steps. ``close()`` removes the temporary data directory."""

    def __init__(self, pairs: Sequence[Any], device: torch.device | str, batch_size: int = 16, seed: int = 0, *,
                 repo: Path = DEFAULT_REFERENCE_REPO, torch_scatter_src: Path = DEFAULT_TORCH_SCATTER_SRC) -> None:
        if not pairs:
            raise ValueError("no pairs")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.repo, self.mismatched, self.torch_scatter = import_reference(
            repo, torch_scatter_src=torch_scatter_src, blobs=TRAIN_BLOBS)
        modules = importlib.import_module("liflow.model.modules")
        dataset_mod = importlib.import_module("liflow.data.dataset")
        prior_mod = importlib.import_module("liflow.utils.prior")
        from omegaconf import OmegaConf
        from torch_geometric.loader.dataloader import Collater

        cfg = OmegaConf.load(self.repo / "liflow" / "config" / "train.yaml")
        for key, value in P_UNIVERSAL_OVERRIDES.items():
            OmegaConf.update(cfg, key, value, merge=False)
        self.cfg = cfg

        element_idx = _element_index()
        self._tmp = tempfile.TemporaryDirectory(prefix="liflow-ref-train-")
        root = Path(self._tmp.name)
        rows = []
        numbers, lattices, by_temp = {}, {}, {}
        for k, p in enumerate(pairs):
            z = np.asarray(p.numbers, dtype=np.int64)
            bad = sorted({int(a) for a in z if not 0 < a < len(element_idx) or element_idx[a] < 0})
            if bad:
                raise ValueError(f"atomic numbers {bad} have no known embedding row in the universal models")
            name = f"pair{k:05d}"
            temp = float(p.temperature)
            numbers[name] = z
            lattices[name] = np.asarray(p.cell, dtype=np.float64)
            # float64 as in their data files (vesin refuses float32 points with a float64 box)
            by_temp.setdefault(temp, {})[name] = np.stack([np.asarray(p.x0, np.float64), np.asarray(p.x1, np.float64)])
            # prior column index: 0 = the small ("slow") scale, 1 = the large one
            rows.append({"name": name, "temp": temp, "t_start": 0, "t_end": 2,
                         "prior_Li": 0 if p.li_slow else 1, "prior_frame": 0 if p.frame_slow else 1})
        np.save(root / "element_index.npy", element_idx)
        np.save(root / "atomic_numbers.npy", np.array(numbers, dtype=object), allow_pickle=True)
        np.save(root / "lattice.npy", np.array(lattices, dtype=object), allow_pickle=True)
        for temp, arrays in by_temp.items():
            np.savez(root / f"positions_{temp}K.npz", **arrays)
        import pandas as pd

        prior = prior_mod.get_prior(cfg.propagate_prior.class_name, **cfg.propagate_prior.params)
        # time_delay_steps=1 over 2-frame trajectories: each sample is (x0, x1) of one pair
        self.dataset = dataset_mod.TimeDelayedPairDataset(
            data_path=str(root), df=pd.DataFrame(rows), time_delay_steps=1, prior=prior, cutoff=cfg.data.cutoff,
            pbc=cfg.data.pbc, neighbor_list_both_ends=False, in_memory=True)
        self.collate = Collater(self.dataset)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = modules.FlowModule(cfg)
        self.module = module.to(self.device).train()
        self.optimizer = self.module.configure_optimizers()
        self.clip = float(cfg.trainer.gradient_clip_val)
        self.rng = np.random.default_rng(seed)
        self._step = 0

    # ---------------------------------------------------------------- one step, in two phases
    def next_batch(self, indices: Sequence[int] | None = None) -> Any:
        """Their samples for ``indices`` (default: batch_size drawn with replacement), collated (+ pinned)."""
        if indices is None:
            indices = self.rng.integers(0, len(self.dataset), self.batch_size)
        batch = self.collate([self.dataset[int(i)] for i in indices])
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return batch

    def train_step(self, batch: Any) -> torch.Tensor:
        """Copy to the device, training_step, zero_grad, backward, clip, Adam; synchronised. Returns the loss."""
        with _matmul_precision(MATMUL_PRECISION), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*self\.log\(\).*")
            batch = batch.to(self.device, non_blocking=True)
            loss = self.module.training_step(batch, self._step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
            self.optimizer.step()
            _sync(self.device)
        self._step += 1
        return loss.detach()

    def time_steps(self, steps: int) -> dict[str, list[float]]:
        """Run ``steps`` steps; per step the data time and the model-step time (s)."""
        data_s, step_s, losses = [], [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            batch = self.next_batch()
            t1 = time.perf_counter()
            loss = self.train_step(batch)
            t2 = time.perf_counter()
            data_s.append(t1 - t0)
            step_s.append(t2 - t1)
            losses.append(float(loss))
        return {"data_s": data_s, "step_s": step_s, "loss": losses}

    # ---------------------------------------------------------------- description
    def n_edges(self, indices: Sequence[int]) -> int:
        return int(self.next_batch(indices).edge_index.shape[1])

    def describe(self) -> dict[str, Any]:
        import lightning
        import omegaconf
        import torch_geometric

        m = self.cfg.model
        return {
            "runner": "learningmatter-mit/liflow FlowModule.training_step (+ zero_grad, backward, clip, Adam)",
            "commit": REFERENCE_COMMIT, "repo": str(self.repo),
            "files_match_commit": not self.mismatched, "mismatched_files": list(self.mismatched),
            "config": "liflow/config/train.yaml + scripts/train_universal.sh P_universal overrides",
            "model": {k: m[k] for k in ("num_features", "num_radial_basis", "num_layers", "num_elements", "r_max",
                                        "r_offset", "ref_temp", "prediction_mode")},
            "params": sum(p.numel() for p in self.module.parameters()),
            "optimizer": f"{self.cfg.optimizer.class_name} lr {self.cfg.optimizer.lr}",
            "gradient_clip_norm": self.clip, "batch_size": self.batch_size,
            "propagate_prior": {"class": str(self.cfg.propagate_prior.class_name),
                                "scale": [list(map(float, r)) for r in self.cfg.propagate_prior.params.scale]},
            "dataset": "TimeDelayedPairDataset(time_delay_steps=1, in_memory=True, neighbor_list_both_ends=False)",
            "neighbour_list": "vesin on CPU in the dataset (per sample, in their DataLoader workers)",
            "float32_matmul_precision": MATMUL_PRECISION,
            "lightning_trainer": False,
            "torch_scatter": self.torch_scatter,
            "versions": {"torch": torch.__version__, "lightning": lightning.__version__,
                         "omegaconf": omegaconf.__version__, "torch_geometric": torch_geometric.__version__,
                         "numpy": np.__version__},
        }

    def close(self) -> None:
        self._tmp.cleanup()


def _summary(times: Sequence[float]) -> dict[str, float]:
    t = np.asarray(times, dtype=np.float64)
    q1, med, q3 = np.percentile(t, [25, 50, 75])
    return {"median_s": float(med), "q1_s": float(q1), "q3_s": float(q3), "mean_s": float(t.mean()),
            "steps_per_s": float(1.0 / med)}


def time_reference_training(pairs: Sequence[Any], steps: int, device: torch.device | str, batch_size: int = 16, *,
                            warmup: int = 3, seed: int = 0, **kw: Any) -> dict[str, Any]:
    """Build their trainer over ``pairs``, run ``warmup`` untimed steps, time ``steps``; steps/s of the
    model step alone (``step``) and of data + step in one process (``serial``)."""
    tr = ReferenceTrainer(pairs, device, batch_size, seed, **kw)
    try:
        t0 = time.perf_counter()
        tr.time_steps(warmup)
        warm = time.perf_counter() - t0
        r = tr.time_steps(steps)
        out = tr.describe()
        out.update({
            "device": str(tr.device), "torch_threads": torch.get_num_threads(), "warmup_steps": warmup,
            "warmup_s": warm, "timed_steps": steps,
            "step": _summary(r["step_s"]), "data": _summary(r["data_s"]),
            "serial": _summary([a + b for a, b in zip(r["data_s"], r["step_s"])]),
            "loss_finite": bool(np.isfinite(r["loss"]).all()),
            "edges_first_batch": tr.n_edges(range(min(batch_size, len(pairs)))),
        })
        return out
    finally:
        tr.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=DEFAULT_REFERENCE_REPO)
    ap.add_argument("--torch-scatter-src", type=Path, default=DEFAULT_TORCH_SCATTER_SRC)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    from bench_train import make_pairs  # the LiF 96-atom pairs of bench/bench_train.py

    out = time_reference_training(make_pairs(64, seed=0), args.steps, args.device, warmup=args.warmup,
                                  repo=args.repo, torch_scatter_src=args.torch_scatter_src)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
