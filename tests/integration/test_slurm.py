"""The cluster path through a real SLURM: the one-node cluster of ``scripts/local-slurm.sh``.

``.ci/run`` brings that cluster up before pytest; without it (not root, no apt, or no SLURM at all)
the SLURM tests skip with the reason. The workflow is the default, shrunk to three structures as in
test_default_workflow.py (its overlay, plus chunk sizes that make two MD and two rollout chunks),
run through ``--workflow-profile`` pointing at an overlay of workflow/profiles/slurm that fits the
node (written here, in the test's folder, as workflow/profiles/slurm-one-node is written):

1. the same workflow without SLURM (``--cores 2``) is the reference, run beside 2.;
2. through SLURM, the rollout job of chunk 0 is cancelled with ``scancel`` while it runs: the run
   fails (the rest that does not need chunk 0 finishes); the same command again finishes the
   workflow and redoes only chunk 0 and what follows it (the MD chunks and the finished rollout
   chunk keep their mtimes);
3. every rule went out with sbatch, on the profile's partitions (md and rollout on ``gpu``), as
   job arrays where the profile asks for them (it does not: upstream bug, see the profile), and
   ranking.csv, diffusivity.csv and spearman.csv are byte-identical to those of 1.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from test_default_workflow import OVERLAY as DEFAULT_OVERLAY

SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
SLURM_PROFILE = REPO / "workflow" / "profiles" / "slurm" / "config.yaml"
ONE_NODE_PROFILE = REPO / "workflow" / "profiles" / "slurm-one-node" / "config.yaml"
CLUSTER = "liflow"  # ClusterName of scripts/local-slurm.sh's cluster
REPORTS = ("ranking.csv", "diffusivity.csv", "spearman.csv")
# test_default_workflow's three structures (Li4P2S6, Li3N from the panel; LiBr from a CIF, outside
# the element table); 2 per chunk: MD (relaxation) and rollout chunks 0 = the two panel compounds,
# 1 = LiBr, so every chunked rule has two jobs.
OVERLAY = {**DEFAULT_OVERLAY, "run_name": "test-slurm",
           "md": {**DEFAULT_OVERLAY["md"], "chunk_size": 2},
           "rollout": {**DEFAULT_OVERLAY["rollout"], "chunk_size": 2}}


def one_node_profile(profile: dict, cpus: int, mem_mb: int) -> dict:
    """workflow/profiles/slurm fitted to one node of ``cpus`` CPUs: no conda, every mem_mb <= mem_mb,
    cpus_per_task and threads <= cpus, squeue for job status (no accounting daemon), no account."""
    p = copy.deepcopy(profile)
    p.pop("software-deployment-method", None)
    p["slurm-status-command"] = "squeue"
    p["slurm-no-account"] = True
    for res in [p["default-resources"], *p["set-resources"].values()]:
        if "mem_mb" in res:
            res["mem_mb"] = min(res["mem_mb"], mem_mb)
        if "cpus_per_task" in res:
            res["cpus_per_task"] = min(res["cpus_per_task"], cpus)
    p["set-threads"] = {rule: min(n, cpus) for rule, n in p["set-threads"].items()}
    return p


def test_one_node_profile_is_the_slurm_profile_fitted():
    """workflow/profiles/slurm-one-node (the README's) = workflow/profiles/slurm with the four
    one-node differences for a 2-CPU node, nothing else (the two cannot drift apart)."""
    slurm = yaml.safe_load(SLURM_PROFILE.read_text())
    assert yaml.safe_load(ONE_NODE_PROFILE.read_text()) == one_node_profile(slurm, cpus=2, mem_mb=8000)
    # paper-scale resources stay in the site profile
    assert slurm["software-deployment-method"] == "conda" and slurm["set-resources"]["md"]["mem_mb"] >= 32000


# --- the SLURM cluster ----------------------------------------------------------------------------


def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout


def _cluster() -> dict:
    """Name, CPUs and memory of the one node of scripts/local-slurm.sh's cluster, or pytest.skip with why."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        pytest.skip("no SLURM here (no sinfo/sbatch): scripts/local-slurm.sh brings one up, as root")
    try:
        conf = _sh("scontrol", "show", "config")
        nodes = sorted(set(_sh("sinfo", "-h", "-N", "-o", "%N %t").splitlines()))  # a line per partition
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"SLURM not up ({' '.join(exc.cmd)} failed): scripts/local-slurm.sh brings it up, as root")
    name = re.search(r"^ClusterName\s*=\s*(\S+)", conf, re.M)
    if not name or name.group(1) != CLUSTER:
        pytest.skip(f"the SLURM here is not scripts/local-slurm.sh's one-node cluster '{CLUSTER}' "
                    "(the test would submit jobs to it)")
    if len(nodes) != 1 or nodes[0].split()[1] not in ("idle", "mix"):
        pytest.skip(f"SLURM: not one idle node ({'; '.join(nodes)})")
    node = _sh("scontrol", "-o", "show", "node", nodes[0].split()[0])
    cpus = int(re.search(r"CPUTot=(\d+)", node).group(1))
    mem = int(re.search(r"RealMemory=(\d+)", node).group(1))
    return {"node": nodes[0].split()[0], "cpus": cpus, "mem_mb": mem}


