"""End to end: screening with the published universal models (``.test/pretrained/config.yaml``).

A few embedded structures (one holding Nb, outside the published element table), short CHGNet
validation MD, pilot prior selection, fine-tuning of the published models on that MD, rollouts of
both, reports. Offline, with an empty model cache: the universal models resolve to the copies
shipped with the package.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, assert_golden
from liflow_screen.io import schema
from liflow_screen.flow import published as pub
from liflow_screen.flow.training import flow_meta

pytestmark = pytest.mark.slow
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("wf_pretrained")
    (d / "empty-cache").mkdir()
    env = {**os.environ, "LIFLOW_SCREEN_CACHE": str(d / "empty-cache")}
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(d), "--configfile",
           str(REPO / ".test" / "pretrained" / "config.yaml"), "--cores", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return d / "results"


def test_published_and_fine_tuned_screening(run) -> None:
    res = run
    ranking = pd.read_csv(res / "reports" / "ranking.csv").set_index("id")
    assert sorted(ranking.index) == ["emb-Li3N", "emb-LiCl", "emb-LiF", "emb-LiNbO3"]
    assert ranking.loc["emb-LiNbO3", "status"] == "no rollout"
    assert ranking.loc["emb-LiNbO3", "reason"].startswith("unsupported_element: element Nb not in the element table")
    assert pd.isna(ranking.loc["emb-LiNbO3", "rank"])
    # every rollout of the covered structures completed, for both variants
    for variant in ("published", "adaptive"):
        st = pd.concat([schema.read_df(f, "status") for f in (res / "rollout" / variant).glob("*/status.parquet")])
        ok = st[st["id"] != "emb-LiNbO3"]
        assert set(ok["status"]) == {"ok"} and (ok["n_frames"] == 5).all(), variant
        assert set(st.loc[st["id"] == "emb-LiNbO3", "status"]) == {"unsupported_element"}
    # metrics.csv: published and fine-tuned side by side at every temperature
    m = pd.read_csv(res / "reports" / "metrics.csv")
    assert sorted(zip(m["temperature"], m["model"])) == [(800, "adaptive"), (800, "published"),
                                                        (1200, "adaptive"), (1200, "published")]
    by_t = m.set_index(["temperature", "model"])
    assert (by_t.loc[1200, "n"] == 1).all() and by_t.loc[1200, "log_msd_li_mae"].notna().all()
    # rollouts at 800 K have no MD to compare with: n = 0, said so, no numbers
    assert (by_t.loc[800, "n"] == 0).all() and by_t.loc[800, "log_msd_li_mae"].isna().all()
    assert by_t.loc[800, "note"].str.contains("no reference MD").all()
    # the prior class of every rollout came from its pilot; compared with the MD labels
    pri = pd.concat([schema.read_df(f, "priors") for f in (res / "rollout" / "published").glob("*/priors.parquet")])
    assert set(pri["method"]) == {"pilot"} and pri["pilot_rate_li"].notna().all() and pri["frame_slow"].all()
    agree = pd.read_csv(res / "reports" / "prior_classes.csv")
    assert set(agree["method"]) == {"pilot"} and (agree["n"] == 2).all()
    # the fine-tuned models start from the imported published weights, recorded with their source
    for kind, path in (("propagator", "train/propagator_adaptive/best.pt"), ("corrector", "train/corrector/best.pt")):
        meta = flow_meta(res / path)
        src = meta["fine_tuned_from"]["imported_from"]
        name = {"propagator": "P_universal", "corrector": "C_universal"}[kind]
        assert src["sha256"] == pub.PUBLISHED[name].sha256 and src["file"].endswith(f"{name}.ckpt")
        assert meta["hparams"]["n_elements"] == 77 and meta["prior"] == flow_meta(res / f"models/published/{kind}.pt")["prior"]
    # spearman.csv: LiFlow vs the MD per temperature and variant (Table 1's ρ), n as in metrics.csv
    sp = pd.read_csv(res / "reports" / "spearman.csv")
    md_rows = sp[sp["comparison"] == "liflow_vs_md"]
    assert sorted(zip(md_rows["temperature_K"], md_rows["source"])) == [
        (800, "liflow:adaptive"), (800, "liflow:published"), (1200, "liflow:adaptive"), (1200, "liflow:published")]
    assert (md_rows.set_index("temperature_K").loc[1200, "n"] == 1).all()
    assert not (sp["comparison"] == "liflow_vs_literature").any()  # embedded ids: no panel compound


def test_outputs_agree_with_golden(run):
    """ranking.csv, metrics.csv and diffusivity.csv agree with tests/golden as far as they are
    reproducible across CPUs (conftest.assert_golden)."""
    assert_golden("pretrained", run / "reports")
