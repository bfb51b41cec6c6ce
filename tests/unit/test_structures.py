"""Structures stage: embedded set, MP query against a local server, user inputs, split, CLI errors."""

from __future__ import annotations

import dataclasses

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase.cell import Cell
from pymatgen.core import Lattice, Structure

from liflow_screen.core import config
from liflow_screen.io import schema
from liflow_screen import structures
from liflow_screen.cli import main
from liflow_screen.core.errors import LiflowError
from liflow_screen.structures.embedded import embedded_structures
from liflow_screen.structures.sources import cif_dir, manifest_file, materials_project
from conftest import make_settings
from mp_server import FakeMP

# ---------------------------------------------------------------------------------- embedded


def test_embedded_set_is_ordered_li_and_sourced():
    emb = embedded_structures()
    assert len(emb) >= 12
    ids = [e[0] for e in emb]
    assert len(set(ids)) == len(ids)
    formulas = {s.composition.reduced_formula for _, s, _, _ in emb}
    assert {"Li3N", "LiFePO4", "Li2O", "LiF"} <= formulas  # fast and slow conductors
    for sid, s, src, role in emb:
        assert s.is_ordered, sid
        assert s.composition["Li"] > 0, sid
        assert len(src) > 10 and role in {"fast", "moderate", "slow"}
        d = s.distance_matrix + np.eye(len(s)) * 10
        assert d.min() > 1.4, f"{sid}: atoms too close ({d.min():.2f} Å)"


@pytest.mark.parametrize("min_width", [7.0, 9.0])
def test_supercell_widths_meet_minimum(min_width):
    cfg = make_settings({"structures": {"min_width": min_width}})
    df, rejected, _ = structures.build_manifest(cfg)
    assert not rejected and len(df) >= 12
    for row in df.itertuples():
        s = Structure.from_str(row.cif, fmt="cif")
        sup = np.asarray(s.lattice.matrix) * np.asarray(row.supercell)[:, None]
        # independent: width_i = 1 / |reciprocal vector i| (ASE, no 2π)
        widths = 1.0 / np.linalg.norm(Cell(sup).reciprocal(), axis=1)
        assert widths.min() >= min_width - 1e-6, row.id
        assert row.min_width == pytest.approx(widths.min())
        # minimal: one repeat fewer along any axis would violate the bound
        for ax in range(3):
            if row.supercell[ax] > 1:
                reps = np.array(row.supercell)
                reps[ax] -= 1
                w = 1.0 / np.linalg.norm(Cell(np.asarray(s.lattice.matrix) * reps[:, None]).reciprocal(), axis=1)
                assert w[ax] < min_width
        assert row.n_atoms_supercell == len(s) * int(np.prod(row.supercell))


# ---------------------------------------------------------------------------------- split


def test_split_by_composition_disjoint_seeded():
    formulas = [f"Li{i}X" for i in range(40)] * 3  # 40 compositions, 3 polymorphs each
    a = structures.split_by_composition(formulas, 0.1, 0.1, seed=3)
    b = structures.split_by_composition(formulas, 0.1, 0.1, seed=3)
    c = structures.split_by_composition(formulas, 0.1, 0.1, seed=4)
    assert a == b and a != c
    counts = {k: sum(v == k for v in a.values()) for k in ("train", "val", "test")}
    assert counts == {"test": 4, "val": 4, "train": 32}


def test_manifest_split_no_composition_in_two_splits(default_settings):
    df, _, _ = structures.build_manifest(default_settings)
    per_comp = df.groupby("reduced_formula")["split"].nunique()
    assert (per_comp == 1).all()
    assert set(df["split"]) == {"train", "val", "test"}
    assert df["chunk"].max() == (len(df) - 1) // default_settings.md.chunk_size


def test_md_cap_per_split_mapping():
    cfg = make_settings({"md": {"max_structures": {"train": 2, "test": 0}}})
    df, _, _ = structures.build_manifest(cfg)
    assert df[df.run_md]["split"].value_counts().to_dict() == {"train": 2, "val": int((df.split == "val").sum())}


def test_md_cap_picks_smallest_cells_per_split():
    cfg = make_settings({"md": {"max_structures": 1, "splits": ["train", "test"]}})
    df, _, _ = structures.build_manifest(cfg)
    chosen = df[df.run_md]
    assert sorted(chosen["split"]) == ["test", "train"]
    for split, row in chosen.set_index("split").iterrows():
        assert row.n_atoms_supercell == df[df.split == split]["n_atoms_supercell"].min()


# ---------------------------------------------------------------------------------- Materials Project


def _doc(mid, s, bg=5.0, eh=0.0):
    return {"material_id": mid, "formula_pretty": s.composition.reduced_formula, "structure": s.as_dict(),
            "band_gap": bg, "energy_above_hull": eh, "nsites": len(s), "composition": s.composition.as_dict(),
            "elements": sorted({e.symbol for e in s.composition.elements})}


