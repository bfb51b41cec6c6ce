"""The embedded default set: ordered Li-containing crystals that ship with the project.

Eleven are written here from published crystallography (space group, lattice parameters in Å,
Wyckoff positions) and built with pymatgen's ``Structure.from_spacegroup``; four are pymatgen's
bundled ordered Li structures. No network is needed. ``role`` is the expected Li transport class
(fast / moderate / slow) from the literature, used only to annotate reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from pymatgen.core import Lattice, Structure


@dataclass(frozen=True)
class Crystal:
    """A crystal given by its space group, lattice (Å, degrees) and asymmetric unit."""

    id: str
    spacegroup: str
    lattice: tuple[float, float, float, float, float, float]  # a, b, c, alpha, beta, gamma
    species: tuple[str, ...]
    coords: tuple[tuple[float, float, float], ...]
    source: str
    role: str

    def structure(self) -> Structure:
        lat = Lattice.from_parameters(*self.lattice)
        s = Structure.from_spacegroup(self.spacegroup, lat, list(self.species), [list(c) for c in self.coords])
        return s.get_sorted_structure()


CRYSTALS: tuple[Crystal, ...] = (
    Crystal("emb-Li3N", "P6/mmm", (3.648, 3.648, 3.875, 90, 90, 120), ("N", "Li", "Li"),
            ((0, 0, 0), (0, 0, 0.5), (1 / 3, 2 / 3, 0)),
            "alpha-Li3N, P6/mmm, a=3.648 c=3.875 Å; Rabenau & Schulz, J. Less-Common Met. 50, 155 (1976)", "fast"),
    Crystal("emb-Li3OCl", "Pm-3m", (3.91, 3.91, 3.91, 90, 90, 90), ("O", "Cl", "Li"),
            ((0.5, 0.5, 0.5), (0, 0, 0), (0, 0.5, 0.5)),
            "anti-perovskite Li3OCl, Pm-3m, a=3.91 Å; Zhao & Daemen, J. Am. Chem. Soc. 134, 15042 (2012)", "fast"),
    Crystal("emb-Li3OBr", "Pm-3m", (4.02, 4.02, 4.02, 90, 90, 90), ("O", "Br", "Li"),
            ((0.5, 0.5, 0.5), (0, 0, 0), (0, 0.5, 0.5)),
            "anti-perovskite Li3OBr, Pm-3m, a=4.02 Å; Zhao & Daemen, J. Am. Chem. Soc. 134, 15042 (2012)", "fast"),
    Crystal("emb-Li2S", "Fm-3m", (5.708, 5.708, 5.708, 90, 90, 90), ("S", "Li"),
            ((0, 0, 0), (0.25, 0.25, 0.25)),
            "antifluorite Li2S, Fm-3m, a=5.708 Å (room-temperature X-ray value); superionic above ~800 K", "moderate"),
    Crystal("emb-Li2Se", "Fm-3m", (6.002, 6.002, 6.002, 90, 90, 90), ("Se", "Li"),
            ((0, 0, 0), (0.25, 0.25, 0.25)),
            "antifluorite Li2Se, Fm-3m, a=6.002 Å (room-temperature X-ray value)", "moderate"),
    Crystal("emb-LiF", "Fm-3m", (4.027, 4.027, 4.027, 90, 90, 90), ("Li", "F"),
            ((0, 0, 0), (0.5, 0.5, 0.5)),
            "rock-salt LiF, Fm-3m, a=4.027 Å (room-temperature X-ray value)", "slow"),
    Crystal("emb-LiCl", "Fm-3m", (5.130, 5.130, 5.130, 90, 90, 90), ("Li", "Cl"),
            ((0, 0, 0), (0.5, 0.5, 0.5)),
            "rock-salt LiCl, Fm-3m, a=5.130 Å (room-temperature X-ray value)", "slow"),
    Crystal("emb-LiBr", "Fm-3m", (5.501, 5.501, 5.501, 90, 90, 90), ("Li", "Br"),
            ((0, 0, 0), (0.5, 0.5, 0.5)),
            "rock-salt LiBr, Fm-3m, a=5.501 Å (room-temperature X-ray value)", "slow"),
    Crystal("emb-LiI", "Fm-3m", (6.000, 6.000, 6.000, 90, 90, 90), ("Li", "I"),
            ((0, 0, 0), (0.5, 0.5, 0.5)),
            "rock-salt LiI, Fm-3m, a=6.000 Å (room-temperature X-ray value)", "moderate"),
    Crystal("emb-LiNbO3", "R3c", (5.1483, 5.1483, 13.8631, 90, 90, 120), ("Nb", "Li", "O"),
            ((0, 0, 0), (0, 0, 0.2829), (0.0492, 0.3446, 0.0647)),
            "LiNbO3, R3c (hexagonal setting), a=5.1483 c=13.8631 Å; Abrahams, Reddy & Bernstein, "
            "J. Phys. Chem. Solids 27, 997 (1966)", "slow"),
    Crystal("emb-LiCoO2", "R-3m", (2.8156, 2.8156, 14.0542, 90, 90, 120), ("Co", "Li", "O"),
            ((0, 0, 0), (0, 0, 0.5), (0, 0, 0.2396)),
            "layered LiCoO2, R-3m, a=2.8156 c=14.0542 Å, z(O)=0.2396; Orman & Wiseman, "
            "Acta Cryst. C40, 12 (1984)", "moderate"),
)

#: pymatgen's bundled structures (pymatgen/util/structures/*.json) that are ordered and contain Li.
#: Its Li10GeP2S12 is partially occupied (disordered) and therefore not used.
PYMATGEN_BUNDLED: tuple[tuple[str, str, str], ...] = (
    ("emb-Li2O", "Li2O", "slow"),
    ("emb-Li2O2", "Li2O2", "slow"),
    ("emb-LiFePO4", "LiFePO4", "slow"),
    ("emb-Li3V2(PO4)3", "Li3V2(PO4)3", "moderate"),
)


def _pymatgen_bundled(name: str) -> Structure:
    path = resources.files("pymatgen.util").joinpath("structures", f"{name}.json")
    return Structure.from_str(path.read_text(), fmt="json").get_sorted_structure()


def embedded_structures() -> list[tuple[str, Structure, str, str]]:
    """All embedded crystals as (id, unit-cell Structure, source note, transport role)."""
    out = [(c.id, c.structure(), c.source, c.role) for c in CRYSTALS]
    for sid, name, role in PYMATGEN_BUNDLED:
        out.append((sid, _pymatgen_bundled(name), f"pymatgen bundled structure {name}.json (pymatgen.util.structures)", role))
    return out
