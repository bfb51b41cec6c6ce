"""The single Parquet schema module: table schemas, atomic writes, schema-checked reads.

Every file written here carries provenance (config digest + versions) in its key-value
metadata under ``liflow_screen``. Units: Å, ps, K, eV, amu.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ..core.errors import SchemaError
from .files import atomic_path

META_KEY = b"liflow_screen"
SPLITS = ("train", "val", "test")

#: results/structures/manifest.parquet: one row per input structure (unit cell as CIF).
MANIFEST = pa.schema([
    ("id", pa.string()),
    ("formula", pa.string()),            # full formula of the unit cell, e.g. "Li12 P4 S16"
    ("reduced_formula", pa.string()),    # composition key of the split, e.g. "Li3PS4"
    ("n_atoms", pa.int32()),             # atoms in the unit cell
    ("li_fraction", pa.float64()),
    ("band_gap", pa.float64()),          # eV, null when unknown
    ("e_above_hull", pa.float64()),      # eV/atom, null when unknown
    ("source", pa.string()),             # where it came from (MP id + db version, citation, file)
    ("cif", pa.string()),                # unit cell, CIF text
    ("supercell", pa.list_(pa.int32(), 3)),  # diagonal repeats so all widths >= min_width
    ("n_atoms_supercell", pa.int32()),
    ("min_width", pa.float64()),         # Å, smallest perpendicular width of the supercell
    ("split", pa.string()),              # train | val | test (by reduced composition)
    ("chunk", pa.int32()),               # work chunk index for MD / rollout jobs
    ("run_md", pa.bool_()),              # whether reference MD is run for it
])

#: Relaxed supercells with descriptors (md chunks -> dataset/structures.parquet).
STRUCTURES = pa.schema([
    ("id", pa.string()),
    ("reduced_formula", pa.string()),
    ("split", pa.string()),
    ("numbers", pa.list_(pa.int16())),      # atomic numbers, supercell order
    ("cell", pa.list_(pa.float64(), 9)),    # Å, rows a, b, c flattened
    ("positions", pa.list_(pa.float64())),  # Å, relaxed supercell, flattened (n*3)
    ("n_atoms", pa.int32()),
    ("n_li", pa.int32()),
    ("desc_li", pa.list_(pa.float32())),    # mean invariant features of Li atoms
    ("desc_frame", pa.list_(pa.float32())), # mean invariant features of non-Li atoms
    ("energy", pa.float64()),               # eV, after relaxation
    ("relax_status", pa.string()),          # ok | not_converged | failed: <reason> | skipped: <reason>
])

#: Trajectory frames (reference MD and LiFlow rollouts share it). Partitioned by
#: temperature and split on disk, so those two live in the path, not the file.
FRAMES = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),                # "md" or "liflow:<variant>"
    ("replica", pa.int16()),                # independent trajectory r of this (id, T, source); 0 for MD
    ("frame", pa.int32()),                  # saved-frame index, 0 = initial
    ("time_ps", pa.float32()),
    ("positions", pa.list_(pa.float32())),  # Å, unwrapped Cartesian, flattened (n*3)
    ("energy", pa.float64()),               # eV (potential energy; null for rollouts)
    ("temperature_inst", pa.float32()),     # K (instantaneous; null for rollouts)
])
FRAME_PARTITIONS = pa.schema([("temperature", pa.int32()), ("split", pa.string())])

#: One row per trajectory (structure, temperature): how it ended.
STATUS = pa.schema([
    ("id", pa.string()),
    ("temperature", pa.int32()),            # K
    ("split", pa.string()),
    ("source", pa.string()),
    ("replica", pa.int16()),                # which replica trajectory (rollout.replicas); 0 for MD
    ("status", pa.string()),                # ok | exploded | nan | relax_failed | diverged | error
    ("reason", pa.string()),
    ("n_frames", pa.int32()),
    ("duration_ps", pa.float64()),
    ("wall_s", pa.float64()),
])


def status_row(sid: str, temperature: float, split: str, source: str, status: str, reason: str = "",
               n_frames: int = 0, duration_ps: float = 0.0, wall_s: float = 0.0, replica: int = 0) -> dict[str, Any]:
    """One :data:`STATUS` row: how replica ``replica`` of the (structure, temperature K) trajectory
    of ``source`` ended."""
    return {"id": str(sid), "temperature": int(round(float(temperature))), "split": str(split), "source": source,
            "replica": int(replica), "status": status, "reason": reason, "n_frames": int(n_frames),
            "duration_ps": float(duration_ps), "wall_s": float(wall_s)}


#: Per-trajectory labels for the prior selector (dataset/labels.parquet).
LABELS = pa.schema([
    ("id", pa.string()),
    ("temperature", pa.int32()),
    ("split", pa.string()),
    ("duration_ps", pa.float64()),
    ("msd_li", pa.float64()),               # Å^2 at the last frame (Eq. 12, single origin)
    ("msd_frame", pa.float64()),
    ("msd_li_per_ps", pa.float64()),        # MSD / τ, Å^2/ps
    ("msd_frame_per_ps", pa.float64()),
    ("rate_li", pa.float64()),              # mobility rate, Å^2/ps (analysis.mobility_rate)
    ("rate_frame", pa.float64()),
    ("slow_li", pa.bool_()),                # rate < dataset.slow_threshold
    ("slow_frame", pa.bool_()),
])

#: The adaptive-prior class each rollout (structure, temperature) used, and how it was chosen.
PRIORS = pa.schema([
    ("id", pa.string()),
    ("temperature", pa.int32()),            # K
    ("source", pa.string()),                # liflow:<variant>
    ("method", pa.string()),                # selector | pilot | pilot:monotone | fast | slow | none (non-adaptive prior)
    ("li_slow", pa.bool_()),                # True = small Li prior scale
    ("frame_slow", pa.bool_()),
    ("p_slow_li", pa.float64()),            # selector P(slow) (null for other methods)
    ("p_slow_frame", pa.float64()),
    ("pilot_rate_li", pa.float64()),        # pilot rollout mobility rate, Å^2/ps (method pilot)
    ("pilot_rate_frame", pa.float64()),
    ("uncertain", pa.bool_()),              # selector P within 0.15 of 0.5, or pilot rate within 2x of the threshold
])

SCHEMAS: dict[str, pa.Schema] = {
    "manifest": MANIFEST, "structures": STRUCTURES, "frames": FRAMES, "status": STATUS, "labels": LABELS,
    "priors": PRIORS,
}


def _with_meta(schema: pa.Schema, prov: dict[str, Any] | None, kind: str) -> pa.Schema:
    meta = {b"liflow_kind": kind.encode()}
    if prov is not None:
        meta[META_KEY] = json.dumps(prov, default=str, sort_keys=True).encode()
    return schema.with_metadata(meta)


#: Columns that a writer may leave out, and the value they then take.
COLUMN_DEFAULTS: dict[str, Any] = {"replica": 0}


def to_table(df: pd.DataFrame | list[dict[str, Any]], kind: str) -> pa.Table:
    """Build an Arrow table of schema ``kind`` from a DataFrame or list of row dicts (columns of
    :data:`COLUMN_DEFAULTS` may be left out)."""
    schema = SCHEMAS[kind]
    if isinstance(df, list):
        cols = {f.name: [r.get(f.name, COLUMN_DEFAULTS.get(f.name)) for r in df] for f in schema}
        return pa.table(cols, schema=schema)
    df = df.assign(**{c: v for c, v in COLUMN_DEFAULTS.items() if c in schema.names and c not in df.columns})
    missing = [f.name for f in schema if f.name not in df.columns]
    if missing:
        raise SchemaError(f"{kind} table is missing columns: {', '.join(missing)}")
    return pa.Table.from_pandas(df[[f.name for f in schema]], schema=schema, preserve_index=False)


def _is_float(t: pa.DataType) -> bool:
    while pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    return pa.types.is_floating(t)


def _leaf_path(f: pa.Field) -> str:
    """Parquet column path of a (possibly list-nested) field, e.g. 'positions.list.element'."""
    path, t = f.name, f.type
    while pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
        path, t = path + ".list.element", t.value_type
    return path


def write_table(table: pa.Table, path: str | Path, kind: str, prov: dict[str, Any] | None = None,
                zstd_level: int = 3) -> None:
    """Write ``table`` (schema ``kind``) to ``path`` atomically, zstd-compressed, with provenance."""
    expected = SCHEMAS[kind]
    if not table.schema.remove_metadata().equals(expected):
        table = table.select([f.name for f in expected]).cast(expected)
    table = table.replace_schema_metadata(_with_meta(expected, prov, kind).metadata)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", compression_level=zstd_level, **_writer_options(expected))


def _writer_options(expected: pa.Schema) -> dict[str, Any]:
    """Dictionary-encode only the repetitive string columns; floats use BYTE_STREAM_SPLIT, which
    lets zstd compress positions ~25 % below raw float32 (dictionary makes them larger)."""
    return {"use_dictionary": [f.name for f in expected if pa.types.is_string(f.type)],
            "use_byte_stream_split": [_leaf_path(f) for f in expected if _is_float(f.type)]}


class StreamingWriter:
    """Append rows of schema ``kind`` to ``path`` in row groups as they come; the file appears only
    when :meth:`close` succeeds (temp file + rename), so an interrupted writer leaves nothing.

    Use as a context manager; an exception inside the block discards the temp file.
    """

    def __init__(self, path: str | Path, kind: str, prov: dict[str, Any] | None = None, zstd_level: int = 3,
                 rows_per_group: int = 2048) -> None:
        self.kind, self.rows_per_group = kind, int(rows_per_group)
        self.schema = _with_meta(SCHEMAS[kind], prov, kind)
        self._atomic = atomic_path(path)  # the same temp-file-then-rename as every other writer
        self.tmp = self._atomic.__enter__()
        self._writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd", compression_level=zstd_level,
                                        **_writer_options(SCHEMAS[kind]))
        self._buf: list[dict[str, Any]] = []

    def write(self, rows: list[dict[str, Any]]) -> None:
        self._buf += rows
        if len(self._buf) >= self.rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            self._writer.write_table(to_table(self._buf, self.kind).replace_schema_metadata(self.schema.metadata))
            self._buf = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._atomic.__exit__(None, None, None)  # rename onto the final path

    def abort(self) -> None:
        self._writer.close()
        exc = RuntimeError("streaming write aborted")
        self._atomic.__exit__(type(exc), exc, None)  # removes the temp file

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_rows(rows: pd.DataFrame | list[dict[str, Any]], path: str | Path, kind: str,
               prov: dict[str, Any] | None = None, zstd_level: int = 3) -> None:
    """Convenience: ``to_table`` then ``write_table``."""
    write_table(to_table(rows, kind), path, kind, prov, zstd_level)


def _normalise(t: pa.DataType) -> pa.DataType:
    """Treat large_string / large_list like string / list (pandas may write either)."""
    if pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_large_list(t) or pa.types.is_list(t):
        return pa.list_(_normalise(t.value_type))
    if pa.types.is_fixed_size_list(t):
        return pa.list_(_normalise(t.value_type), t.list_size)
    return t


def _check(schema: pa.Schema, kind: str, path: Path) -> None:
    expected = SCHEMAS[kind]
    for f in expected:
        if f.name not in schema.names:
            raise SchemaError(f"{path}: not a {kind} table (column {f.name!r} missing)")
        got = schema.field(f.name).type
        if not _normalise(got).equals(_normalise(f.type)):
            raise SchemaError(f"{path}: column {f.name!r} has type {got}, expected {f.type}")


def read_table(path: str | Path, kind: str, columns: list[str] | None = None) -> pa.Table:
    """Read a single Parquet file of schema ``kind``; a corrupt or mismatched file is a SchemaError."""
    p = Path(path)
    if not p.is_file():
        raise SchemaError(f"{p}: file not found")
    try:
        pf = pq.ParquetFile(p)
        _check(pf.schema_arrow, kind, p)
        table = pf.read(columns=columns)
        target = pa.schema([SCHEMAS[kind].field(n) for n in table.column_names if n in SCHEMAS[kind].names])
        return table.select(target.names).cast(target)
    except SchemaError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for corrupt files
        raise SchemaError(f"{p}: unreadable Parquet file ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc


def read_df(path: str | Path, kind: str, columns: list[str] | None = None) -> pd.DataFrame:
    """``read_table`` as a pandas DataFrame."""
    return read_table(path, kind, columns).to_pandas()


def read_provenance(path: str | Path) -> dict[str, Any] | None:
    """The provenance record stored in a Parquet file written by ``write_table``."""
    md = pq.ParquetFile(path).schema_arrow.metadata or {}
    raw = md.get(META_KEY)
    return json.loads(raw) if raw else None


def verify(path: str | Path, kind: str) -> None:
    """Fully decode a file (all pages) to detect corruption; raises SchemaError."""
    t = read_table(path, kind)
    try:
        t.validate(full=True)
    except Exception as exc:
        raise SchemaError(f"{path}: invalid {kind} data ({exc})") from exc


def open_frames(files: "Sequence[str | os.PathLike[str]]") -> pads.Dataset:
    """Open exactly ``files`` as one frame dataset with ``temperature`` and ``split`` columns, schema-checked.

    Each file is a chunk's ``frames_T<K>.parquet`` (then ``split`` is null: the structures table holds
    it) or a dataset part ``temperature=<K>/split=<s>/part-NNNNN.parquet`` (see :mod:`liflow_screen.io.layout`).
    Nothing else is read: the caller passes the files its rule declares.
    """
    import pyarrow.compute as pc
    import pyarrow.fs as pafs

    from . import layout

    paths = [Path(f) for f in files]
    if not paths:
        raise SchemaError("no frame files given")
    keys = []
    for f in paths:
        try:
            keys.append(layout.frames_key(f))
        except ValueError as exc:
            raise SchemaError(str(exc)) from exc
        try:
            _check(pq.read_schema(f), "frames", f)
        except SchemaError:
            raise
        except Exception as exc:
            raise SchemaError(f"{f}: unreadable Parquet file ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    seen: dict[tuple[int, str | None], Path] = {}
    for f, k in zip(paths, keys):
        if k[1] is None and k in seen:
            raise SchemaError(f"frame files {seen[k]} and {f} both hold {k[0]} K: pass one chunk's files")
        seen.setdefault(k, f)
    full = pa.unify_schemas([FRAMES, FRAME_PARTITIONS])

    def part(k: tuple[int, str | None]) -> "pc.Expression":
        e = pc.field("temperature") == pa.scalar(k[0], pa.int32())
        return e & (pc.field("split") == pa.scalar(k[1], pa.string())) if k[1] is not None else e

    return pads.FileSystemDataset.from_paths(
        [str(f.resolve()) for f in paths], schema=full, format=pads.ParquetFileFormat(),
        filesystem=pafs.LocalFileSystem(), partitions=[part(k) for k in keys])


def positions_array(table: pa.Table) -> "np.ndarray":  # noqa: F821 (numpy imported lazily)
    """The ``positions`` list column of one trajectory's frames -> (frames, n, 3) float32 Å."""
    import numpy as np
    import pyarrow.compute as pc

    col = table.column("positions").combine_chunks()
    lengths = pc.list_value_length(col).to_numpy()
    if len(lengths) and (lengths != lengths[0]).any():
        raise SchemaError("frames of one trajectory have different atom counts")
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(len(lengths), -1, 3)


def read_trajectory(dataset: pads.Dataset, sid: str, temperature: float, source: str | None = None,
                    replica: int = 0):
    """Positions (F, n, 3) float32 Å and times (F,) ps of one trajectory (replica ``replica``),
    frames in order. A frame number stored twice is a SchemaError."""
    import numpy as np
    import pyarrow.compute as pc

    filt = ((pc.field("id") == sid) & (pc.field("temperature") == int(round(temperature)))
            & (pc.field("replica") == int(replica)))
    if source is not None:
        filt = filt & (pc.field("source") == source)
    t = dataset.to_table(columns=["frame", "time_ps", "positions"], filter=filt).sort_by("frame")
    if t.num_rows == 0:
        raise SchemaError(f"no frames for structure {sid!r} at {temperature:g} K (replica {replica})")
    frames = t.column("frame").to_numpy()
    if np.any(np.diff(frames) == 0):
        raise SchemaError(f"structure {sid!r} at {temperature:g} K (replica {replica}): a frame is stored twice")
    return positions_array(t), t.column("time_ps").to_numpy()
