"""Entry script of rule place_classifier_weights: copy or download the weights, verify their sha256."""

from cfaudit.classifiers import place_weights
from cfaudit.config import run_settings
from cfaudit.runtime import script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    src = run_settings(smk.params.source, smk.config, f"classifier.{smk.wildcards.kind}")
    place_weights(smk.output.weights, local_path=src["local_path"], url=src["url"], sha256=src["sha256"],
                  retries=src["retries"], timeout_s=src["timeout_s"], what=f"classifier.{smk.wildcards.kind}", log=log)
