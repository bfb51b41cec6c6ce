"""The trajectory dataset in memory: MSD labels, reference trajectories, Δτ pair sampling.

The stage that writes the dataset is ``stages.run_dataset``.

Layout of ``results/dataset/``: see ``stages.run_dataset`` and :mod:`liflow_screen.io.layout`.
Units: Å, ps, K.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..io import layout, schema
from ..core.errors import SchemaError

log = logging.getLogger(__name__)


def msd_labels(pos: np.ndarray, is_li: np.ndarray, times_ps: np.ndarray) -> dict[str, float]:
    """Per group (Li, frame): MSD (Å²) at the last frame from frame 0 (Eq. 12), MSD/τ (Å²/ps), and
    the mobility rate (Å²/ps, :func:`analysis.mobility_rate`) on which the slow/fast label rests.

    ``pos`` (F, n, 3) unwrapped Å; an empty group gives NaN.
    """
    from ..analysis import mobility_rate

    if not np.isfinite(pos).all():
        raise SchemaError("trajectory contains NaN or infinite positions")
    disp = pos[-1].astype(np.float64) - pos[0].astype(np.float64)
    sq = (disp**2).sum(axis=1)
    tau = float(times_ps[-1] - times_ps[0])
    out = {"duration_ps": tau}
    for name, mask in (("li", is_li), ("frame", ~is_li)):
        msd = float(sq[mask].mean()) if mask.any() else float("nan")
        out[f"msd_{name}"] = msd
        out[f"msd_{name}_per_ps"] = msd / tau if tau > 0 else float("nan")
        out[f"rate_{name}"] = mobility_rate(pos, times_ps, mask) if mask.any() and len(pos) > 1 else float("nan")
    return out


# ----------------------------------------------------------------------------------- pairs


@dataclass
class Trajectory:
    """One reference trajectory held in memory (float32 positions, Å)."""

    id: str
    reduced_formula: str
    temperature: float
    numbers: np.ndarray   # (n,)
    cell: np.ndarray      # (3,3)
    positions: np.ndarray  # (F, n, 3)


def load_trajectories(dataset_dir: str | Path, splits: Iterable[str]) -> list[Trajectory]:
    """All 'ok' trajectories of the given splits, positions as float32 arrays in memory."""
    root = Path(dataset_dir)
    st = schema.read_df(root / "structures.parquet", "structures").set_index("id")
    labels = schema.read_df(root / "labels.parquet", "labels")
    splits = set(splits)
    out: list[Trajectory] = []
    by_key: dict[tuple[int, str | None], list[Path]] = {}
    for f in layout.dataset_frame_files(root, sorted(splits)):
        by_key.setdefault(layout.frames_key(f), []).append(f)
    for T in sorted(labels["temperature"].unique()):
        for split in sorted(splits):
            for f in by_key.get((int(T), split), []):
                table = schema.read_table(f, "frames", columns=["id", "frame", "positions"])
                ids = table.column("id").to_pylist()
                for sid in sorted(set(ids)):
                    sub = table.filter(pc.equal(table.column("id"), sid)).sort_by("frame")
                    row = st.loc[sid]
                    numbers = np.asarray(row["numbers"], dtype=np.int64)
                    pos = schema.positions_array(sub)
                    if pos.shape[1] != len(numbers):
                        raise SchemaError(f"{f}: {sid} has {pos.shape[1]} atoms in its frames, {len(numbers)} in structures.parquet")
                    out.append(Trajectory(sid, row["reduced_formula"], float(T), numbers,
                                          np.asarray(row["cell"], dtype=np.float64).reshape(3, 3), pos))
    return out


class ParquetPairSource:
    """Samples (X_τ, X_τ+Δτ) pairs from dataset trajectories with composition-balanced weights.

    A trajectory's weight is 1 / (number of structures of its reduced composition in the set),
    split evenly over its temperatures, so each composition is drawn equally often (Appendix D.3).
    The origin τ is uniform over saved frames with τ + Δτ inside the trajectory.
    ``slow`` maps (id, T) to the prior selector's predictions (li_slow, frame_slow).
    """

    def __init__(self, trajectories: list[Trajectory], delta_frames: int,
                 slow: dict[tuple[str, int], tuple[bool, bool]] | None = None):
        self.trajs = [t for t in trajectories if t.positions.shape[0] > delta_frames]
        if not self.trajs:
            raise SchemaError(f"no trajectory is longer than Δτ ({delta_frames} saved frames)")
        self.delta = int(delta_frames)
        self.slow = slow or {}
        per_comp: dict[str, set[str]] = {}
        for t in self.trajs:
            per_comp.setdefault(t.reduced_formula, set()).add(t.id)
        per_struct: dict[str, int] = {}
        for t in self.trajs:
            per_struct[t.id] = per_struct.get(t.id, 0) + 1
        w = np.array([1.0 / (len(per_comp[t.reduced_formula]) * per_struct[t.id]) for t in self.trajs])
        self.weights = w / w.sum()

    def __len__(self) -> int:
        return sum(t.positions.shape[0] - self.delta for t in self.trajs)

    def sample(self, batch_size: int, rng: np.random.Generator) -> list[Any]:
        """``batch_size`` pairs as ``flow.training.Pair`` objects."""
        from ..flow.training import Pair

        idx = rng.choice(len(self.trajs), size=batch_size, p=self.weights)
        pairs = []
        for k in idx:
            t = self.trajs[int(k)]
            f0 = int(rng.integers(0, t.positions.shape[0] - self.delta))
            li_slow, frame_slow = self.slow.get((t.id, int(round(t.temperature))), (False, False))
            pairs.append(Pair(id=t.id, numbers=t.numbers, cell=t.cell, x0=t.positions[f0],
                              x1=t.positions[f0 + self.delta], temperature=t.temperature,
                              li_slow=bool(li_slow), frame_slow=bool(frame_slow)))
        return pairs


def bytes_per_atom_frame(dataset_dir: str | Path) -> float:
    """On-disk bytes of the frame files per stored atom-frame (raw float32 xyz is 12 bytes)."""
    files = layout.dataset_frame_files(dataset_dir)
    size = sum(f.stat().st_size for f in files)
    atoms = 0
    for f in files:
        t = pq.read_table(f, columns=["positions"])
        atoms += int(pc.sum(pc.list_value_length(t.column("positions"))).as_py() or 0) // 3
    return size / atoms if atoms else float("nan")
