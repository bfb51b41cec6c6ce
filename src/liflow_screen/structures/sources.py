"""Structure sources: Materials Project (mp-api), a folder of CIFs, or a manifest of CIF paths.

Each source yields ``Record`` objects; inputs that cannot be used (malformed CIF, disordered,
no Li) are rejected with a message naming the file, and the rest proceed.
"""

from __future__ import annotations

import csv
import datetime as _dt
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pymatgen.core import Structure

from ..core.errors import InputError, LiflowError
from ..core.settings import MPSettings

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Record:
    """One candidate structure (unit cell) with its origin."""

    id: str
    structure: Structure
    source: str
    band_gap: float | None = None       # eV
    e_above_hull: float | None = None   # eV/atom
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rejection:
    """An input that was not used, and why."""

    name: str
    reason: str


def check_structure(s: Structure, name: str) -> str | None:
    """Why ``s`` cannot be used (disordered, no Li, overlapping atoms), or None if it is fine."""
    if not s.is_ordered:
        return f"{name}: disordered structure (partial occupancies); order it first (e.g. pymatgen OrderDisorderedStructureTransformation)"
    if "Li" not in {el.symbol for el in s.composition.elements}:
        return f"{name}: contains no lithium"
    if len(s) > 1:
        dmin = min(s.get_distance(i, j) for i in range(len(s)) for j in range(i + 1, len(s))) if len(s) < 200 else None
        if dmin is not None and dmin < 0.5:
            return f"{name}: atoms closer than 0.5 Å ({dmin:.2f} Å); malformed structure"
    return None


def read_cif(path: Path) -> Structure:
    """Parse one CIF into a Structure; any parse problem is an InputError naming the file."""
    from pymatgen.io.cif import CifParser

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parser = CifParser(str(path), occupancy_tolerance=1.0)
            structures = parser.parse_structures(primitive=False)
    except Exception as exc:  # pymatgen raises ValueError/KeyError/... for bad CIFs
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: malformed CIF ({msg})") from exc
    if not structures:
        raise InputError(f"{path}: malformed CIF (no structure found)")
    return structures[0]


def from_files(paths: list[tuple[str, Path]]) -> tuple[list[Record], list[Rejection]]:
    """Records from (id, CIF path) pairs; unusable files become Rejections."""
    records, rejected = [], []
    for sid, path in paths:
        try:
            if not path.is_file():
                raise InputError(f"{path}: file not found")
            s = read_cif(path)
        except InputError as exc:
            rejected.append(Rejection(str(path), str(exc)))
            continue
        why = check_structure(s, str(path))
        if why:
            rejected.append(Rejection(str(path), why))
            continue
        records.append(Record(sid, s.get_sorted_structure(), f"file:{path}"))
    return records, rejected


def cif_dir(folder: str | Path) -> tuple[list[Record], list[Rejection]]:
    """All ``*.cif`` files of a folder (id = file stem)."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder of CIF files")
    files = sorted(root.glob("*.cif"))
    if not files:
        raise InputError(f"{root}: no *.cif files found")
    return from_files([(f.stem, f) for f in files])


def manifest_file(path: str | Path) -> tuple[list[Record], list[Rejection]]:
    """A CSV manifest with columns ``path`` (CIF, relative to the manifest) and optional ``id``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: manifest file not found")
    with p.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise InputError(f"{p}: manifest must be a CSV with a 'path' column (and optionally 'id')")
        rows = list(reader)
    pairs = []
    for k, row in enumerate(rows, start=2):
        if not row.get("path"):
            raise InputError(f"{p}: line {k} has an empty 'path'")
        cif = Path(row["path"])
        cif = cif if cif.is_absolute() else p.parent / cif
        pairs.append(((row.get("id") or cif.stem).strip(), cif))
    ids = [sid for sid, _ in pairs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(f"{p}: duplicate ids {', '.join(dup)}")
    return from_files(pairs)


# --------------------------------------------------------------------------- Materials Project

MP_FIELDS = ["material_id", "formula_pretty", "structure", "band_gap", "energy_above_hull", "nsites", "composition"]


def with_retries(fn: Callable[[], T], retries: int, backoff_s: float, what: str) -> T:
    """Call ``fn``; on network errors retry ``retries`` times with exponential backoff (s)."""
    import requests

    from mp_api.client.core.client import MPRestError

    for attempt in range(retries + 1):
        try:
            return fn()
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout, MPRestError) as exc:
            transient = not isinstance(exc, MPRestError) or any(
                code in str(exc) for code in ("429", "500", "502", "503", "504", "timed out", "Connection")
            )
            if not transient or attempt == retries:
                raise LiflowError(f"{what} failed after {attempt + 1} attempt(s): {str(exc).splitlines()[0][:200]}") from exc
            delay = backoff_s * 2**attempt
            log.warning("%s: %s; retrying in %.1f s (%d/%d)", what, type(exc).__name__, delay, attempt + 1, retries)
            time.sleep(delay)
    raise AssertionError("unreachable")


