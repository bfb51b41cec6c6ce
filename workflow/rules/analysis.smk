rule analyze_reference:
    input:
        structures=f"{R}/dataset/structures.parquet",
        status=f"{R}/md/chunk_{{chunk}}/status.parquet",
        frames=expand(f"{R}/md/chunk_{{{{chunk}}}}/frames_T{{T}}.parquet", T=TEMPS),
    output:
        f"{R}/analysis/md/chunk_{{chunk}}.parquet",
    log:
        "logs/analysis/md/chunk_{chunk}.log",
    wildcard_constraints:
        chunk=r"\d{5}",
    conda:
        "../../envs/analysis.yaml"
    resources:
        runtime=120,
        mem_mb=8000,
    params:
        config=RUNCFG,
        cfg=lambda w: section("analysis"),
    shell:
        "python -m liflow_screen analyze --config {params.config} --structures {input.structures} --frames {input.frames} "
        "--status {input.status} "
        "--source md --out {output} 2> {log}"


rule analyze_rollout:
    input:
        structures=f"{R}/rollout/{{variant}}/chunk_{{chunk}}/structures.parquet",
        status=f"{R}/rollout/{{variant}}/chunk_{{chunk}}/status.parquet",
        frames=expand(
            f"{R}/rollout/{{{{variant}}}}/chunk_{{{{chunk}}}}/frames_T{{T}}.parquet",
            T=ROLL_TEMPS,
        ),
    output:
        f"{R}/analysis/{{variant}}/chunk_{{chunk}}.parquet",
    log:
        "logs/analysis/{variant}/chunk_{chunk}.log",
    wildcard_constraints:
        chunk=r"\d{5}",
        variant="|".join(sorted(ROLL_VARIANTS, key=len, reverse=True)),
    conda:
        "../../envs/analysis.yaml"
    resources:
        runtime=120,
        mem_mb=8000,
    params:
        config=RUNCFG,
        cfg=lambda w: section("analysis"),
    shell:
        "python -m liflow_screen analyze --config {params.config} --structures {input.structures} --frames {input.frames} "
        "--status {input.status} "
        "--source liflow:{wildcards.variant} --out {output} 2> {log}"
