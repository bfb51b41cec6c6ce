rule report:
    input:
        manifest=f"{R}/structures/manifest.parquet",
        structures=f"{R}/dataset/structures.parquet",
        selector=f"{R}/train/selector.pt",
        analysis=report_analysis_inputs,
    output:
        ranking=report(f"{R}/reports/ranking.csv", caption="../report/ranking.rst", category="Ranking"),
        metrics=report(f"{R}/reports/metrics.csv", caption="../report/metrics.rst", category="Metrics"),
        parity=report(directory(f"{R}/reports/parity"), patterns=["{name}.png"],
                      caption="../report/parity.rst", category="Parity"),
        arrhenius=report(directory(f"{R}/reports/arrhenius"), patterns=["{name}.png"],
                         caption="../report/arrhenius.rst", category="Arrhenius"),
    params:
        config=RUNCFG,
        cfg=lambda w: section("analysis"),
        dataset=lambda w, input: os.path.dirname(input.structures),
        analysis_root=lambda w, input: os.path.dirname(os.path.dirname(input.analysis[0])),
        rollout_root=f"{R}/rollout",
        out_dir=lambda w, output: os.path.dirname(output.ranking),
    log:
        "logs/report.log",
    conda:
        "../../envs/analysis.yaml"
    resources:
        runtime=60,
        mem_mb=8000,
    shell:
        "liflow-screen report --config {params.config} --manifest {input.manifest} --dataset {params.dataset} "
        "--selector {input.selector} --analysis-root {params.analysis_root} --rollout-root {params.rollout_root} "
        "--out-dir {params.out_dir} 2> {log}"
