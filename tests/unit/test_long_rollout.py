"""Single-material path (paper section 4.3): Δτ in frames, prior classes from the trajectories' own
MSD labels, supercell rollouts with the Corrector every k steps, frames streamed to Parquet."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.io import write

from liflow_screen.core import config
from liflow_screen.io import layout, schema
from liflow_screen.core.errors import ConfigError
from liflow_screen.core.geometry import tile
from liflow_screen.flow.painn import FlowModel
from liflow_screen.flow.training import CKPT_FORMAT
from conftest import make_settings

SMALL = dict(features=16, radial=8, layers=2)


def test_tile_matches_ase_repeat() -> None:
    a = bulk("LiCl", "rocksalt", a=5.13, cubic=True)
    a.rattle(0.1, seed=1)
    ref = a.repeat((2, 1, 3))
    z, pos, cell = tile(a.numbers, a.positions, a.cell.array, (2, 1, 3))
    np.testing.assert_array_equal(z, ref.numbers)
    np.testing.assert_allclose(pos, ref.positions, atol=1e-12)
    np.testing.assert_allclose(cell, ref.cell.array, atol=1e-12)


def test_delta_tau_in_frames() -> None:
    md = {"timestep_fs": 1.5, "save_every": 10}
    cfg = config.validate({"md": md, "dataset": {"delta_tau_frames": 67}})
    assert cfg["dataset"]["delta_tau_ps"] == pytest.approx(1.005)  # the paper's LGPS Δτ: 670 x 1.5 fs
    assert config.validate(cfg)["dataset"]["delta_tau_ps"] == pytest.approx(1.005)  # resolved config re-validates
    with pytest.raises(ConfigError, match="disagree"):
        config.validate({"md": md, "dataset": {"delta_tau_frames": 67, "delta_tau_ps": 1.0}})


def test_streaming_writer_atomic(tmp_path) -> None:
    rows = [{"id": "a", "source": "md", "frame": f, "time_ps": 0.1 * f, "positions": np.full(6, f, np.float32),
             "energy": None, "temperature_inst": None} for f in range(7)]
    out = tmp_path / "frames.parquet"
    with schema.StreamingWriter(out, "frames", prov={"x": 1}, rows_per_group=3) as w:
        for r in rows:
            w.write([r])
        assert not out.exists()  # nothing at the final path until closed
    t = schema.read_table(out, "frames")
    assert t.num_rows == 7 and t.column("frame").to_pylist() == list(range(7))
    assert pq_row_groups(out) == 3 and schema.read_provenance(out) == {"x": 1}
    bad = tmp_path / "bad.parquet"
    with pytest.raises(RuntimeError):
        with schema.StreamingWriter(bad, "frames") as w:
            w.write(rows[:5])
            raise RuntimeError("killed")
    assert not bad.exists() and not list(tmp_path.glob(".bad.parquet.*"))


def pq_row_groups(path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_row_groups


def _checkpoint(path, kind: str, prior: dict, seed: int, dtau: float) -> None:
    m = FlowModel(**SMALL, seed=seed)
    torch.save({"format": CKPT_FORMAT, "kind": kind, "variant": "adaptive" if kind == "propagator" else "uniform",
                "prior": prior, "hparams": m.hparams, "model": m.state_dict(), "delta_tau_ps": dtau}, path)


@pytest.fixture(scope="module")
def own_dataset(tmp_path_factory):
    """Two 'user' trajectories of rock-salt LiCl (8 atoms, 41 frames 10 fs apart): at 600 K the Li
    only rattle (slow), at 1000 K they random-walk ~0.35 Å per frame (fast); through the
    trajectories and dataset stages."""
    from liflow_screen.stages import run_dataset as dataset, run_trajectories as trajectories

    d = tmp_path_factory.mktemp("own")
    atoms = bulk("LiCl", "rocksalt", a=5.13, cubic=True)
    li = atoms.numbers == 3
    rng = np.random.default_rng(0)
    lines = ["id,path,temperature_K,frame_dt_fs"]
    for T, step in ((600, 0.0), (1000, 0.35)):
        walk = np.cumsum(rng.normal(0, step, (41, 8, 3)) * li[None, :, None], axis=0)
        frames = [Atoms(numbers=atoms.numbers, positions=atoms.positions + w + rng.normal(0, 0.05, (8, 3)),
                        cell=atoms.cell, pbc=True) for w in walk]
        write(d / f"run_{T}.extxyz", frames, format="extxyz")
        lines.append(f"LiCl,run_{T}.extxyz,{T},10")
    (d / "trajectories.csv").write_text("\n".join(lines) + "\n")
    cfg = {"structures": {"source": "trajectories", "path": str(d / "trajectories.csv")},
           "md": {"temperatures": [600, 1000], "timestep_fs": 1.0, "save_every": 10},
           "dataset": {"delta_tau_frames": 5}}
    settings = make_settings(cfg)
    paths = trajectories.run(settings, d / "trajectories.csv", d / "manifest.parquet", d / "md" / "chunk_00000")
    md_files = [paths["structures"], paths["status"], paths["frames_T600"], paths["frames_T1000"]]
    dataset.run(settings, d / "manifest.parquet", md_files, d / "dataset")
    return d, cfg


def test_labels_are_the_trajectories_own(own_dataset) -> None:
    d, _ = own_dataset
    lab = schema.read_df(d / "dataset" / layout.LABELS, "labels").set_index("temperature")
    assert bool(lab.loc[600, "slow_li"]) and not bool(lab.loc[1000, "slow_li"])
    assert bool(lab.loc[600, "slow_frame"]) and bool(lab.loc[1000, "slow_frame"])


def test_supercell_rollout_streamed_with_label_priors(own_dataset, tmp_path) -> None:
    """rollout.supercell [2, 1, 1], Corrector every 2nd step, prior classes from the labels at the
    nearest temperature (900 K -> the 1000 K label): the stage writes the 16-atom cells it rolled
    out, every frame of every (structure, T) once, and the classes it used."""
    from liflow_screen.stages import run_rollout as stage

    d, cfg = own_dataset
    cfg = config.deep_merge(cfg, {"rollout": {"temperatures": [600, 900], "n_steps": 4, "n_flow": 2,
                                              "supercell": [2, 1, 1], "corrector_every": 2,
                                              "prior_selection": "labels"}})
    cfg = make_settings(cfg)
    adaptive = {"kind": "adaptive", "prior_li": [1.0, 10.0], "prior_frame": [0.5, 0.5]}
    _checkpoint(tmp_path / "P.pt", "propagator", adaptive, 1, cfg.dataset.delta_tau_ps)
    _checkpoint(tmp_path / "C.pt", "corrector", {"kind": "uniform", "scale": 0.1, "sigma_max": 0.1}, 2,
                cfg.dataset.delta_tau_ps)
    out = tmp_path / "chunk"
    stage.run(cfg, d / "manifest.parquet", d / "dataset" / layout.STRUCTURES, None, tmp_path / "P.pt",
              tmp_path / "C.pt", "adaptive", 0, out, labels_path=d / "dataset" / layout.LABELS)
    base = schema.read_df(d / "dataset" / layout.STRUCTURES, "structures").iloc[0]
    cells = schema.read_df(out / layout.STRUCTURES, "structures").iloc[0]
    z, pos, cell = tile(np.asarray(base["numbers"]), np.asarray(base["positions"]).reshape(-1, 3),
                        np.asarray(base["cell"]).reshape(3, 3), (2, 1, 1))
    assert cells["n_atoms"] == 16 and cells["n_li"] == 8
    np.testing.assert_allclose(np.asarray(cells["positions"]).reshape(-1, 3), pos)
    np.testing.assert_allclose(np.asarray(cells["cell"]).reshape(3, 3), cell)
    priors = schema.read_df(out / layout.PRIORS, "priors").set_index("temperature")
    assert priors.loc[600, "method"] == "labels@600K" and bool(priors.loc[600, "li_slow"])
    assert priors.loc[900, "method"] == "labels@1000K" and not bool(priors.loc[900, "li_slow"])
    status = schema.read_df(out / layout.STATUS, "status")
    for T in (600, 900):
        fr = schema.read_df(layout.frames_file(out, T), "frames")
        st = status[status["temperature"] == T].iloc[0]
        assert len(fr) == st["n_frames"] and sorted(fr["frame"]) == list(range(st["n_frames"]))
        assert all(len(p) == 48 for p in fr["positions"])
        np.testing.assert_allclose(np.asarray(fr[fr["frame"] == 0]["positions"].iloc[0]).reshape(-1, 3), pos,
                                   atol=1e-5)
        if st["status"] == "ok":
            assert st["n_frames"] == 5
    # the Li prior at 900 K is the large one (x10 Maxwell-Boltzmann): its first step moves Li more
    f600 = schema.read_df(layout.frames_file(out, 600), "frames").sort_values("frame")
    f900 = schema.read_df(layout.frames_file(out, 900), "frames").sort_values("frame")
    li = z == 3

    def li_step(f: pd.DataFrame) -> float:
        a, b = (np.asarray(f["positions"].iloc[i]).reshape(-1, 3) for i in (0, 1))
        return float(np.sqrt(((b - a)[li] ** 2).sum(-1).mean()))

    assert li_step(f900) > 3 * li_step(f600)


def _stage_run(d, cfg, tmp_path, name: str, rollout: dict):
    """Run the rollout stage on the own dataset (LiCl, 600 / 900 K) with ``rollout`` settings."""
    from liflow_screen.stages import run_rollout as stage

    s = make_settings(config.deep_merge(cfg, {"rollout": {"temperatures": [600, 900], "n_flow": 2,
                                                          "prior_selection": "slow", **rollout}}))
    if not (tmp_path / "P.pt").exists():
        adaptive = {"kind": "adaptive", "prior_li": [1.0, 10.0], "prior_frame": [0.5, 0.5]}
        _checkpoint(tmp_path / "P.pt", "propagator", adaptive, 1, s.dataset.delta_tau_ps)
        _checkpoint(tmp_path / "C.pt", "corrector", {"kind": "uniform", "scale": 0.1, "sigma_max": 0.1}, 2,
                    s.dataset.delta_tau_ps)
    out = tmp_path / name
    stage.run(s, d / "manifest.parquet", d / "dataset" / layout.STRUCTURES, None, tmp_path / "P.pt",
              tmp_path / "C.pt", "adaptive", 0, out)
    status = schema.read_df(out / layout.STATUS, "status")
    frames = {T: schema.read_df(layout.frames_file(out, T), "frames") for T in (600, 900)}
    return s, out, status, frames


def test_replicas_and_extension_rounds(own_dataset, tmp_path) -> None:
    """Two replicas per (structure, T), small priors (Li barely moves: unresolved), extension in rounds
    of 3 steps up to 9: every replica's frames are 0..n once each, the replicas are different
    trajectories, an extended replica 0 is exactly the uninterrupted 9-step rollout of the same seed
    stream (bit for bit on one machine), and a budget of one round goes to the hottest temperature."""
    from liflow_screen.report.trajectory import li_resolution

    d, cfg = own_dataset
    s, out, status, frames = _stage_run(d, cfg, tmp_path, "ext", {"n_steps": 3, "replicas": 2, "max_steps": 9,
                                                                   "extend_steps": 3})
    assert sorted(status["replica"]) == [0, 0, 1, 1] and set(status["status"]) == {"ok"}
    cell = schema.read_df(out / layout.STRUCTURES, "structures").iloc[0]
    for T in (600, 900):
        st = status[status["temperature"] == T]
        assert st["n_frames"].nunique() == 1  # replicas extend together
        n = int(st["n_frames"].iloc[0])
        assert (n - 1) in (3, 6, 9)
        reps = []
        for r in (0, 1):
            fr = frames[T][frames[T]["replica"] == r].sort_values("frame")
            assert fr["frame"].tolist() == list(range(n))
            np.testing.assert_allclose(fr["time_ps"].to_numpy(), np.arange(n) * s.dataset.delta_tau_ps, rtol=1e-6)
            reps.append(np.stack([np.asarray(p).reshape(-1, 3) for p in fr["positions"]]).astype(float))
        assert not np.allclose(reps[0][1], reps[1][1])  # independent streams
        res, _, _ = li_resolution(reps, np.arange(n) * s.dataset.delta_tau_ps, np.asarray(cell["numbers"]),
                                  np.asarray(cell["cell"]))
        assert res["resolved"] or n - 1 == 9  # stopped only when resolved or at max_steps
    # replica 0, extended in rounds, is the uninterrupted rollout of its stream
    _, _, st1, fr1 = _stage_run(d, cfg, tmp_path, "one", {"n_steps": 9, "replicas": 1})
    # (small priors: Li rattle on their sites, nothing resolves in 9 steps, both temperatures reach 9)
    assert status["n_frames"].tolist() == [10, 10, 10, 10]
    a = frames[900][frames[900]["replica"] == 0].sort_values("frame")
    b = fr1[900].sort_values("frame")
    assert len(a) == len(b) == 10
    for pa, pb in zip(a["positions"], b["positions"]):
        np.testing.assert_array_equal(np.asarray(pa), np.asarray(pb))
    # a budget of one round (2 replicas x 3 steps x Δτ) is spent on the hottest unresolved pair only
    dt = s.dataset.delta_tau_ps
    _, _, st2, _ = _stage_run(d, cfg, tmp_path, "budget", {"n_steps": 3, "replicas": 2, "max_steps": 9,
                                                          "extend_steps": 3, "extend_budget_ps": 2 * 3 * dt * 1.01})
    n = st2.groupby("temperature")["n_frames"].max()
    assert n[600] == 4 and n[900] == 7
