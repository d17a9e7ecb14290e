"""Entry script of rules gather_scores / gather_oracle_scores: one score table from the per-generator ones."""

import pandas as pd

from cfaudit.files import write_csv
from cfaudit.provenance import now, write_job_provenance
from cfaudit.runtime import script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    started = now()
    table = pd.concat([pd.read_csv(p) for p in smk.input.parts], ignore_index=True)
    write_csv(table, smk.output.scores)
    write_job_provenance(smk, [smk.output.scores], started)
    log.info("%s: %s", smk.output.scores, table.groupby("generator", sort=False).size().to_dict())
