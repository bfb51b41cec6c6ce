"""Known-answer tests of the analysis and ranking reports (liflow_screen.report).

Synthetic crystals with known answers: Li on a simple cubic lattice (a = 3 Å) hopping between
sites at a Poisson rate Γ(T) (D* = a² Γ / 6, following a known E_A), with thermal vibration on
top; frame atoms on the body centres. Structures:

* ``s1``, ``s2``: Li hop, E_A = 0.20 / 0.40 eV: D* and E_A recovered within their intervals, ranked
  in the order of their true σ(300 K);
* ``s3``: Li hop (E_A 0.30 eV), but its reference MD's frame melts at 1200 K: 1200 K leaves the fit;
* ``s4``: Li hop (E_A 0.25 eV), rollout diverged at 800 K: fitted from 1000 and 1200 K;
* ``vib``: Li only vibrate: an upper bound per temperature, never a ranked conductor;
* ``drift``: a vibrating crystal whose frame drifts apart: flagged frame_melted, unranked;
* ``liquid``: Brownian (continuous) Li, no sites: flagged li_molten, unranked.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from liflow_screen import analysis as an
from liflow_screen.core import config
from liflow_screen.io import layout, schema
from liflow_screen.core.errors import InputError, SchemaError
from liflow_screen.report.ranking import compute_ranking
from liflow_screen.report.tables import read_analysis
from liflow_screen.stages.run_analyze import run as analyze_trajectories
from liflow_screen.stages.run_report import run as write_reports
from conftest import make_settings

A = 3.0           # Å, Li-Li site spacing (simple cubic)
NSIDE = 3         # 27 Li sites in a 9 Å cube, 27 frame atoms on the body centres
BOX = A * NSIDE
N_LI = NSIDE ** 3
TEMPS = (800, 1000, 1200)
SIG_LI, SIG_FR = 0.12, 0.08  # Å, vibration per Cartesian component
ROLL_DT, ROLL_FRAMES = 1.0, 31    # LiFlow-like: 1-ps frames, 30 ps
MD_DT, MD_FRAMES = 0.1, 101       # MD-like: 0.1-ps frames, 10 ps
#: id -> (split, E_A eV, D*(1200 K) Å²/ps); None = Li do not hop
KIND = {"s1": ("train", 0.20, 1.5), "s2": ("train", 0.40, 1.0), "s3": ("test", 0.30, 1.2),
        "s4": ("train", 0.25, 1.0), "vib": ("train", None, 0.0), "drift": ("train", None, 0.0),
        "liquid": ("train", 0.10, 3.0)}


def d_true(sid: str, T: float) -> float:
    """Known D* (Å²/ps)."""
    _, e_a, d1200 = KIND[sid]
    if e_a is None:
        return 0.0
    return d1200 * math.exp(-e_a / an.K_B_EV * (1.0 / T - 1.0 / 1200.0))


def _sites() -> tuple[np.ndarray, np.ndarray]:
    g = np.stack(np.meshgrid(*[np.arange(NSIDE)] * 3, indexing="ij"), -1).reshape(-1, 3) * A
    return g.astype(float), g + A / 2


def trajectory(sid: str, T: int, source: str, dt: float, n_frames: int, frame_drift: float = 0.0) -> np.ndarray:
    """(F, 54, 3) unwrapped positions, Å: Li hops (or Brownian for 'liquid') + vibration."""
    rng = np.random.default_rng(zlib.crc32(f"{sid}|{T}|{source}".encode()))
    li0, fr0 = _sites()
    d = d_true(sid, T)
    if sid == "liquid":  # continuous random walk: no sites
        li = np.cumsum(rng.normal(0, math.sqrt(2 * d * dt), (n_frames, N_LI, 3)), axis=0)
        li -= li[0]
    else:
        gamma = 6.0 * d / A ** 2  # hops per ps
        hops = rng.poisson(gamma * dt, (n_frames - 1, N_LI))
        step = np.zeros((n_frames - 1, N_LI, 3))
        for f, k in zip(*np.nonzero(hops)):
            for _ in range(hops[f, k]):
                step[f, k, rng.integers(3)] += A * rng.choice((-1.0, 1.0))
        li = np.concatenate([np.zeros((1, N_LI, 3)), np.cumsum(step, axis=0)])
    fr = np.zeros((n_frames, N_LI, 3))
    if frame_drift > 0:
        fr = np.cumsum(rng.normal(0, math.sqrt(2 * frame_drift * dt), (n_frames, N_LI, 3)), axis=0)
        fr -= fr[0]
    pos = np.concatenate([li0 + li + rng.normal(0, SIG_LI, li.shape), fr0 + fr + rng.normal(0, SIG_FR, fr.shape)], 1)
    return pos.astype(np.float32)


def _plan() -> dict[tuple[str, int, str], dict]:
    """(id, T, source) -> how to make it."""
    plan = {}
    for sid in KIND:
        for T in TEMPS:
            spec = {"dt": ROLL_DT, "n": ROLL_FRAMES, "drift": 0.0, "status": "ok"}
            if sid == "drift":
                spec["drift"] = 0.2  # Å²/ps: the frame comes apart
            if sid == "s4" and T == 800:
                spec.update(n=12, status="diverged")
            plan[(sid, T, "liflow:adaptive")] = spec
    for T in TEMPS:  # reference MD of the test structure; its frame melts at 1200 K
        plan[("s3", T, "md")] = {"dt": MD_DT, "n": MD_FRAMES, "drift": 2.0 if T == 1200 else 0.0, "status": "ok"}
    return plan


PLAN = _plan()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    numbers = [3] * N_LI + [8] * N_LI
    cell = (np.eye(3) * BOX).reshape(-1).tolist()
    li0, fr0 = _sites()
    srows = [{"id": s, "reduced_formula": "LiO", "split": sp, "numbers": numbers, "cell": cell,
              "positions": np.concatenate([li0, fr0]).reshape(-1).tolist(), "n_atoms": 2 * N_LI, "n_li": N_LI,
              "desc_li": [0.0], "desc_frame": [0.0], "energy": -1.0, "relax_status": "ok"}
             for s, (sp, _, _) in KIND.items()]
    schema.write_rows(srows, root / "structures.parquet", "structures")
    positions, by_file, status = {}, {}, []
    for (sid, T, src), spec in PLAN.items():
        pos = trajectory(sid, T, src, spec["dt"], spec["n"], spec["drift"])
        positions[(sid, T, src)] = pos
        split = KIND[sid][0]
        for k in range(spec["n"]):
            by_file.setdefault((T, split, src), []).append(
                {"id": sid, "source": src, "frame": k, "time_ps": k * spec["dt"], "positions": pos[k].reshape(-1),
                 "energy": None, "temperature_inst": None})
        status.append({"id": sid, "temperature": T, "split": split, "source": src, "status": spec["status"],
                       "reason": "max displacement" if spec["status"] != "ok" else "", "n_frames": spec["n"],
                       "duration_ps": (spec["n"] - 1) * spec["dt"], "wall_s": 0.1})
    for (T, split, src), rows in by_file.items():
        part = layout.frame_partition_path(root / "frames", T, split)
        schema.write_rows(rows, part / f"{src.replace(':', '_')}.parquet", "frames")
    schema.write_rows(status, root / "status.parquet", "status")
    cfg = make_settings({"analysis": {"kinisi_samples": 500, "kinisi_n_dt": 15, "top_n": 3}})
    files = [layout.frame_partition_path(root / "frames", T, split) / f"{src.replace(':', '_')}.parquet"
             for (T, split, src) in by_file]
    table = analyze_trajectories(files, root / "structures.parquet", root / "analysis.parquet", cfg,
                                 status=[root / "status.parquet"])
    return {"root": root, "files": files, "positions": positions, "cfg": cfg, "table": read_analysis(table)}


def _row(df: pd.DataFrame, sid: str, T: int, src: str = "liflow:adaptive") -> pd.Series:
    return df[(df["id"] == sid) & (df["temperature"] == T) & (df["source"] == src)].iloc[0]


def test_analysis_rows_msd_and_hop_length(dataset):
    df = dataset["table"]
    assert len(df) == len(PLAN) and set(zip(df["id"], df["temperature"], df["source"])) == set(PLAN)
    for r in df.itertuples(index=False):
        pos = dataset["positions"][(r.id, r.temperature, r.source)].astype(np.float64)
        li = np.arange(pos.shape[1]) < N_LI
        assert r.msd_li == pytest.approx(np.mean(np.sum((pos[-1, li] - pos[0, li]) ** 2, axis=1)), rel=1e-6)
        assert r.msd_frame == pytest.approx(np.mean(np.sum((pos[-1, ~li] - pos[0, ~li]) ** 2, axis=1)), rel=1e-6)
        assert r.stable == (r.status == "ok")
        # hop length: shortest Li-Li distance of frame 0, a = 3 Å up to the vibration
        assert abs(r.li_hop_A - A) < 6 * SIG_LI
        assert len(r.rdf) == dataset["cfg"].analysis.rdf_bins


def test_known_diffusivities_recovered(dataset):
    """Resolved hopping Li: kinisi's 95 % interval holds the true D* (cm²/s) at every temperature."""
    df = dataset["table"]
    for sid in ("s1", "s2", "s3"):
        for T in TEMPS:
            r = _row(df, sid, T)
            assert r["li_resolved"] and r["D_method"] == "kinisi", (sid, T, r["D_note"])
            want = d_true(sid, T) * 1e-4
            assert r["D_li_low"] <= want <= r["D_li_high"], (sid, T, r["D_li_low"], want, r["D_li_high"])
            assert abs(r["D_li"] / want - 1) < 0.35
            assert not r["li_molten"] and not r["frame_melted"]
            assert r["li_site_occupancy"] > 0.9


