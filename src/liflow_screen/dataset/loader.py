"""The trajectory dataset for training: MSD labels, an index of the reference trajectories, Δτ pairs
streamed from the frame files.

The stage that writes the dataset is ``stages.run_dataset``.

Layout of ``results/dataset/``: see ``stages.run_dataset`` and :mod:`liflow_screen.io.layout`.
Units: Å, ps, K.
"""

from __future__ import annotations

import logging
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

    Frame ``f`` (in frame order) is row ``start + f`` of frame file ``file`` when ``rows`` is None
    (the dataset stage writes each trajectory's frames contiguously and in order), else ``rows[f]``.
    """

    id: str
    reduced_formula: str
    temperature: float    # K
    numbers: np.ndarray   # (n,) atomic numbers
    cell: np.ndarray      # (3, 3) Å
    file: int             # index into the source's frame files
    n_frames: int
    start: int = 0
    rows: np.ndarray | None = None

    def row(self, frame: int) -> int:
        return self.start + frame if self.rows is None else int(self.rows[frame])


def index_trajectories(dataset_dir: str | Path, splits: Iterable[str]) -> tuple[list[TrajectoryRef], list[Path]]:
    """The 'ok' trajectories of the given splits as :class:`TrajectoryRef`, and the frame files they
    point into. Reads only the ``id`` and ``frame`` columns, one file at a time: memory grows with the
    number of trajectories (a few hundred bytes each), not with their frames.

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
                files.append(f)
                order = np.lexsort((frame_no, ids))  # by id, then frame
                ids_sorted = ids[order]
                bounds = np.flatnonzero(ids_sorted[1:] != ids_sorted[:-1]) + 1
                for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(order)]):
                    if hi <= lo:
                        continue
                    sid = str(ids_sorted[lo])
                    rows = order[lo:hi]
                    fr = frame_no[rows]
                    if (np.diff(fr) == 0).any():
                        raise SchemaError(f"{f}: {sid} stores a frame number twice")
                    if sid not in numbers:
                        if sid not in st.index:
                            raise SchemaError(f"{f}: {sid} is not in structures.parquet")
                        row = st.loc[sid]
                        numbers[sid] = np.asarray(row["numbers"], dtype=np.int64)
                        cells[sid] = np.asarray(row["cell"], dtype=np.float64).reshape(3, 3)
                    contiguous = bool((np.diff(rows) == 1).all())
                    refs.append(TrajectoryRef(
                        sid, st.loc[sid, "reduced_formula"], float(T), numbers[sid], cells[sid], len(files) - 1,
                        int(hi - lo), start=int(rows[0]) if contiguous else 0,
                        rows=None if contiguous else rows.astype(np.int64)))
    return refs, files


class _RowGroupCache:
    """Decoded ``positions`` row groups of the frame files, least recently used first out, their
    bytes bounded by ``max_bytes`` (the group being read is always kept). Files are opened lazily, at
    most ``max_open`` at once."""

    def __init__(self, files: list[Path], max_bytes: int, max_open: int = 32) -> None:
        self.files, self.max_bytes, self.max_open = files, int(max_bytes), int(max_open)
        self._open: OrderedDict[int, tuple[pq.ParquetFile, np.ndarray]] = OrderedDict()
        self._groups: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.nbytes = 0
        self.peak_bytes = 0
        self.reads = 0

    def _file(self, k: int) -> tuple[pq.ParquetFile, np.ndarray]:
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        try:
            pf = pq.ParquetFile(self.files[k])
        except Exception as exc:
            raise SchemaError(f"{self.files[k]}: unreadable Parquet file ({type(exc).__name__}: {exc})") from exc
        md = pf.metadata
        starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        self._open[k] = (pf, starts)
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return self._open[k]

    def frame(self, k: int, row: int) -> np.ndarray:
        """Row ``row`` of file ``k`` as a flat float32 copy (3n values, Å)."""
        pf, starts = self._file(k)
        g = int(np.searchsorted(starts, row, side="right")) - 1
        key = (k, g)
        if key in self._groups:
            self._groups.move_to_end(key)
            offsets, values = self._groups[key]
        else:
            try:
                col = pf.read_row_group(g, columns=["positions"]).column(0).combine_chunks()
            except Exception as exc:
                raise SchemaError(f"{self.files[k]}: row group {g} unreadable ({type(exc).__name__}: {exc})") from exc
            lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            self.reads += 1
            self._groups[key] = (offsets, values)
            self.nbytes += values.nbytes + offsets.nbytes
            while self.nbytes > self.max_bytes and len(self._groups) > 1:
                _, (o, v) = self._groups.popitem(last=False)
                self.nbytes -= v.nbytes + o.nbytes
            self.peak_bytes = max(self.peak_bytes, self.nbytes)
        r = row - int(starts[g])
        return values[offsets[r]:offsets[r + 1]].copy()


