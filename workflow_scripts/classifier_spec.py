"""Entry script of rule classifier_spec: results/classifier/classifier.json, checked by a strict load."""

from cfaudit.classifiers import write_checked_spec
from cfaudit.provenance import now, snakemake_inputs, write_provenance
from cfaudit.runtime import script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    started = now()
    heldout = smk.input.get("heldout")
    write_checked_spec(smk.params.classifier, smk.input.weights, smk.output.spec, heldout, log=log)
    write_provenance(smk.output.spec, snakemake_inputs(smk), {"classifier": smk.params.classifier},
                     rule="classifier_spec", started=started)
