"""Reference MD stage: units, unwrapping, resume after kill, failure isolation, batched == one-by-one."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from ase import Atoms
from ase.build import bulk
from ase.io import write

from liflow_screen.core import config
from liflow_screen.io import schema
from liflow_screen.core.errors import InputError
from liflow_screen.md import batched, integrate
from liflow_screen.md.relax import build_supercell, relax
from liflow_screen.stages import run_md as md_stage
from liflow_screen.md import potentials as P
from liflow_screen.core.geometry import mic_displacements
from liflow_screen.core.settings import MDSettings, Settings

from conftest import make_settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Killed(BaseException):
    """Simulates the job being killed (not an Exception: nothing may swallow it)."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> P.Potential:
    path = P.save_mace_model(P.build_random_mace("tiny", seed=1), tmp_path_factory.mktemp("m") / "tiny.model")
    return P.load_potential(MDSettings.defaults(potential="mace-file", model_path=str(path)))


def li2o() -> Atoms:
    return bulk("Li2O", "fluorite", a=4.62, cubic=True)


def cif_of(atoms: Atoms) -> str:
    buf = io.BytesIO()
    write(buf, atoms, format="cif")
    return buf.getvalue().decode()


def row(sid: str, atoms: Atoms, rep=(1, 1, 1), run_md: bool = True, split: str = "train", chunk: int = 0) -> dict:
    return dict(id=sid, reduced_formula=atoms.get_chemical_formula("hill", empirical=True), cif=cif_of(atoms),
                supercell=list(rep), split=split, chunk=chunk, run_md=run_md)


def cfg_of(**md_over) -> dict:
    mdc = {"potential": "mace-file", "model_path": "unused", "temperatures": [600], "timestep_fs": 2.0,
           "duration_ps": 0.08, "save_every": 4, "relax_steps": 0, "relax_cell": False, "checkpoint_every": 2}
    mdc.update(md_over)
    frame_ps = mdc["timestep_fs"] * mdc["save_every"] / 1000
    return {"seed": 3, "md": mdc, "dataset": {"delta_tau_ps": frame_ps}}


def settings_of(**md_over) -> Settings:
    return make_settings(cfg_of(**md_over))


def test_build_supercell():
    atoms = build_supercell(pd.Series(row("a", li2o(), rep=(2, 1, 3))))
    assert len(atoms) == 12 * 6 and atoms.pbc.all()
    np.testing.assert_allclose(atoms.cell.lengths(), [9.24, 4.62, 13.86], atol=1e-6)
    assert (atoms.numbers == 3).sum() == 8 * 6
    with pytest.raises(InputError, match="unreadable CIF"):
        build_supercell(pd.Series(dict(id="bad", cif="data_x\n_cell_length_a 1\n", supercell=[1, 1, 1])))


def test_relax_lowers_energy_and_reports_failure(tiny):
    a = li2o().repeat((2, 1, 1))
    a.rattle(0.15, seed=4)
    a.calc = tiny.calculator
    e0 = a.get_potential_energy()
    out, status = relax(a, tiny, fmax=1e-4, steps=10, cell=True)
    assert status in ("ok", "not_converged")
    assert out.get_potential_energy() < e0
    bad = a.copy()
    bad.numbers[0] = 92  # uranium: outside the tiny model's 89 elements
    out_bad, status_bad = relax(bad, tiny, 0.05, 5, True)
    assert status_bad.startswith("failed: ") and "\n" not in status_bad
    np.testing.assert_array_equal(out_bad.positions, bad.positions)


def test_chunk_outputs_units_and_temperature(tiny, tmp_path):
    cfg = settings_of(temperatures=[600, 900], duration_ps=0.6, save_every=10, timestep_fs=2.0, relax_steps=3)
    man = pd.DataFrame([row("md-1", li2o(), rep=(2, 2, 1)), row("nomd", li2o(), run_md=False, split="test"),
                        row("other-chunk", li2o(), chunk=1)])
    paths = md_stage.run(cfg, man, 0, tmp_path, potential=tiny, progress=False)
    assert not (tmp_path / "ckpt").exists()
    st = schema.read_df(paths["structures"], "structures")
    assert sorted(st.id) == ["md-1", "nomd"]  # descriptors for all rows of the chunk, MD or not
    assert all(len(d) == 8 and np.isfinite(d).all() for d in st.desc_li)
    assert st.set_index("id").loc["md-1", "n_li"] == 32
    status = schema.read_df(paths["status"], "status")
    assert sorted(zip(status.id, status.temperature, status.status)) == [("md-1", 600, "ok"), ("md-1", 900, "ok")]
    for temp in (600, 900):
        fr = schema.read_df(tmp_path / f"frames_T{temp}.parquet", "frames").sort_values("frame")
        assert fr.frame.tolist() == list(range(31))
        # time spacing = save_every * timestep / 1000 ps
        np.testing.assert_allclose(np.diff(fr.time_ps), 10 * 2.0 / 1000, rtol=1e-5)
        pos = np.stack(fr.positions.to_numpy()).reshape(31, 48, 3)
        assert pos.dtype == np.float32
        # frame 0 is the relaxed structure stored in structures.parquet
        relaxed = np.asarray(st.set_index("id").loc["md-1", "positions"]).reshape(48, 3)
        np.testing.assert_allclose(pos[0], relaxed, atol=1e-5)
        # instantaneous T from the saved frames' kinetic energy is near the target on average
        t_mean = fr.temperature_inst.iloc[5:].mean()
        assert 0.6 * temp < t_mean < 1.5 * temp, t_mean
        assert np.isfinite(fr.energy).all()


