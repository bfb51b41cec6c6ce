"""Validation panel (structures.panel, data/panel.yaml): literature data, structures, loader errors."""

from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest
from ase.data import atomic_numbers
from pymatgen.core import Composition, Structure

from liflow_screen.core.errors import InputError
from liflow_screen.core.geometry import perpendicular_widths, supercell_repeats
from liflow_screen.structures import panel

#: The published universal models' element table: Z <= 32 without He, Ne, Ar.
TABLE = {z for z in range(1, 33)} - {2, 10, 18}
YEAR = re.compile(r"\b(19[5-9]\d|20[0-4]\d)\b")


@pytest.fixture(scope="module")
def entries() -> list[panel.PanelEntry]:
    return panel.load_panel()


@pytest.fixture(scope="module")
def built(entries) -> dict[str, Structure]:
    """Every panel structure, built once per module (ordering included)."""
    return {e.id: e.structure() for e in entries}


# --------------------------------------------------------------------------- literature data
def test_panel_size_classes_and_span(entries):
    assert len(entries) >= 20
    ids = [e.id for e in entries]
    assert len(set(ids)) == len(ids)
    classes = [e.transport_class for e in entries]
    assert classes.count("fast") >= 5 and classes.count("slow") >= 5
    for e in entries:
        assert e.transport_class == panel.class_of(e.sigma_rt_S_cm), e.id
    sig = np.array([e.sigma_rt_S_cm for e in entries])
    assert math.log10(sig.max() / sig.min()) >= 4.0


def test_every_compound_cited_with_year_and_finite_values(entries):
    for e in entries:
        assert e.citation.strip() and YEAR.search(e.citation), e.id
        assert e.structure_source.strip() and e.ordering.note.strip() and e.sample.strip(), e.id
        for v in (e.sigma_rt_S_cm, e.E_A_eV, e.density_g_cm3, e.T_sigma_K):
            assert math.isfinite(v) and v > 0, e.id
        assert 0.05 < e.E_A_eV < 2.5, e.id
        assert e.confidence in panel.CONFIDENCES, e.id


def test_every_compound_has_a_doi(entries):
    for e in entries:
        assert e.doi.startswith("10."), e.id


def test_two_point_activation_energies_are_marked_and_consistent(entries):
    """LiMgPO4 and Li6SiO4Cl2 have no published E_A: theirs is the ln(sigma) slope through the two
    compiled (sigma, T) points, and the note says so."""
    k_b = 8.617333e-5  # eV/K
    points = {"panel-LiMgPO4": ((6.3e-12, 298.15), (4.7e-10, 363.15)),
              "panel-Li6SiO4Cl2": ((1.0e-10, 298.15), (6.2e-6, 575.15))}
    by_id = {e.id: e for e in entries}
    for pid, ((s1, t1), (s2, t2)) in points.items():
        e = by_id[pid]
        assert "not a published value" in e.note and "two-point" in e.note, pid
        assert e.sigma_rt_S_cm == pytest.approx(s1), pid
        slope = k_b * math.log(s2 / s1) / (1.0 / t1 - 1.0 / t2)
        assert e.E_A_eV == pytest.approx(slope, abs=0.01), pid


def test_display_names_and_literature_plot_labels():
    """spearman_literature.png labels panel compounds by panel name, not pymatgen's reduced formula
    (which merges beta- and gamma-Li3PS4 and writes LGPS as Li10Ge(PS6)2); other rows keep theirs."""
    import pandas as pd

    from liflow_screen.report.plots import _point_labels

    names = panel.display_names()
    assert set(names) == {e.id for e in panel.load_panel()}
    assert names["panel-Li3PS4-beta"] == "β-Li3PS4" and names["panel-Li3PS4-gamma"] == "γ-Li3PS4"
    assert names["panel-Li10GeP2S12"] == "Li10GeP2S12" and names["panel-Li3BN2-alpha"] == "α-Li3BN2"
    rows = pd.DataFrame({"id": ["panel-Li3PS4-beta", "panel-Li3PS4-gamma", "panel-Li10GeP2S12", "my-cif-1"],
                         "formula": ["Li3PS4", "Li3PS4", "Li10Ge(PS6)2", "LiFePO4"]})
    labels = _point_labels(rows)
    assert labels[0] != labels[1]
    assert labels == ["β-Li3PS4", "γ-Li3PS4", "Li10GeP2S12", "LiFePO4"]


