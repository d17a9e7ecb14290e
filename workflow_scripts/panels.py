"""Entry script of rule panels: the seed's per-anchor panels and a contact sheet for one generator."""

from cfaudit.panels import run_panels
from cfaudit.runtime import script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    run_panels(list(smk.input.scores), smk.input.anchors, smk.wildcards.generator, smk.output.panels, smk.output.sheet,
               smk.params.panels, log=log)
