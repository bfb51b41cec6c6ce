checkpoint structures:
    output:
        manifest=f"{R}/structures/manifest.parquet",
    log:
        "logs/structures.log",
    conda:
        "../../envs/core.yaml"
    resources:
        runtime=60,
        mem_mb=4000,
    params:
        config=RUNCFG,
        cfg=lambda w: section("structures") + section("md") + str(S.seed),
    shell:
        "python -m liflow_screen structures --config {params.config} --out {output.manifest} 2> {log}"
