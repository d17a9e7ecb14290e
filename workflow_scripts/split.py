"""Entry script of rule split: seeded stratified train / eval split."""

import pandas as pd

from cfaudit.data.split import stratified_split
from cfaudit.files import write_csv
from cfaudit.runtime import script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    split = stratified_split(pd.read_csv(smk.input.index), smk.params.eval_fraction, smk.params.seed)
    write_csv(split, smk.output.split)
    log.info("split (seed %d): %s", smk.params.seed, split.groupby(["split", "label"]).size().to_dict())
