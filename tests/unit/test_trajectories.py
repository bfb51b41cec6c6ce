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


def _jumping(frames: int = 6, cell: float = 8.0) -> tuple[list[Atoms], np.ndarray]:
    """Li2O in an 8-Å cube whose first Li jumps 5 Å along x between every two saved frames
    (0.625 of the lattice vector: no minimum-image unwrapping can follow it)."""
    base = np.array([[1.0, 1.0, 1.0], [4.0, 4.0, 4.0], [2.0, 6.0, 3.0]])
    pos = np.repeat(base[None], frames, axis=0)
    pos[:, 0, 0] += 5.0 * np.arange(frames)
    return [_atoms(cell, p) for p in pos], pos


def test_unwrapped_input_with_large_jumps_is_read_as_is_and_wrapped_is_refused(tmp_path) -> None:
    frames, pos = _jumping()
    f = tmp_path / "unwrapped.extxyz"
    write(f, frames, format="extxyz")
    got = tr.read(f)  # auto: coordinates outside the cell -> unwrapped input, taken as is
    assert got.unwrapped_input
    np.testing.assert_allclose(got.positions, pos, atol=1e-6)  # frame 0 already in the cell: no shift
    np.testing.assert_allclose(np.diff(got.positions[:, 0, 0]), 5.0, atol=1e-6)
    assert tr.read(f, unwrapped=True).unwrapped_input
    # the same file declared wrapped, and the same trajectory wrapped into the cell: refused, named
    msg = r"atom 0 moves 0\.38 of lattice vector a between frames 0 and 1 of wrapped positions"
    with pytest.raises(InputError, match=r"unwrapped\.extxyz: " + msg):
        tr.read(f, unwrapped=False)
    wrapped = tmp_path / "wrapped.extxyz"
    for a in frames:
        a.wrap()
    write(wrapped, frames, format="extxyz")
    with pytest.raises(InputError, match=r"wrapped\.extxyz: " + msg + r".*unwrapped = true"):
        tr.read(wrapped)


def test_unwrapped_input_keeps_its_motion_and_puts_frame_0_in_the_cell(tmp_path) -> None:
    x = _walk(frames=20) * 6.0  # Å in a 6-Å cube; frame 0 outside the cell
    frames = [Atoms("Li5", positions=p, cell=np.eye(3) * 6.0, pbc=True) for p in x]
    f = tmp_path / "walk.extxyz"
    write(f, frames, format="extxyz")
    got = tr.read(f)
    assert got.unwrapped_input
    shift = x[0] - got.positions[0]
    np.testing.assert_allclose(shift / 6.0, np.round(shift / 6.0), atol=1e-6)  # whole lattice vectors
    np.testing.assert_allclose(got.positions, x - shift[None], atol=1e-6)
    assert (got.positions[0] >= 0).all() and (got.positions[0] < 6.0).all()


def test_unwrapped_column_of_the_trajectories_csv(tmp_path) -> None:
    (tmp_path / "t.csv").write_text("id,path,temperature_K,frame_dt_fs,unwrapped\n"
                                    "a,a.xyz,600,10,TRUE\na,b.xyz,900,10,false\nb,c.xyz,600,10,\n")
    df = load_table(tmp_path / "t.csv")
    assert df["unwrapped"].tolist() == [True, False, None]
    (tmp_path / "bad.csv").write_text("id,path,temperature_K,unwrapped\na,a.xyz,600,maybe\n")
    with pytest.raises(InputError, match=r"bad\.csv: column unwrapped: 'maybe' is not true, false or auto"):
        load_table(tmp_path / "bad.csv")
