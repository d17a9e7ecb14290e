"""Entry script of rule shortcut_cue_effect: does adding the planted cue raise each classifier's malignant score?"""

import pandas as pd

from cfaudit.classifiers import load_classifier
from cfaudit.files import write_csv
from cfaudit.guided import final_scores
from cfaudit.provenance import now, write_job_provenance
from cfaudit.runtime import script_logging
from cfaudit.traits.shortcut import CUE_PLACEMENTS, cue_effect, cue_pair_images

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    started = now()
    p = smk.params
    cue = p.shortcut["cue"]
    specs = {"audited": smk.input.spec, **dict(zip(p.oracles, smk.input.oracle_specs))}
    # 2 x anchors images per placement: the CPU is enough and gives the same numbers anywhere
    classifiers = {name: load_classifier(spec, "cpu") for name, spec in specs.items()}
    roles = {name: "audited" if name == "audited" else "oracle" for name in specs}
    train_data = {"audited": "shortcut", **p.train_data}
    tables = []
    for placement in CUE_PLACEMENTS[cue]:
        without, with_cue = cue_pair_images(pd.read_csv(smk.input.anchors), pd.read_csv(smk.input.metadata), cue,
                                            seed=p.seed, synth_size=p.synth_size, image_size=p.image_size,
                                            hair_count=p.shortcut["hair_count"], resize_mode=p.resize["mode"],
                                            resample=p.resize["resample"], placement=placement)
        scores = {present: {name: final_scores(clf, images, "cpu").numpy() for name, clf in classifiers.items()}
                  for present, images in ((False, without), (True, with_cue))}
        tables.append(cue_effect(scores[False], scores[True], roles, train_data, resamples=p.bootstrap, seed=p.seed,
                                 level=p.ci_level, placement=placement))
    table = pd.concat(tables, ignore_index=True)
    write_csv(table, smk.output.table)
    write_job_provenance(smk, [smk.output.table], started)
    log.info("cue %r added to %d anchors:\n%s", cue, len(without), table.to_string(index=False))
