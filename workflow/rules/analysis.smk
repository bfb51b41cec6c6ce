rule analyze_reference:
    input:
        structures=f"{R}/dataset/structures.parquet",
        status=f"{R}/md/chunk_{{chunk}}/status.parquet",
        frames=expand(f"{R}/md/chunk_{{{{chunk}}}}/frames_T{{T}}.parquet", T=TEMPS),
    output:
        f"{R}/analysis/md/chunk_{{chunk}}.parquet",
    params:
        config=RUNCFG,
        cfg=lambda w: section("analysis"),
        dataset=lambda w, input: os.path.dirname(input.structures),
        frames=lambda w, input: os.path.dirname(input.status),
    wildcard_constraints:
        chunk=r"\d{5}",
    log:
        "logs/analysis/md/chunk_{chunk}.log",
    conda:
        "../../envs/analysis.yaml"
    resources:
        runtime=120,
        mem_mb=8000,
    shell:
        "liflow-screen analyze --config {params.config} --dataset {params.dataset} --frames {params.frames} "
        "--source md --out {output} 2> {log}"


rule analyze_rollout:
    input:
        structures=f"{R}/dataset/structures.parquet",
        status=f"{R}/rollout/{{variant}}/chunk_{{chunk}}/status.parquet",
        frames=expand(f"{R}/rollout/{{{{variant}}}}/chunk_{{{{chunk}}}}/frames_T{{T}}.parquet", T=ROLL_TEMPS),
    output:
        f"{R}/analysis/{{variant}}/chunk_{{chunk}}.parquet",
    params:
        config=RUNCFG,
        cfg=lambda w: section("analysis"),
        dataset=lambda w, input: os.path.dirname(input.structures),
        frames=lambda w, input: os.path.dirname(input.status),
    wildcard_constraints:
        chunk=r"\d{5}",
        variant="|".join(sorted(ROLL_VARIANTS, key=len, reverse=True)),
    log:
        "logs/analysis/{variant}/chunk_{chunk}.log",
    conda:
        "../../envs/analysis.yaml"
    resources:
        runtime=120,
        mem_mb=8000,
    shell:
        "liflow-screen analyze --config {params.config} --dataset {params.dataset} --frames {params.frames} "
        "--source liflow:{wildcards.variant} --out {output} 2> {log}"