def test_vibration_only_gives_an_upper_bound(dataset):
    df = dataset["table"]
    for T in TEMPS:
        r = _row(df, "vib", T)
        assert not r["li_resolved"] and r["D_method"] == "bound:hop"
        assert math.isnan(r["D_li"]) and math.isnan(r["D_li_low"])
        # the bound: a² / (6 τ_obs) with τ_obs = 30 ps - 1 ps plateau lag, in cm²/s
        assert r["li_tau_obs_ps"] == pytest.approx(29.0)
        assert r["D_li_bound"] == pytest.approx(r["li_hop_A"] ** 2 / (6 * 29.0) * 1e-4, rel=1e-9)
        # excess over the plateau is vibration noise: far below one hop
        assert abs(r["li_msd_excess"]) < 0.2 and r["li_msd_plateau"] == pytest.approx(
            2 * 3 * SIG_LI ** 2, rel=0.3)
        assert "MSD excess" in r["D_note"]


def test_sanity_flags(dataset):
    df = dataset["table"]
    for T in TEMPS:
        assert _row(df, "drift", T)["frame_melted"] and not _row(df, "vib", T)["frame_melted"]
        liq = _row(df, "liquid", T)
        assert liq["li_molten"] and liq["li_site_occupancy"] < 0.5
        assert not _row(df, "s1", T)["li_molten"]
    assert _row(df, "s3", 1200, "md")["frame_melted"] and not _row(df, "s3", 1000, "md")["frame_melted"]
    assert _row(df, "s4", 800)["status"] == "diverged"


