rule report:
    input:
        structures=f"{R}/dataset/structures.parquet",
        labels=f"{R}/dataset/labels.parquet",
        md_status=f"{R}/dataset/status.parquet",
        analysis=report_analysis_inputs,
        status=lambda w: rollout_chunk_files("status.parquet"),
        priors=lambda w: rollout_chunk_files("priors.parquet"),
        models=lambda w: rollout_model_files(),
    output:
        ranking=report(
            f"{R}/reports/ranking.csv",
            caption="../report/ranking.rst",
            category="Ranking",
        ),
        metrics=report(
            f"{R}/reports/metrics.csv",
            caption="../report/metrics.rst",
            category="Metrics",
        ),
        prior_classes=f"{R}/reports/prior_classes.csv",
        spearman=report(
            f"{R}/reports/spearman.csv",
            caption="../report/spearman.rst",
            category="Ranking",
        ),
        spearman_plot=report(
            f"{R}/reports/spearman_literature.png",
            caption="../report/spearman_literature.rst",
            category="Ranking",
        ),
        diffusivity=report(
            f"{R}/reports/diffusivity.csv",
            caption="../report/diffusivity.rst",
            category="Ranking",
        ),
        parity=report(
            directory(f"{R}/reports/parity"),
            patterns=["{name}.png"],
            caption="../report/parity.rst",
            category="Parity",
        ),
        arrhenius=report(
            directory(f"{R}/reports/arrhenius"),
            patterns=["{name}.png"],
            caption="../report/arrhenius.rst",
            category="Arrhenius",
        ),
    log:
        "logs/report.log",
    conda:
        "../../envs/analysis.yaml"
    resources:
        runtime=60,
        mem_mb=8000,
    params:
        config=RUNCFG,
        cfg=lambda w: section("analysis"),
        out_dir=lambda w, output: os.path.dirname(output.ranking),
    shell:
        "python -m liflow_screen report --config {params.config} --structures {input.structures} --labels {input.labels} "
        "--analysis {input.analysis} --status {input.md_status} {input.status} --priors {input.priors} "
        "--models {input.models} --out-dir {params.out_dir} 2> {log}"
