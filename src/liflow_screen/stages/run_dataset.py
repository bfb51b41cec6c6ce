"""Stage ``dataset``: merge the MD chunk files given into the Parquet trajectory dataset with labels.

Layout of ``results/dataset/`` (all zstd Parquet, provenance in the metadata; names from :mod:`liflow_screen.io.layout`)::

    structures.parquet                      relaxed supercells + descriptors (schema.STRUCTURES)
    status.parquet                          one row per (structure, T) trajectory (schema.STATUS)
    labels.parquet                          MSD/τ and mobility-rate labels per trajectory (schema.LABELS)
    frames/temperature=<K>/split=<s>/part-<chunk>.parquet   frames (schema.FRAMES), sorted by id, frame
    frames/temperature=<K>/split=<s>/part-<chunk>.f32       the same rows' positions, raw float32, for
                                            training's random frame reads (layout.positions_sidecar)
    frames/index.json                       the list of those frame files (readers use it, never a listing)

Units: Å, ps, K.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..io import layout, schema
from ..core.constants import LI_Z
from ..dataset.loader import msd_labels
from ..core.errors import InputError, SchemaError
from ..io.files import atomic_path, provenance
from ..core.settings import Settings

log = logging.getLogger(__name__)



def _group_md_files(md_files: Sequence[str | Path], temps: Sequence[float]) -> list[dict[str, Path]]:
    """The given MD files grouped by chunk folder, each group checked complete (names -> paths)."""
    groups: dict[Path, dict[str, Path]] = {}
    for f in map(Path, md_files):
        groups.setdefault(f.parent, {})[f.name] = f
    need = [layout.STRUCTURES, layout.STATUS] + [layout.frames_name(T) for T in temps]
    for d, g in groups.items():
        missing = [n for n in need if n not in g]
        if missing:
            raise InputError(f"MD chunk {d}: {', '.join(missing)} not given")
    if not groups:
        raise InputError("no MD chunk files given")
    return [groups[d] for d in sorted(groups)]


def run(settings: Settings, manifest_path: str | Path, md_files: Sequence[str | Path],
          out_dir: str | Path) -> dict[str, int]:
    """Assemble the dataset from exactly the MD chunk files given (``md_files``).

    ``md_files`` holds, for every MD chunk, its ``structures.parquet``, ``status.parquet`` and one
    ``frames_T<K>.parquet`` per ``md.temperatures`` (grouped by folder). Built in ``<out_dir>.tmp``
    and renamed into place, so a failure leaves no half-written dataset; ``frames/index.json``
    lists the frame files written. Returns counts (structures, trajectories, frames).
    """
    manifest = schema.read_df(manifest_path, "manifest", columns=["id", "split", "chunk", "run_md"])
    split_of = dict(zip(manifest["id"], manifest["split"]))
    temps = list(settings.md.temperatures)
    threshold = settings.dataset.slow_threshold
    zstd = settings.dataset.zstd_level
    prov = provenance(settings, stage="dataset")
    chunks = _group_md_files(md_files, temps)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    structures, statuses, labels = [], [], []
    n_frames = 0
    written: list[Path] = []
    for chunk, files in enumerate(chunks):
        st = schema.read_df(files[layout.STRUCTURES], "structures")
        structures.append(st)
        status = schema.read_df(files[layout.STATUS], "status")
        statuses.append(status)
        numbers = {r.id: np.asarray(r.numbers) for r in st.itertuples()}
        ok = status[status["status"] == "ok"]
        for T in temps:
            ffile = files[layout.frames_name(T)]
            table = schema.read_table(ffile, "frames")
            if table.num_rows == 0:
                continue
            ok_ids = set(ok.loc[ok["temperature"] == int(round(T)), "id"])
            for split in schema.SPLITS:
                ids = [i for i in ok_ids if split_of.get(i) == split]
                if not ids:
                    continue
                part = table.filter(pc.is_in(table.column("id"), pa.array(ids))).sort_by([("id", "ascending"),
                                                                                        ("frame", "ascending")])
                dest = layout.frame_partition_file(tmp / "frames", T, split, chunk)
                schema.write_table(part, dest, "frames", prov=prov, zstd_level=zstd)
                raw = part.column("positions").combine_chunks().flatten().to_numpy(zero_copy_only=False)
                with atomic_path(layout.positions_sidecar(dest)) as f:
                    np.ascontiguousarray(raw, dtype="<f4").tofile(f)
                written.append(dest)
                n_frames += part.num_rows
            for sid in sorted(ok_ids):
                sub = table.filter(pc.equal(table.column("id"), sid)).sort_by("frame")
                pos = schema.positions_array(sub)
                try:
                    lab = msd_labels(pos, numbers[sid] == LI_Z, sub.column("time_ps").to_numpy())
                except SchemaError as exc:
                    raise SchemaError(f"{ffile}: structure {sid} at {T:g} K: {exc}") from exc
                labels.append({"id": sid, "temperature": int(round(T)), "split": split_of[sid], **lab,
                               "slow_li": bool(lab["rate_li"] < threshold),
                               "slow_frame": bool(lab["rate_frame"] < threshold)})
    st_all = pd.concat(structures, ignore_index=True)
    missing = set(manifest["id"]) - set(st_all["id"])
    if missing:
        raise SchemaError(f"MD outputs lack structures listed in the manifest: {', '.join(sorted(missing)[:5])}")
    schema.write_rows(st_all, tmp / "structures.parquet", "structures", prov=prov, zstd_level=zstd)
    schema.write_rows(pd.concat(statuses, ignore_index=True), tmp / "status.parquet", "status", prov=prov)
    schema.write_rows(labels, tmp / "labels.parquet", "labels", prov=prov)
    layout.write_frames_index(tmp / "frames", written)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    counts = {"structures": len(st_all), "trajectories": len(labels), "frames": n_frames}
    log.info("dataset %s: %s", out, counts)
    return counts
