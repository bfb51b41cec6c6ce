"""Rank stability across seeds (or machines): compare the ranking.csv of several runs of one config.

    python bench/rank_stability.py --label after results_s0/reports results_s1/reports results_s2/reports

For every pair of runs: statuses that agree, Kendall τ over the rows ranked in both, the largest rank
change; over all runs: the compounds whose status agrees in every run, and whether each run's rank lies
inside the other runs' rank intervals (rank_low-rank_high, where the runs have them). Per run: ρ of
the ranking quantity against the literature (spearman.csv: bootstrap and, where present, posterior
intervals) and how many ranked rows' 95 % σ(300 K) interval holds the literature σ(RT). Writes
results/bench/rank_stability_<label>.json and prints it. Statistics only: no rollout is run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import pandas as pd
from scipy import stats

from liflow_screen.structures.panel import literature_table


def summary(reports: list[Path]) -> dict:
    """The comparison of the runs whose report folders are ``reports``."""
    rk = [pd.read_csv(r / "ranking.csv").set_index("id") for r in reports]
    sp = [pd.read_csv(r / "spearman.csv") for r in reports]
    lit = literature_table().set_index("id")["sigma_rt_S_cm"]
    ids = sorted(set.intersection(*(set(r.index) for r in rk)))
    pairs = []
    for (i, a), (j, b) in itertools.combinations(enumerate(rk), 2):
        both = [k for k in ids if a.loc[k, "status"] == "ranked" == b.loc[k, "status"]]
        tau = stats.kendalltau(a.loc[both, "rank"], b.loc[both, "rank"]).statistic if len(both) >= 2 else math.nan
        pairs.append({"runs": [i, j], "status_agree": int(sum(a.loc[k, "status"] == b.loc[k, "status"] for k in ids)),
                      "n_ranked_both": len(both), "kendall_tau": float(tau),
                      "max_rank_change": int((a.loc[both, "rank"] - b.loc[both, "rank"]).abs().max()) if both else 0})
    agree_all = [k for k in ids if len({r.loc[k, "status"] for r in rk}) == 1]
    inside, checked = 0, 0
    for (i, a), (j, b) in itertools.permutations(enumerate(rk), 2):
        if "rank_low" not in b.columns:
            continue
        for k in ids:
            if a.loc[k, "status"] == "ranked" == b.loc[k, "status"]:
                checked += 1
                inside += int(b.loc[k, "rank_low"] <= a.loc[k, "rank"] <= b.loc[k, "rank_high"])
    per_run = []
    for r, s, path in zip(rk, sp, reports):
        row = s[(s["quantity"] == "sigma_300K_S_cm_rankq") & (s["subset"] == "all_by_status")]
        ranked = r[r["status"] == "ranked"]
        held = [k for k in ranked.index if k in lit.index
                and ranked.loc[k, "sigma_300K_S_cm_low"] <= lit[k] <= ranked.loc[k, "sigma_300K_S_cm_high"]]
        per_run.append({
            "reports": str(path), "n_ranked": int(len(ranked)),
            "statuses": {k: str(r.loc[k, "status"]) for k in ids},
            "ranks": {k: (str(r.loc[k, "rank_text"]) if "rank_text" in r.columns else str(int(r.loc[k, "rank"])))
                      for k in ranked.index},
            "rho_rankq_all": None if row.empty else {c: float(row[c].iloc[0]) for c in
                                                     ("rho", "rho_low", "rho_high", "rho_post_low", "rho_post_high", "n")
                                                     if c in row.columns},
            "literature_inside_sigma_interval": f"{len(held)} of {len(ranked)}", "held": held,
        })
    return {"runs": [str(r) for r in reports], "compounds": len(ids), "status_agree_all_runs": len(agree_all),
            "status_disagree": [k for k in ids if k not in agree_all], "pairs": pairs,
            "rank_inside_other_runs_interval": f"{inside} of {checked}" if checked else "no intervals",
            "per_run": per_run}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", type=Path, help="report folders (each with ranking.csv, spearman.csv)")
    ap.add_argument("--label", required=True, help="name of the comparison (output file suffix)")
    ap.add_argument("--out", type=Path, default=Path("results/bench"))
    a = ap.parse_args()
    res = summary(a.reports)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"rank_stability_{a.label}.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
