"""Dataset stage: partitioned layout, MSD labels vs an independent computation, schema errors, pairs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from liflow_screen.core import config
from liflow_screen.dataset import loader as dataset
from liflow_screen.io import layout, schema
from liflow_screen.stages import run_dataset as dataset_stage
from liflow_screen.cli import main
from liflow_screen.core.errors import SchemaError
from conftest import make_settings

TEMPS = [600, 1000]


def _cfg():
    return make_settings({"md": {"temperatures": TEMPS, "timestep_fs": 2.0, "save_every": 10, "duration_ps": 2.0}})


def md_files(root: Path, chunks=(0, 1)) -> list[Path]:
    """Every file of the given MD chunks, as the dataset rule passes them."""
    names = [layout.STRUCTURES, layout.STATUS] + [layout.frames_name(T) for T in TEMPS]
    return [layout.chunk_dir(root, c) / n for c in chunks for n in names]


def _fake_md(root: Path, specs, n_frames=101, seed=0, nan_in=None):
    """Write MD chunk outputs for structures (id, formula, split, n_li, n_frame, chunk) with random walks.

    Li atoms step with σ=0.05 Å per frame, frame atoms with σ=0.005 Å; returns the positions used.
    """
    rng = np.random.default_rng(seed)
    man, truth = [], {}
    by_chunk: dict[int, list] = {}
    for sid, formula, split, n_li, n_fr, chunk in specs:
        by_chunk.setdefault(chunk, []).append((sid, formula, split, n_li, n_fr))
        man.append({"id": sid, "split": split, "chunk": chunk, "run_md": True})
    for chunk, items in by_chunk.items():
        cdir = layout.chunk_dir(root, chunk)
        srows, status, frames = [], [], {T: [] for T in TEMPS}
        for sid, formula, split, n_li, n_fr in items:
            n = n_li + n_fr
            numbers = np.array([3] * n_li + [8] * n_fr)
            cell = np.eye(3) * 6.0
            x0 = rng.uniform(0, 6, size=(n, 3))
            srows.append({"id": sid, "reduced_formula": formula, "split": split, "numbers": numbers.tolist(),
                          "cell": cell.reshape(-1).tolist(), "positions": x0.reshape(-1).tolist(), "n_atoms": n,
                          "n_li": n_li, "desc_li": [0.1, 0.2], "desc_frame": [0.3, 0.4], "energy": -1.0,
                          "relax_status": "ok"})
            for T in TEMPS:
                sig = np.where(numbers == 3, 0.05, 0.005)[None, :, None] * np.sqrt(T / 600)
                steps = rng.normal(size=(n_frames - 1, n, 3)) * sig
                pos = np.concatenate([x0[None], x0[None] + np.cumsum(steps, axis=0)]).astype(np.float32)
                if nan_in == (sid, T):
                    pos[50, 0, 0] = np.nan
                truth[(sid, T)] = pos
                for f in range(n_frames):
                    frames[T].append({"id": sid, "source": "md", "frame": f, "time_ps": np.float32(f * 0.02),
                                      "positions": pos[f].reshape(-1), "energy": -1.0,
                                      "temperature_inst": np.float32(T)})
                status.append({"id": sid, "temperature": T, "split": split, "source": "md", "status": "ok",
                               "reason": "", "n_frames": n_frames, "duration_ps": 2.0, "wall_s": 1.0})
        schema.write_rows(srows, cdir / "structures.parquet", "structures")
        schema.write_rows(status, cdir / "status.parquet", "status")
        for T in TEMPS:
            schema.write_rows(frames[T], layout.frames_file(cdir, T), "frames")
    mrows = []
    for r in man:
        mrows.append({"id": r["id"], "formula": "x", "reduced_formula": "x", "n_atoms": 1, "li_fraction": 0.5,
                      "band_gap": None, "e_above_hull": None, "source": "test", "cif": "", "supercell": [1, 1, 1],
                      "n_atoms_supercell": 1, "min_width": 6.0, "split": r["split"], "chunk": r["chunk"],
                      "run_md": r["run_md"]})
    schema.write_rows(mrows, root / "manifest.parquet", "manifest")
    return truth


SPECS = [("a1", "LiA", "train", 4, 4, 0), ("a2", "LiA", "train", 4, 4, 0), ("b1", "LiB", "train", 2, 6, 1),
         ("c1", "LiC", "test", 3, 5, 1)]


def test_build_layout_labels_and_provenance(tmp_path):
    truth = _fake_md(tmp_path / "md", SPECS)
    out = tmp_path / "dataset"
    counts = dataset_stage.run(_cfg(), tmp_path / "md" / "manifest.parquet", md_files(tmp_path / "md"), out)
    assert counts == {"structures": 4, "trajectories": 8, "frames": 8 * 101}
    parts = sorted(str(p.relative_to(out)) for p in out.glob("frames/*/*/*.parquet"))
    assert parts == sorted(f"frames/temperature={T}/split={s}/part-{c:05d}.parquet"
                           for T in TEMPS for s, c in (("test", 1), ("train", 0), ("train", 1)))
    assert pq.ParquetFile(out / parts[0]).metadata.row_group(0).column(0).compression == "ZSTD"
    labels = schema.read_df(out / "labels.parquet", "labels").set_index(["id", "temperature"])
    for (sid, T), pos in truth.items():
        li = np.arange(pos.shape[1]) < dict((s[0], s[3]) for s in SPECS)[sid]
        d = pos[-1].astype(np.float64) - pos[0]
        msd_li = np.mean([d[i] @ d[i] for i in np.where(li)[0]])   # independent loop
        msd_fr = np.mean([d[i] @ d[i] for i in np.where(~li)[0]])
        row = labels.loc[(sid, T)]
        assert row.msd_li == pytest.approx(msd_li, rel=1e-6)
        assert row.msd_frame == pytest.approx(msd_fr, rel=1e-6)
        assert row.msd_li_per_ps == pytest.approx(msd_li / 2.0, rel=1e-6)
        # the label rests on the mobility rate: slope of the multi-origin MSD over the later half
        x = pos[:, li].astype(np.float64)
        nf = len(x)
        lags = np.arange((nf - 1 + 1) // 2, nf)  # lags >= (F-1)/2 frames
        lags = lags[lags >= (nf - 1) / 2]
        msd = [np.mean(np.sum((x[m:] - x[:nf - m]) ** 2, axis=-1)) for m in lags]  # brute force
        rate = np.polyfit(lags * 0.02, msd, 1)[0]
        assert row.rate_li == pytest.approx(rate, rel=1e-6, abs=1e-9)
        assert row.slow_li == (rate < 0.1)
    prov = schema.read_provenance(out / "labels.parquet")
    assert prov["config"]["md"]["temperatures"] == TEMPS and "torch" in prov["versions"]
    # partitioned read gives back the exact trajectory
    ds = schema.open_frames(layout.dataset_frame_files(out))
    pos, times = schema.read_trajectory(ds, "b1", 1000)
    np.testing.assert_array_equal(pos, truth[("b1", 1000)])
    assert times[1] - times[0] == pytest.approx(0.02)
    assert not (tmp_path / "dataset.tmp").exists()


def test_nan_trajectory_is_a_clear_error_and_no_output(tmp_path):
    _fake_md(tmp_path / "md", SPECS, nan_in=("b1", 600))
    out = tmp_path / "dataset"
    with pytest.raises(SchemaError, match="b1 at 600 K.*NaN"):
        dataset_stage.run(_cfg(), tmp_path / "md" / "manifest.parquet", md_files(tmp_path / "md"), out)
    assert not out.exists()


def test_corrupt_and_mismatched_parquet_cli(tmp_path, capsys):
    _fake_md(tmp_path / "md", SPECS)
    f = layout.frames_file(layout.chunk_dir(tmp_path / "md", 1), 1000)
    blob = f.read_bytes()
    f.write_bytes(blob[: len(blob) // 2])  # truncated file
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text("md:\n  temperatures: [600, 1000]\n")
    rc = main(["dataset", "--config", str(cfgfile), "--manifest", str(tmp_path / "md" / "manifest.parquet"),
               "--md-files", *map(str, md_files(tmp_path / "md")), "--out-dir", str(tmp_path / "ds")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and "frames_T1000.parquet" in err[-1]
    assert "unreadable Parquet" in err[-1] and not (tmp_path / "ds").exists()
    # a valid Parquet file with the wrong schema
    pd.DataFrame({"id": ["x"], "frame": [1.5]}).to_parquet(f)
    with pytest.raises(SchemaError, match="column 'source' missing|not a frames table"):
        schema.read_table(f, "frames")


def _in_memory_reference(truth, k: int, batches: int, batch: int, seed: int):
    """Today's sampling, computed independently from the MD positions held in memory: trajectories in
    (T, split, file, id) order, weight 1 / (structures of the composition x temperatures of the
    structure), origin uniform over frames with τ + Δτ inside. Returns (id, T, x0, x1) per pair."""
    comp = {s[0]: s[1] for s in SPECS}
    train = [s[0] for s in SPECS if s[2] == "train"]
    chunk = {s[0]: s[5] for s in SPECS}
    trajs = [(sid, T) for T in TEMPS for c in (0, 1) for sid in sorted(i for i in train if chunk[i] == c)]
    n_comp = Counter(comp[i] for i in train)
    w = np.array([1.0 / (n_comp[comp[sid]] * len(TEMPS)) for sid, _ in trajs])
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        for j in rng.choice(len(trajs), size=batch, p=w / w.sum()):
            sid, T = trajs[int(j)]
            pos = truth[(sid, T)]
            f0 = int(rng.integers(0, len(pos) - k))
            out.append((sid, T, pos[f0], pos[f0 + k]))
    return out


def _assert_same_pairs(src, want, batches: int, seed: int) -> list:
    """``src`` draws, from a generator seeded ``seed``, exactly the pairs of ``want``; returns them."""
    rng = np.random.default_rng(seed)
    got = [p for _ in range(batches) for p in src.sample(16, rng)]
    assert [(p.id, int(p.temperature)) for p in got] == [(w[0], w[1]) for w in want]
    for p, (_, _, x0, x1) in zip(got, want):
        np.testing.assert_array_equal(p.x0, x0)
        np.testing.assert_array_equal(p.x1, x1)
    return got


def test_streaming_pairs_are_the_in_memory_pairs(tmp_path):
    truth = _fake_md(tmp_path / "md", SPECS)
    out = tmp_path / "dataset"
    cfg = _cfg()
    dataset_stage.run(cfg, tmp_path / "md" / "manifest.parquet", md_files(tmp_path / "md"), out)
    k = cfg.delta_tau_frames
    assert k == 50
    for part in layout.dataset_frame_files(out):
        t = pq.read_table(part, columns=["id", "frame"]).to_pandas()
        assert t.equals(t.sort_values(["id", "frame"], ignore_index=True))  # contiguous, in order
        # the sidecar holds exactly the Parquet rows' positions, raw float32
        raw = np.fromfile(layout.positions_sidecar(part), dtype="<f4")
        want = np.concatenate(pq.read_table(part, columns=["positions"]).column(0).to_pylist())
        np.testing.assert_array_equal(raw, np.asarray(want, dtype=np.float32))
    want = _in_memory_reference(truth, k, batches=30, batch=16, seed=0)
    src = dataset.StreamingPairSource.open(out, ["train"], k, slow={("b1", 600): (True, False)})
    got = _assert_same_pairs(src, want, batches=30, seed=0)
    assert all(p.li_slow == (p.id == "b1" and p.temperature == 600) and not p.frame_slow for p in got)
    assert src.raw.reads == 2 * len(got)
    # composition balance: LiA (two structures) and LiB (one) drawn equally often
    comp = Counter("LiA" if w[0].startswith("a") else "LiB" for w in want)
    assert abs(comp["LiA"] / len(want) - 0.5) < 0.05
    assert len(src) == 3 * len(TEMPS) * (101 - k)
    # a sidecar that does not match its Parquet file is refused at open, with the file named
    side = layout.positions_sidecar(layout.dataset_frame_files(out, ["train"])[0])
    side.write_bytes(side.read_bytes()[:-12])
    with pytest.raises(SchemaError, match=r"part-00000\.f32.*rebuild the dataset"):
        dataset.StreamingPairSource.open(out, ["train"], k)
    side.unlink()
    with pytest.raises(SchemaError, match="missing"):
        dataset.StreamingPairSource.open(out, ["train"], k)


def test_streaming_source_reads_unsorted_files_and_pickles(tmp_path):
    """A frame file (and sidecar) whose trajectories are interleaved (frame-major, as a lockstep MD
    writes them) gives the same pairs; a pickled copy (a DataLoader worker's) opens its own files."""
    import pickle

    truth = _fake_md(tmp_path / "md", SPECS)
    out = tmp_path / "dataset"
    cfg = _cfg()
    dataset_stage.run(cfg, tmp_path / "md" / "manifest.parquet", md_files(tmp_path / "md"), out)
    for part in layout.dataset_frame_files(out, ["train"]):
        tab = pq.read_table(part)
        order = np.lexsort((tab.column("id").to_numpy(zero_copy_only=False), tab.column("frame").to_numpy()))
        tab = tab.take(order)
        pq.write_table(tab, part)
        np.asarray(np.concatenate(tab.column("positions").to_pylist()), "<f4").tofile(layout.positions_sidecar(part))
    src = dataset.StreamingPairSource.open(out, ["train"], cfg.delta_tau_frames)
    assert any(t.offsets is not None for t in src.trajs)
    want = _in_memory_reference(truth, cfg.delta_tau_frames, batches=5, batch=16, seed=3)
    for s in (src, pickle.loads(pickle.dumps(src))):
        _assert_same_pairs(s, want, batches=5, seed=3)
