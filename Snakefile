# liflow-screen: MP/embedded structures -> reference MD -> Parquet dataset -> LiFlow training
# -> batched rollouts -> diffusivity / ranking reports. Rules are thin: each calls the package CLI.
import json
import os
import sys
from pathlib import Path

import yaml
from snakemake.utils import min_version, validate

min_version("8.20")


# config.yaml is the default run. A config given with --configfile replaces it (it is not merged
# on top of it), so a config's keys are its own plus the schema's defaults; --config KEY=VALUE
# alone overrides keys of config.yaml.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


# defaults are filled by the package (below), after the cross-key rules that need the raw values
validate(config, "workflow/schemas/config.schema.yaml", set_default=False)

# Rules run the package CLI as `python -m liflow_screen`. Without conda: the Python running
# Snakemake (the venv need not be activated). With --use-conda: each rule's env provides the
# libraries and PYTHONPATH points at this checkout's src/, so rules always run the current code
# (the envs do not install the package; no stale snapshot after a code change).
from snakemake.settings.types import DeploymentMethod

if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    shell.prefix(f'export PATH="{os.path.dirname(sys.executable)}:$PATH"; ')
else:
    # braces doubled twice: once for this f-string, once for shell.prefix's own formatting
    shell.prefix(
        f'export PYTHONPATH="{workflow.basedir}/src${{{{PYTHONPATH:+:$PYTHONPATH}}}}"; '
    )

# Cross-key checks and defaults from the same schema, via the package (one config schema), then
# the typed settings every stage builds from the same validated config.
from liflow_screen.core import config as _lcfg
from liflow_screen.core.errors import ConfigError as _ConfigError
from liflow_screen.core.settings import Settings as _Settings

try:
    CFG = _lcfg.validate(config)
except _ConfigError as _exc:
    raise WorkflowError(f"config: {_exc}")
S = _Settings.from_config(CFG)

R = S.results_dir
TEMPS = [int(round(t)) for t in S.md.temperatures]
ROLL_TEMPS = [int(round(t)) for t in S.rollout_temperatures]
VARIANTS = list(S.train.variants)
# "published": the authors' imported Propagator (+ Corrector), screened without training.
PUBLISHED = ["published"] if S.pretrained.propagator else []
# Rollout variants: the published models and every trained Propagator, plus "<name>-noC"
# (no Corrector) when ablated.
NO_CORRECTOR = "-noC"
ROLL_VARIANTS = (
    PUBLISHED
    + VARIANTS
    + (
        [v + NO_CORRECTOR for v in PUBLISHED + VARIANTS if v != "regressor"]
        if S.rollout.ablate_corrector and S.rollout.corrector
        else []
    )
)
USE_SELECTOR = S.rollout.prior_selection == "selector"
USE_LABELS = S.rollout.prior_selection == "labels"
TRAIN_SELECTOR = S.train.prior_classes == "selector"
# The user's own trajectories replace structure collection and the reference MD.
OWN_TRAJECTORIES = S.structures.source == "trajectories"

# The resolved config every rule reads (params.config). Written by Snakemake's onstart hook, which
# runs only in the main process of a run that executes jobs (not in a dry run, --lint, --summary or
# a cluster job's re-parse), and rewritten only when it changes so its mtime stays put.
from snakemake_interface_executor_plugins.settings import ExecMode as _ExecMode

MAIN_PROCESS = workflow.exec_mode == _ExecMode.DEFAULT
RUNCFG = f"{R}/config.resolved.yaml"


onstart:
    _text = yaml.safe_dump(CFG, sort_keys=True)
    if not Path(RUNCFG).exists() or Path(RUNCFG).read_text() != _text:
        Path(R).mkdir(parents=True, exist_ok=True)
        Path(RUNCFG).write_text(_text)


include: "workflow/rules/common.smk"


if OWN_TRAJECTORIES:

    include: "workflow/rules/trajectories.smk"

else:

    include: "workflow/rules/structures.smk"
    include: "workflow/rules/md.smk"


include: "workflow/rules/dataset.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/rollout.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        f"{R}/reports/ranking.csv",
        f"{R}/reports/metrics.csv",
        f"{R}/reports/spearman.csv",