def test_trajectory_is_unwrapped(tiny):
    a = li2o().repeat((2, 2, 1))
    a.positions -= a.positions[0]  # atoms sit on the x=0, y=0, z=0 faces: half leave the cell
    settings = MDSettings.defaults(timestep_fs=2.0, duration_ps=0.2, save_every=5)
    res = integrate.run_trajectory("unwrap", a, 1200.0, settings, P.EnergyForcesCalculator(tiny), seed=1)
    assert res.status == "ok" and res.n_frames == 21
    frac = res.positions.astype(np.float64) @ np.linalg.inv(a.cell.array)
    assert (frac < 0).any()  # atoms crossed a face and were NOT wrapped back
    steps = np.diff(res.positions.astype(np.float64), axis=0)
    # every frame-to-frame displacement is already the minimum-image one: no wrap jumps
    np.testing.assert_allclose(steps, mic_displacements(steps, a.cell.array), atol=1e-5)
    # and the total displacement is continuous with the sum of the steps
    np.testing.assert_allclose(res.positions[-1] - res.positions[0], steps.sum(0), atol=1e-4)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_resume_after_kill_reproduces_uninterrupted_run(tiny, tmp_path, batch_size):
    """Killed at r2's frame 5, resumed from the frame-4 checkpoint: the same frames, bit for bit. One by
    one, r1 had finished (its done checkpoint is reused); batched, both resume from the batch's."""
    cfg = settings_of(temperatures=[700], duration_ps=0.08, save_every=4, checkpoint_every=2, batch_size=batch_size)
    man = pd.DataFrame([row("r1", li2o()), row("r2", li2o().repeat((1, 1, 2)))])
    ref_paths = md_stage.run(cfg, man, 0, tmp_path / "ref", potential=tiny, progress=False)
    ref = schema.read_df(ref_paths["frames_T700"], "frames")

    def kill_at_5(sid, temp, frame):
        if sid == "r2" and frame == 5:
            raise Killed

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        md_stage.run(cfg, man, 0, out, potential=tiny, progress=False, frame_callback=kill_at_5)
    assert not (out / "frames_T700.parquet").exists()  # nothing half-written
    # one by one: r1 finished, r2 at its frame-4 checkpoint; batched: one batch file at frame 4
    assert len(list((out / "ckpt").glob("md_*.pkl"))) == (2 if batch_size == 1 else 1)

    seen: dict[str, list[int]] = {"r1": [], "r2": []}
    paths = md_stage.run(cfg, man, 0, out, potential=tiny, progress=False,
                         frame_callback=lambda sid, t, f: seen[sid].append(f))
    assert seen["r1"] == ([] if batch_size == 1 else list(range(5, 11)))
    assert seen["r2"] == list(range(5, 11))  # resumed, not restarted
    got = schema.read_df(paths["frames_T700"], "frames")
    key = ["id", "frame"]
    ref, got = ref.sort_values(key).reset_index(drop=True), got.sort_values(key).reset_index(drop=True)
    assert len(got) == len(ref) == 22
    for pg, pr in zip(got.positions, ref.positions):
        np.testing.assert_array_equal(pg, pr)
    np.testing.assert_array_equal(got.energy, ref.energy)
    assert not (out / "ckpt").exists()


@pytest.mark.parametrize("batch_size", [1, 3])
def test_failure_isolation(tiny, tmp_path, batch_size):
    crushed = li2o()
    crushed.positions[1] = crushed.positions[0] + [0.2, 0.0, 0.0]  # Li on top of O: ZBL blows it apart
    uranium = li2o()
    uranium.numbers[0] = 92  # not in the tiny model: relaxation fails
    cfg = settings_of(batch_size=batch_size, temperatures=[600], duration_ps=0.04)
    man = pd.DataFrame([row("good", li2o()), row("crushed", crushed), row("uranium", uranium),
                        row("good2", li2o().repeat((2, 1, 1)))])
    paths = md_stage.run(cfg, man, 0, tmp_path, potential=tiny, progress=False)
    status = schema.read_df(paths["status"], "status").set_index("id")
    assert status.loc["good", "status"] == "ok" and status.loc["good2", "status"] == "ok"
    assert status.loc["crushed", "status"] in ("exploded", "nan"), status.loc["crushed", "reason"]
    assert status.loc["uranium", "status"] == "relax_failed"
    assert status.loc["good", "n_frames"] == 6
    frames = schema.read_df(paths["frames_T600"], "frames")
    assert sorted(set(frames.id)) == ["good", "good2"]
    st = schema.read_df(paths["structures"], "structures").set_index("id")
    assert st.loc["uranium", "relax_status"].startswith("failed")


