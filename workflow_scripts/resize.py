"""Entry script of rule resize: working-size PNGs, the packed array, and the quarantine report."""

import pandas as pd

from cfaudit.data.images import resize_dataset
from cfaudit.runtime import script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    r = smk.params.resize
    index, quarantine = resize_dataset(
        pd.read_csv(smk.input.table), smk.output.images, smk.output.pack, smk.output.index, smk.output.quarantine,
        size=smk.params.size, mode=r["mode"], resample=r["resample"], background=r["alpha_background"],
        workers=smk.threads, log=log,
    )
    log.info("resized %d images to %d px (%s); %d quarantined", len(index), smk.params.size, r["mode"], len(quarantine))
