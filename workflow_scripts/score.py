"""Entry script of rule score: results/scores/scores.csv (originals + every generator's counterfactuals)."""

from cfaudit.runtime import resolve_device, script_logging
from cfaudit.scoring import run_scoring

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    compute = smk.params.compute
    device = resolve_device(compute["device"], compute["allow_cpu_fallback"])
    cf_indexes = dict(zip(smk.params.generators, list(smk.input.indexes)))
    run_scoring(smk.input.spec, smk.input.anchors, smk.input.pack_index, smk.input.split, cf_indexes,
                smk.output.scores, smk.params.scoring, device, threads=smk.threads, log=log)