def test_batched_equals_one_by_one(tiny):
    """The batched engine (one model call per MD step for the whole group) gives the one-by-one ASE
    trajectories: same initial velocities, same integrator; float32 model, 20 steps."""
    settings = MDSettings.defaults(timestep_fs=2.0, duration_ps=0.04, save_every=4)
    jobs = [batched.MDJob("a", li2o(), 600.0), batched.MDJob("b", li2o().repeat((2, 1, 1)), 600.0),
            batched.MDJob("a", li2o(), 1000.0)]
    calls: list[int] = []
    inner = tiny.evaluate

    def counting(systems, stress=False):
        calls.append(systems.n_systems)
        return inner(systems, stress)

    serial = batched.run_trajectories(jobs, tiny, settings, 5, batch_size=1)
    tiny.evaluate = counting  # instance attribute: counts model calls, computes the same
    try:
        res = batched.run_trajectories(jobs, tiny, settings, 5, batch_size=3)
    finally:
        del tiny.evaluate
    n_steps = 5 * 4
    assert calls == [3] * (n_steps + 1)  # one model call per MD step for the whole group
    for s, b in zip(serial, res):
        assert s.status == b.status == "ok"
        np.testing.assert_allclose(b.positions, s.positions, atol=2e-5)
        np.testing.assert_allclose(b.energies, s.energies, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(b.temperatures, s.temperatures, rtol=1e-4)


def test_chgnet_short_md():
    pot = P.load_potential(MDSettings.defaults(potential="chgnet"))
    settings = MDSettings.defaults(timestep_fs=1.0, duration_ps=0.004, save_every=2)
    res = integrate.run_trajectory("li2o", li2o(), 800.0, settings, P.EnergyForcesCalculator(pot), seed=0)
    assert res.status == "ok" and res.n_frames == 3
    assert np.all(res.energies / 12 < -3.0) and np.ptp(res.energies) < 1.0


def test_published_only_screening_skips_relaxing_what_nothing_rolls_out(tiny, tmp_path):
    """With only the published models to roll out (no training), a row without MD holding an element
    outside their table (Br) keeps its unrelaxed cell, flagged "skipped", and costs no relaxation;
    the covered row is relaxed as always. A row WITH MD is relaxed whatever its elements."""
    cfg = config.deep_merge(cfg_of(relax_steps=3), {"train": {"variants": []},
                                                    "pretrained": {"propagator": "P_universal"}})
    cfg = make_settings(cfg)
    libr = bulk("LiBr", "rocksalt", a=5.50, cubic=True)
    libr.rattle(0.05, seed=2)
    man = pd.DataFrame([row("LiBr", libr, run_md=False), row("Li2O", li2o(), run_md=False),
                        row("LiBr-md", libr, run_md=True)])
    calls = []
    orig = md_stage.relax
    try:
        md_stage.relax = lambda atoms, *a, **k: (calls.append(atoms.get_chemical_formula()), orig(atoms, *a, **k))[1]
        paths = md_stage.run(cfg, man, 0, tmp_path, potential=tiny, progress=False)
    finally:
        md_stage.relax = orig
    st = schema.read_df(paths["structures"], "structures").set_index("id")
    assert st.loc["LiBr", "relax_status"] == "skipped: Br outside the published models' element table"
    unrelaxed = build_supercell(man.iloc[0])  # the cell as built from the manifest's CIF
    np.testing.assert_allclose(np.asarray(st.loc["LiBr", "positions"]).reshape(-1, 3), unrelaxed.positions)
    assert not st.loc["Li2O", "relax_status"].startswith("skipped")
    assert not st.loc["LiBr-md", "relax_status"].startswith("skipped")
    assert sorted(calls) == sorted(["Li8O4", libr.get_chemical_formula()])  # LiBr (no MD) never relaxed


def test_md_stage_runs_with_deterministic_kernels_and_restores_the_setting(tiny, tmp_path):
    """run_md turns torch's deterministic kernels on for CPU work (at 2 threads an unconverged
    relaxation otherwise differed by up to 4e-5 Å between identical runs) and restores the setting."""
    import torch

    from liflow_screen.core.runtime import deterministic_torch

    seen = []
    orig = md_stage.relax
    try:
        md_stage.relax = lambda *a, **k: (seen.append(torch.are_deterministic_algorithms_enabled()), orig(*a, **k))[1]
        cfg = settings_of(relax_steps=2, duration_ps=0.016)
        md_stage.run(cfg, pd.DataFrame([row("Li2O", li2o(), run_md=False)]), 0, tmp_path, potential=tiny,
                     progress=False)
    finally:
        md_stage.relax = orig
    assert seen == [True] and not torch.are_deterministic_algorithms_enabled()
    with deterministic_torch(False):
        assert not torch.are_deterministic_algorithms_enabled()