def _jobs(workdir: Path | None = None) -> list[dict]:
    """SLURM's record of every job (started from ``workdir``; finished jobs stay listed for
    MinJobAge = 10 min): JobId, ArrayJobId, ArrayTaskId, Partition, JobState, Comment (rule_<name>...)."""
    out = _sh("scontrol", "-o", "show", "job")
    jobs = []
    for line in out.splitlines():
        rec = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if "JobId" in rec and (workdir is None or rec.get("WorkDir") == str(workdir)):
            jobs.append(rec)
    return jobs


def _id(rec: dict) -> str:
    """The id squeue and scancel use: <array job>_<task> for an array task, else the job id."""
    return f"{rec['ArrayJobId']}_{rec['ArrayTaskId']}" if "ArrayJobId" in rec else rec["JobId"]


def _rule(rec: dict) -> str:
    return re.match(r"rule_(.+?)(_wildcards_.*)?$", rec["Comment"]).group(1)


# --- the runs ------------------------------------------------------------------------------------


def _prepare(d: Path) -> None:
    d.mkdir()
    shutil.copy(REPO / "config.yaml", d / "config.yaml")
    (d / "over.yaml").write_text(yaml.safe_dump(OVERLAY))
    (d / "own").mkdir()
    shutil.copy(REPO / ".test" / "tiny" / "LiBr.cif", d / "own" / "LiBr.cif")


def _cmd(d: Path, *extra: str) -> list[str]:
    return [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(d), "--configfile", "config.yaml", "over.yaml",
            *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cluster = _cluster()
    earlier = {j["JobId"] for j in _jobs()}  # jobs of an earlier session still listed
    top = tmp_path_factory.mktemp("slurm")
    cache = top / "empty-cache"
    cache.mkdir()
    env = {**os.environ, "LIFLOW_SCREEN_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    profile = top / "profile"
    profile.mkdir()
    # One CPU per job (two jobs share a 2-core node; a second torch thread of a small graph only
    # spin-waits on a busy machine, ~5x slower), memory capped at the one-node profile's 8000 MB.
    fitted = one_node_profile(yaml.safe_load(SLURM_PROFILE.read_text()), cpus=1,
                              mem_mb=min(cluster["mem_mb"], 8000))
    # test only: first status check after 2 s instead of 40 (short jobs), the SLURM logs of
    # successful jobs kept (which job ran which chunk), no retry (the profile's 1 would resubmit
    # the cancelled job within the run)
    fitted.update({"slurm-init-seconds-before-status-checks": 2, "slurm-keep-successful-logs": True,
                   "retries": 0})
    (profile / "config.yaml").write_text(yaml.safe_dump(fitted, sort_keys=False))

    local, viaslurm = top / "local", top / "slurm"
    _prepare(local)
    _prepare(viaslurm)
    times = {}
    cmd = _cmd(viaslurm, "--workflow-profile", str(profile))
    # the reference without SLURM, the same threads per job, beside the SLURM run (mostly waiting)
    t0 = time.perf_counter()
    with subprocess.Popen(_cmd(local, "--cores", "2", "--set-threads", "md=1", "rollout=1"),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=local) as ref:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              cwd=viaslurm) as killed:
            cancelled = _cancel_rollout(viaslurm, "00000", killed, timeout=400)
            killed_out = killed.communicate(timeout=600)[0]
            times["slurm, chunk 0 cancelled"] = time.perf_counter() - t0
        ref_out = ref.communicate(timeout=600)[0]
    times["local (beside it)"] = (local / "results" / "reports" / "ranking.csv").stat().st_mtime - time.time() + (
        time.perf_counter() - t0)
    assert ref.returncode == 0, ref_out[-4000:]

    res = viaslurm / "results"
    rollout_dir = res / "rollout" / "published"
    chunks = sorted(p.name for p in rollout_dir.iterdir())
    done = [c for c in chunks if (rollout_dir / c / "status.parquet").exists()]
    kept = {p: p.stat().st_mtime_ns for c in done for p in (rollout_dir / c).iterdir()}
    kept |= {p: p.stat().st_mtime_ns for p in (res / "analysis").rglob("*.parquet")}
    kept |= {p: p.stat().st_mtime_ns for p in (res / "md").rglob("*.parquet")}

    t0 = time.perf_counter()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=viaslurm)
    times["the same command again"] = time.perf_counter() - t0
    assert rerun.returncode == 0, rerun.stderr[-6000:]
    print(f"SLURM test runs: {', '.join(f'{k} {v:.0f} s' for k, v in times.items())}")
    return {"local": local, "slurm": viaslurm, "profile": fitted,
            "jobs": [j for j in _jobs(viaslurm) if j["JobId"] not in earlier],
            "cancelled": cancelled, "killed_rc": killed.returncode, "killed_out": killed_out, "done": done,
            "chunks": chunks, "kept": kept, "rerun": rerun, "times": times}


