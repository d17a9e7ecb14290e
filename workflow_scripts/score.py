"""Entry script of rule score: results/scores/{generator}.csv (the originals, or one generator's counterfactuals)."""

from cfaudit.config import run_settings
from cfaudit.runtime import job_device, script_logging
from cfaudit.names import ORIGINAL
from cfaudit.scoring import run_scoring

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    device = job_device(smk.config["compute"], smk.threads)  # not a param: a device change reruns nothing
    generator = smk.wildcards.generator
    cf_indexes = {} if generator == ORIGINAL else {generator: smk.input.indexes[0]}
    run_scoring(smk.input.spec, smk.input.anchors, smk.input.pack_index, smk.input.split, cf_indexes,
                smk.output.scores, run_settings(smk.params.scoring, smk.config, "classifier.scoring"), device,
                threads=smk.threads, log=log, originals=generator == ORIGINAL, rule=smk.rule)
