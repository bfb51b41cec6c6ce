"""End to end: the DEFAULT workflow (``config.yaml``: published-model screening of the validation
panel), shrunk to three structures by a small overlay config.

The overlay keeps every stage and setting of the default (shipped published models, CHGNet
relaxation, pilot prior selection, rollouts at the default's four temperatures, kinisi, censored
Arrhenius, ranking, Spearman report) and changes only the size: two panel members, one fast
(Li3N, 1.2e-3 S/cm) and one slow (Li4P2S6, 1.6e-10 S/cm), in cells >= 5 Å wide, fewer relaxation
and rollout steps; plus LiBr from a CIF beside the panel (``structures.path``), whose Br lies
outside the published models' element table. Offline: the model cache points at an empty folder,
so the shipped copies are what resolves.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, assert_golden

pytestmark = pytest.mark.slow
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
FAST, SLOW, OUTSIDE = "panel-Li3N", "panel-Li4P2S6", "LiBr"
OVERLAY = {
    "run_name": "test-default",
    "structures": {"panel_ids": [FAST, SLOW], "path": "own", "min_width": 5.0},
    "md": {"relax_steps": 5},
    "rollout": {"n_steps": 12, "pilot_steps": 3},
    "analysis": {"kinisi_n_dt": 10, "kinisi_samples": 300},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("wf_default")
    shutil.copy(REPO / "config.yaml", d / "config.yaml")  # the default, exactly as shipped
    (d / "over.yaml").write_text(yaml.safe_dump(OVERLAY))
    (d / "own").mkdir()
    shutil.copy(REPO / ".test" / "tiny" / "LiBr.cif", d / "own" / "LiBr.cif")
    cache = d / "empty-cache"
    cache.mkdir()
    env = {**os.environ, "LIFLOW_SCREEN_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(d), "--configfile", "config.yaml", "over.yaml",
           "--cores", "2"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=d)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return d / "results", time.perf_counter() - t0


def test_default_config_is_the_published_panel_screening():
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    assert cfg["structures"]["source"] == "panel" and len(cfg["structures"]["panel_ids"]) >= 12
    assert cfg["pretrained"] == {"propagator": "P_universal", "corrector": "C_universal", "download": False}
    assert cfg["train"]["variants"] == [] and cfg["md"]["max_structures"] == 0
    assert cfg["rollout"]["prior_selection"] == "pilot" and len(cfg["rollout"]["temperatures"]) == 4
    assert FAST in cfg["structures"]["panel_ids"] and SLOW in cfg["structures"]["panel_ids"]


def test_default_workflow_end_to_end(run):
    res, wall = run
    # the shipped models ran: their SHA-256, as the run's reports record them, are the shipped ones
    shipped = json.loads((REPO / "src" / "liflow_screen" / "data" / "models" / "PROVENANCE.json").read_text())
    prov = json.loads((res / "reports" / "ranking.provenance.json").read_text())
    assert prov["models"]["published/propagator.pt"]["sha256"] == shipped["models"]["P_universal"]["sha256"]
    assert prov["models"]["published/corrector.pt"]["sha256"] == shipped["models"]["C_universal"]["sha256"]
    assert prov["config"]["structures"]["source"] == "panel" and prov["config"]["train"]["variants"] == []
    assert "versions" in prov and set(prov["literature"]["ids"]) == {FAST, SLOW}
    # no MD, no training
    assert not (res / "train").exists()
    ranking = pd.read_csv(res / "reports" / "ranking.csv").set_index("id")
    assert sorted(ranking.index) == sorted([FAST, SLOW, OUTSIDE])
    assert (ranking["source"] == "liflow:published").all()
    # fast above slow, or the slow one not resolved (bounded)
    fast, slow = ranking.loc[FAST], ranking.loc[SLOW]
    if slow["status"] == "ranked":
        assert fast["status"] == "ranked" and int(fast["rank"]) < int(slow["rank"]), ranking[["rank", "status"]]
    else:
        assert slow["status"] in ("unresolved", "unstable", "non-Arrhenius"), slow["status"]
        assert len(str(slow["reason"])) > 0
    # the structure outside the element table is listed, unranked, with the element named
    out = ranking.loc[OUTSIDE]
    assert out["status"] == "no rollout" and pd.isna(out["rank"])
    assert "Br" in out["reason"] and "element table" in out["reason"], out["reason"]
    # Spearman vs the literature: rows with n (two panel members: n = 2, ρ undefined and said so)
    sp = pd.read_csv(res / "reports" / "spearman.csv")
    lit = sp[sp["comparison"] == "liflow_vs_literature"]
    head = lit[(lit["quantity"] == "sigma_300K_S_cm_rankq") & (lit["subset"] == "all_by_status")]
    assert len(head) == 1
    n_usable = sum(ranking.loc[i, "status"] in ("ranked", "unresolved") for i in (FAST, SLOW))
    assert int(head["n"].iloc[0]) == n_usable
    assert set(lit["temperature_K"]) == {300.0, 600.0, 800.0, 1000.0, 1200.0}
    assert not (sp["comparison"] == "liflow_vs_md").any()  # no MD in the default run
    assert json.loads((res / "reports" / "spearman.provenance.json").read_text())["config_digest"] == prov[
        "config_digest"]
    png = res / "reports" / "spearman_literature.png"
    assert png.stat().st_size > 1000
    assert np.isfinite(wall)
    print(f"default workflow, 3 structures: {wall:.0f} s")


def _dry_run_jobs(tmp: Path, *configfiles: Path) -> set[str]:
    """Job names of a dry run (before the structures checkpoint has run)."""
    proc = subprocess.run([SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(tmp), "--configfile",
                           *map(str, configfiles), "-n"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = proc.stdout.split("Job stats:")[1].split("total")[0]
    return {line.split()[0] for line in stats.splitlines()[3:] if line.strip()}


def test_train_demo_and_default_dags(tmp_path):
    """config/train-demo.yaml is the train-your-own chain (MD, dataset, training); the default and
    config/panel.yaml and config/panel-gpu.yaml train nothing. A --configfile replaces config.yaml
    (nothing of the default leaks into the demo)."""
    demo = _dry_run_jobs(tmp_path / "demo", REPO / "config" / "train-demo.yaml")
    assert {"structures", "dataset", "train_selector", "train_propagator", "train_corrector", "report"} <= demo
    for cfg in (REPO / "config.yaml", REPO / "config" / "panel.yaml", REPO / "config" / "panel-gpu.yaml"):
        jobs = _dry_run_jobs(tmp_path / cfg.stem, cfg)
        assert "structures" in jobs and not {j for j in jobs if j.startswith("train")}, (cfg, jobs)


def test_outputs_agree_with_golden(run):
    """ranking.csv, metrics.csv and diffusivity.csv agree with tests/golden/default-3 as far as they
    are reproducible across CPUs (conftest.assert_golden)."""
    assert_golden("default-3", run[0] / "reports")
