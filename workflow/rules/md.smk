rule md:
    input:
        manifest=f"{R}/structures/manifest.parquet",
    output:
        structures=f"{R}/md/chunk_{{chunk}}/structures.parquet",
        status=f"{R}/md/chunk_{{chunk}}/status.parquet",
        frames=expand(f"{R}/md/chunk_{{{{chunk}}}}/frames_T{{T}}.parquet", T=TEMPS),
    log:
        "logs/md/chunk_{chunk}.log",
    benchmark:
        "logs/benchmarks/md/chunk_{chunk}.tsv"
    wildcard_constraints:
        chunk=r"\d{5}",
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        runtime=2880,
        mem_mb=16000,
    params:
        config=RUNCFG,
        cfg=lambda w: section("md"),
        outdir=lambda w, output: os.path.dirname(output.status),
    shell:
        "python -m liflow_screen md --config {params.config} --threads {threads} --manifest {input.manifest} --chunk {wildcards.chunk} "
        "--out-dir {params.outdir} 2> {log}"
