"""Entry script of rule anchors: the eval images that get counterfactuals."""

import pandas as pd

from cfaudit.data.split import choose_anchors
from cfaudit.files import write_csv
from cfaudit.runtime import script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    anchors = choose_anchors(pd.read_csv(smk.input.split), smk.params.max_anchors, smk.params.seed)
    anchors = anchors.merge(pd.read_csv(smk.input.index)[["image_id", "png"]], on="image_id", how="left")
    write_csv(anchors, smk.output.anchors)
    log.info("%d anchors (%d malignant)", len(anchors), int(anchors["label"].sum()))
