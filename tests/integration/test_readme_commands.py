"""Every command the README shows, in its code blocks and its table of configs, runs as written, or
is listed in EXCLUDED with the reason it cannot run here.

A command runs verbatim (``bash -c``) in a copy of this checkout's files whose ``.venv`` is this
checkout's environment (``./scripts/setup.sh``, the first half of the quick-start commands, is what
CI's ``.ci/run`` has just run on this checkout; the test checks it says so). A README command this
file does not know fails the test: a new command needs a test here or a reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, assert_golden

pytestmark = pytest.mark.slow

README = REPO / "README.md"
SETUP = "./scripts/setup.sh"

#: Commands run by a test of this module (by the README's exact text).
DEFAULT = "./scripts/setup.sh && .venv/bin/snakemake --cores 2"
DEFAULT_TABLE = "snakemake --cores 2"
OWN = "snakemake --cores 2 --configfile config/own-trajectories.yaml"
RUN_HERE = {DEFAULT, DEFAULT_TABLE, OWN}

#: Commands that cannot run in the test suite, and why.
EXCLUDED = {
    "./scripts/setup.sh && .venv/bin/python -m pytest -q":
        "the test command itself: CI (.ci/run) runs it; run from inside the suite it would recurse",
    ".venv/bin/snakemake --cores 2 --configfile config/train-demo.yaml":
        "9-22 min of CHGNet MD and training on 2 cores (measured), beyond the suite's budget; its DAG is "
        "built in test_default_workflow.py and its chain of rules runs on .test/tiny (test_workflow.py)",
    "snakemake --cores 2 --configfile config/train-demo.yaml": "the same command (see above)",
    "snakemake --cores 2 --configfile config/panel.yaml":
        "tens of minutes on 2 cores (3 replicas of the whole panel), beyond the suite's budget; the default "
        "command runs the same rules and code on 14 of its 20 compounds, the replica and extension code runs "
        "in tests/unit (the panel config is validated in test_structures.py, its DAG in test_default_workflow.py)",
    "snakemake --cores 8 --configfile config/panel-gpu.yaml":
        "needs a CUDA GPU (rollout.device: cuda); its DAG is built in test_default_workflow.py",
    "export MP_API_KEY=...": "needs a Materials Project account and the network",
    "./scripts/local-slurm.sh":
        "starts daemons as root and installs packages; .ci/run runs it before pytest, and "
        "tests/integration/test_slurm.py uses the cluster it brings up (skips, saying why, without it)",
    ".venv/bin/snakemake --workflow-profile workflow/profiles/slurm-one-node":
        "the 14-compound default through SLURM takes longer than the suite's budget allows; "
        "test_slurm.py runs the same profile (fitted to 1 CPU per job) on 3 structures",
    "snakemake --workflow-profile workflow/profiles/slurm --configfile config/paper.yaml":
        "needs the network (Materials Project), a SLURM cluster and GPUs; its DAG at 4,186 structures "
        "is built in test_workflow.py::test_paper_config_dag_is_chunked",
}


def readme_commands() -> list[str]:
    """The lines of the README's ``bash`` code blocks and the commands in the first column of its
    tables (the table of configs)."""
    text = README.read_text()
    cmds: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                cmds.append(line)
    for row in re.findall(r"^\| `([^`]+)` \|", text, re.M):  # command tables: the first column
        if re.match(r"(snakemake|\.venv/bin/|\./scripts/|liflow-screen|python) ", row):
            cmds.append(row)
    return list(dict.fromkeys(cmds))


def test_every_readme_command_is_run_or_excluded_with_a_reason() -> None:
    cmds = readme_commands()
    assert DEFAULT in cmds and OWN in cmds and len(cmds) >= 7, cmds
    unknown = [c for c in cmds if c not in RUN_HERE and c not in EXCLUDED]
    assert not unknown, f"README commands with neither a test nor a reason here: {unknown}"
    stale = [c for c in list(RUN_HERE) + list(EXCLUDED) if c not in cmds]
    assert not stale, f"commands listed here but gone from the README: {stale}"
    # the quick start's set-up half is what CI runs before the tests (.ci/run)
    assert f"{SETUP} && .venv/bin/python -m pytest -q" in (REPO / ".ci" / "run").read_text()


def checkout_copy(dest: Path) -> Path:
    """This checkout's files (tracked and untracked, not ignored) in ``dest``, with ``.venv`` linked
    to this checkout's environment."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    for f in files:
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f, follow_symlinks=False)
    (dest / ".venv").symlink_to(REPO / ".venv")
    return dest


