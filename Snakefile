# liflow-screen: MP/embedded structures -> reference MD -> Parquet dataset -> LiFlow training
# -> batched rollouts -> diffusivity / ranking reports. Rules are thin: each calls the package CLI.
import json
import os
import sys
from pathlib import Path

import yaml
from snakemake.utils import min_version, validate

min_version("8.20")


configfile: "config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")

# Rules call the `liflow-screen` CLI. Without conda, find it next to the Python running Snakemake
# (the venv need not be activated); with --use-conda each rule's environment provides it.
from snakemake.settings.types import DeploymentMethod

if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    shell.prefix(f'export PATH="{os.path.dirname(sys.executable)}:$PATH"; ')

# Cross-key checks and defaults from the same schema, via the package (one config schema).
from liflow_screen import config as _lcfg
from liflow_screen.errors import ConfigError as _ConfigError

try:
    CFG = _lcfg.validate(config)
except _ConfigError as _exc:
    raise WorkflowError(f"config: {_exc}")

R = CFG["results_dir"]
TEMPS = [int(round(t)) for t in CFG["md"]["temperatures"]]
ROLL_TEMPS = [int(round(t)) for t in _lcfg.rollout_temperatures(CFG)]
VARIANTS = CFG["train"]["variants"]
PRE = CFG["pretrained"]
# "published": the authors' imported Propagator (+ Corrector), screened without training.
PUBLISHED = ["published"] if PRE["propagator"] else []
# Rollout variants: the published models and every trained Propagator, plus "<name>-noC"
# (no Corrector) when ablated.
NO_CORRECTOR = "-noC"
ROLL_VARIANTS = (
    PUBLISHED
    + VARIANTS
    + (
        [v + NO_CORRECTOR for v in PUBLISHED + VARIANTS if v != "regressor"]
        if CFG["rollout"]["ablate_corrector"] and CFG["rollout"]["corrector"]
        else []
    )
)
USE_SELECTOR = CFG["rollout"]["prior_selection"] == "selector"

# The resolved config every rule reads; rewritten only when it changes so mtimes stay put.
RUNCFG = f"{R}/config.resolved.yaml"
_text = yaml.safe_dump(CFG, sort_keys=True)
Path(R).mkdir(parents=True, exist_ok=True)
if not Path(RUNCFG).exists() or Path(RUNCFG).read_text() != _text:
    Path(RUNCFG).write_text(_text)


include: "workflow/rules/common.smk"
include: "workflow/rules/structures.smk"
include: "workflow/rules/md.smk"
include: "workflow/rules/dataset.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/rollout.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        f"{R}/reports/ranking.csv",
        f"{R}/reports/metrics.csv",
    default_target: True
