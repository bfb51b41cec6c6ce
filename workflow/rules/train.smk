rule train_selector:
    input:
        structures=f"{R}/dataset/structures.parquet",
        labels=f"{R}/dataset/labels.parquet",
    output:
        model=f"{R}/train/selector.pt",
        report=f"{R}/train/selector.json",
    params:
        config=RUNCFG,
        cfg=lambda w: section("train") + section("dataset"),
        dataset=lambda w, input: os.path.dirname(input.structures),
    log:
        "logs/train/selector.log",
    conda:
        "../../envs/torch.yaml"
    resources:
        runtime=60,
        mem_mb=4000,
    shell:
        "liflow-screen train-selector --config {params.config} --dataset {params.dataset} --out {output.model} "
        "--report {output.report} 2> {log}"


FINETUNE = CFG["train"]["init_from"] == "published"


rule import_model:
    output:
        model=f"{R}/models/published/{{kind}}.pt",
    params:
        config=RUNCFG,
        cfg=lambda w: section("pretrained"),
    wildcard_constraints:
        kind="propagator|corrector",
    log:
        "logs/import/{kind}.log",
    conda:
        "../../envs/torch.yaml"
    resources:
        runtime=30,
        mem_mb=4000,
    shell:
        "liflow-screen import-model --config {params.config} --kind {wildcards.kind} --out {output.model} 2> {log}"


rule train_propagator:
    input:
        structures=f"{R}/dataset/structures.parquet",
        labels=f"{R}/dataset/labels.parquet",
        selector=f"{R}/train/selector.pt",
        init=[f"{R}/models/published/propagator.pt"] if FINETUNE else [],
    output:
        model=f"{R}/train/propagator_{{variant}}/best.pt",
    params:
        config=RUNCFG,
        cfg=lambda w: section("train") + section("dataset"),
        dataset=lambda w, input: os.path.dirname(input.structures),
        out_dir=lambda w, output: os.path.dirname(output.model),
        init=lambda w, input: f"--init-from {input.init}" if input.init else "",
    wildcard_constraints:
        variant="|".join(VARIANTS) or "adaptive",
    log:
        "logs/train/propagator_{variant}.log",
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        runtime=240,
        mem_mb=32000,
    shell:
        "liflow-screen train --config {params.config} --threads {threads} --dataset {params.dataset} --selector {input.selector} "
        "--kind propagator --variant {wildcards.variant} {params.init} --out-dir {params.out_dir} 2> {log}"


rule train_corrector:
    input:
        structures=f"{R}/dataset/structures.parquet",
        labels=f"{R}/dataset/labels.parquet",
        init=[f"{R}/models/published/corrector.pt"] if FINETUNE else [],
    output:
        model=f"{R}/train/corrector/best.pt",
    params:
        config=RUNCFG,
        cfg=lambda w: section("train") + section("dataset"),
        dataset=lambda w, input: os.path.dirname(input.structures),
        out_dir=lambda w, output: os.path.dirname(output.model),
        init=lambda w, input: f"--init-from {input.init}" if input.init else "",
    log:
        "logs/train/corrector.log",
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        runtime=240,
        mem_mb=32000,
    shell:
        "liflow-screen train --config {params.config} --threads {threads} --dataset {params.dataset} --kind corrector "
        "--variant corrector {params.init} --out-dir {params.out_dir} 2> {log}"
