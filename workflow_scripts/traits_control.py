"""Entry script of rule traits_planted_shift: the positive control's counterfactuals (embedded data only)."""

from pathlib import Path

import pandas as pd

from cfaudit.counterfactuals import write_index
from cfaudit.runtime import script_logging
from cfaudit.traits.control import planted_shift_counterfactuals

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    p = smk.params
    rows = planted_shift_counterfactuals(
        pd.read_csv(smk.input.anchors), pd.read_csv(smk.input.metadata), Path(smk.output.images),
        seed=p.seed, synth_size=p.synth_size, image_size=p.image_size, resize_mode=p.resize["mode"],
        resample=p.resize["resample"], shift=p.shift)
    write_index(rows.to_dict("records"), smk.output.index)
    log.info("wrote %d planted-shift counterfactuals", len(rows))
