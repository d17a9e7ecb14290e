"""Entry script of rule split: seeded stratified train / eval split, grouped by lesion/patient when known."""

import json

import pandas as pd

from cfaudit.data.split import grouped_stratified_split, split_report, stratified_split
from cfaudit.files import atomic_write_text, write_csv
from cfaudit.runtime import script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    index = pd.read_csv(smk.input.index)
    truth = pd.read_csv(smk.input.ground_truth, dtype={"group_id": str})
    group_column = json.loads(open(smk.input.label_report).read()).get("group_column")
    groups = index[["image_id"]].merge(truth[["image_id", "group_id"]], on="image_id", how="left")["group_id"]
    if group_column and groups.duplicated().any():
        split = grouped_stratified_split(index, groups, smk.params.eval_fraction, smk.params.seed)
    else:  # every image its own group: the plain stratified split
        split = stratified_split(index, smk.params.eval_fraction, smk.params.seed)
    write_csv(split, smk.output.split)
    report = split_report(split, group_column)
    atomic_write_text(smk.output.report, json.dumps(report, indent=2))
    log.info("split (seed %d): %s", smk.params.seed, report)
