"""User trajectories: unwrapping, refusals, frame interval (liflow_screen.dataset.trajectories)."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.io import write

from liflow_screen.dataset import trajectories as tr
from liflow_screen.core.errors import InputError
from liflow_screen.stages.run_trajectories import load_table


def _walk(seed: int = 0, frames: int = 60, n: int = 5, step: float = 0.06) -> np.ndarray:
    """Fractional random walk (F, n, 3) that leaves the cell several times, frame 0 anywhere."""
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-2.0, 3.0, (1, n, 3))
    return x0 + np.concatenate([np.zeros((1, n, 3)), np.cumsum(rng.normal(0, step, (frames - 1, n, 3)), 0)])


def test_unwrap_recovers_the_walk_from_wrapped_and_unwrapped_input() -> None:
    x = _walk()
    assert np.ptp(x[:, :, 0]) > 1.0  # crosses cell boundaries
    want = x - np.floor(x[0])         # frame 0 wrapped into [0, 1), the rest follows continuously
    np.testing.assert_allclose(tr.unwrap(x), want, atol=1e-12)
    np.testing.assert_allclose(tr.unwrap(x - np.floor(x)), want, atol=1e-12)  # fully wrapped input
    assert (tr.unwrap(x)[0] >= 0).all() and (tr.unwrap(x)[0] < 1).all()


def test_ambiguous_jump_is_refused_naming_the_file() -> None:
    x = _walk(frames=5)
    x[3:, 2, 1] += 0.3
    with pytest.raises(InputError, match=r"run\.xyz: atom 2 moves 0\.3\d of lattice vector b between frames 2 and 3"):
        tr.unwrap(x, "run.xyz")


def _atoms(cell: float, pos: np.ndarray) -> Atoms:
    return Atoms("Li2O", positions=pos, cell=np.eye(3) * cell, pbc=True)


def test_changing_cell_and_too_few_frames_are_refused(tmp_path) -> None:
    pos = np.array([[0.0, 0, 0], [1.5, 1.5, 1.5], [0.5, 2.0, 1.0]])
    f = tmp_path / "npt.extxyz"
    write(f, [_atoms(4.0, pos), _atoms(4.02, pos)], format="extxyz")
    with pytest.raises(InputError, match=r"npt\.extxyz: the cell changes at frame 1"):
        tr.read(f)
    one = tmp_path / "one.extxyz"
    write(one, [_atoms(4.0, pos)], format="extxyz")
    with pytest.raises(InputError, match=r"one\.extxyz: 1 frame"):
        tr.read(one)
    with pytest.raises(InputError, match="not found"):
        tr.read(tmp_path / "missing.xyz")


def test_vasprun_frame_interval(tmp_path) -> None:
    f = tmp_path / "vasprun.xml"
    f.write_text('<?xml version="1.0"?>\n<modeling><incar><i name="POTIM">    2.00</i></incar></modeling>\n')
    assert tr.vasprun_frame_dt_fs(f) == 2.0
    g = tmp_path / "other.xml"
    g.write_text('<?xml version="1.0"?>\n<modeling/>\n')
    assert tr.vasprun_frame_dt_fs(g) is None


def test_manifest_checks(tmp_path) -> None:
    good = tmp_path / "t.csv"
    good.write_text("id,path,temperature_K\na,x.xyz,600\na,y.xyz,900\n")
    df = load_table(good)
    assert list(df["split"]) == ["train", "train"] and df["path"][0] == str(tmp_path / "x.xyz")
    for text, msg in [("id,path,temperature_K,pressure\na,x,600,1\n", "unknown column"),
                      ("id,path\na,x\n", "missing column"),
                      ("id,path,temperature_K\na,x,600\na,y,600.2\n", "listed twice"),
                      ("id,path,temperature_K,split\na,x,600,holdout\n", "unknown split")]:
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(InputError, match=msg):
            load_table(bad)
