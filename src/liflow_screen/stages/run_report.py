"""Stage ``report``: metrics.csv, ranking.csv, prior_classes.csv, diffusivity.csv, spearman.csv and
plots from the analysis, status and priors tables given. Needs no torch (its conda env has none).

Every output is written atomically and carries provenance (a ``*.provenance.json`` next to
each CSV, PNG text metadata).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.settings import Settings
from ..io import schema
from ..io.files import atomic_path, provenance, sha256_of, write_json_atomic
from ..report.metrics import compute_metrics, prior_agreement
from ..report.plots import arrhenius_plots, literature_plot, parity_plots
from ..report.ranking import compute_ranking, diffusivity_by_source, ranking_source
from ..report.spearman import SPEARMAN_COLUMNS, spearman_vs_literature, spearman_vs_md
from ..report.tables import load_priors, load_status, load_structures, read_analysis


def _write_csv(df: pd.DataFrame, path: Path, prov: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    write_json_atomic(path.with_name(path.stem + ".provenance.json"), prov)


def screened_literature(ranking: pd.DataFrame) -> pd.DataFrame:
    """The validation panel's literature values (``structures.panel.literature_table``) of the
    structures in ``ranking`` (matched by id); empty when none of them is a panel compound."""
    from ..structures.panel import literature_table

    lit = literature_table()
    ids = set(ranking["id"].astype(str)) if len(ranking) else set()
    return lit[lit["id"].isin(ids)].reset_index(drop=True)


def model_records(models: Sequence[str | os.PathLike[str]] | None) -> dict[str, dict[str, Any]]:
    """``<folder>/<file>`` (e.g. ``published/propagator.pt``) -> {path, sha256} of the flow-model
    checkpoints the rollouts used."""
    return {f"{Path(m).parent.name}/{Path(m).name}": {"path": str(m), "sha256": sha256_of(m)} for m in (models or [])}


def run(
    analysis_table: pd.DataFrame | str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    structures_table: pd.DataFrame | str | os.PathLike[str],
    status_table: pd.DataFrame | str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    priors_table: pd.DataFrame | str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    out_dir: str | os.PathLike[str],
    settings: Settings | None = None,
    variant: str | None = None,
    metric_splits: Sequence[str] = ("test",),
    labels_table: pd.DataFrame | str | os.PathLike[str] | None = None,
    models: Sequence[str | os.PathLike[str]] | None = None,
) -> dict[str, Any]:
    """Write metrics.csv, ranking.csv, prior_classes.csv, diffusivity.csv (D*(T) and E_A per
    structure and trajectory source: MD beside each LiFlow variant), spearman.csv (+ provenance
    JSON), parity/*.png, arrhenius/*.png and spearman_literature.png.

    spearman.csv (:mod:`report.spearman`): LiFlow vs the literature σ(RT) over the screened
    validation-panel compounds (σ(target T) median and ranking quantity, D* per temperature; every
    row by its status and resolved rows only), and LiFlow vs reference MD per temperature (Table 1's
    ρ of log MSD) wherever MD exists; each with n and a bootstrap 95 % interval. ``models``: the
    flow-model checkpoints the rollouts used; their SHA-256 go into every provenance record.

    Inputs are DataFrames or paths (analysis Parquet files, the STRUCTURES Parquet, STATUS and
    PRIORS Parquet files, the dataset's LABELS). ``settings``: the run's (``analysis.top_n``,
    ``analysis.target_temperature``, ``analysis.metric_tau_ps``, ``dataset.delta_tau_ps``, ``seed``);
    None = the schema defaults. Everything is computed before the first file is
    written; each file is atomic. Returns the written paths.
    """
    settings = settings if settings is not None else Settings.defaults()
    acfg = settings.analysis
    df = read_analysis(analysis_table)
    structs = load_structures(structures_table)
    status = load_status(status_table)
    priors = load_priors(priors_table)
    labels = (labels_table if isinstance(labels_table, pd.DataFrame) or labels_table is None
              else schema.read_df(labels_table, "labels"))
    target_T = acfg.target_temperature
    metrics = compute_metrics(df, status, metric_splits, tau_ps=acfg.metric_tau_ps,
                              delta_tau_ps=settings.dataset.delta_tau_ps)
    src = ranking_source(df, variant)
    ranking, fits = compute_ranking(df, structs, status, priors[priors["source"] == src] if len(priors) else None,
                                    target_T, variant, seed=settings.seed)
    by_source = diffusivity_by_source(df, structs, status, target_T)
    agreement = prior_agreement(priors, labels if labels is not None else pd.DataFrame())
    literature = screened_literature(ranking)
    draws = {sid: f["sigma_draws"] for sid, f in fits.items() if "sigma_draws" in f}
    parts = [spearman_vs_literature(ranking, literature, target_T=target_T, seed=settings.seed, sigma_draws=draws)
             if len(literature) and len(ranking) else pd.DataFrame(columns=SPEARMAN_COLUMNS),
             spearman_vs_md(df, status, metric_splits, tau_ps=acfg.metric_tau_ps,
                            delta_tau_ps=settings.dataset.delta_tau_ps, seed=settings.seed)]
    parts = [p for p in parts if len(p)]
    spearman = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=SPEARMAN_COLUMNS)
    out = Path(out_dir)
    prov = provenance(settings, stage="report", n_trajectories=int(len(df)), n_structures=int(len(ranking)),
                      metric_splits=list(metric_splits), target_temperature_K=target_T,
                      prediction_source=str(ranking["source"].iloc[0]) if len(ranking) else None,
                      models=model_records(models),
                      literature={"source": "liflow_screen/data/panel.yaml",
                                  "ids": literature["id"].tolist()})
    _write_csv(metrics, out / "metrics.csv", prov)
    _write_csv(ranking, out / "ranking.csv", prov)
    _write_csv(agreement, out / "prior_classes.csv", prov)
    _write_csv(by_source, out / "diffusivity.csv", prov)
    _write_csv(spearman, out / "spearman.csv", prov)
    for sub in ("parity", "arrhenius"):  # declared outputs, even when there is nothing to plot
        (out / sub).mkdir(parents=True, exist_ok=True)
    parity = parity_plots(df, metrics, out, prov, metric_splits)
    arr = arrhenius_plots(ranking, fits, df, out, prov, acfg.top_n, target_T) if len(ranking) else []
    lit_png = literature_plot(ranking, literature, spearman, out / "spearman_literature.png", prov, target_T)
    return {"metrics": out / "metrics.csv", "ranking": out / "ranking.csv", "prior_classes": out / "prior_classes.csv",
            "diffusivity": out / "diffusivity.csv", "spearman": out / "spearman.csv",
            "parity": parity, "arrhenius": arr, "spearman_plot": lit_png}
