rule dataset:
    input:
        manifest=f"{R}/structures/manifest.parquet",
        chunks=lambda w: [f"{R}/md/chunk_{chunk_str(k)}/status.parquet" for k in md_chunks()],
        frames=lambda w: [f"{R}/md/chunk_{chunk_str(k)}/{f}" for k in md_chunks()
                          for f in ["structures.parquet"] + [f"frames_T{T}.parquet" for T in TEMPS]],
    output:
        structures=f"{R}/dataset/structures.parquet",
        labels=f"{R}/dataset/labels.parquet",
        status=f"{R}/dataset/status.parquet",
    params:
        config=RUNCFG,
        cfg=lambda w: section("dataset") + section("md"),
        md_root=lambda w, input: os.path.dirname(os.path.dirname(input.chunks[0])),
        out_dir=lambda w, output: os.path.dirname(output.structures),
    log:
        "logs/dataset.log",
    conda:
        "../../envs/core.yaml"
    resources:
        runtime=240,
        mem_mb=16000,
    shell:
        "liflow-screen dataset --config {params.config} --manifest {input.manifest} --md-root {params.md_root} "
        "--out-dir {params.out_dir} 2> {log}"
