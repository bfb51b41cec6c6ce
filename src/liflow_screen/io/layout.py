"""The one registry of file names and the results layout (rules, stages and ``verify`` import it).

Paths are relative to ``results_dir`` (config); every stage writes exactly the files named here
and reads exactly the files its rule passes (never a folder listing)::

    structures/manifest.parquet                        structures stage (schema.MANIFEST)
    md/chunk_NNNNN/{structures,status}.parquet         md stage, one chunk of md.chunk_size structures
    md/chunk_NNNNN/frames_T<K>.parquet                 frames at temperature K (schema.FRAMES)
    dataset/{structures,status,labels}.parquet         dataset stage
    dataset/frames/temperature=<K>/split=<s>/part-NNNNN.parquet
    dataset/frames/index.json                          the frame files of this dataset, listed
    models/published/{propagator,corrector}.pt         import_model
    train/selector.pt, train/propagator_<v>/best.pt, train/corrector/best.pt
    rollout/<variant>/chunk_NNNNN/{frames_T<K>,status,priors}.parquet
    analysis/<source>/chunk_NNNNN.parquet              analysis tables (md or a rollout variant)
    reports/{ranking,metrics,prior_classes}.csv, reports/{parity,arrhenius}/
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

MANIFEST = "manifest.parquet"
STRUCTURES = "structures.parquet"
STATUS = "status.parquet"
LABELS = "labels.parquet"
PRIORS = "priors.parquet"
FRAMES_INDEX = "index.json"

#: schema kind of each fixed table name (frames files are recognised by pattern)
KIND_OF_NAME = {MANIFEST: "manifest", STRUCTURES: "structures", STATUS: "status", LABELS: "labels",
                PRIORS: "priors"}

_FRAMES_RE = re.compile(r"^frames_T(\d+)\.parquet$")


def chunk_str(chunk: int) -> str:
    """Zero-padded chunk index, as in ``chunk_00012``."""
    return f"{int(chunk):05d}"


def chunk_dir(root: str | os.PathLike[str], chunk: int) -> Path:
    """``<root>/chunk_NNNNN``: the outputs of one MD or rollout chunk."""
    return Path(root) / f"chunk_{chunk_str(chunk)}"


def frames_name(temperature: float) -> str:
    """File name of one chunk's frames at ``temperature`` (K)."""
    return f"frames_T{int(round(temperature))}.parquet"


def frames_file(chunk_directory: str | os.PathLike[str], temperature: float) -> Path:
    """The frame table of one chunk at one temperature (K), MD or rollout."""
    return Path(chunk_directory) / frames_name(temperature)


def frame_partition_path(root: str | os.PathLike[str], temperature: float, split: str) -> Path:
    """Hive-style directory of the dataset's frame table for one (temperature K, split)."""
    return Path(root) / f"temperature={int(round(temperature))}" / f"split={split}"


def frame_partition_file(root: str | os.PathLike[str], temperature: float, split: str, chunk: int) -> Path:
    """One MD chunk's part of the dataset's frame table for (temperature K, split)."""
    return frame_partition_path(root, temperature, split) / f"part-{chunk_str(chunk)}.parquet"


def positions_sidecar(frame_file: str | os.PathLike[str]) -> Path:
    """The raw positions beside a dataset frame partition (``part-<chunk>.f32``): its rows' ``positions``
    as little-endian float32, in row order (3n values per row, Å). Training reads single frames from it
    (``dataset.loader.StreamingPairSource``); the Parquet file stays the dataset."""
    return Path(frame_file).with_suffix(".f32")


def frames_key(path: str | os.PathLike[str]) -> tuple[int, str | None]:
    """(temperature K, split or None) of a frame file, from its name or its hive partition folders."""
    p = Path(path)
    m = _FRAMES_RE.match(p.name)
    if m:
        return int(m.group(1)), None
    if p.suffix == ".parquet" and p.parent.name.startswith("split=") and p.parent.parent.name.startswith("temperature="):
        return int(p.parent.parent.name.removeprefix("temperature=")), p.parent.name.removeprefix("split=")
    raise ValueError(f"{p}: not a frame file (frames_T<K>.parquet or temperature=<K>/split=<s>/*.parquet)")


def is_frames_file(path: str | os.PathLike[str]) -> bool:
    try:
        frames_key(path)
    except ValueError:
        return False
    return True


def kind_of(path: str | os.PathLike[str]) -> str | None:
    """Schema kind of a workflow output by its name; None for tables without one (analysis)."""
    name = Path(path).name
    if name in KIND_OF_NAME:
        return KIND_OF_NAME[name]
    return "frames" if is_frames_file(path) else None


def write_frames_index(frames_root: str | os.PathLike[str], files: Iterable[str | os.PathLike[str]]) -> Path:
    """List the dataset's frame files (relative to ``frames_root``) in ``frames_root/index.json``."""
    root = Path(frames_root)
    rel = sorted(str(Path(f).relative_to(root)) for f in files)
    out = root / FRAMES_INDEX
    root.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"files": rel}, indent=1))
    tmp.replace(out)
    return out


def dataset_frame_files(dataset_dir: str | os.PathLike[str], splits: Sequence[str] | None = None) -> list[Path]:
    """The frame files the dataset stage wrote (its ``frames/index.json``), optionally of some splits."""
    root = Path(dataset_dir) / "frames"
    index = root / FRAMES_INDEX
    if not index.is_file():
        from ..core.errors import SchemaError

        raise SchemaError(f"{index}: missing (the dataset lists its frame files there; rebuild the dataset)")
    files = [root / f for f in json.loads(index.read_text())["files"]]
    if splits is not None:
        files = [f for f in files if frames_key(f)[1] in set(splits)]
    return files
