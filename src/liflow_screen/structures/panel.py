"""The validation panel: ordered Li compounds with literature room-temperature conductivities.

The packaged ``data/panel.yaml`` lists, per compound, a crystal structure (space group, lattice in
Å and degrees, asymmetric unit in fractional coordinates, optional site occupancies; or one of
pymatgen's bundled structures), its crystallographic source, the literature room-temperature Li-ion
conductivity σ (S/cm, ~298 K), activation energy E_A (eV), the citation, the kind of sample, the
transport class (fast: σ ≥ 1e-4 S/cm; moderate; slow: σ < 1e-8 S/cm) and how a partially occupied
structure was ordered. Every element lies inside the element table of the LiFlow authors' universal
models (Z ≤ 32 without He, Ne, Ar).

Partially occupied structures are ordered reproducibly the way ``bench/bench_lgps.py`` orders LGPS:
oxidation states are added, pymatgen's ``OrderDisorderedStructureTransformation`` (``ALGO_FAST``)
ranks the orderings by Ewald energy and the lowest one is kept. With ``ordering.cell: primitive``
the ordering is done in the primitive cell (far fewer configurations) and the result is then
expanded back to the conventional cell given in the file. Structures are cached per entry.

Units: lengths Å, angles degrees, σ S/cm, E_A eV, density g/cm³, temperatures K.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

import yaml
from ase.data import atomic_numbers

from ..core.errors import InputError

if TYPE_CHECKING:  # pymatgen and pandas are imported lazily (only when structures or tables are built)
    import pandas as pd
    from pymatgen.core import Structure

#: Atomic numbers of the universal LiFlow models' element table: Z <= 32 without He, Ne, Ar
#: (the rows the published checkpoints pin; ``flow.published.PINNED_ELEMENTS``, which needs torch).
UNIVERSAL_ELEMENTS: frozenset[int] = frozenset(z for z in range(1, 33) if z not in (2, 10, 18))
#: Conductivity class boundaries, S/cm: fast σ >= FAST_MIN, slow σ < SLOW_MAX, moderate in between.
FAST_MIN_S_CM: float = 1e-4
SLOW_MAX_S_CM: float = 1e-8
CLASSES: tuple[str, ...] = ("fast", "moderate", "slow")
CONFIDENCES: tuple[str, ...] = ("high", "medium", "low")
ORDERING_METHODS: tuple[str, ...] = ("none", "ewald")
#: Candidates ranked by ``OrderDisorderedStructureTransformation`` before the lowest is taken
#: (the same number ``bench/bench_lgps.py`` asks for).
N_RANKED: int = 5

_REQUIRED = ("id", "formula", "structure", "structure_source", "ordering", "density_g_cm3", "sigma_rt_S_cm",
             "E_A_eV", "citation", "sample", "class")
_OPTIONAL = ("doi", "confidence", "note", "T_sigma_K")
_YEAR = re.compile(r"\b(19[5-9]\d|20[0-4]\d)\b")


def class_of(sigma_s_cm: float) -> str:
    """Transport class of a room-temperature conductivity σ (S/cm)."""
    if sigma_s_cm >= FAST_MIN_S_CM:
        return "fast"
    if sigma_s_cm < SLOW_MAX_S_CM:
        return "slow"
    return "moderate"


@dataclass(frozen=True)
class StructureDef:
    """How to build a crystal: a pymatgen bundled structure, or space group + asymmetric unit.

    ``lattice`` is (a, b, c, alpha, beta, gamma) in Å and degrees; ``coords`` are fractional;
    ``occupancies`` (one per site, default 1) mark partially occupied sites for the ordering step;
    ``cell`` ``primitive`` returns the (Niggli-reduced) primitive cell of the ordered structure,
    for cells whose primitive one needs fewer atoms in a >= 9 Å supercell. An isostructural model
    of a bundled structure: ``substitute`` (element -> element) and ``lattice`` (the model's cell;
    fractional coordinates are kept).
    """

    bundled: str | None = None
    spacegroup: str | None = None
    lattice: tuple[float, float, float, float, float, float] | None = None
    species: tuple[str, ...] = ()
    coords: tuple[tuple[float, float, float], ...] = ()
    occupancies: tuple[float, ...] | None = None
    cell: str = "conventional"
    substitute: tuple[tuple[str, str], ...] = ()

    def build(self) -> Structure:
        """The (possibly partially occupied) structure, unsorted."""
        from pymatgen.core import Lattice, Structure

        if self.bundled is not None:
            path = resources.files("pymatgen.util").joinpath("structures", f"{self.bundled}.json")
            s = Structure.from_str(path.read_text(), fmt="json")
            if self.substitute:
                s.replace_species(dict(self.substitute))
            if self.lattice is not None:
                s = Structure(Lattice.from_parameters(*self.lattice), s.species_and_occu, s.frac_coords)
            return s
        assert self.lattice is not None and self.spacegroup is not None
        occ = self.occupancies or (1.0,) * len(self.species)
        species: list[Any] = [el if o >= 1.0 else {el: o} for el, o in zip(self.species, occ)]
        return Structure.from_spacegroup(self.spacegroup, Lattice.from_parameters(*self.lattice), species,
                                         [list(c) for c in self.coords])


@dataclass(frozen=True)
class Ordering:
    """How a partially occupied structure is made ordered.

    ``method``: ``none`` (the file's structure is already ordered) or ``ewald`` (lowest Ewald energy
    of ``OrderDisorderedStructureTransformation``, ALGO_FAST, with ``oxidation_states``);
    ``cell``: ``conventional`` (order the cell as built) or ``primitive`` (order the primitive cell,
    then expand to the conventional one); ``note``: what was done, in words.
    """

    method: str
    note: str
    oxidation_states: tuple[tuple[str, int], ...] = ()
    cell: str = "conventional"


@dataclass(frozen=True)
class PanelEntry:
    """One panel compound: structure definition and literature transport data.

    ``sigma_rt_S_cm`` room-temperature Li-ion conductivity (S/cm) measured (or extrapolated, see
    ``note``) near ``T_sigma_K`` (default 298 K); ``E_A_eV`` its activation energy (eV);
    ``density_g_cm3`` the crystallographic density of the cited cell (g/cm³); ``transport_class``
    fast / moderate / slow; ``confidence`` how firmly the σ / E_A pair is established
    (high / medium / low, see ``note``).
    """

    id: str
    formula: str
    structure_def: StructureDef
    structure_source: str
    ordering: Ordering
    density_g_cm3: float
    sigma_rt_S_cm: float
    E_A_eV: float
    citation: str
    sample: str
    transport_class: str
    doi: str = ""
    confidence: str = "medium"
    note: str = ""
    T_sigma_K: float = 298.0

    def structure(self) -> Structure:
        """The ordered structure, sites sorted by electronegativity (a fresh copy per call)."""
        return _ordered_structure(self).copy()

    def source_note(self) -> str:
        """One line: crystallographic source and ordering, for manifests and reports."""
        return f"{self.formula}: {self.structure_source}; ordering: {self.ordering.note}"


@lru_cache(maxsize=None)
def _ordered_structure(entry: PanelEntry) -> Structure:
    s = entry.structure_def.build()
    o = entry.ordering
    if o.method == "ewald":
        s = _order_ewald(s, dict(o.oxidation_states), o.cell)
    if not s.is_ordered:
        raise InputError(f"panel entry {entry.id}: structure is partially occupied but ordering.method is {o.method!r}")
    if entry.structure_def.cell == "primitive":
        s = s.get_primitive_structure().get_reduced_structure()
    return s.get_sorted_structure()


def _order_ewald(s: Structure, oxidation_states: dict[str, int], cell: str) -> Structure:
    """Lowest-Ewald-energy ordering (ALGO_FAST) of ``s``; in its primitive cell if ``cell == 'primitive'``."""
    import numpy as np
    from pymatgen.transformations.standard_transformations import OrderDisorderedStructureTransformation

    work = s.get_primitive_structure() if cell == "primitive" else s.copy()
    work.add_oxidation_state_by_element(oxidation_states)
    ranked = OrderDisorderedStructureTransformation(algo=OrderDisorderedStructureTransformation.ALGO_FAST)\
        .apply_transformation(work, return_ranked_list=N_RANKED)
    best = ranked[0]["structure"]
    best.remove_oxidation_states()
    if cell == "primitive":
        m = np.linalg.solve(best.lattice.matrix.T, s.lattice.matrix.T).T  # conventional rows in primitive basis
        mi = np.rint(m).astype(int)
        if not np.allclose(m, mi, atol=1e-6):
            raise InputError("primitive-cell ordering: the conventional cell is not an integer supercell of the primitive")
        best.make_supercell(mi.tolist())
    return best


# ---------------------------------------------------------------------------------------- loading
def _fail(where: str, msg: str) -> InputError:
    return InputError(f"panel.yaml entry {where}: {msg}")


def _num(raw: dict[str, Any], key: str, where: str, positive: bool = True) -> float:
    v = raw.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _fail(where, f"{key} must be a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v) or (positive and v <= 0):
        raise _fail(where, f"{key} must be finite and > 0, got {v!r}")
    return v


def _str(raw: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    v = raw.get(key, "" if not required else None)
    if not isinstance(v, str) or (required and not v.strip()):
        raise _fail(where, f"{key} must be a non-empty string, got {v!r}")
    return v.strip()


def _elements(formula: str, where: str) -> list[str]:
    els = re.findall(r"[A-Z][a-z]?", formula)
    if not els:
        raise _fail(where, f"formula {formula!r} has no elements")
    for el in els:
        z = atomic_numbers.get(el)
        if z is None:
            raise _fail(where, f"unknown element {el!r} in {formula!r}")
        if z not in UNIVERSAL_ELEMENTS:
            raise _fail(where, f"element {el} (Z={z}) is outside the universal models' element table (Z <= 32 without He, Ne, Ar)")
    return els


def _structure_def(raw: Any, where: str) -> StructureDef:
    if not isinstance(raw, dict):
        raise _fail(where, "structure must be a mapping")
    if "pymatgen_bundled" in raw:
        name = raw["pymatgen_bundled"]
        if not isinstance(name, str) or not name:
            raise _fail(where, "structure.pymatgen_bundled must be a structure name")
        sub = raw.get("substitute") or {}
        if not isinstance(sub, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sub.items()):
            raise _fail(where, "structure.substitute must map element symbols to element symbols")
        for el in sub.values():
            _elements(el, where)
        lat = raw.get("lattice")
        if lat is not None:
            lat = _lattice(lat, where)
        return StructureDef(bundled=name, lattice=lat, substitute=tuple(sorted(sub.items())),
                            cell=_cell(raw, where))
    for key in ("spacegroup", "lattice", "species", "coords"):
        if key not in raw:
            raise _fail(where, f"structure needs pymatgen_bundled or spacegroup/lattice/species/coords (missing {key})")
    lat = _lattice(raw["lattice"], where)
    species, coords = raw["species"], raw["coords"]
    if not isinstance(species, list) or not isinstance(coords, list) or len(species) != len(coords) or not species:
        raise _fail(where, "structure.species and structure.coords must be lists of equal, non-zero length")
    for c in coords:
        if not isinstance(c, list) or len(c) != 3 or not all(isinstance(x, (int, float)) for x in c):
            raise _fail(where, f"structure.coords entries must be [x, y, z] fractions, got {c!r}")
    for el in species:
        if not isinstance(el, str):
            raise _fail(where, f"structure.species entries must be element symbols, got {el!r}")
        _elements(el, where)
    occ = raw.get("occupancies")
    if occ is not None:
        if (not isinstance(occ, list) or len(occ) != len(species)
                or not all(isinstance(x, (int, float)) and 0 < x <= 1 for x in occ)):
            raise _fail(where, "structure.occupancies must list one value in (0, 1] per site")
        occ = tuple(float(x) for x in occ)
    return StructureDef(spacegroup=str(raw["spacegroup"]), lattice=lat, species=tuple(species),
                        coords=tuple(tuple(float(x) for x in c) for c in coords), occupancies=occ,
                        cell=_cell(raw, where))


def _lattice(lat: Any, where: str) -> tuple[float, float, float, float, float, float]:
    if (not isinstance(lat, list) or len(lat) != 6 or not all(isinstance(x, (int, float)) for x in lat)
            or min(lat) <= 0):
        raise _fail(where, f"structure.lattice must be [a, b, c, alpha, beta, gamma] (Å, degrees), got {lat!r}")
    return tuple(float(x) for x in lat)  # type: ignore[return-value]


def _cell(raw: dict[str, Any], where: str) -> str:
    cell = raw.get("cell", "conventional")
    if cell not in ("conventional", "primitive"):
        raise _fail(where, f"structure.cell must be conventional or primitive, got {cell!r}")
    return cell


def _ordering(raw: Any, where: str) -> Ordering:
    if not isinstance(raw, dict):
        raise _fail(where, "ordering must be a mapping with method and note")
    method = raw.get("method")
    if method not in ORDERING_METHODS:
        raise _fail(where, f"ordering.method must be one of {', '.join(ORDERING_METHODS)}, got {method!r}")
    note = _str(raw, "note", where)
    cell = raw.get("cell", "conventional")
    if cell not in ("conventional", "primitive"):
        raise _fail(where, f"ordering.cell must be conventional or primitive, got {cell!r}")
    ox = raw.get("oxidation_states") or {}
    if method == "ewald":
        if not isinstance(ox, dict) or not ox or not all(isinstance(v, int) for v in ox.values()):
            raise _fail(where, "ordering.method ewald needs oxidation_states {element: integer}")
    return Ordering(method=method, note=note, oxidation_states=tuple(sorted((str(k), int(v)) for k, v in ox.items())),
                    cell=cell)


def parse_entry(raw: Any, index: int) -> PanelEntry:
    """One validated :class:`PanelEntry` from its YAML mapping; ``InputError`` (one line) if malformed."""
    if not isinstance(raw, dict):
        raise _fail(f"#{index}", "must be a mapping")
    where = str(raw.get("id") or f"#{index}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise _fail(where, f"missing field(s): {', '.join(missing)}")
    unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise _fail(where, f"unknown field(s): {', '.join(unknown)}")
    pid = _str(raw, "id", where)
    if not pid.startswith("panel-"):
        raise _fail(where, "id must start with 'panel-'")
    formula = _str(raw, "formula", where)
    _elements(formula, where)
    sigma = _num(raw, "sigma_rt_S_cm", where)
    cls = raw["class"]
    if cls not in CLASSES:
        raise _fail(where, f"class must be one of {', '.join(CLASSES)}, got {cls!r}")
    if cls != class_of(sigma):
        raise _fail(where, f"class {cls!r} does not match sigma_rt_S_cm {sigma:g} S/cm (expected {class_of(sigma)!r})")
    citation = _str(raw, "citation", where)
    if not _YEAR.search(citation):
        raise _fail(where, "citation must contain the publication year")
    confidence = raw.get("confidence", "medium")
    if confidence not in CONFIDENCES:
        raise _fail(where, f"confidence must be one of {', '.join(CONFIDENCES)}, got {confidence!r}")
    t_sigma = _num(raw, "T_sigma_K", where) if "T_sigma_K" in raw else 298.0
    return PanelEntry(
        id=pid, formula=formula, structure_def=_structure_def(raw["structure"], where),
        structure_source=_str(raw, "structure_source", where), ordering=_ordering(raw["ordering"], where),
        density_g_cm3=_num(raw, "density_g_cm3", where), sigma_rt_S_cm=sigma, E_A_eV=_num(raw, "E_A_eV", where),
        citation=citation, sample=_str(raw, "sample", where), transport_class=cls,
        doi=_str(raw, "doi", where, required=False), confidence=confidence,
        note=_str(raw, "note", where, required=False), T_sigma_K=t_sigma)


def parse_panel(text: str) -> list[PanelEntry]:
    """Entries of a panel YAML document (``compounds:`` list); ``InputError`` on the first bad one."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"panel.yaml is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("compounds"), list) or not doc["compounds"]:
        raise InputError("panel.yaml must be a mapping with a non-empty 'compounds' list")
    entries = [parse_entry(raw, i) for i, raw in enumerate(doc["compounds"])]
    ids = [e.id for e in entries]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(f"panel.yaml: duplicate id(s): {', '.join(dup)}")
    return entries


