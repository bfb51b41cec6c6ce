"""The trajectory dataset for training: MSD labels, an index of the reference trajectories, Δτ pairs
streamed from the frame files.

The stage that writes the dataset is ``stages.run_dataset``.

Layout of ``results/dataset/``: see ``stages.run_dataset`` and :mod:`liflow_screen.io.layout`.
Units: Å, ps, K.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
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


@dataclass(frozen=True)
class TrajectoryRef:
    """Where one reference trajectory's frames lie in the dataset; no positions are held.

    Frame ``f`` (in frame order) starts at byte ``start + f * 12 n`` of the positions sidecar of frame
    file ``file`` when ``offsets`` is None (the dataset stage stores each trajectory's frames
    contiguously and in order), else at byte ``offsets[f]``.
    """

    id: str
    reduced_formula: str
    temperature: float    # K
    numbers: np.ndarray   # (n,) atomic numbers
    cell: np.ndarray      # (3, 3) Å
    file: int             # index into the source's frame files
    n_frames: int
    start: int = 0
    offsets: np.ndarray | None = None

    def offset(self, frame: int) -> int:
        """Byte offset of ``frame`` in the sidecar."""
        return self.start + frame * 12 * len(self.numbers) if self.offsets is None else int(self.offsets[frame])


def index_trajectories(dataset_dir: str | Path, splits: Iterable[str]) -> tuple[list[TrajectoryRef], list[Path]]:
    """The 'ok' trajectories of the given splits as :class:`TrajectoryRef`, and the frame files they
    point into. Reads only the ``id`` and ``frame`` columns, one file at a time, and checks each
    file's positions sidecar (``layout.positions_sidecar``) has exactly its rows' positions: memory
    grows with the number of trajectories (a few hundred bytes each), not with their frames.

    Order: temperature, then split, then file, then id (sorted) - the order every pair source samples in.
    """
    root = Path(dataset_dir)
    st = schema.read_df(root / "structures.parquet", "structures", columns=["id", "reduced_formula", "numbers", "cell"])
    st = st.set_index("id")
    labels = schema.read_df(root / "labels.parquet", "labels", columns=["temperature"])
    splits = set(splits)
    by_key: dict[tuple[int, str | None], list[Path]] = {}
    for f in layout.dataset_frame_files(root, sorted(splits)):
        by_key.setdefault(layout.frames_key(f), []).append(f)
    numbers: dict[str, np.ndarray] = {}
    cells: dict[str, np.ndarray] = {}
    refs: list[TrajectoryRef] = []
    files: list[Path] = []
    for T in sorted(labels["temperature"].unique()):
        for split in sorted(splits):
            for f in by_key.get((int(T), split), []):
                table = schema.read_table(f, "frames", columns=["id", "frame"])
                ids = np.asarray(table.column("id").to_pylist(), dtype=str)
                frame_no = table.column("frame").to_numpy()
                uniq, which = np.unique(ids, return_inverse=True)
                for sid in uniq:
                    if sid not in numbers:
                        if sid not in st.index:
                            raise SchemaError(f"{f}: {sid} is not in structures.parquet")
                        row = st.loc[sid]
                        numbers[sid] = np.asarray(row["numbers"], dtype=np.int64)
                        cells[sid] = np.asarray(row["cell"], dtype=np.float64).reshape(3, 3)
                # byte offset of every row in the sidecar (rows hold 3n float32 each)
                row_bytes = np.array([12 * len(numbers[u]) for u in uniq], dtype=np.int64)[which]
                row_start = np.concatenate([[0], np.cumsum(row_bytes)])
                raw = layout.positions_sidecar(f)
                size = raw.stat().st_size if raw.is_file() else -1
                if size != row_start[-1]:
                    raise SchemaError(f"{raw}: {'missing' if size < 0 else f'{size} bytes'}, expected the "
                                      f"{row_start[-1]} bytes of {f.name}'s positions (rebuild the dataset)")
                files.append(f)
                order = np.lexsort((frame_no, ids))  # by id, then frame
                ids_sorted = ids[order]
                bounds = np.flatnonzero(ids_sorted[1:] != ids_sorted[:-1]) + 1
                for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(order)]):
                    sid = str(ids_sorted[lo])
                    rows = order[lo:hi]
                    if (np.diff(frame_no[rows]) == 0).any():
                        raise SchemaError(f"{f}: {sid} stores a frame number twice")
                    contiguous = bool((np.diff(rows) == 1).all())
                    refs.append(TrajectoryRef(
                        sid, st.loc[sid, "reduced_formula"], float(T), numbers[sid], cells[sid], len(files) - 1,
                        int(hi - lo), start=int(row_start[rows[0]]) if contiguous else 0,
                        offsets=None if contiguous else row_start[rows].astype(np.int64)))
    return refs, files


class _RawFrames:
    """Single frames read with ``os.pread`` from the frame files' positions sidecars: no decoding, no
    cache of its own (the operating system's page cache serves repeated reads, outside the process),
    at most ``max_open`` descriptors open at once."""

    def __init__(self, files: list[Path], max_open: int = 256) -> None:
        self.files, self.max_open = files, int(max_open)
        self._fds: OrderedDict[int, int] = OrderedDict()
        self.reads = 0

    def _fd(self, k: int) -> int:
        if k in self._fds:
            self._fds.move_to_end(k)
            return self._fds[k]
        self._fds[k] = os.open(layout.positions_sidecar(self.files[k]), os.O_RDONLY)
        while len(self._fds) > self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        return self._fds[k]

    def frame(self, k: int, offset: int, n: int) -> np.ndarray:
        """(n, 3) float32 positions (Å) at byte ``offset`` of file ``k``'s sidecar."""
        buf = os.pread(self._fd(k), 12 * n, offset)
        if len(buf) != 12 * n:
            raise SchemaError(f"{layout.positions_sidecar(self.files[k])}: truncated (rebuild the dataset)")
        self.reads += 1
        return np.frombuffer(buf, dtype="<f4").reshape(n, 3)

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __del__(self) -> None:
        self.close()


class StreamingPairSource:
    """Samples (X_τ, X_τ+Δτ) pairs from the dataset, reading the two frames of each pair on demand.

    Sampling (Appendix D.3): a trajectory's weight is 1 / (number of structures of its reduced
    composition in the set), split evenly over its temperatures, so each composition is drawn equally
    often; the origin τ is uniform over saved frames with τ + Δτ inside the trajectory. Frames come
    from the positions sidecars (``layout.positions_sidecar``) with one ``pread`` each: the process
    holds an index of the trajectories (no positions), so its memory does not grow with the dataset.
    ``slow`` maps (id, T) to the prior selector's predictions (li_slow, frame_slow).

    Picklable (for DataLoader workers): a copy opens its own files.
    """

    def __init__(self, trajectories: list[TrajectoryRef], files: list[Path], delta_frames: int,
                 slow: dict[tuple[str, int], tuple[bool, bool]] | None = None):
        self.trajs = [t for t in trajectories if t.n_frames > delta_frames]
        if not self.trajs:
            raise SchemaError(f"no trajectory is longer than Δτ ({delta_frames} saved frames)")
        self.files = list(files)
        self.delta = int(delta_frames)
        self.slow = slow or {}
        per_comp: dict[str, set[str]] = {}
        per_struct: dict[str, int] = {}
        for t in self.trajs:
            per_comp.setdefault(t.reduced_formula, set()).add(t.id)
            per_struct[t.id] = per_struct.get(t.id, 0) + 1
        w = np.array([1.0 / (len(per_comp[t.reduced_formula]) * per_struct[t.id]) for t in self.trajs])
        self.weights = w / w.sum()
        self._raw: _RawFrames | None = None

    @classmethod
    def open(cls, dataset_dir: str | Path, splits: Iterable[str], delta_frames: int,
             slow: dict[tuple[str, int], tuple[bool, bool]] | None = None) -> "StreamingPairSource":
        """The source over the 'ok' trajectories of ``splits`` of a dataset folder."""
        refs, files = index_trajectories(dataset_dir, splits)
        return cls(refs, files, delta_frames, slow)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_raw": None}

    @property
    def raw(self) -> _RawFrames:
        if self._raw is None:
            self._raw = _RawFrames(self.files)
        return self._raw

    def __len__(self) -> int:
        return sum(t.n_frames - self.delta for t in self.trajs)

    def draw(self, batch_size: int, rng: np.random.Generator) -> list[tuple[int, int]]:
        """``batch_size`` (trajectory index, origin frame) draws; all randomness of a batch is here."""
        idx = rng.choice(len(self.trajs), size=batch_size, p=self.weights)
        return [(int(k), int(rng.integers(0, self.trajs[int(k)].n_frames - self.delta))) for k in idx]

    def fetch(self, draws: Sequence[tuple[int, int]]) -> list[Any]:
        """The pairs of ``draws`` as ``flow.training.Pair`` objects (frames read from the sidecars)."""
        from ..flow.training import Pair

        pairs = []
        for k, f0 in draws:
            t = self.trajs[k]
            n = len(t.numbers)
            x0, x1 = (self.raw.frame(t.file, t.offset(f), n) for f in (f0, f0 + self.delta))
            li_slow, frame_slow = self.slow.get((t.id, int(round(t.temperature))), (False, False))
            pairs.append(Pair(id=t.id, numbers=t.numbers, cell=t.cell, x0=x0, x1=x1, temperature=t.temperature,
                              li_slow=bool(li_slow), frame_slow=bool(frame_slow)))
        return pairs

    def atoms(self, draw: tuple[int, int]) -> int:
        """Atoms of the pair a draw stands for (from the index, nothing read)."""
        return len(self.trajs[draw[0]].numbers)

    def sample(self, batch_size: int, rng: np.random.Generator) -> list[Any]:
        """``batch_size`` pairs as ``flow.training.Pair`` objects: ``fetch(draw(...))``."""
        return self.fetch(self.draw(batch_size, rng))


def bytes_per_atom_frame(dataset_dir: str | Path) -> float:
    """On-disk bytes of the frame files per stored atom-frame (raw float32 xyz is 12 bytes)."""
    files = layout.dataset_frame_files(dataset_dir)
    size = sum(f.stat().st_size for f in files)
    atoms = 0
    for f in files:
        t = pq.read_table(f, columns=["positions"])
        atoms += int(pc.sum(pc.list_value_length(t.column("positions"))).as_py() or 0) // 3
    return size / atoms if atoms else float("nan")
