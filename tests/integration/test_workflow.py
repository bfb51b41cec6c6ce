"""End-to-end: the Snakemake workflow on a tiny config, failure isolation, kill + resume, corruption.

One uninterrupted run (module fixture) is the reference; a second run is killed in the middle of its
MD stage and started again, and must finish with identical outputs without recomputing finished jobs.
The input set holds one structure outside the potential's element coverage (Am, Z = 95 > CHGNet's 94):
its relaxation fails, it is flagged, and every other structure still goes through the whole chain.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import REPO, assert_golden
from liflow_screen.io import layout, schema

pytestmark = pytest.mark.slow
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")

TINY_DIR = REPO / ".test" / "tiny"
TINY = (TINY_DIR / "config.yaml").read_text()


def make_project(d: Path) -> Path:
    """A work folder with the tiny workflow's inputs (CIFs, manifest) and config (``.test/tiny``)."""
    import shutil

    d.mkdir(parents=True, exist_ok=True)
    for f in TINY_DIR.iterdir():
        shutil.copy(f, d / ("tiny.yaml" if f.name == "config.yaml" else f.name))
    return d


def snakemake(d: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(d), "--configfile", str(d / "tiny.yaml"),
           "--cores", "2", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    d = make_project(tmp_path_factory.mktemp("wf_ref"))
    t0 = time.perf_counter()
    proc = snakemake(d)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return d, time.perf_counter() - t0


def _md_files(res: Path) -> list[Path]:
    """Every MD chunk file of a run, as the dataset rule passes them (chunks from the manifest)."""
    chunks = sorted(set(schema.read_df(res / "structures" / "manifest.parquet", "manifest")["chunk"]))
    names = [layout.STRUCTURES, layout.STATUS] + [layout.frames_name(T) for T in (600, 900)]
    return [layout.chunk_dir(res / "md", c) / n for c in chunks for n in names]


def _tables(d: Path) -> dict[str, object]:
    """Every data output, without provenance metadata (which holds wall times and dates)."""
    out: dict[str, object] = {}
    res = d / "results"
    for f in sorted(res.rglob("*.parquet")):
        rel = str(f.relative_to(res))
        t = pq.read_table(f)
        drop = [c for c in ("wall_s",) if c in t.column_names]
        out[rel] = t.drop(drop).replace_schema_metadata(None)
    for f in sorted((res / "reports").glob("*.csv")):
        out[str(f.relative_to(res))] = f.read_text()
    return out


def _same(a, b) -> bool:
    """Exact equality of nested Python values, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (a != a and b != b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def test_end_to_end_outputs(reference_run):
    d, wall = reference_run
    res = d / "results"
    manifest = schema.read_df(res / "structures" / "manifest.parquet", "manifest")
    assert sorted(manifest["id"]) == ["Li2S", "LiAm", "LiBr", "LiCl", "LiI"]
    # the failing structure is isolated: status rows say why, everything else completed
    status = schema.read_df(res / "dataset" / "status.parquet", "status")
    am = status[status["id"] == "LiAm"]
    assert len(am) == 2 and set(am["status"]) == {"relax_failed"}
    assert set(status.loc[status["id"] != "LiAm", "status"]) == {"ok"}
    labels = schema.read_df(res / "dataset" / "labels.parquet", "labels")
    assert len(labels) == 8 and np.isfinite(labels["msd_li"]).all()
    # frames: unwrapped float32, 31 frames of 10 fs per trajectory, Δτ pairs exist
    ds = schema.open_frames(layout.dataset_frame_files(res / "dataset"))
    pos, times = schema.read_trajectory(ds, "LiCl", 900)
    assert pos.dtype == np.float32 and pos.shape == (31, 8, 3)
    np.testing.assert_allclose(np.diff(times), 0.01, atol=1e-6)
    # rollouts for every structure that relaxed, in the frame schema, n_steps + 1 frames
    rstat = pd.concat([schema.read_df(f, "status") for f in sorted((res / "rollout" / "adaptive").glob("*/status.parquet"))])
    ok = rstat[rstat["status"] == "ok"]
    assert sorted(set(ok["id"])) == ["Li2S", "LiBr", "LiCl", "LiI"]
    assert (ok["n_frames"] == 4).all()
    assert set(rstat.loc[rstat["id"] == "LiAm", "status"]) == {"relax_failed"}
    # reports
    ranking = pd.read_csv(res / "reports" / "ranking.csv")
    assert sorted(ranking["id"]) == ["Li2S", "LiAm", "LiBr", "LiCl", "LiI"]
    am_row = ranking.set_index("id").loc["LiAm"]
    assert am_row["status"] == "no rollout" and am_row["reason"].startswith("relax_failed")
    assert ranking["id"].iloc[-1] == "LiAm" and pd.isna(am_row["rank"])
    # ranks only for rows with a σ(300 K) from a valid fit; every other row says why
    ranked = ranking[ranking["status"] == "ranked"]
    assert ranked["sigma_300K_S_cm"].notna().all() and (np.diff(ranked["sigma_300K_S_cm_rankq"]) <= 0).all()
    assert ranking.loc[ranking["status"] != "ranked", "reason"].str.len().gt(0).all()
    assert ranking.loc[ranking["status"] != "ranked", "sigma_300K_S_cm"].isna().all()
    metrics = pd.read_csv(res / "reports" / "metrics.csv")
    assert sorted(metrics["temperature"]) == [600, 900] and set(metrics["model"]) == {"adaptive"}
    assert (res / "reports" / "parity" / "parity_600K.png").stat().st_size > 1000
    assert {"tau_ps", "n", "stable_pct", "phys_stable_pct", "warning"} <= set(metrics.columns)
    # spearman.csv: LiFlow vs the MD per temperature (no panel compound here: no literature rows)
    sp = pd.read_csv(res / "reports" / "spearman.csv")
    assert set(sp["comparison"]) == {"liflow_vs_md"} and sorted(sp["temperature_K"]) == [600, 900]
    assert (sp.sort_values("temperature_K")["n"].to_numpy() == metrics.sort_values("temperature")["n"].to_numpy()).all()
    prov = schema.read_provenance(res / "dataset" / "labels.parquet")
    assert prov["config"]["run_name"] == "tiny-e2e" and "chgnet" in prov["versions"]
    for rule_log in ("structures.log", "dataset.log", "report.log"):
        assert (d / "logs" / rule_log).exists()
    # nothing left to do
    dry = snakemake(d, "-n")
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr


def test_kill_and_resume_identical_without_recompute(reference_run, tmp_path):
    ref_dir, _ = reference_run
    d = make_project(tmp_path / "wf_kill")
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(d), "--configfile", str(d / "tiny.yaml"), "--cores", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = d / "results" / "md" / "chunk_00000" / "status.parquet"
    deadline = time.time() + 600
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert first.exists() and proc.poll() is None, "the run ended before it could be killed mid-way"
    time.sleep(3)  # into the next MD chunk (or, on a fast machine, the dataset job)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (d / "results" / "reports" / "ranking.csv").exists()
    done_mtime = first.stat().st_mtime_ns
    assert snakemake(d, "--unlock").returncode == 0  # a hard kill leaves Snakemake's lock behind
    # the kill may land inside any job (MD or, on a fast machine, the dataset): its outputs are
    # marked incomplete and are rebuilt, as the profiles' rerun-incomplete does (README)
    again = snakemake(d, "--rerun-incomplete")
    assert again.returncode == 0, again.stderr[-4000:]
    assert first.stat().st_mtime_ns == done_mtime, "a finished MD chunk was recomputed"
    assert "chunk_00000" not in " ".join(l for l in again.stdout.splitlines() + again.stderr.splitlines()
                                         if "rule md:" in l or "wildcards: chunk=00000" in l)
    ref, got = _tables(ref_dir), _tables(d)
    assert sorted(ref) == sorted(got)
    for k in ref:
        if isinstance(ref[k], str):
            assert ref[k] == got[k], k
        else:
            assert ref[k].schema.equals(got[k].schema) and _same(ref[k].to_pylist(), got[k].to_pylist()), k


def test_rerun_with_other_chunks_and_fewer_temperatures_reads_only_declared_files(reference_run, tmp_path):
    """A rerun with another rollout.chunk_size and one rollout temperature fewer leaves the old
    chunks' files on disk; the report reads only the current config's files, so it succeeds and
    equals a run whose rollout / analysis / report folders started empty."""
    import shutil

    ref_dir, _ = reference_run
    new_cfg = TINY.replace("  chunk_size: 3\n", "  chunk_size: 2\n  temperatures: [900]\n")
    assert new_cfg != TINY
    runs = {}
    for name, clean in (("stale", False), ("clean", True)):
        d = tmp_path / name
        shutil.copytree(ref_dir, d, symlinks=True)
        (d / "tiny.yaml").write_text(new_cfg)
        if clean:
            for sub in ("rollout", "analysis", "reports"):
                shutil.rmtree(d / "results" / sub)
        proc = snakemake(d)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[name] = d / "results"
    stale = runs["stale"]
    # the leftovers are there (chunk 0 at 600 K from the old config) and were not read
    assert (stale / "rollout" / "adaptive" / "chunk_00000" / "frames_T600.parquet").exists()
    assert not (runs["clean"] / "rollout" / "adaptive" / "chunk_00000" / "frames_T600.parquet").exists()
    for name in ("ranking.csv", "metrics.csv", "prior_classes.csv"):
        assert (stale / "reports" / name).read_text() == (runs["clean"] / "reports" / name).read_text(), name
    rk = pd.read_csv(stale / "reports" / "ranking.csv")
    assert not any(c.endswith("600K") and c.startswith("D_pred") for c in rk.columns)


def test_corrupt_intermediate_is_detected_and_rebuilt(reference_run, tmp_path):
    ref_dir, _ = reference_run
    import shutil

    d = tmp_path / "wf_corrupt"
    shutil.copytree(ref_dir, d, symlinks=True)
    # a run that stopped before its analysis, with one finished MD output damaged meanwhile
    shutil.rmtree(d / "results" / "analysis")
    shutil.rmtree(d / "results" / "reports")
    target = d / "results" / "md" / "chunk_00001" / "frames_T900.parquet"
    blob = target.read_bytes()
    target.write_bytes(blob[: len(blob) // 3])  # truncated by a crashed copy / full disk
    # the consumer stops with a one-line error naming the file instead of using it
    out = subprocess.run([str(Path(sys.executable).parent / "liflow-screen"), "dataset", "--config",
                          str(d / "results" / "config.resolved.yaml"), "--manifest",
                          str(d / "results" / "structures" / "manifest.parquet"), "--md-files",
                          *map(str, _md_files(d / "results")),
                          "--out-dir", str(tmp_path / "ds")], capture_output=True, text=True, cwd=d)
    assert out.returncode == 2 and "frames_T900.parquet" in out.stderr and "unreadable" in out.stderr
    # `liflow-screen verify` reports it (exit 1)
    check = subprocess.run([str(Path(sys.executable).parent / "liflow-screen"), "verify", "--config",
                            str(d / "results" / "config.resolved.yaml"), "--results", str(d / "results")],
                           capture_output=True, text=True, cwd=d)
    assert check.returncode == 1 and "frames_T900.parquet" in check.stdout
    # a dry run reports nothing changed and touches no file
    assert snakemake(d, "-n").returncode == 0 and target.stat().st_size == len(blob) // 3
    # (the MD file recovered, with its old mtime; a damaged rollout file instead keeps the rebuild short)
    st = (ref_dir / "results" / "md" / "chunk_00001" / "frames_T900.parquet").stat()
    target.write_bytes(blob)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    roll = d / "results" / "rollout" / "adaptive" / "chunk_00000" / "frames_T900.parquet"
    rblob = roll.read_bytes()
    roll.write_bytes(rblob[: len(rblob) // 3])
    # a real run moves it aside, rebuilds that chunk and everything downstream, identically
    again = snakemake(d)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "corrupt" in again.stderr and (roll.parent / (roll.name + ".corrupt")).exists()
    log = again.stdout + again.stderr
    assert "rule rollout:" in log and "rule md:" not in log and "rule dataset:" not in log  # only from there on
    assert pq.read_table(roll).equals(pq.read_table(ref_dir / "results" / "rollout" / "adaptive" / "chunk_00000" /
                                                    "frames_T900.parquet"))
    ref = pd.read_csv(ref_dir / "results" / "reports" / "ranking.csv")
    pd.testing.assert_frame_equal(pd.read_csv(d / "results" / "reports" / "ranking.csv"), ref)


def test_training_loss_falls_on_workflow_data(reference_run, tmp_path):
    """The Propagator's training loss falls on the MD dataset the workflow built (not synthetic data)."""
    from liflow_screen.core.settings import Settings
    from liflow_screen.stages import run_train as train

    d, _ = reference_run
    cfg = Settings.load(d / "results" / "config.resolved.yaml",
                      overrides={"train": {"max_steps": 120, "val_every": 40, "batch_size": 8, "features": 32,
                                           "layers": 2, "radial": 8}})
    summary = train.run(cfg, d / "results" / "dataset", "propagator", "adaptive", tmp_path / "prop",
                                 selector=d / "results" / "train" / "selector.pt")
    assert summary["steps"] == 120
    import json

    hist = json.loads((tmp_path / "prop" / "history.json").read_text())["history"]
    assert len(hist) == 3
    assert hist[-1]["train_loss"] < 0.8 * hist[0]["train_loss"], hist


def test_paper_config_dag_is_chunked(tmp_path):
    """config/paper.yaml on a fabricated manifest: chunked jobs, one aggregation, dry run succeeds."""
    sys.path.insert(0, str(REPO / "bench"))
    import bench_dag

    from liflow_screen.core import config

    cfg = config.load(REPO / "config" / "paper.yaml")
    n = 400
    bench_dag.fabricate_manifest(cfg, n, tmp_path / "results" / "structures" / "manifest.parquet")
    wall, counts, _ = bench_dag.dry_run(tmp_path / "results", REPO / "config" / "paper.yaml")
    n_md = -(-n // cfg["md"]["chunk_size"])
    n_roll = -(-n // cfg["rollout"]["chunk_size"])
    assert counts["md"] == n_md and counts["analyze_reference"] == n_md
    variants = cfg["train"]["variants"]
    no_c = [v for v in variants if v != "regressor"] if cfg["rollout"]["ablate_corrector"] else []
    assert counts["rollout"] == n_roll * (len(variants) + len(no_c)) and counts["analyze_rollout"] == counts["rollout"]
    assert counts["dataset"] == 1 and counts["report"] == 1 and counts["train_propagator"] == 4
    # the SLURM profile validates and plans the same DAG (conda is replaced by env-modules here only
    # because this machine has no conda executable; the profile itself asks for conda)
    _, counts_slurm, out = bench_dag.dry_run(tmp_path / "results", REPO / "config" / "paper.yaml",
                                             ["--workflow-profile", str(REPO / "workflow" / "profiles" / "slurm"),
                                              "--sdm", "env-modules"])
    assert counts_slurm == counts


def test_outputs_agree_with_golden(reference_run):
    """ranking.csv, metrics.csv and diffusivity.csv agree with tests/golden as far as they are
    reproducible across CPUs (conftest.assert_golden)."""
    assert_golden("tiny", reference_run[0] / "results" / "reports")
