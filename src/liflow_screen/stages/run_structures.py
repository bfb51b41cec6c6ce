"""Stage ``structures``: collect structures (Materials Project, CIF folder, manifest or embedded
set), build supercells, split by composition, plan MD chunks; write the manifest.
"""

from __future__ import annotations

import logging
from pathlib import Path
import pandas as pd

from ..io import schema
from ..io.files import provenance
from ..core.settings import Settings
from ..structures import build_manifest

log = logging.getLogger(__name__)


def run(settings: Settings, out: str | Path) -> pd.DataFrame:
    """Build the manifest and write it atomically to ``out`` (with rejections in provenance)."""
    df, rejected, extra = build_manifest(settings)
    for r in rejected:
        log.warning("rejected %s", r.reason)
    prov = provenance(settings, stage="structures", rejected=[r.reason for r in rejected], **extra)
    schema.write_rows(df, out, "manifest", prov=prov)
    counts = df["split"].value_counts().to_dict()
    log.info("wrote %s: %d structures (%s), %d with MD, %d chunks, %d rejected", out, len(df),
             ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), int(df["run_md"].sum()),
             int(df["chunk"].max()) + 1, len(rejected))
    return df
