rule dataset:
    input:
        manifest=f"{R}/structures/manifest.parquet",
        md=lambda w: [
            f"{R}/md/chunk_{chunk_str(k)}/{f}"
            for k in md_chunks()
            for f in [layout.STRUCTURES, layout.STATUS]
            + [layout.frames_name(T) for T in TEMPS]
        ],
    output:
        structures=f"{R}/dataset/structures.parquet",
        labels=f"{R}/dataset/labels.parquet",
        status=f"{R}/dataset/status.parquet",
        frames=directory(f"{R}/dataset/frames"),
    log:
        "logs/dataset.log",
    conda:
        "../../envs/core.yaml"
    resources:
        runtime=240,
        mem_mb=16000,
    params:
        config=RUNCFG,
        cfg=lambda w: section("dataset") + section("md"),
        out_dir=lambda w, output: os.path.dirname(output.structures),
    shell:
        "python -m liflow_screen dataset --config {params.config} --manifest {input.manifest} --md-files {input.md} "
        "--out-dir {params.out_dir} 2> {log}"