@pytest.fixture
def mp_docs():
    lif = Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.03), ["Li", "F"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    li3n = Structure.from_spacegroup("P6/mmm", Lattice.hexagonal(3.648, 3.875), ["N", "Li", "Li"],
                                     [[0, 0, 0], [0, 0, 0.5], [1 / 3, 2 / 3, 0]])
    # Li fraction 1/17 < 10 %: must be dropped client-side
    dilute = Structure(Lattice.cubic(8.0), ["Li"] + ["O"] * 16,
                       [[0, 0, 0]] + [[(i % 4) / 4 + 0.125, (i // 4) / 4 + 0.125, 0.5] for i in range(16)])
    disordered = lif.copy()
    disordered.replace(0, {"Li": 0.5, "Na": 0.5})
    return [
        _doc("mp-1138", lif, bg=8.7),
        _doc("mp-2251", li3n, bg=2.5, eh=0.05),
        _doc("mp-9001", dilute, bg=4.0),
        _doc("mp-9002", disordered, bg=4.0),
        _doc("mp-9003", li3n, bg=1.0),          # below the band-gap criterion: server filters it
        _doc("mp-9004", lif, bg=6.0, eh=0.5),   # above hull: server filters it
    ]


def test_mp_query_through_real_client(mp_docs, default_settings):
    mp_cfg = default_settings.structures.mp
    with FakeMP(mp_docs, db_version="2025.09.25") as srv:
        mp_cfg = dataclasses.replace(mp_cfg, endpoint=srv.url)
        recs, rejected, prov = materials_project(mp_cfg, api_key="k" * 32)
    assert [r.id for r in recs] == ["mp-1138", "mp-2251"]
    assert recs[0].band_gap == 8.7 and recs[1].e_above_hull == 0.05
    reasons = " ".join(r.reason for r in rejected)
    assert "mp-9001" in reasons and "Li fraction" in reasons
    assert "mp-9002" in reasons and "disordered" in reasons
    assert prov["database_version"] == "2025.09.25" and prov["n_documents"] == 4
    assert recs[0].source == "materials-project:mp-1138@2025.09.25"
    assert any(r.rstrip("/").endswith("heartbeat") for r in srv.requests)
    summary = [r for r in srv.requests if "summary" in r]
    assert "band_gap_min=2.0" in summary[0] and "energy_above_hull_max=0.1" in summary[0] and "elements=Li" in summary[0]
    assert srv.keys[-1] == "k" * 32


def test_mp_retries_with_backoff_then_succeeds(mp_docs, default_settings):
    mp_cfg = dataclasses.replace(default_settings.structures.mp, backoff_s=0.01, retries=3)
    with FakeMP(mp_docs, fail_first=2) as srv:
        mp_cfg = dataclasses.replace(mp_cfg, endpoint=srv.url)
        recs, _, _ = materials_project(mp_cfg, api_key="k" * 32)
    assert len(recs) == 2
    assert sum("summary" in r for r in srv.requests) >= 3


def test_mp_gives_up_after_retries(mp_docs, default_settings):
    mp_cfg = dataclasses.replace(default_settings.structures.mp, backoff_s=0.01, retries=1)
    with FakeMP(mp_docs, fail_first=100) as srv:
        mp_cfg = dataclasses.replace(mp_cfg, endpoint=srv.url)
        with pytest.raises(LiflowError, match="after 2 attempt"):
            materials_project(mp_cfg, api_key="k" * 32)


def test_mp_unreachable_server_is_a_clear_error(default_settings):
    mp_cfg = dataclasses.replace(default_settings.structures.mp, backoff_s=0.01, retries=1,
                                 endpoint="http://127.0.0.1:9/")
    with pytest.raises(LiflowError, match="Materials Project query failed"):
        materials_project(mp_cfg, api_key="k" * 32)


def test_missing_api_key_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MP_API_KEY", raising=False)
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text("structures:\n  source: mp\n")
    out = tmp_path / "m.parquet"
    rc = main(["structures", "--config", str(cfgfile), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists()
    assert err[-1].startswith("error: MP_API_KEY is not set")


# ---------------------------------------------------------------------------------- user input

GOOD_CIF = Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.03), ["Li", "F"], [[0, 0, 0], [0.5, 0.5, 0.5]]).to(fmt="cif")


def _write_inputs(folder: Path) -> None:
    folder.mkdir()
    (folder / "good.cif").write_text(GOOD_CIF)
    (folder / "broken.cif").write_text("data_x\n_cell_length_a 4.0\nthis is not a cif loop\n")
    dis = Structure.from_str(GOOD_CIF, fmt="cif")
    dis.replace(0, {"Li": 0.5, "Na": 0.5})
    (folder / "disordered.cif").write_text(dis.to(fmt="cif"))
    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    (folder / "noli.cif").write_text(nacl.to(fmt="cif"))


def test_cif_folder_rejects_bad_inputs_rest_proceed(tmp_path):
    _write_inputs(tmp_path / "cifs")
    recs, rejected = cif_dir(tmp_path / "cifs")
    assert [r.id for r in recs] == ["good"]
    msgs = {Path(r.name).name: r.reason for r in rejected}
    assert set(msgs) == {"broken.cif", "disordered.cif", "noli.cif"}
    assert "malformed CIF" in msgs["broken.cif"] and "broken.cif" in msgs["broken.cif"]
    assert "disordered" in msgs["disordered.cif"]
    assert "no lithium" in msgs["noli.cif"]


def test_manifest_csv_and_cli_run(tmp_path):
    _write_inputs(tmp_path / "cifs")
    man = tmp_path / "inputs.csv"
    man.write_text("id,path\nLiF-test,cifs/good.cif\nbad,cifs/noli.cif\n")
    recs, rejected = manifest_file(man)
    assert [r.id for r in recs] == ["LiF-test"] and len(rejected) == 1
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text(f"structures:\n  source: manifest\n  path: {man}\n  test_fraction: 0\n  val_fraction: 0\n")
    out = tmp_path / "out" / "manifest.parquet"
    assert main(["structures", "--config", str(cfgfile), "--out", str(out)]) == 0
    df = schema.read_df(out, "manifest")
    assert df["id"].tolist() == ["LiF-test"] and df["split"].tolist() == ["train"]
    prov = schema.read_provenance(out)
    assert any("noli.cif" in r for r in prov["rejected"]) and prov["config"]["structures"]["source"] == "manifest"
    assert sorted(p.name for p in out.parent.iterdir()) == ["manifest.parquet"]  # no temp files left


def test_all_inputs_rejected_is_an_error(tmp_path, capsys):
    folder = tmp_path / "cifs"
    folder.mkdir()
    (folder / "broken.cif").write_text("garbage")
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text(f"structures:\n  source: cif_dir\n  path: {folder}\n")
    out = tmp_path / "m.parquet"
    assert main(["structures", "--config", str(cfgfile), "--out", str(out)]) == 2
    assert "no usable structures" in capsys.readouterr().err and not out.exists()


# ---------------------------------------------------------------------------------- config


@pytest.mark.parametrize("text,needle", [
    ("md:\n  bogus: 1\n", "unknown config key 'bogus' in md"),
    ("nonsense: 3\n", "unknown config key 'nonsense'"),
    ("md:\n  timestep_fs: fast\n", "md.timestep_fs"),
    ("structures:\n  source: cif_dir\n", "structures.path is required"),
    ("md:\n  temperatures: [600]\n  timestep_fs: 3\n", "dataset.delta_tau_ps"),
])
def test_config_errors_are_one_line_nonzero(tmp_path, text, needle):
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "liflow_screen.cli", "validate-config", "--config", str(cfgfile)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]


def test_panel_source_with_own_structures(tmp_path):
    """source panel: the chosen panel compounds (ids of data/panel.yaml) plus the user's CIFs."""
    from conftest import REPO

    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "LiBr.cif").write_text((REPO / ".test" / "tiny" / "LiBr.cif").read_text())
    cfg = make_settings({"structures": {"source": "panel", "panel_ids": ["panel-Li3N", "panel-Li4P2S6"],
                                          "path": str(tmp_path / "own"), "min_width": 5.0}})
    df, rejected, extra = structures.build_manifest(cfg)
    assert not rejected and sorted(df["id"]) == ["LiBr", "panel-Li3N", "panel-Li4P2S6"]
    assert extra["panel_ids"] == ["panel-Li3N", "panel-Li4P2S6"] and extra["own_structures"]["ids"] == ["LiBr"]
    assert "Rabenau" in df.set_index("id").loc["panel-Li3N", "source"]
    with pytest.raises(LiflowError, match="unknown panel id"):
        structures.build_manifest(make_settings({"structures": {"source": "panel", "panel_ids": ["panel-Nope"]}}))
    with pytest.raises(LiflowError, match="panel_ids"):
        config.validate({"structures": {"panel_ids": ["Li3N"]}})  # ids of the panel start with panel-


def test_shipped_configs_validate():
    from conftest import REPO

    for name in ("config.yaml", "config/panel.yaml", "config/train-demo.yaml"):
        cfg = config.load(REPO / name)
        assert cfg["structures"]["source"] == ("embedded" if "train-demo" in name else "panel"), name
    assert not (REPO / "config" / "pretrained.yaml").exists()  # the default is the published-model screening
    demo = config.load(REPO / "config" / "train-demo.yaml")
    assert demo["train"]["variants"] == ["adaptive"] and demo["pretrained"]["propagator"] is None
    if (REPO / "config" / "paper.yaml").exists():
        cfg = config.load(REPO / "config" / "paper.yaml")
        assert cfg["md"]["temperatures"] == [600, 800, 1000, 1200]
