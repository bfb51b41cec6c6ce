# Bring your own trajectories (structures.source: trajectories): the user's trajectory files,
# listed in the CSV at structures.path, become the structures manifest and one MD-chunk folder,
# in place of the structures and md rules.
import csv as _csv


def trajectory_files(wildcards):
    """The trajectory files the CSV lists (declared, so a changed file re-runs the chain)."""
    table = Path(S.structures.path)
    if not table.is_file():
        return []
    with open(table, newline="") as fh:
        return [
            str(table.parent / r["path"]) for r in _csv.DictReader(fh) if r.get("path")
        ]


checkpoint structures:
    input:
        table=S.structures.path,
        files=trajectory_files,
    output:
        manifest=f"{R}/structures/manifest.parquet",
        structures=f"{R}/md/chunk_00000/structures.parquet",
        status=f"{R}/md/chunk_00000/status.parquet",
        frames=expand(f"{R}/md/chunk_00000/frames_T{{T}}.parquet", T=TEMPS),
    log:
        "logs/trajectories.log",
    conda:
        "../../envs/core.yaml"
    resources:
        runtime=60,
        mem_mb=8000,
    params:
        config=RUNCFG,
        cfg=lambda w: section("structures") + section("md"),
        outdir=lambda w, output: os.path.dirname(output.status),
    shell:
        "python -m liflow_screen trajectories --config {params.config} --trajectories {input.table} "
        "--manifest-out {output.manifest} --out-dir {params.outdir} 2> {log}"
