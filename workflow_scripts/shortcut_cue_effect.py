"""Entry script of rule shortcut_cue_effect: does adding the planted cue raise each classifier's malignant score?"""

import pandas as pd

from cfaudit.classifiers import load_classifier
from cfaudit.files import write_csv
from cfaudit.guided import final_scores
from cfaudit.provenance import now, write_job_provenance
from cfaudit.runtime import script_logging
from cfaudit.traits.shortcut import cue_effect_table

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    started = now()
    p = smk.params
    cue = p.shortcut["cue"]
    specs = {"audited": smk.input.spec, **dict(zip(p.oracles, smk.input.oracle_specs))}
    # 2 x anchors images per placement: the CPU is enough and gives the same numbers anywhere
    classifiers = {name: load_classifier(spec, "cpu") for name, spec in specs.items()}
    score = {name: (lambda images, clf=clf: final_scores(clf, images, "cpu").numpy()) for name, clf in classifiers.items()}
    roles = {name: "audited" if name == "audited" else "oracle" for name in specs}
    train_data = {"audited": "shortcut", **p.train_data}
    anchors = pd.read_csv(smk.input.anchors)
    render = {"seed": p.seed, "synth_size": p.synth_size, "image_size": p.image_size,
              "hair_count": p.shortcut["hair_count"], "resize_mode": p.resize["mode"], "resample": p.resize["resample"]}
    table = cue_effect_table(score, anchors, pd.read_csv(smk.input.metadata), cue, roles, train_data, render=render,
                             resamples=p.bootstrap, seed=p.seed, level=p.ci_level)
    write_csv(table, smk.output.table)
    write_job_provenance(smk, [smk.output.table], started)
    log.info("cue %r added to %d anchors:\n%s", cue, len(anchors), table.to_string(index=False))