def _true_sigma(sid: str) -> float:
    d300 = d_true(sid, 300.0) * 1e-4
    return an.nernst_einstein_conductivity(d300, N_LI, BOX ** 3, 300.0)


def test_ranking_only_resolved_in_true_order(dataset, tmp_path):
    root = dataset["root"]
    priors = pd.DataFrame({"id": ["s1", "s2"], "temperature": [800, 800], "source": ["liflow:adaptive"] * 2,
                           "uncertain": [False, True]})
    out = write_reports([root / "analysis.parquet"], root / "structures.parquet", [root / "status.parquet"],
                        priors, tmp_path / "reports", dataset["cfg"])
    rk = pd.read_csv(out["ranking"])
    ranked = rk[rk["status"] == "ranked"]
    # exactly the structures with >= 2 usable temperatures, in the order of their TRUE σ(300 K)
    assert sorted(ranked["id"]) == ["s1", "s2", "s3", "s4"]
    assert ranked["id"].tolist() == sorted(ranked["id"], key=_true_sigma, reverse=True)
    assert ranked["rank"].tolist() == [1, 2, 3, 4]
    assert rk.loc[rk["status"] != "ranked", "rank"].isna().all()
    assert rk["id"].tolist()[:4] == ranked["id"].tolist()  # unranked rows come after
    by = rk.set_index("id")
    for sid in ("s1", "s2", "s3", "s4"):
        _, e_a, _ = KIND[sid]
        assert by.loc[sid, "E_A_eV_low"] <= e_a <= by.loc[sid, "E_A_eV_high"], sid
        hand = (N_LI / (BOX ** 3 * 1e-24)) * (1.602176634e-19) ** 2 * by.loc[sid, "D_300K"] / (1.380649e-23 * 300.0)
        assert by.loc[sid, "sigma_300K_S_cm"] == pytest.approx(hand, rel=1e-4)
    assert by.loc["s1", "arrhenius_T"] == "800;1000;1200"
    # excluded temperatures say why
    assert by.loc["s3", "arrhenius_T"] == "800;1000" and "md_melts_from_1200K" in by.loc["s3", "flags_1200K"]
    assert by.loc["s3", "md_melts_from_K"] == 1200
    assert by.loc["s4", "arrhenius_T"] == "1000;1200" and "diverged" in by.loc["s4", "flags_800K"]
    # never ranked: vibration (bounds), drifting frame, molten Li sublattice; each with its reason
    for sid, st, word in (("vib", "unresolved", "unresolved"), ("drift", "unstable", "frame_melted"),
                          ("liquid", "unstable", "li_molten")):
        assert by.loc[sid, "status"] == st and word in by.loc[sid, "reason"], (sid, by.loc[sid, "reason"])
        assert math.isnan(by.loc[sid, "sigma_300K_S_cm"]) and math.isnan(by.loc[sid, "E_A_eV"])
    for T in TEMPS:
        assert by.loc["vib", f"D_method_{T}K"] == "bound:hop" and by.loc["vib", f"D_pred_{T}K_bound"] > 0
        assert math.isnan(by.loc["vib", f"D_pred_{T}K"])
    assert by.loc["s2", "prior_class_uncertain"] and not by.loc["s1", "prior_class_uncertain"]
    # plots agree with the table: one Arrhenius plot per ranked structure (top_n = 3), none for others
    names = [p.name for p in out["arrhenius"]]
    assert len(names) == 3 and all(any(n.startswith(f"arrhenius_{k:02d}_") for n in names) for k in (1, 2, 3))
    prov = json.loads((tmp_path / "reports" / "ranking.provenance.json").read_text())
    assert prov["stage"] == "report"
    assert not list(Path(tmp_path / "reports").rglob("*.tmp"))


