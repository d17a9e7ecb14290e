"""Entry script of rule judges: 'Are the counterfactuals semantic?' (tables, paired differences, verdicts)."""

from cfaudit.judges_stage import make_judges
from cfaudit.provenance import now, write_job_provenance
from cfaudit.runtime import script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]):
    started = now()
    names = list(smk.params.oracles)
    make_judges(smk.input.scores, smk.input.anchors, smk.input.spec, dict(zip(names, smk.input.oracle_scores)),
                dict(zip(names, smk.input.oracle_specs)), smk.input.diagnostics, smk.input.closeness,
                smk.input.realism, smk.input.features, smk.params.generators, smk.params.bootstrap, smk.params.seed,
                smk.params.fd_resamples, smk.output.csv, smk.output.differences, smk.output.md, smk.output.html,
                guided_index_path=smk.input.guided_index[0] if smk.input.guided_index else None)
    write_job_provenance(smk, [smk.output.csv, smk.output.differences, smk.output.md, smk.output.html], started)