@lru_cache(maxsize=1)
def _packaged() -> tuple[PanelEntry, ...]:
    text = resources.files("liflow_screen").joinpath("data", "panel.yaml").read_text(encoding="utf-8")
    return tuple(parse_panel(text))


def load_panel() -> list[PanelEntry]:
    """The packaged validation panel (``liflow_screen/data/panel.yaml``), validated, in file order."""
    return list(_packaged())


#: Phase suffixes of panel ids and the prefix they are displayed with (``panel-Li3PS4-beta`` -> β-Li3PS4).
_PHASE_PREFIX: dict[str, str] = {"alpha": "α", "beta": "β", "gamma": "γ"}


def display_names() -> dict[str, str]:
    """Display name per packaged panel id: the id without ``panel-``, a phase suffix written as its
    Greek prefix (``panel-Li3PS4-beta`` -> ``β-Li3PS4``, ``panel-Li10GeP2S12`` -> ``Li10GeP2S12``).
    For plot labels, where pymatgen's reduced formula would merge polymorphs."""
    names: dict[str, str] = {}
    for e in load_panel():
        stem = e.id.removeprefix("panel-")
        head, _, phase = stem.rpartition("-")
        names[e.id] = f"{_PHASE_PREFIX[phase]}-{head}" if head and phase in _PHASE_PREFIX else stem
    return names


