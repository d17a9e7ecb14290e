"""Entry script of rule shortcut_pack: the audited classifier's pack with the planted cue in its train images."""

import numpy as np
import pandas as pd

from cfaudit.data.shortcut import assign_cues, cue_summary, shortcut_pack
from cfaudit.files import atomic_output, write_csv
from cfaudit.provenance import now, write_job_provenance
from cfaudit.runtime import script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    started = now()
    p = smk.params
    index, metadata = pd.read_csv(smk.input.index), pd.read_csv(smk.input.metadata)
    cues = assign_cues(index, pd.read_csv(smk.input.split), metadata, p.shortcut, p.seed)
    pack = shortcut_pack(np.load(smk.input.pack), index, cues, metadata, seed=p.seed, synth_size=p.synth_size,
                         hair_count=p.shortcut["hair_count"], resize_mode=p.resize["mode"], resample=p.resize["resample"])
    with atomic_output(smk.output.pack) as tmp, open(tmp, "wb") as fh:
        np.save(fh, pack)
    write_csv(cues, smk.output.cues)
    summary = cue_summary(cues)
    write_csv(summary, smk.output.summary)
    write_job_provenance(smk, [smk.output.cues], started, extra={"re-rendered images": int((cues["had_cue"] != cues["has_cue"]).sum())})
    log.info("planted cue %r: %d train images re-rendered\n%s", p.shortcut["cue"],
             int((cues["had_cue"] != cues["has_cue"]).sum()), summary.to_string(index=False))
