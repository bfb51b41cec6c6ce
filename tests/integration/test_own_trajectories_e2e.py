"""Bring your own trajectories: the project's own MD, exported to extxyz (unwrapped) and to a wrapped
VASP XDATCAR, goes through ``trajectories`` -> ``dataset`` and gives the same dataset both ways,
with the same unwrapped frames as the MD itself."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from liflow_screen.io import layout, schema
from liflow_screen.md import potentials
from liflow_screen.cli import main
from liflow_screen.md import integrate
from liflow_screen.core.settings import MDSettings

TEMPS = [600, 900]
MD = {"potential": "chgnet", "temperatures": TEMPS, "timestep_fs": 2.0, "save_every": 5, "duration_ps": 0.1}


@pytest.fixture(scope="module")
def md_frames():
    """Two short CHGNet trajectories of rock-salt LiCl (8 atoms), unwrapped, float32 as the MD stage stores."""
    pot = potentials.load_potential(MDSettings.defaults(potential="chgnet"))
    settings = MDSettings.defaults(timestep_fs=2.0, duration_ps=0.1, save_every=5)
    atoms = bulk("LiCl", "rocksalt", a=5.13, cubic=True)
    out = {}
    for T in TEMPS:
        res = integrate.run_trajectory("LiCl", atoms, float(T), settings, potentials.EnergyForcesCalculator(pot),
                                       seed=3)
        assert res.status == "ok" and res.n_frames == 11
        out[T] = (atoms.get_atomic_numbers(), atoms.cell.array.copy(), res.positions.astype(np.float32),
                  res.energies)
    return out


def _export(d, md_frames, fmt: str) -> None:
    d.mkdir()
    lines = ["id,path,temperature_K,frame_dt_fs"]
    for T, (numbers, cell, pos, energies) in md_frames.items():
        images = [Atoms(numbers=numbers, positions=p.astype(np.float64), cell=cell, pbc=True) for p in pos]
        for a, e in zip(images, energies):
            a.calc = SinglePointCalculator(a, energy=float(e))
        if fmt == "xdatcar":
            for a in images:
                a.wrap()
            name = f"XDATCAR_{T}"
            write(d / name, images, format="vasp-xdatcar")
        else:
            name = f"run_{T}.extxyz"
            write(d / name, images, format="extxyz")
        lines.append(f"LiCl,{name},{T},10")
    (d / "trajectories.csv").write_text("\n".join(lines) + "\n")


def _run(d, cfgfile) -> pd.DataFrame:
    chunk = d / "md" / "chunk_00000"
    assert main(["trajectories", "--config", str(cfgfile), "--trajectories", str(d / "trajectories.csv"),
                 "--manifest-out", str(d / "manifest.parquet"), "--out-dir", str(chunk)]) == 0
    files = [chunk / layout.STRUCTURES, chunk / layout.STATUS] + [layout.frames_file(chunk, T) for T in TEMPS]
    assert main(["dataset", "--config", str(cfgfile), "--manifest", str(d / "manifest.parquet"),
                 "--md-files", *map(str, files), "--out-dir", str(d / "dataset")]) == 0
    return d / "dataset"


def test_extxyz_and_wrapped_xdatcar_give_the_same_dataset(tmp_path, md_frames):
    cfgfile = tmp_path / "cfg.yaml"
    cfgfile.write_text(yaml.safe_dump({"md": MD, "dataset": {"delta_tau_ps": 0.05}}))
    ds = {}
    for fmt in ("extxyz", "xdatcar"):
        _export(tmp_path / fmt, md_frames, fmt)
        ds[fmt] = _run(tmp_path / fmt, cfgfile)
    a, b = ds["extxyz"], ds["xdatcar"]
    sa, sb = schema.read_df(a / "structures.parquet", "structures"), schema.read_df(b / "structures.parquet", "structures")
    assert list(sa["numbers"][0]) == list(sb["numbers"][0]) and sa["n_li"][0] == 4
    np.testing.assert_allclose(np.asarray(sa["positions"][0]), np.asarray(sb["positions"][0]), atol=1e-5)
    la, lb = schema.read_df(a / "labels.parquet", "labels"), schema.read_df(b / "labels.parquet", "labels")
    assert len(la) == len(lb) == 2
    for col in ("msd_li", "msd_frame", "rate_li", "rate_frame"):
        np.testing.assert_allclose(la[col], lb[col], rtol=1e-4, atol=1e-7)
    assert list(la["slow_li"]) == list(lb["slow_li"])
    fa, fb = layout.dataset_frame_files(a), layout.dataset_frame_files(b)
    assert [f.relative_to(a) for f in fa] == [f.relative_to(b) for f in fb]
    da, db = schema.open_frames(fa), schema.open_frames(fb)
    for T, (_, cell, pos, _) in md_frames.items():
        pa_, ta = schema.read_trajectory(da, "LiCl", T)
        pb_, tb = schema.read_trajectory(db, "LiCl", T)
        np.testing.assert_array_equal(ta, tb)
        np.testing.assert_allclose(ta[1] - ta[0], 0.01, rtol=1e-6)
        # identical up to float32 rounding of the XDATCAR's 8-decimal fractional coordinates
        np.testing.assert_allclose(pa_, pb_, atol=1e-5)
        # and the MD's own unwrapped frames, up to one lattice translation of the whole trajectory
        shift = (pa_[0] - pos[0]) @ np.linalg.inv(cell)
        assert np.allclose(shift, np.round(shift), atol=1e-5)
        np.testing.assert_allclose(pa_ - pa_[0], pos - pos[0], atol=1e-5)
    # energies came with the extxyz frames (CHGNet's), not with the XDATCAR
    fr = da.to_table(columns=["energy"], filter=None).column("energy").to_pylist()
    want = np.concatenate([md_frames[T][3] for T in TEMPS])
    np.testing.assert_allclose(sorted(fr), sorted(want), rtol=1e-12)
    assert all(e is None for e in db.to_table(columns=["energy"]).column("energy").to_pylist())


def test_workflow_own_trajectories_end_to_end(tmp_path, md_frames):
    """config/own-trajectories.yaml through Snakemake on the wrapped XDATCAR export: trajectories ->
    dataset -> single-material P + C (labels as prior classes, uniform frame prior) -> rollouts on a
    1 x 1 x 2 supercell with the Corrector every 2nd step -> kinisi / Arrhenius -> reports with the
    input trajectories' D* beside the rollouts'."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import REPO

    d = tmp_path / "own"
    _export(d, md_frames, "xdatcar")
    over = {"md": MD, "dataset": {"delta_tau_frames": 2},
            "train": {"features": 16, "radial": 8, "layers": 1, "max_steps": 10, "val_every": 5, "val_batches": 1,
                      "batch_size": 2},
            "rollout": {"n_steps": 4, "n_flow": 2, "supercell": [1, 1, 2], "corrector_every": 2},
            "analysis": {"kinisi_n_dt": 4, "kinisi_samples": 200}}
    (d / "over.yaml").write_text(yaml.safe_dump(over))
    cmd = [str(Path(sys.executable).parent / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(d), "--cores", "2",
           "--configfile", str(REPO / "config" / "own-trajectories.yaml"), str(d / "over.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = d / "results-own"
    resolved = yaml.safe_load((res / "config.resolved.yaml").read_text())
    assert resolved["dataset"]["delta_tau_ps"] == pytest.approx(0.02)  # 2 frames x 10 fs
    assert not (res / "train" / "selector.pt").exists()  # no classifier on this path
    labels = schema.read_df(res / "dataset" / "labels.parquet", "labels").set_index("temperature")
    cells = schema.read_df(res / "rollout" / "adaptive" / "chunk_00000" / layout.STRUCTURES, "structures")
    assert list(cells["n_atoms"]) == [16] and list(cells["n_li"]) == [8]
    priors = schema.read_df(res / "rollout" / "adaptive" / "chunk_00000" / layout.PRIORS, "priors")
    for p in priors.itertuples():
        assert p.method == f"labels@{p.temperature}K" and bool(p.li_slow) == bool(labels.loc[p.temperature, "slow_li"])
    for T in TEMPS:
        fr = schema.read_df(layout.frames_file(res / "rollout" / "adaptive" / "chunk_00000", T), "frames")
        assert sorted(fr["frame"]) == list(range(len(fr))) and len(fr) <= 5
        assert {len(p) for p in fr["positions"]} == {48}
    diff = pd.read_csv(res / "reports" / "diffusivity.csv")
    assert set(diff["source"]) == {"md", "liflow:adaptive"} and set(diff["id"]) == {"LiCl"}
    for T in TEMPS:
        assert diff[f"D_method_{T}K"].notna().all()
    an = pd.concat([pd.read_parquet(f) for f in (res / "analysis").rglob("*.parquet")])
    assert set(an["source"]) == {"md", "liflow:adaptive"} and len(an) == 2 * len(TEMPS)
    # the same Li sublattice in the 8-atom input cell and the 16-atom supercell: same hop length
    hop = an.groupby("source")["li_hop_A"].first()
    assert hop["md"] == pytest.approx(hop["liflow:adaptive"], rel=0.05)