def panel_structures(ids: list[str] | None = None) -> list[tuple[str, Structure, str, str]]:
    """(id, ordered unit-cell Structure, source note, transport class) per panel compound.

    Same shape as ``structures.embedded.embedded_structures()``. ``ids`` selects (in the given
    order); an unknown id is an ``InputError``.
    """
    entries = {e.id: e for e in load_panel()}
    if ids is None:
        chosen = list(entries.values())
    else:
        missing = [i for i in ids if i not in entries]
        if missing:
            raise InputError(f"unknown panel id(s): {', '.join(missing)}")
        chosen = [entries[i] for i in ids]
    return [(e.id, e.structure(), e.source_note(), e.transport_class) for e in chosen]


def literature_table() -> pd.DataFrame:
    """Literature values, one row per compound: id, formula, sigma_rt_S_cm (S/cm), E_A_eV (eV),
    citation, sample, class."""
    import pandas as pd

    rows = [{"id": e.id, "formula": e.formula, "sigma_rt_S_cm": e.sigma_rt_S_cm, "E_A_eV": e.E_A_eV,
             "citation": e.citation, "sample": e.sample, "class": e.transport_class} for e in load_panel()]
    return pd.DataFrame(rows, columns=["id", "formula", "sigma_rt_S_cm", "E_A_eV", "citation", "sample", "class"])
