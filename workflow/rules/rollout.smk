rule rollout:
    input:
        manifest=f"{R}/structures/manifest.parquet",
        structures=f"{R}/dataset/structures.parquet",
        selector=[f"{R}/train/selector.pt"] if USE_SELECTOR else [],
        labels=[f"{R}/dataset/labels.parquet"] if USE_LABELS else [],
        propagator=lambda w: propagator_file(w.variant),
        corrector=lambda w: corrector_files(w.variant),
    output:
        status=f"{R}/rollout/{{variant}}/chunk_{{chunk}}/status.parquet",
        priors=f"{R}/rollout/{{variant}}/chunk_{{chunk}}/priors.parquet",
        structures=f"{R}/rollout/{{variant}}/chunk_{{chunk}}/structures.parquet",
        frames=expand(
            f"{R}/rollout/{{{{variant}}}}/chunk_{{{{chunk}}}}/frames_T{{T}}.parquet",
            T=ROLL_TEMPS,
        ),
    log:
        "logs/rollout/{variant}/chunk_{chunk}.log",
    benchmark:
        "logs/benchmarks/rollout/{variant}/chunk_{chunk}.tsv"
    wildcard_constraints:
        chunk=r"\d{5}",
        variant="|".join(sorted(ROLL_VARIANTS, key=len, reverse=True)),
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        runtime=240,
        mem_mb=16000,
    params:
        config=RUNCFG,
        cfg=lambda w: section("rollout"),
        corrector=lambda w, input: (
            f"--corrector {input.corrector}" if input.corrector else ""
        ),
        selector=lambda w, input: (
            f"--selector {input.selector}" if input.selector else ""
        ),
        labels=lambda w, input: f"--labels {input.labels}" if input.labels else "",
        out_dir=lambda w, output: os.path.dirname(output.status),
    shell:
        "python -m liflow_screen rollout --config {params.config} --threads {threads} --manifest {input.manifest} --structures {input.structures} "
        "{params.selector} {params.labels} --propagator {input.propagator} {params.corrector} "
        "--variant {wildcards.variant} --chunk {wildcards.chunk} --out-dir {params.out_dir} 2> {log}"
