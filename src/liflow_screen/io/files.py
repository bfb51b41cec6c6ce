"""Atomic file output and provenance (config + library versions) for every artefact."""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

_TRACKED = (
    "liflow-screen", "torch", "numpy", "pandas", "pyarrow", "ase", "pymatgen", "mp-api",
    "mace-torch", "chgnet", "vesin-torch", "kinisi", "snakemake",
)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    A crash or exception inside the block leaves no (half-written) file at ``path``.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def versions() -> dict[str, str]:
    """Installed versions of the libraries that shape the results."""
    out = {"python": platform.python_version()}
    for name in _TRACKED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    from .. import __version__

    out["liflow-screen"] = __version__  # the code that ran (also when run from a checkout via PYTHONPATH)
    return out


def sha256_of(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file (model checkpoints, inputs)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def config_digest(config: Any) -> str:
    """Short SHA-256 of a JSON-serialisable config (stable key order)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def provenance(config: Any, **extra: Any) -> dict[str, Any]:
    """The record stored with every output: config, its digest, versions, UTC time, extras.

    ``config``: the run's :class:`~liflow_screen.core.settings.Settings` (its validated config is
    recorded) or a JSON-serialisable mapping.
    """
    config = getattr(config, "config", config)
    rec = {
        "config": config,
        "config_digest": config_digest(config),
        "versions": versions(),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
    }
    rec.update(extra)
    return rec


def load_torch_file(path: str | os.PathLike[str], fmt: str, what: str) -> dict[str, Any]:
    """Load a torch file written by this package (weights only) and check its ``format`` tag.

    A missing, unreadable or foreign file is an InputError naming ``what`` and the path.
    """
    import torch

    from ..core.errors import InputError

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} file not found: {p}")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means a bad file
        raise InputError(f"cannot read {what} file {p}: {type(exc).__name__}") from exc
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        raise InputError(f"{p} is not a {what} file (format {fmt})")
    return blob