def materials_project(mp: MPSettings, api_key: str | None = None) -> tuple[list[Record], list[Rejection], dict[str, Any]]:
    """Query the Materials Project with the paper's criteria (Appendix C.1).

    Server-side: contains Li, band gap > ``band_gap_min`` eV, energy above hull < ``e_above_hull_max``
    eV/atom. Client-side: Li atom fraction > ``li_fraction_min`` and ordered structures only.
    Returns records, rejections and the query provenance (criteria, database version, date).
    """
    key = api_key or os.environ.get("MP_API_KEY")
    if not key:
        raise LiflowError("MP_API_KEY is not set: export MP_API_KEY=<your Materials Project API key> (or use structures.source: panel, the offline validation panel)")
    from mp_api.client import MPRester

    endpoint = mp.endpoint
    kwargs: dict[str, Any] = {"api_key": key, "use_document_model": False, "mute_progress_bars": True}
    if endpoint:
        kwargs["endpoint"] = endpoint if endpoint.endswith("/") else endpoint + "/"
    retries, backoff = mp.retries, mp.backoff_s

    def query() -> tuple[list[dict[str, Any]], str | None]:
        with MPRester(**kwargs) as mpr:
            docs = mpr.materials.summary.search(
                elements=["Li"],
                band_gap=(mp.band_gap_min, None),
                energy_above_hull=(0.0, mp.e_above_hull_max),
                fields=MP_FIELDS,
            )
            return list(docs), mpr.db_version

    docs, db_version = with_retries(query, retries, backoff, "Materials Project query")
    records, rejected = [], []
    for d in sorted(docs, key=lambda d: str(d["material_id"])):
        mid = str(d["material_id"])
        try:
            s = d["structure"] if isinstance(d["structure"], Structure) else Structure.from_dict(d["structure"])
        except Exception as exc:
            rejected.append(Rejection(mid, f"{mid}: unreadable structure ({exc})"))
            continue
        bg, eh = d.get("band_gap"), d.get("energy_above_hull")
        frac = s.composition.get_atomic_fraction("Li")
        if frac <= mp.li_fraction_min:
            rejected.append(Rejection(mid, f"{mid}: Li fraction {frac:.3f} <= {mp.li_fraction_min}"))
            continue
        if bg is not None and bg <= mp.band_gap_min:
            rejected.append(Rejection(mid, f"{mid}: band gap {bg} eV <= {mp.band_gap_min}"))
            continue
        if eh is not None and eh >= mp.e_above_hull_max:
            rejected.append(Rejection(mid, f"{mid}: energy above hull {eh} eV/atom >= {mp.e_above_hull_max}"))
            continue
        why = check_structure(s, mid)
        if why:
            rejected.append(Rejection(mid, why))
            continue
        records.append(Record(mid, s.get_sorted_structure(), f"materials-project:{mid}@{db_version}",
                              band_gap=bg, e_above_hull=eh))
        if mp.max_structures and len(records) >= mp.max_structures:
            break
    prov = {
        "query": {"elements": ["Li"], "band_gap_gt": mp.band_gap_min, "e_above_hull_lt": mp.e_above_hull_max,
                  "li_fraction_gt": mp.li_fraction_min, "ordered_only": True, "fields": MP_FIELDS},
        "endpoint": kwargs.get("endpoint", "default"),
        "database_version": db_version,
        "retrieved_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "n_documents": len(docs),
    }
    return records, rejected, prov