class StreamingPairSource:
    """Samples (X_τ, X_τ+Δτ) pairs from the dataset's frame files, reading row groups on demand.

    Sampling (Appendix D.3): a trajectory's weight is 1 / (number of structures of its reduced
    composition in the set), split evenly over its temperatures, so each composition is drawn equally
    often; the origin τ is uniform over saved frames with τ + Δτ inside the trajectory. The pairs
    depend only on ``rng``, never on ``cache_gb``: the cache (decoded row groups, least recently used
    out) bounds memory, the index holds no positions, so memory does not grow with the dataset.
    ``slow`` maps (id, T) to the prior selector's predictions (li_slow, frame_slow).

    Picklable (for DataLoader workers): a copy opens its own files and starts with an empty cache.
    """

    def __init__(self, trajectories: list[TrajectoryRef], files: list[Path], delta_frames: int,
                 slow: dict[tuple[str, int], tuple[bool, bool]] | None = None, cache_gb: float = 1.0):
        self.trajs = [t for t in trajectories if t.n_frames > delta_frames]
        if not self.trajs:
            raise SchemaError(f"no trajectory is longer than Δτ ({delta_frames} saved frames)")
        self.files = list(files)
        self.delta = int(delta_frames)
        self.slow = slow or {}
        self.cache_bytes = int(float(cache_gb) * 1e9)
        per_comp: dict[str, set[str]] = {}
        per_struct: dict[str, int] = {}
        for t in self.trajs:
            per_comp.setdefault(t.reduced_formula, set()).add(t.id)
            per_struct[t.id] = per_struct.get(t.id, 0) + 1
        w = np.array([1.0 / (len(per_comp[t.reduced_formula]) * per_struct[t.id]) for t in self.trajs])
        self.weights = w / w.sum()
        self._cache: _RowGroupCache | None = None

    @classmethod
    def open(cls, dataset_dir: str | Path, splits: Iterable[str], delta_frames: int,
             slow: dict[tuple[str, int], tuple[bool, bool]] | None = None, cache_gb: float = 1.0) -> "StreamingPairSource":
        """The source over the 'ok' trajectories of ``splits`` of a dataset folder."""
        refs, files = index_trajectories(dataset_dir, splits)
        return cls(refs, files, delta_frames, slow, cache_gb)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}

    @property
    def cache(self) -> _RowGroupCache:
        if self._cache is None:
            self._cache = _RowGroupCache(self.files, self.cache_bytes)
        return self._cache

    def __len__(self) -> int:
        return sum(t.n_frames - self.delta for t in self.trajs)

    def draw(self, batch_size: int, rng: np.random.Generator) -> list[tuple[int, int]]:
        """``batch_size`` (trajectory index, origin frame) draws; all randomness of a batch is here."""
        idx = rng.choice(len(self.trajs), size=batch_size, p=self.weights)
        return [(int(k), int(rng.integers(0, self.trajs[int(k)].n_frames - self.delta))) for k in idx]

    def fetch(self, draws: Sequence[tuple[int, int]]) -> list[Any]:
        """The pairs of ``draws`` as ``flow.training.Pair`` objects (frames read from the files)."""
        from ..flow.training import Pair

        pairs = []
        for k, f0 in draws:
            t = self.trajs[k]
            n = len(t.numbers)
            x0, x1 = (self.cache.frame(t.file, t.row(f)) for f in (f0, f0 + self.delta))
            if x0.size != 3 * n or x1.size != 3 * n:
                raise SchemaError(f"{self.files[t.file]}: {t.id} has {max(x0.size, x1.size) // 3} atoms in its "
                                  f"frames, {n} in structures.parquet")
            li_slow, frame_slow = self.slow.get((t.id, int(round(t.temperature))), (False, False))
            pairs.append(Pair(id=t.id, numbers=t.numbers, cell=t.cell, x0=x0.reshape(n, 3), x1=x1.reshape(n, 3),
                              temperature=t.temperature, li_slow=bool(li_slow), frame_slow=bool(frame_slow)))
        return pairs

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
