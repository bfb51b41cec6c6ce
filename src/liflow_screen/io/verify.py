"""Integrity check of workflow outputs: find corrupt Parquet files so they are rebuilt, not used.

The shallow check reads each file's footer (cheap: detects truncated or overwritten files, the
common damage after a full disk or an interrupted copy); the deep check decodes every page and the
schema. Files written by this package are atomic (temp + rename), so a crash alone never leaves one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.parquet as pq

from . import layout, schema
from ..core.errors import SchemaError

log = logging.getLogger(__name__)


def check(root: str | Path, deep: bool = False) -> list[tuple[Path, str]]:
    """(path, reason) for every unreadable Parquet file under ``root``.

    The one place that lists a results folder: an integrity scan of everything there, not a stage
    reading its inputs (stages read only the files their rules declare).
    """
    bad: list[tuple[Path, str]] = []
    for f in sorted(Path(root).rglob("*.parquet")):
        try:
            pq.read_metadata(f)
            if deep:
                kind = layout.kind_of(f)
                if kind is None:
                    pq.read_table(f).validate(full=True)
                else:
                    schema.verify(f, kind)
        except SchemaError as exc:
            bad.append((f, str(exc)))
        except Exception as exc:  # pyarrow: ArrowInvalid / OSError on damaged files
            bad.append((f, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
    return bad


def move_aside(path: Path, reason: str) -> Path:
    """Rename a corrupt file to ``<name>.corrupt`` (kept for inspection; the workflow rebuilds the original)."""
    dest = path.with_name(path.name + ".corrupt")
    path.replace(dest)
    log.warning("corrupt output %s (%s): moved to %s; it will be rebuilt", path, reason, dest.name)
    return dest


def quarantine(root: str | Path, deep: bool = False) -> list[Path]:
    """Move every corrupt Parquet file under ``root`` aside so it gets rebuilt; returns their paths."""
    bad = check(root, deep)
    for f, reason in bad:
        move_aside(f, reason)
    return [f for f, _ in bad]
