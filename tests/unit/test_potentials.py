"""Potentials: MACE file path (random tiny MACE), MACE-MP-0 small resolution, CHGNet, descriptors."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk

from liflow_screen.core.settings import MDSettings
from liflow_screen.md import potentials as P
from liflow_screen.core.errors import InputError, LiflowError


def md(d: dict) -> MDSettings:
    """MD settings: the schema defaults with ``d``."""
    return MDSettings.defaults(**d)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return P.save_mace_model(P.build_random_mace("tiny", seed=1), tmp_path_factory.mktemp("m") / "tiny.model")


def li2o(rattle: float = 0.05, seed: int = 0):
    a = bulk("Li2O", "fluorite", a=4.62, cubic=True)
    a.rattle(rattle, seed=seed)
    return a


def test_mace_file_batched_matches_calculator(tiny_path):
    pot = P.load_potential(md({"potential": "mace-file", "model_path": str(tiny_path), "dtype": "float64"}))
    assert pot.name == "mace-file" and pot.device == "cpu"
    a, b = li2o(seed=0), li2o(seed=1).repeat((2, 1, 1))
    energies, forces = pot.energies_forces([a, b])  # one batched graph
    assert energies.shape == (2,) and forces[0].shape == (12, 3) and forces[1].shape == (24, 3)
    for atoms, e, f in zip((a, b), energies, forces):
        atoms.calc = pot.calculator  # mace-torch's own ASE calculator, one structure per call
        assert e == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(f, atoms.get_forces(), atol=1e-9)
    # forces are minus the gradient of the energy (central differences, float64 model)
    h, i, k = 1e-4, 3, 1
    plus, minus = a.copy(), a.copy()
    plus.positions[i, k] += h
    minus.positions[i, k] -= h
    ep, em = pot.energies_forces([plus, minus])[0]
    assert -(ep - em) / (2 * h) == pytest.approx(forces[0][i, k], rel=1e-4, abs=1e-8)


def test_energy_invariant_to_lattice_translation_of_one_atom(tiny_path):
    """Unwrapped input: moving an atom by a lattice vector changes nothing."""
    pot = P.load_potential(md({"potential": "mace-file", "model_path": str(tiny_path)}))
    a = li2o()
    b = a.copy()
    b.positions[0] += 2 * a.cell[0] - a.cell[2]
    (ea, eb), (fa, fb) = pot.energies_forces([a, b])
    assert ea == pytest.approx(eb, rel=1e-5)
    np.testing.assert_allclose(fa, fb, atol=1e-6)


def test_mace_descriptors_are_group_means(tiny_path):
    pot = P.load_potential(md({"potential": "mace-file", "model_path": str(tiny_path)}))
    a = li2o()
    feats = pot.atom_features(a)
    assert feats.shape == (12, 8)  # tiny: 8x0e hidden irreps, first interaction layer
    d_li, d_frame = pot.descriptors(a)
    assert d_li.dtype == np.float32 and d_li.shape == (8,)
    li = a.numbers == 3
    np.testing.assert_allclose(d_li, feats[li].mean(0), rtol=1e-5)
    np.testing.assert_allclose(d_frame, feats[~li].mean(0), rtol=1e-5)
    # rotation + permutation invariance of the descriptors
    b = a.copy()
    b.rotate(37, "z", rotate_cell=True)
    b = b[np.random.default_rng(0).permutation(len(b))]
    np.testing.assert_allclose(pot.descriptors(b)[0], d_li, atol=1e-5)
    # no Li atoms: NaN-filled Li vector of the right length
    no_li = bulk("MgO", "rocksalt", a=4.2)
    d_li0, d_frame0 = pot.descriptors(no_li)
    assert d_li0.shape == (8,) and np.isnan(d_li0).all() and np.isfinite(d_frame0).all()


def test_random_small_has_mace_mp0_small_shape():
    model = P.build_random_mace("small", seed=0)
    assert int(model.num_interactions) == 2
    assert float(model.r_max) == 6.0
    assert len(model.atomic_numbers) == 89
    assert str(model.products[0].linear.irreps_out) == "128x0e"
    # same seed -> same weights; the global RNG is untouched
    import torch

    state = torch.random.get_rng_state()
    again = P.build_random_mace("small", seed=0)
    assert torch.equal(state, torch.random.get_rng_state())
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)


def test_mace_mp_small_resolution(tmp_path, monkeypatch, tiny_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network blocked in tests")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    cache_file = P.mace_mp_small_cache_path()
    # the name mace_mp(model="small") caches under: alphanumerics and '_' of the URL's basename
    assert cache_file == tmp_path / "cache" / "mace" / "20231210mace128L0_energy_epoch249model"

    with pytest.raises(LiflowError) as err:
        P.load_potential(md({"potential": "mace-mp-0-small"}))
    msg = str(err.value)
    assert "\n" not in msg and "md.model_path" in msg and str(cache_file) in msg and "network" in msg
    assert not cache_file.exists()  # no half-downloaded file left behind

    with pytest.raises(LiflowError):
        P.load_potential(md({"potential": "mace-mp-0-small"}), allow_download=False)
    with pytest.raises(InputError, match="does not exist"):
        P.load_potential(md({"potential": "mace-mp-0-small", "model_path": str(tmp_path / "missing.model")}))

    # explicit file, then the cache: both load through the mace-file code path
    pot = P.load_potential(md({"potential": "mace-mp-0-small", "model_path": str(tiny_path)}))
    assert pot.name == "mace-mp-0-small" and isinstance(pot, P.MacePotential)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_bytes(tiny_path.read_bytes())
    pot2 = P.load_potential(md({"potential": "mace-mp-0-small"}))
    a = li2o()
    assert pot2.energies_forces([a])[0][0] == pytest.approx(pot.energies_forces([a])[0][0])


def test_bad_model_file_is_input_error(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_text("not a model")
    with pytest.raises(InputError, match="not a loadable MACE model"):
        P.load_potential(md({"potential": "mace-file", "model_path": str(bad)}))


def test_chgnet_descriptors_and_batch():
    pot = P.load_potential(md({"potential": "chgnet"}))
    a, b = li2o(seed=0), li2o(seed=2)
    d_li, d_frame = pot.descriptors(a)
    assert d_li.shape == (64,) and d_frame.shape == (64,) and d_li.dtype == np.float32
    assert np.isfinite(d_li).all() and not np.allclose(d_li, d_frame)
    energies, forces = pot.energies_forces([a, b])
    a.calc = pot.calculator
    assert energies[0] == pytest.approx(a.get_potential_energy(), rel=1e-4)  # eV (total, not per atom)
    np.testing.assert_allclose(forces[0], a.get_forces(), atol=2e-4)
    assert energies[0] / len(a) < -3.0  # Li2O is strongly bound (~ -4.8 eV/atom with CHGNet)


def test_e3nn_import_trap_is_handled():
    """Importing the package first makes e3nn importable under torch >= 2.6 without the env var."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    code = "import liflow_screen.md.potentials, e3nn.o3; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-500:]
