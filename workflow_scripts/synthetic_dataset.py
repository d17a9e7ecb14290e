"""Entry script of rule synthetic_dataset: generate the embedded dataset."""

from cfaudit.data.synthetic import generate_dataset
from cfaudit.files import write_csv
from cfaudit.runtime import script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    p = smk.params.synthetic
    table = generate_dataset(smk.output.images, p["n_images"], p["malignant_fraction"], p["size"], smk.params.seed)
    write_csv(table, smk.output.metadata)
    log.info("generated %d images (%d malignant) at %d px", len(table), int(table["label"].sum()), p["size"])
