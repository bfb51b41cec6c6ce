"""Tests of liflow_screen.report on a tiny fabricated dataset (Brownian Li, Arrhenius D)."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from liflow_screen import analysis as an
from liflow_screen import config, schema
from liflow_screen.errors import InputError, SchemaError
from liflow_screen.report import analyze_trajectories, compute_ranking, read_analysis, write_reports

BOX = 7.0
N_LI, N_O = 8, 8
DT = 0.1  # ps between saved frames
N_FRAMES = 21
# structure -> (split, E_A eV); D(T) = D0 exp(-E_A / kT) in Å²/ps
STRUCTS = {"s1": ("test", 0.20), "s2": ("test", 0.50), "s3": ("train", 0.35)}
D0 = 40.0
# (id, T, source): number of frames written (a diverged rollout is truncated)
TRAJ = {
    **{(s, 600, "md"): N_FRAMES for s in ("s1", "s2", "s3")},
    ("s3", 1000, "md"): N_FRAMES,
    **{(s, T, "liflow:adaptive"): N_FRAMES for s in STRUCTS for T in (600, 1000)},
    **{(s, 600, "liflow:uniform"): N_FRAMES for s in STRUCTS},
}
TRAJ[("s2", 600, "liflow:adaptive")] = 6  # diverged after 0.5 ps


def _d_true(sid: str, T: float) -> float:
    return D0 * math.exp(-STRUCTS[sid][1] / (an.K_B_EV * T))


def _positions(sid: str, T: int, source: str, n_frames: int) -> np.ndarray:
    seed = zlib.crc32(f"{sid}|{T}|{source}".encode())
    rng = np.random.default_rng(seed)
    n = N_LI + N_O
    base = np.random.default_rng(zlib.crc32(sid.encode())).uniform(0, BOX, (n, 3))
    scale = np.full(n, math.sqrt(2 * _d_true(sid, T) * DT))
    scale[N_LI:] = 0.02
    steps = rng.normal(0.0, 1.0, (n_frames - 1, n, 3)) * scale[None, :, None]
    return (base[None] + np.concatenate([np.zeros((1, n, 3)), np.cumsum(steps, axis=0)])).astype(np.float32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    numbers = [3] * N_LI + [8] * N_O
    cell = (np.eye(3) * BOX).reshape(-1).tolist()
    srows = [{"id": s, "reduced_formula": "LiO", "split": sp, "numbers": numbers, "cell": cell,
              "positions": [0.0] * (3 * (N_LI + N_O)), "n_atoms": N_LI + N_O, "n_li": N_LI, "desc_li": [0.0],
              "desc_frame": [0.0], "energy": -1.0, "relax_status": "ok"} for s, (sp, _) in STRUCTS.items()]
    schema.write_rows(srows, root / "structures.parquet", "structures")
    positions: dict[tuple[str, int, str], np.ndarray] = {}
    by_file: dict[tuple[int, str, str], list[dict]] = {}
    status = []
    for (sid, T, src), nf in TRAJ.items():
        pos = _positions(sid, T, src, nf)
        positions[(sid, T, src)] = pos
        split = STRUCTS[sid][0]
        for k in range(nf):
            by_file.setdefault((T, split, src), []).append(
                {"id": sid, "source": src, "frame": k, "time_ps": k * DT, "positions": pos[k].reshape(-1).tolist(),
                 "energy": None, "temperature_inst": None})
        diverged = nf < N_FRAMES
        status.append({"id": sid, "temperature": T, "split": split, "source": src,
                       "status": "diverged" if diverged else "ok", "reason": "max displacement" if diverged else "",
                       "n_frames": nf, "duration_ps": (nf - 1) * DT, "wall_s": 0.1})
    for (T, split, src), rows in by_file.items():
        part = schema.frame_partition_path(root / "frames", T, split)
        schema.write_rows(rows, part / f"{src.replace(':', '_')}.parquet", "frames")
    schema.write_rows(status, root / "status.parquet", "status")
    cfg = config.validate({"analysis": {"kinisi_samples": 200, "kinisi_n_dt": 10, "top_n": 2}})
    table = analyze_trajectories(root / "frames", root / "structures.parquet", root / "analysis.parquet", cfg,
                                 status=[root / "status.parquet"])
    return {"root": root, "positions": positions, "cfg": cfg, "table": table}


def test_analysis_table_rows_and_values(dataset):
    df = read_analysis(dataset["root"] / "analysis.parquet")
    assert len(df) == len(TRAJ)
    assert set(zip(df["id"], df["temperature"], df["source"])) == set(TRAJ)
    for r in df.itertuples(index=False):
        pos = dataset["positions"][(r.id, r.temperature, r.source)].astype(np.float64)
        li = np.arange(pos.shape[1]) < N_LI
        assert r.msd_li == pytest.approx(np.mean(np.sum((pos[-1, li] - pos[0, li]) ** 2, axis=1)), rel=1e-6)
        assert r.msd_frame == pytest.approx(np.mean(np.sum((pos[-1, ~li] - pos[0, ~li]) ** 2, axis=1)), rel=1e-6)
        assert r.n_frames == pos.shape[0]
        assert r.stable == (r.status == "ok")
        assert r.D_method == "kinisi"
        assert r.D_li_low < r.D_li < r.D_li_high
        assert len(r.rdf) == dataset["cfg"]["analysis"]["rdf_bins"]
    s2 = df[(df["id"] == "s2") & (df["source"] == "liflow:adaptive") & (df["temperature"] == 600)].iloc[0]
    assert s2["status"] == "diverged" and not s2["stable"]
    # D* tracks the synthetic Arrhenius law within a factor 2 (few atoms, 2 ps)
    full = df[df["n_frames"] == N_FRAMES]
    ratio = full["D_li"] / [_d_true(s, T) * 1e-4 for s, T in zip(full["id"], full["temperature"])]
    assert ratio.between(0.5, 2.0).all(), ratio.tolist()
    from liflow_screen.schema import read_provenance

    assert read_provenance(dataset["root"] / "analysis.parquet")["stage"] == "analysis"


def test_analyze_rejects_unknown_structure(dataset, tmp_path):
    st = schema.read_df(dataset["root"] / "structures.parquet", "structures")
    with pytest.raises(InputError, match="missing from the structures table"):
        analyze_trajectories(dataset["root"] / "frames", st[st["id"] != "s1"], tmp_path / "a.parquet",
                             dataset["cfg"], ids=["s1"])
    assert not (tmp_path / "a.parquet").exists()
    with pytest.raises(SchemaError):
        analyze_trajectories(tmp_path / "nothing", st, tmp_path / "a.parquet", dataset["cfg"])


def _msd(pos: np.ndarray, k: int, li: bool) -> float:
    m = (np.arange(pos.shape[1]) < N_LI) if li else (np.arange(pos.shape[1]) >= N_LI)
    return float(np.mean(np.sum((pos[k, m].astype(float) - pos[0, m].astype(float)) ** 2, axis=1)))


def test_reports_metrics_ranking_plots(dataset, tmp_path):
    root, positions, cfg = dataset["root"], dataset["positions"], dataset["cfg"]
    flags = pd.DataFrame({"id": ["s1", "s2"], "temperature": [600, 600], "source": ["liflow:adaptive"] * 2,
                          "uncertain": [False, True]})
    out = write_reports([root / "analysis.parquet"], root / "structures.parquet", [root / "status.parquet"],
                        flags, tmp_path / "reports", cfg)

    # ---- metrics.csv: one row per (T, variant) ----
    m = pd.read_csv(out["metrics"])
    assert list(zip(m["temperature"], m["model"])) == [(600, "adaptive"), (600, "uniform"), (1000, "adaptive")]
    for col in ("log_msd_li_mae", "log_msd_li_spearman", "log_msd_frame_mae", "rdf_mae", "stable_pct", "n", "note"):
        assert col in m.columns
    row = m[(m["temperature"] == 600) & (m["model"] == "adaptive")].iloc[0]
    # independent: test structures s1 (full) and s2 (diverged at frame 5 -> compared at 0.5 ps)
    ref = [_msd(positions[("s1", 600, "md")], N_FRAMES - 1, True), _msd(positions[("s2", 600, "md")], 5, True)]
    gen = [_msd(positions[("s1", 600, "liflow:adaptive")], N_FRAMES - 1, True),
           _msd(positions[("s2", 600, "liflow:adaptive")], 5, True)]
    assert row["log_msd_li_mae"] == pytest.approx(np.mean(np.abs(np.log10(gen) - np.log10(ref))), rel=1e-4)
    assert row["n"] == 2
    assert row["stable_pct"] == pytest.approx(50.0)
    uni = m[(m["temperature"] == 600) & (m["model"] == "uniform")].iloc[0]
    assert uni["stable_pct"] == pytest.approx(100.0)
    hot = m[m["temperature"] == 1000].iloc[0]
    assert math.isnan(hot["log_msd_li_mae"]) and "no reference MD" in hot["note"]
    assert hot["n"] == 0

    # ---- ranking.csv ----
    rk = pd.read_csv(out["ranking"])
    assert rk["id"].tolist() == ["s1", "s3", "s2"]  # lowest E_A -> highest σ(300 K)
    assert rk["rank"].tolist() == [1, 2, 3]
    for col in ("id", "formula", "split", "D_pred_600K", "D_pred_600K_low", "D_pred_1000K_high", "E_A_eV",
                "E_A_eV_low", "E_A_eV_high", "D_300K", "D_300K_low", "D_300K_high", "sigma_300K_S_cm",
                "sigma_300K_S_cm_low", "sigma_300K_S_cm_high", "D_ref_600K", "D_ref_1000K", "diverged",
                "extrapolated_temperature", "classifier_uncertain"):
        assert col in rk.columns, col
    sig = rk["sigma_300K_S_cm"].to_numpy()
    assert np.all(np.diff(sig) <= 0)
    vol = BOX**3
    for r in rk.itertuples(index=False):
        hand = (N_LI / (vol * 1e-24)) * (1.602176634e-19) ** 2 * r.D_300K / (1.380649e-23 * 300.0)
        assert r.sigma_300K_S_cm == pytest.approx(hand, rel=1e-4)
        assert r.E_A_eV_low < r.E_A_eV < r.E_A_eV_high
        assert r.extrapolated_temperature
    by_id = rk.set_index("id")
    assert by_id.loc["s2", "diverged"] and not by_id.loc["s1", "diverged"]
    assert by_id.loc["s2", "classifier_uncertain"] and not by_id.loc["s1", "classifier_uncertain"]
    assert math.isnan(by_id.loc["s1", "D_ref_1000K"]) and by_id.loc["s3", "D_ref_1000K"] > 0
    assert abs(by_id.loc["s1", "E_A_eV"] - 0.20) < 0.12 and abs(by_id.loc["s2", "E_A_eV"] - 0.50) < 0.12

    # ---- plots and provenance ----
    assert [p.name for p in out["parity"]] == ["parity_600K.png", "parity_1000K.png"]
    assert len(out["arrhenius"]) == 2 and out["arrhenius"][0].name.startswith("arrhenius_01_s1")
    for p in out["parity"] + out["arrhenius"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    prov = json.loads((tmp_path / "reports" / "ranking.provenance.json").read_text())
    assert prov["stage"] == "report" and prov["config"]["analysis"]["top_n"] == 2
    assert (tmp_path / "reports" / "metrics.provenance.json").is_file()
    assert not list(Path(tmp_path / "reports").rglob("*.tmp"))


def test_ranking_variant_choice_and_errors(dataset):
    df = dataset["table"]
    st = schema.read_df(dataset["root"] / "structures.parquet", "structures")
    rk, _ = compute_ranking(df, st, variant="uniform")
    assert set(rk["source"]) == {"liflow:uniform"}
    assert rk["extrapolated_temperature"].all() and rk["E_A_eV"].isna().all()  # one temperature only
    with pytest.raises(InputError):
        compute_ranking(df, st, variant="isotropic")
    with pytest.raises(SchemaError):
        read_analysis(df.drop(columns=["rdf"]))
