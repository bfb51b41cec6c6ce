"""The batched MD and relaxation engine (md/batched.py) against ASE one structure at a time.

- Potential.evaluate (one batched call) = the ASE calculators' energies, forces, stresses.
- NVT: in float64 the batched Nosé–Hoover chain retraces ASE's NoseHooverChainNVT trajectory; in
  float32 (chaotic divergence) the ensembles agree: kinetic temperature mean and variance (and the
  canonical 2T²/3N), Li MSD over seeds.
- NVE (no thermostat): total energy conserved; with the chain, its conserved quantity.
- Relaxation: FIRE + Fréchet cell filter batched = ASE's FIRE(FrechetCellFilter) (MACE float64 to
  1e-8; CHGNet within 1 meV/atom and 0.1 % of the cell).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk
from ase.stress import voigt_6_to_full_3x3_stress

from liflow_screen.core.settings import MDSettings
from liflow_screen.md import batched, integrate
from liflow_screen.md import potentials as P
from liflow_screen.md.relax import relax

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return P.save_mace_model(P.build_random_mace("tiny", seed=1), tmp_path_factory.mktemp("m") / "tiny.model")


@pytest.fixture(scope="module")
def tiny64(model_path) -> P.Potential:
    return P.load_potential(MDSettings.defaults(potential="mace-file", model_path=str(model_path), dtype="float64"),
                            device="cpu")


@pytest.fixture(scope="module")
def tiny32(model_path) -> P.Potential:
    return P.load_potential(MDSettings.defaults(potential="mace-file", model_path=str(model_path)), device="cpu")


@pytest.fixture(scope="module")
def chgnet() -> P.Potential:
    return P.load_potential(MDSettings.defaults(potential="chgnet"), device="cpu")


def li2o(a: float = 4.62) -> Atoms:
    return bulk("Li2O", "fluorite", a=a, cubic=True)


def lif() -> Atoms:
    return bulk("LiF", "rocksalt", a=4.03, cubic=True)


def md_settings(steps: int, save_every: int, dt_fs: float = 1.0) -> MDSettings:
    return dataclasses.replace(MDSettings.defaults(), timestep_fs=dt_fs, duration_ps=steps * dt_fs / 1000.0,
                               save_every=save_every, max_step_displacement=50.0, max_temperature_factor=1e6)


def strained(atoms: Atoms, seed: int, strain) -> Atoms:
    out = atoms.copy()
    out.rattle(0.08, seed=seed)
    out.set_cell(out.cell.array @ np.asarray(strain, dtype=float), scale_atoms=True)
    return out


@pytest.mark.parametrize("kind", ["mace", "chgnet"])
def test_evaluate_matches_the_ase_calculators(kind, tiny64, chgnet):
    pot = tiny64 if kind == "mace" else chgnet
    a = strained(li2o(), 1, np.diag([1.02, 1.0, 0.99]))
    b = strained(lif().repeat((2, 1, 1)), 2, np.eye(3))
    b.positions[3] += [6.0, -4.0, 0.0]  # an atom outside the cell (unwrapped input)
    systems = P.Systems.from_atoms([a, b])
    energy, forces, stress = pot.evaluate(systems, stress=True)
    tol = 1e-9 if kind == "mace" else 1e-5
    for g, atoms in enumerate((a, b)):
        atoms.calc = pot.calculator
        lo, hi = int(systems.ptr[g]), int(systems.ptr[g + 1])
        assert energy[g].item() == pytest.approx(atoms.get_potential_energy(), abs=tol * len(atoms))
        np.testing.assert_allclose(forces[lo:hi].numpy(), atoms.get_forces(), atol=tol * 10)
        np.testing.assert_allclose(stress[g].numpy(), voigt_6_to_full_3x3_stress(atoms.get_stress()), atol=tol)
    assert float(stress.abs().max()) > 1e-4  # strained: the stress comparison is not between zeros


def test_nvt_retraces_ase_nose_hoover_chain_in_float64(tiny64):
    """Same initial velocities, same factorisation: the batched chain reproduces ASE's trajectories of
    three structures of two sizes at two temperatures (float64), and makes one model call per step."""
    s = md_settings(60, 10)
    jobs = [batched.MDJob("a", li2o(), 600.0), batched.MDJob("b", li2o().repeat((2, 1, 1)), 1200.0),
            batched.MDJob("a", li2o(), 1200.0)]
    ref = [integrate.run_trajectory(j.sid, j.atoms, j.temperature, s, P.EnergyForcesCalculator(tiny64), seed=4)
           for j in jobs]
    got = batched.run_batch(jobs, tiny64, s, seed=4)
    for r, g in zip(ref, got):
        assert r.status == g.status == "ok" and g.n_frames == 7
        assert np.abs(g.positions[-1] - g.positions[0]).max() > 0.05  # the atoms moved
        np.testing.assert_allclose(g.positions, r.positions, atol=1e-6)   # float32 frames
        np.testing.assert_allclose(g.energies, r.energies, atol=1e-9)
        np.testing.assert_allclose(g.temperatures, r.temperatures, rtol=1e-9)
    assert got[0].extra["batch_evaluations"] == 60 + 1


def test_nvt_ensemble_agrees_with_one_by_one(tiny32):
    """12-atom Li2O at 900 K, 8 trajectories each, the batched ones from other initial velocities (master
    seed 12 vs 11: independent samples, so the agreement is statistical, not one trajectory computed
    twice): kinetic temperature mean and variance agree with each other and with the canonical
    ensemble (<T> = T0, var T = 2 T0² / 3N), and so do the Li mean-squared displacements at the end."""
    n_seeds, t0 = 8, 900.0
    s = md_settings(250, 10, dt_fs=2.0)
    jobs = [batched.MDJob(f"r{k}", li2o(), t0) for k in range(n_seeds)]
    ref = batched.run_trajectories(jobs, tiny32, s, seed=11, batch_size=1)
    got = batched.run_trajectories(jobs, tiny32, s, seed=12, batch_size=n_seeds)
    li = li2o().numbers == 3
    n = len(li2o())
    summary = {}
    for name, runs in (("one-by-one", ref), ("batched", got)):
        assert all(r.status == "ok" for r in runs)
        temps = np.concatenate([r.temperatures[10:] for r in runs])      # after 0.2 ps
        msd = np.array([((r.positions[-1][li] - r.positions[0][li]) ** 2).sum(-1).mean() for r in runs])
        summary[name] = (temps.mean(), temps.var(), msd.mean(), msd.std(ddof=1))
    canonical_var = 2 * t0 ** 2 / (3 * n)
    # frames are correlated: ~2 independent samples per trajectory -> sem of <T> ~ sqrt(var / 16)
    sem = np.sqrt(canonical_var / (2 * n_seeds))
    for name, (m, v, _, _) in summary.items():
        assert abs(m - t0) < 4 * sem, (name, summary)
        assert 0.4 * canonical_var < v < 2.2 * canonical_var, (name, summary)
    (m1, v1, d1, s1), (m2, v2, d2, s2) = summary["one-by-one"], summary["batched"]
    assert abs(m1 - m2) < 4 * np.sqrt(2) * sem
    assert 1 / 3 < v1 / v2 < 3.0  # ~30 effectively independent frames per run: a variance is known to ~25 %
    assert abs(d1 - d2) < 3 * np.hypot(s1, s2) / np.sqrt(n_seeds) + 1e-3
    assert min(np.abs(a.positions[1] - b.positions[1]).max() for a, b in zip(ref, got)) > 1e-3  # independent


def test_nve_conserves_energy(tiny64):
    """No thermostat, 1 fs, 500 steps at ~1500 K: E_pot + E_kin fluctuates < 1e-4 eV/atom (velocity
    Verlet's O(dt²) shadow-energy wobble) and does not drift (< 1e-5 eV/atom between the first and the
    last tenth of the run), float64."""
    a = li2o()
    s = md_settings(500, 10)
    res = batched.run_batch([batched.MDJob("nve", a, 1500.0)], tiny64, s, seed=0, thermostat=False)[0]
    e_kin = 1.5 * len(a) * units.kB * res.temperatures
    total = (res.energies + e_kin) / len(a)
    assert res.temperatures.std() > 20  # energy is really exchanged between the two terms
    assert np.abs(total - total[0]).max() < 1e-4
    tenth = len(total) // 10
    assert abs(total[-tenth:].mean() - total[:tenth].mean()) < 1e-5


def test_nose_hoover_conserved_quantity(tiny64):
    """The chain's conserved quantity E_pot + E_kin + E_thermostat over 200 fs of heating from 300 K
    towards 1500 K (τ = 50 fs; the kinetic energy grows by > 0.5 eV): its largest excursion is small
    (< 1e-4 eV/atom at 1 fs; ASE's NoseHooverChainNVT gives 4.6e-5 on this case over 400 fs) and
    shrinks as dt² (second-order integrator): x 4 +- 1 from 1 fs to 0.5 fs."""
    a = li2o().repeat((2, 1, 1))
    sys0 = P.Systems.from_atoms([a])
    masses = torch.tensor(a.get_masses(), dtype=torch.float64).unsqueeze(-1)
    rng = np.random.default_rng(0)
    p0 = torch.tensor(rng.normal(size=(len(a), 3)) * np.sqrt(a.get_masses()[:, None] * units.kB * 300),
                      dtype=torch.float64)

    def excursion(dt_fs: float) -> tuple[float, float]:
        nhc = batched.NHC.create(torch.tensor([1500.0]), torch.tensor([len(a)]), 50 * units.fs)
        dt = dt_fs * units.fs
        p, q = p0.clone(), sys0.positions.clone()
        e, f, _ = tiny64.evaluate(sys0)
        hist, kin = [], []
        for _ in range(int(round(200 / dt_fs))):
            p = nhc.integrate(p, masses, sys0.batch, dt / 2)
            p = p + dt / 2 * f
            q = q + dt * p / masses
            e, f, _ = tiny64.evaluate(sys0.with_geometry(q))
            p = p + dt / 2 * f
            p = nhc.integrate(p, masses, sys0.batch, dt / 2)
            ke = float((p * p / masses).sum() / 2)
            kin.append(ke)
            hist.append(float(e[0]) + ke + float(nhc.energy()[0]))
        hist_a = np.array(hist)
        return float(np.abs(hist_a - hist_a[0]).max()) / len(a), max(kin) - min(kin)

    err1, heat = excursion(1.0)
    err05, _ = excursion(0.5)
    assert heat > 0.5
    assert err1 < 1e-4
    assert 3.0 < err1 / err05 < 5.0, (err1, err05)


def test_relaxation_matches_ase_fire_frechet_float64(tiny64):
    cases = [strained(li2o(), 3, np.diag([1.03, 1.03, 1.03])),
             strained(lif().repeat((1, 1, 2)), 4, [[1.0, 0.02, 0.0], [0.0, 0.98, 0.0], [0.0, 0.0, 1.01]])]
    ref = [relax(c, tiny64, fmax=2e-4, steps=300, cell=True) for c in cases]
    got = batched.relax_batch(cases, tiny64, fmax=2e-4, steps=300, cell=True)
    for c, (ra, rs), (ga, gs) in zip(cases, ref, got):
        assert rs == gs == "ok"
        assert np.abs(ga.cell.array - c.cell.array).max() > 0.05  # the cell really relaxed
        assert ga.get_potential_energy() == pytest.approx(ra.get_potential_energy(), abs=1e-9 * len(c))
        np.testing.assert_allclose(ga.cell.array, ra.cell.array, atol=1e-8)
        np.testing.assert_allclose(ga.positions, ra.positions, atol=1e-8)
    # positions only: the cells stay
    fixed = batched.relax_batch(cases, tiny64, fmax=2e-4, steps=300, cell=False)
    for c, (ga, gs) in zip(cases, fixed):
        np.testing.assert_array_equal(ga.cell.array, c.cell.array)
        assert np.abs(ga.get_forces()).max() < 2e-4 and gs == "ok"


def test_relaxation_with_chgnet_matches_ase(chgnet):
    """CHGNet (float32): relaxed energies within 1 meV/atom and cells within 0.1 % of ASE's."""
    cases = [strained(lif(), 5, np.diag([1.03, 0.99, 1.0])), strained(li2o(), 6, np.eye(3) * 1.02)]
    ref = [relax(c, chgnet, fmax=0.05, steps=100, cell=True) for c in cases]
    got = batched.relax_batch(cases, chgnet, fmax=0.05, steps=100, cell=True)
    for c, (ra, rs), (ga, gs) in zip(cases, ref, got):
        assert rs == gs == "ok"
        assert abs(ga.get_potential_energy() - ra.get_potential_energy()) / len(c) < 1e-3
        np.testing.assert_allclose(ga.cell.array, ra.cell.array, atol=1e-3 * np.abs(ra.cell.array).max())


def test_failures_leave_the_batch_and_the_others_go_on(tiny32):
    """A structure the model cannot evaluate fails alone (relaxation and MD); one that blows up is
    flagged; the rest are unchanged by their company."""
    uranium = li2o()
    uranium.numbers[0] = 92  # the model covers elements 1..89: evaluating U raises
    relaxed = batched.relax_batch([li2o(), uranium, lif()], tiny32, fmax=0.01, steps=5)
    assert relaxed[0][1] in ("ok", "not_converged") and relaxed[2][1] in ("ok", "not_converged")
    assert relaxed[1][1].startswith("failed: InputError")
    alone = batched.relax_batch([lif()], tiny32, fmax=0.01, steps=5)
    np.testing.assert_allclose(relaxed[2][0].positions, alone[0][0].positions, atol=1e-6)

    crushed = li2o()
    crushed.positions[1] = crushed.positions[0] + [0.15, 0.0, 0.0]
    s = dataclasses.replace(md_settings(40, 4), max_step_displacement=1.0, max_temperature_factor=5.0)
    jobs = [batched.MDJob("good", li2o(), 600.0), batched.MDJob("u", uranium, 600.0),
            batched.MDJob("crushed", crushed, 600.0)]
    res = batched.run_batch(jobs, tiny32, s, seed=1)
    assert res[0].status == "ok" and res[0].n_frames == 11
    assert res[1].status == "error" and res[1].n_frames == 0 and "InputError" in res[1].reason
    assert res[2].status in ("exploded", "nan"), res[2].reason
    solo = batched.run_batch(jobs[:1], tiny32, s, seed=1)[0]
    np.testing.assert_allclose(res[0].positions, solo.positions, atol=1e-4)


def test_packing_by_atoms():
    assert batched.pack([100, 100, 100, 300, 50], max_items=8, atom_budget=250) == [[0, 1], [2], [3], [4]]
    assert batched.pack([10] * 5, max_items=2, atom_budget=1000) == [[0, 1], [2, 3], [4]]
    assert batched.batch_atom_budget(None, "cpu") == batched.CPU_BATCH_ATOMS
    assert batched.batch_atom_budget(500, "cuda") == 500


def test_cpu_model_groups_give_the_one_call_result(tiny64):
    """On CPU the model is called per group of <= CPU_MODEL_ATOMS atoms (cache-bound cost per atom);
    the groups' energies, forces and stresses are those of one call over the whole batch."""
    atoms = [strained(li2o(), 7, np.eye(3)), strained(lif().repeat((2, 1, 1)), 8, np.eye(3)), strained(li2o(), 9, np.eye(3))]
    systems = P.Systems.from_atoms(atoms)
    whole, failed = batched._Evaluator(tiny64, stress=True, model_atoms=10_000)(systems)
    grouped_ev = batched._Evaluator(tiny64, stress=True, model_atoms=20)
    calls: list[int] = []
    inner = tiny64.evaluate
    tiny64.evaluate = lambda s, stress=False: (calls.append(s.n_systems), inner(s, stress))[1]
    try:
        grouped, failed2 = grouped_ev(systems)
        grouped_ev(systems.with_geometry(systems.positions + 0.01))  # same layout: same groups
    finally:
        del tiny64.evaluate
    assert not failed and not failed2
    assert calls == [1, 1, 1, 1, 1, 1]  # 12, 16, 12 atoms: one structure per group at 20 atoms
    for w, g in zip(whole, grouped):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)