def test_elements_inside_universal_table(entries, built):
    assert set(panel.UNIVERSAL_ELEMENTS) == TABLE
    for e in entries:
        zs = {atomic_numbers[el] for el in re.findall(r"[A-Z][a-z]?", e.formula)}
        assert zs <= TABLE, e.id
        assert {site.specie.Z for site in built[e.id]} <= TABLE, e.id


def test_element_table_matches_published_checkpoints():
    pytest.importorskip("torch")
    from liflow_screen.flow.published import PINNED_ELEMENTS

    assert set(PINNED_ELEMENTS) == set(panel.UNIVERSAL_ELEMENTS)


def test_literature_table(entries):
    df = panel.literature_table()
    assert list(df.columns) == ["id", "formula", "sigma_rt_S_cm", "E_A_eV", "citation", "sample", "class"]
    assert len(df) == len(entries) and df["id"].tolist() == [e.id for e in entries]
    assert (df["sigma_rt_S_cm"] > 0).all() and (df["E_A_eV"] > 0).all()


# ------------------------------------------------------------------------------------- structures
def test_structures_ordered_formula_distances_density_charge(entries, built):
    for e in entries:
        s = built[e.id]
        assert s.is_ordered, e.id
        assert s.composition.reduced_formula == Composition(e.formula).reduced_formula, e.id
        assert s.composition["Li"] > 0, e.id
        # no two atoms closer than 0.9 Å (pairs with H) / 1.3 Å (others)
        d = s.distance_matrix + np.eye(len(s)) * 99.0
        has_h = np.array([site.specie.symbol == "H" for site in s])
        limit = np.where(has_h[:, None] | has_h[None, :], 0.9, 1.3)
        i, j = np.unravel_index(np.argmin(d - limit), d.shape)
        assert (d >= limit).all(), f"{e.id}: {s[i].specie}-{s[j].specie} {d[i, j]:.2f} Å"
        # density within 15 % of the recorded crystallographic density
        assert abs(s.density / e.density_g_cm3 - 1.0) < 0.15, f"{e.id}: {s.density:.3f} vs {e.density_g_cm3}"
        # charge balance with common oxidation states (pymatgen finds an assignment for every entry)
        guesses = Composition(s.composition.reduced_formula).oxi_state_guesses()
        assert guesses, f"{e.id}: no charge-balanced oxidation-state assignment"
        # the oxidation states used for Ewald ordering balance the ordered cell
        if e.ordering.method == "ewald":
            ox = dict(e.ordering.oxidation_states)
            assert sum(ox[el.symbol] * n for el, n in s.composition.items()) == pytest.approx(0.0), e.id


def test_cells_compact_and_supercells_bounded(entries, built):
    for e in entries:
        s = built[e.id]
        assert len(s) <= 100, e.id
        reps = supercell_repeats(s.lattice.matrix, 9.0)
        assert (perpendicular_widths(s.lattice.matrix) * np.asarray(reps) >= 9.0 - 1e-9).all(), e.id
        assert len(s) * int(np.prod(reps)) <= 300, f"{e.id}: {reps} -> {len(s) * int(np.prod(reps))} atoms"


def test_known_cells(built):
    assert len(built["panel-Li10GeP2S12"]) == 50  # as bench/bench_lgps.py
    assert len(built["panel-Li6PS5Cl"]) == 52
    assert len(built["panel-Li4GeS4"]) == 36
    assert len(built["panel-Li3PS4-beta"]) == 32
    assert len(built["panel-Li3N"]) == 4


