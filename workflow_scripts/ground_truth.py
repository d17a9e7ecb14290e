"""Entry script of rule ground_truth: benign/malignant labels for every usable original."""

import json
from pathlib import Path

import pandas as pd

from cfaudit.data.labels import build_ground_truth
from cfaudit.files import write_csv
from cfaudit.runtime import script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    source = smk.params.source
    if source == "synthetic":
        meta_path, images, kw = smk.input.metadata, smk.input.images, {"id_column": "image_id", "label_column": "label"}
    elif source == "isic":
        images = smk.input.images
        meta_path, kw = str(Path(images) / "metadata.csv"), {"id_column": "isic_id", "label_column": None}
    else:
        f = smk.params.folder
        meta_path, images = smk.input.metadata, smk.input.images
        kw = {"id_column": f["id_column"], "label_column": f["label_column"], "file_column": f["file_column"],
              "diagnosis_column": f["diagnosis_column"], "licence_column": f["licence_column"]}
    metadata = pd.read_csv(meta_path, dtype=str, keep_default_na=False)
    gt, excluded, report = build_ground_truth(metadata, images, source, metadata_name=str(meta_path),
                                              group_column=smk.params.group_column, **kw)
    write_csv(gt, smk.output.table)
    write_csv(excluded, smk.output.excluded)
    Path(smk.output.report).write_text(json.dumps(report, indent=2))
    log.info("ground truth: %s", report)