def test_metrics_common_tau_and_warnings(dataset, tmp_path):
    root = dataset["root"]
    out = write_reports([root / "analysis.parquet"], root / "structures.parquet", [root / "status.parquet"],
                        None, tmp_path / "reports", dataset["cfg"])
    m = pd.read_csv(out["metrics"])
    assert sorted(m["temperature"]) == list(TEMPS) and set(m["model"]) == {"adaptive"}
    row = m[m["temperature"] == 1000].iloc[0]
    # one test structure (s3): compared at τ = min(10 ps MD, 30 ps rollout), n = 1 -> warned
    assert row["tau_ps"] == pytest.approx(10.0) and row["n"] == 1 and "n = 1 < 3" in row["warning"]
    ref = dataset["positions"][("s3", 1000, "md")].astype(float)
    gen = dataset["positions"][("s3", 1000, "liflow:adaptive")].astype(float)
    li = np.arange(ref.shape[1]) < N_LI
    msd_ref = np.mean(np.sum((ref[100, li] - ref[0, li]) ** 2, axis=1))
    msd_gen = np.mean(np.sum((gen[10, li] - gen[0, li]) ** 2, axis=1))
    assert row["log_msd_li_mae"] == pytest.approx(abs(np.log10(msd_gen) - np.log10(msd_ref)), rel=1e-4)
    assert row["stable_pct"] == 100.0 and row["phys_stable_pct"] == 100.0
    # τ shorter than 3 Δτ is warned about too
    short = compute_metrics_at(dataset, 2.0)
    assert "spans fewer than 3 Δτ" in short[short["temperature"] == 1000]["warning"].iloc[0]


def compute_metrics_at(dataset, tau: float) -> pd.DataFrame:
    from liflow_screen.report.metrics import compute_metrics

    return compute_metrics(dataset["table"], None, ("test",), tau_ps=tau, delta_tau_ps=1.0)