def test_ordering_deterministic_and_fast(entries):
    disordered = [e for e in entries if e.ordering.method == "ewald"]
    assert {e.id for e in disordered} >= {"panel-Li10GeP2S12", "panel-Li6PS5Cl", "panel-Li4GeS4"}
    build = panel._ordered_structure.__wrapped__  # bypass the cache
    for e in disordered:
        t0 = time.perf_counter()
        a = build(e)
        assert time.perf_counter() - t0 < 20.0, e.id
        if len(a) <= 60:
            b = build(e)
            assert [x.species_string for x in a] == [x.species_string for x in b], e.id
            assert np.allclose(a.frac_coords, b.frac_coords, atol=1e-8), e.id


def test_structure_returns_copies(entries):
    e = entries[0]
    s = e.structure()
    s.remove_sites([0])
    assert len(e.structure()) == len(s) + 1


def test_panel_structures_shape_and_selection(entries):
    ids = ["panel-Li3PO4-gamma", "panel-Li3N"]
    out = panel.panel_structures(ids)
    assert [o[0] for o in out] == ids
    for pid, s, note, cls in out:
        assert isinstance(s, Structure) and isinstance(note, str) and len(note) > 20
        assert cls in panel.CLASSES
    assert len(panel.panel_structures()) == len(entries)
    with pytest.raises(InputError, match="unknown panel id"):
        panel.panel_structures(["panel-nope"])


# ------------------------------------------------------------------------------------------ loader
GOOD = """
compounds:
- id: panel-Li3N
  formula: Li3N
  structure:
    spacegroup: P6/mmm
    lattice: [3.648, 3.648, 3.875, 90, 90, 120]
    species: [N, Li, Li]
    coords: [[0, 0, 0], [0, 0, 0.5], [0.3333333, 0.6666667, 0]]
  structure_source: test
  ordering: {method: none, note: ordered}
  density_g_cm3: 1.295
  sigma_rt_S_cm: 1.2e-3
  E_A_eV: 0.29
  citation: Alpen et al., Appl. Phys. Lett. (1977)
  sample: single crystal
  class: fast
"""


def test_parse_good_entry():
    (e,) = panel.parse_panel(GOOD)
    assert e.id == "panel-Li3N" and e.transport_class == "fast" and len(e.structure()) == 4


@pytest.mark.parametrize("old,new,match", [
    ("  citation: Alpen et al., Appl. Phys. Lett. (1977)\n", "", "missing field"),
    ("(1977)", "(no year)", "year"),
    ("class: fast", "class: slow", "does not match"),
    ("formula: Li3N", "formula: Li2Se", "outside the universal"),
    ("species: [N, Li, Li]", "species: [N, Li]", "equal"),
    ("E_A_eV: 0.29", "E_A_eV: .nan", "finite"),
    ("sigma_rt_S_cm: 1.2e-3", "sigma_rt_S_cm: -1.0", "finite and > 0"),
    ("method: none", "method: magic", "ordering.method"),
    ("method: none", "method: ewald", "oxidation_states"),
    ("sample: single crystal", "sample: single crystal\n  colour: blue", "unknown field"),
    ("id: panel-Li3N", "id: Li3N", "panel-"),
])
def test_bad_entries_are_one_line_input_errors(old, new, match):
    assert old in GOOD
    with pytest.raises(InputError, match=match) as exc:
        panel.parse_panel(GOOD.replace(old, new))
    assert "\n" not in str(exc.value)


def test_bad_documents():
    with pytest.raises(InputError, match="compounds"):
        panel.parse_panel("entries: []")
    with pytest.raises(InputError, match="not valid YAML"):
        panel.parse_panel("compounds: [unclosed")
    with pytest.raises(InputError, match="duplicate"):
        panel.parse_panel(GOOD + GOOD.replace("compounds:\n", ""))


def test_partially_occupied_without_ordering_is_refused():
    text = GOOD.replace("coords: [[0, 0, 0], [0, 0, 0.5], [0.3333333, 0.6666667, 0]]",
                        "coords: [[0, 0, 0], [0, 0, 0.5], [0.3333333, 0.6666667, 0]]\n    occupancies: [1, 0.5, 1]")
    (e,) = panel.parse_panel(text)
    with pytest.raises(InputError, match="partially occupied"):
        e.structure()
