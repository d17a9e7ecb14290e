# cfaudit: audit a melanoma classifier with counterfactual images.
# Stages (one rules file each): data -> classifier -> diffusion / gan / guided counterfactuals -> scoring ->
# metrics, figures, traits and the HTML report.
# Run `snakemake -n` to see the DAG; docs/ documents every rule (methods.md) and config key (configuration.md).
import os
import sys

from snakemake.utils import min_version

min_version("9.0")

# The package lives beside the entry scripts; make it importable here even without `pip install -e .`.
sys.path.insert(0, os.path.join(workflow.basedir, "workflow_scripts"))
from cfaudit.config import validate_config  # noqa: E402


configfile: os.path.join(workflow.basedir, "config.yaml")


validate_config(config)  # snakemake.utils.validate + schema defaults; names any bad key


include: "rules/common.smk"
include: "rules/data.smk"


include: "rules/classifier.smk"
include: "rules/scoring.smk"
include: "rules/counterfactuals.smk"  # one gather rule for the sharded generators
include: "rules/diffusion.smk"
include: "rules/gan.smk"
include: "rules/guided.smk"
include: "rules/traits.smk"
include: "rules/metrics.smk"  # after the stages: it reads their rules
include: "rules/judges.smk"  # oracles, diagnostics, the PGD control; reads the metrics rules
include: "rules/report.smk"  # last: the report's landing page (run identity) takes every deliverable


rule all:
    input:
        ALL_TARGETS,
    default_target: True