def _cancel_rollout(workdir: Path, chunk: str, proc: subprocess.Popen, timeout: float) -> str:
    """``scancel`` the SLURM job (or array task) running the rollout of ``chunk`` once its rollout
    has begun (the pilot rollouts are logged); return its id. Which job runs which chunk: its SLURM
    log (the job step's Snakemake names the wildcards)."""
    t_end = time.monotonic() + timeout
    log = workdir / "logs" / "rollout" / "published" / f"chunk_{chunk}.log"
    while time.monotonic() < t_end and proc.poll() is None:
        if log.exists() and "pilot rollouts" in log.read_text():
            out = _sh("squeue", "-h", "-t", "RUNNING", "-o", "%i|%k|%Z")
            for job, comment, wd in (r.split("|") for r in out.splitlines()):
                if wd != str(workdir) or not comment.startswith("rule_rollout"):
                    continue
                slurm_logs = list((workdir / "logs" / "slurm" / "rule_rollout").rglob(f"{job}.log"))
                if slurm_logs and f"chunk={chunk}" in slurm_logs[0].read_text():
                    subprocess.run(["scancel", job], check=True, timeout=30)
                    return job
        time.sleep(0.2)
    raise AssertionError(f"no running rollout job of chunk {chunk} seen (run ended: {proc.poll()})")


def _array_rules(profile: dict) -> set[str]:
    return {r.strip() for r in str(profile.get("slurm-array-jobs") or "").replace(";", ",").split(",") if r.strip()}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_reports_through_slurm_identical_to_local(runs):
    for name in REPORTS:
        local = (runs["local"] / "results" / "reports" / name).read_bytes()
        assert (runs["slurm"] / "results" / "reports" / name).read_bytes() == local, name


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_every_rule_went_through_sbatch_on_its_partition(runs):
    jobs = runs["jobs"]
    assert jobs, "no SLURM job ran from the workflow's folder"
    rules = {_rule(j) for j in jobs}
    assert rules == {"structures", "import_model", "md", "dataset", "analyze_reference", "rollout",
                     "analyze_rollout", "report"}, rules
    state = {_id(j): j["JobState"] for j in jobs}
    cancelled = runs["cancelled"]
    assert state.pop(cancelled) == "CANCELLED" and set(state.values()) == {"COMPLETED"}, state
    gpu = {"md", "rollout"}  # the profile's GPU rules in this DAG (no training)
    for j in jobs:
        assert j["Partition"] == ("gpu" if _rule(j) in gpu else "cpu"), (j["JobId"], _rule(j), j["Partition"])
    arrays = _array_rules(runs["profile"])
    # per rule: 2 chunks of md, analyze_reference, rollout (+ the cancelled one), analyze_rollout
    count = {"structures": 1, "import_model": 2, "md": 2, "dataset": 1, "analyze_reference": 2, "rollout": 3,
             "analyze_rollout": 2, "report": 1}
    for rule, n in count.items():
        recs = [j for j in jobs if _rule(j) == rule]
        assert len(recs) == n, (rule, [j["JobId"] for j in recs])
        if rule in arrays and rule != "rollout":  # one array of both chunks
            assert len({j.get("ArrayJobId") for j in recs}) == 1 and None not in {j.get("ArrayJobId") for j in recs}
        elif rule not in arrays:
            assert not any("ArrayJobId" in j for j in recs), rule
        # the SLURM log of each (kept: the test's overlay keeps successful jobs' logs)
        logs = list((runs["slurm"] / "logs" / "slurm" / f"rule_{rule}").rglob("*.log"))
        assert len(logs) == n, (rule, logs)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_cancelled_job_fails_the_run_and_the_rerun_redoes_only_it(runs):
    assert runs["killed_rc"] != 0, runs["killed_out"][-3000:]
    assert f"SLURM-job '{runs['cancelled']}' failed, SLURM status is: 'CANCELLED'" in runs["killed_out"], \
        runs["killed_out"][-3000:]
    # chunk 1 finished in the cancelled run, chunk 0 did not
    assert runs["done"] == ["chunk_00001"], (runs["chunks"], runs["done"])
    # the rerun ran only chunk 0's rollout and what follows it
    out = runs["rerun"].stdout + runs["rerun"].stderr
    stats = out.split("Job stats:")[1].split("total")[0]
    counts = {ln.split()[0]: int(ln.split()[1]) for ln in stats.splitlines()[3:] if ln.strip()}
    assert counts == {"rollout": 1, "analyze_rollout": 1, "report": 1, "all": 1}, counts
    assert "chunk=00000" in out and "chunk=00001" not in out
    # what finished before the cancel is untouched: MD (relaxation) chunks, analyses, rollout chunk 1
    kept = runs["kept"]
    assert len(kept) > 10 and all(p.stat().st_mtime_ns == t for p, t in kept.items()), kept
