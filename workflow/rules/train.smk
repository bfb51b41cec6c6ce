rule train_selector:
    input:
        structures=f"{R}/dataset/structures.parquet",
        labels=f"{R}/dataset/labels.parquet",
        frames=f"{R}/dataset/frames",
    output:
        model=f"{R}/train/selector.pt",
        report=f"{R}/train/selector.json",
    log:
        "logs/train/selector.log",
    benchmark:
        "logs/benchmarks/train/selector.tsv"
    conda:
        "../../envs/torch.yaml"
    resources:
        runtime=60,
        mem_mb=4000,
    params:
        config=RUNCFG,
        cfg=lambda w: section("train") + section("dataset"),
        dataset=lambda w, input: os.path.dirname(input.structures),
    shell:
        "python -m liflow_screen train-selector --config {params.config} --dataset {params.dataset} --out {output.model} "
        "--report {output.report} 2> {log}"


FINETUNE = S.train.init_from == "published"
# train.processes > 1: DistributedDataParallel, one process per GPU (or CPU share), under torchrun
TRAIN_LAUNCH = (
    f"torchrun --standalone --nproc_per_node {S.train.processes} -m liflow_screen"
    if S.train.processes > 1
    else "python -m liflow_screen"
)


rule import_model:
    output:
        model=f"{R}/models/published/{{kind}}.pt",
    log:
        "logs/import/{kind}.log",
    wildcard_constraints:
        kind="propagator|corrector",
    conda:
        "../../envs/torch.yaml"
    resources:
        runtime=30,
        mem_mb=4000,
    params:
        config=RUNCFG,
        cfg=lambda w: section("pretrained"),
    shell:
        "python -m liflow_screen import-model --config {params.config} --kind {wildcards.kind} --out {output.model} 2> {log}"


rule train_propagator:
    input:
        structures=f"{R}/dataset/structures.parquet",
        labels=f"{R}/dataset/labels.parquet",
        frames=f"{R}/dataset/frames",
        selector=[f"{R}/train/selector.pt"] if TRAIN_SELECTOR else [],
        init=[f"{R}/models/published/propagator.pt"] if FINETUNE else [],
    output:
        model=f"{R}/train/propagator_{{variant}}/best.pt",
    log:
        "logs/train/propagator_{variant}.log",
    benchmark:
        "logs/benchmarks/train/propagator_{variant}.tsv"
    wildcard_constraints:
        variant="|".join(VARIANTS) or "adaptive",
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        runtime=240,
        mem_mb=32000,
    params:
        config=RUNCFG,
        cfg=lambda w: section("train") + section("dataset"),
        dataset=lambda w, input: os.path.dirname(input.structures),
        out_dir=lambda w, output: os.path.dirname(output.model),
        init=lambda w, input: f"--init-from {input.init}" if input.init else "",
        launch=TRAIN_LAUNCH,
        threads=lambda w, threads: max(1, threads // S.train.processes),
        selector=lambda w, input: (
            f"--selector {input.selector}" if input.selector else ""
        ),
    shell:
        "{params.launch} train --config {params.config} --threads {params.threads} --dataset {params.dataset} {params.selector} "
        "--kind propagator --variant {wildcards.variant} {params.init} --out-dir {params.out_dir} 2> {log}"


rule train_corrector:
    input:
        structures=f"{R}/dataset/structures.parquet",
        labels=f"{R}/dataset/labels.parquet",
        frames=f"{R}/dataset/frames",
        init=[f"{R}/models/published/corrector.pt"] if FINETUNE else [],
    output:
        model=f"{R}/train/corrector/best.pt",
    log:
        "logs/train/corrector.log",
    benchmark:
        "logs/benchmarks/train/corrector.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        runtime=240,
        mem_mb=32000,
    params:
        config=RUNCFG,
        cfg=lambda w: section("train") + section("dataset"),
        dataset=lambda w, input: os.path.dirname(input.structures),
        out_dir=lambda w, output: os.path.dirname(output.model),
        init=lambda w, input: f"--init-from {input.init}" if input.init else "",
        launch=TRAIN_LAUNCH,
        threads=lambda w, threads: max(1, threads // S.train.processes),
    shell:
        "{params.launch} train --config {params.config} --threads {params.threads} --dataset {params.dataset} --kind corrector "
        "--variant corrector {params.init} --out-dir {params.out_dir} 2> {log}"