def test_physical_stability_counts_melted_frames(dataset):
    from liflow_screen.report.metrics import compute_metrics

    df = dataset["table"].copy()
    df.loc[df["id"] == "drift", "split"] = "test"
    m = compute_metrics(df, None, ("test",))
    row = m[m["temperature"] == 800].iloc[0]
    assert row["stable_pct"] == 100.0 and row["phys_stable_pct"] == 50.0  # drift's frame came apart


def test_ranking_variant_choice_and_errors(dataset):
    df = dataset["table"]
    st = schema.read_df(dataset["root"] / "structures.parquet", "structures")
    rk, _ = compute_ranking(df, st, variant="adaptive")
    assert set(rk["source"]) == {"liflow:adaptive"}
    with pytest.raises(InputError):
        compute_ranking(df, st, variant="isotropic")
    with pytest.raises(SchemaError):
        read_analysis(df.drop(columns=["rdf"]))


def test_analyze_rejects_unknown_structure(dataset, tmp_path):
    st = schema.read_df(dataset["root"] / "structures.parquet", "structures")
    with pytest.raises(InputError, match="missing from the structures table"):
        analyze_trajectories(dataset["files"], st[st["id"] != "s1"], tmp_path / "a.parquet",
                             dataset["cfg"], ids=["s1"])
    assert not (tmp_path / "a.parquet").exists()
    with pytest.raises(SchemaError):
        analyze_trajectories([tmp_path / "nothing.parquet"], st, tmp_path / "a.parquet", dataset["cfg"])
    with pytest.raises(SchemaError):
        analyze_trajectories([], st, tmp_path / "a.parquet", dataset["cfg"])


def test_report_stage_runs_without_torch(dataset, tmp_path):
    """The report rule's env (envs/analysis.yaml) has no torch: the CLI stage must not import it."""
    import subprocess
    import sys

    import yaml

    root = dataset["root"]
    cfgfile = tmp_path / "cfg.yaml"
    cfgfile.write_text(yaml.safe_dump(dict(dataset["cfg"].config)))
    code = ("import importlib.abc, sys\n"
            "class NoTorch(importlib.abc.MetaPathFinder):  # any `import torch` raises ImportError\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.'):\n"
            "            raise ImportError(f'{name} is not installed in this environment')\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            "from liflow_screen.cli import main\n"
            "rc = main(sys.argv[1:])\n"
            "assert 'torch' not in sys.modules\n"
            "sys.exit(rc)")
    args = ["report", "--config", str(cfgfile), "--structures", str(root / "structures.parquet"),
            "--analysis", str(root / "analysis.parquet"), "--status", str(root / "status.parquet"),
            "--out-dir", str(tmp_path / "reports")]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rk = pd.read_csv(tmp_path / "reports" / "ranking.csv")
    ref = pd.read_csv(write_reports([root / "analysis.parquet"], root / "structures.parquet",
                                    [root / "status.parquet"], None, tmp_path / "ref", dataset["cfg"])["ranking"])
    pd.testing.assert_frame_equal(rk, ref)


def test_diffusivity_by_source_md_beside_liflow(dataset):
    """diffusivity.csv: one row per (structure, source) that has trajectories; s3's reference MD (frame
    melts at 1200 K) is fitted from 800 and 1000 K, beside its rollouts' fit from all three; both hold
    the true E_A = 0.30 eV in their 95 % interval."""
    from liflow_screen.report.ranking import diffusivity_by_source

    df = dataset["table"]
    structs = schema.read_df(dataset["root"] / "structures.parquet", "structures")
    out = diffusivity_by_source(df, structs, schema.read_df(dataset["root"] / "status.parquet", "status"))
    assert sorted(zip(out["id"], out["source"])) == sorted({(k[0], k[2]) for k in PLAN})
    s3 = out[out["id"] == "s3"].set_index("source")
    assert s3.loc["md", "arrhenius_T"] == "800;1000" and "md_melts_from_1200K" in s3.loc["md", "flags_1200K"]
    assert s3.loc["liflow:adaptive", "status"] == "fitted" and s3.loc["md", "status"] == "fitted"
    for src in ("md", "liflow:adaptive"):
        assert s3.loc[src, "E_A_eV_low"] < 0.30 < s3.loc[src, "E_A_eV_high"], src
    assert "rank" not in out.columns
