checkpoint structures:
    output:
        manifest=f"{R}/structures/manifest.parquet",
    params:
        config=RUNCFG,
        cfg=lambda w: section("structures") + section("md") + str(CFG["seed"]),
    log:
        "logs/structures.log",
    conda:
        "../../envs/core.yaml"
    resources:
        runtime=60,
        mem_mb=4000,
    shell:
        "liflow-screen structures --config {params.config} --out {output.manifest} 2> {log}"