def run_verbatim(cmd: str, cwd: Path, timeout: int) -> tuple[subprocess.CompletedProcess, float]:
    """``cmd`` exactly as the README writes it, in bash, with the environment's bin on PATH (as after
    ``source .venv/bin/activate``) and no model cache."""
    cache = cwd / "empty-cache"
    cache.mkdir(exist_ok=True)
    env = {**os.environ, "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}", "LIFLOW_SCREEN_CACHE": str(cache)}
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - t0


@pytest.mark.timeout(1800)
def test_default_command(tmp_path) -> None:
    """The quick start's workflow command, verbatim: the default screening of 12 panel compounds with the
    shipped models. Its tables agree with tests/golden/default as far as they are reproducible across
    CPUs (conftest.assert_golden); every ranked row has a rank interval that holds its rank. The
    README's table form (``snakemake --cores 2``) is the same invocation with the environment on PATH."""
    d = checkout_copy(tmp_path / "checkout")
    cmd = DEFAULT.split(" && ", 1)[1]  # the setup half is CI's (.ci/run), checked above
    proc, wall = run_verbatim(cmd, d, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = d / "results" / "reports"
    ranking = pd.read_csv(reports / "ranking.csv")
    assert len(ranking) == 12 and (ranking["status"] == "ranked").sum() >= 5
    ranked = ranking[ranking["status"] == "ranked"]
    assert ((ranked["rank_low"] <= ranked["rank"]) & (ranked["rank"] <= ranked["rank_high"])).all()
    assert (ranking["n_replicas"] == 1).all()
    assert_golden("default", reports)
    print(f"default workflow: {wall:.0f} s")


def _tiny_trajectories(d: Path) -> None:
    """A trajectories.csv with two synthetic LiCl trajectories (8-atom rock salt, extxyz, 15 fs apart
    as config/own-trajectories.yaml says, 100 frames): Li hops at 1400 K, only vibrates at 650 K."""
    from ase.build import bulk
    from ase.io import write

    rng = np.random.default_rng(0)
    atoms = bulk("LiCl", "rocksalt", a=5.13, cubic=True)
    li = atoms.numbers == 3
    lines = ["id,path,temperature_K,frame_dt_fs"]
    for T, hop in ((650, 0.0), (1400, 0.08)):
        frames, pos = [], atoms.positions.copy()
        for _ in range(100):  # 1.5 ps: Δτ = 67 frames plus 33 pair origins
            drift = np.zeros_like(pos)
            drift[li] = rng.normal(0.0, hop, (li.sum(), 3)) if hop else 0.0
            pos = pos + drift
            a = atoms.copy()
            a.positions = pos + rng.normal(0.0, 0.05 * (T / 650) ** 0.5, pos.shape)
            frames.append(a)
        write(d / f"LiCl_{T}K.extxyz", frames, format="extxyz")
        lines.append(f"LiCl,LiCl_{T}K.extxyz,{T},15")
    (d / "trajectories.csv").write_text("\n".join(lines) + "\n")


@pytest.mark.timeout(1800)
def test_own_trajectories_command(tmp_path) -> None:
    """The README's own-trajectories command, verbatim, on a tiny trajectories.csv in the working
    folder: the config as shipped (trajectories -> dataset -> P + C -> rollouts -> reports)."""
    d = checkout_copy(tmp_path / "checkout")
    _tiny_trajectories(d)
    proc, wall = run_verbatim(OWN, d, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = d / "results-own"
    diff = pd.read_csv(res / "reports" / "diffusivity.csv")
    assert set(diff["source"]) == {"md", "liflow:adaptive"} and set(diff["id"]) == {"LiCl"}
    an = pd.concat([pd.read_parquet(f) for f in (res / "analysis").rglob("*.parquet")])
    assert set(an.loc[an["source"] == "liflow:adaptive", "temperature"]) == {650, 900, 1150, 1400}
    print(f"own-trajectories workflow: {wall:.0f} s")
