"""Entry script of rule pgd_counterfactuals: the PGD control with each guided counterfactual's mask and L2 budget."""

from cfaudit.pgd import run_pgd
from cfaudit.provenance import now, snakemake_inputs, write_provenance
from cfaudit.runtime import job_device, script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]):
    started = now()
    device = job_device(smk.config["compute"], smk.threads)  # not a param: no rerun on a device change
    df = run_pgd(classifier_spec=smk.input.classifier, guided_index=smk.input.guided, pack=smk.input.pack,
                 pack_index=smk.input.index, out_index=smk.output.index, out_dir=smk.output.images,
                 cfg=smk.params.pgd, device=device,
                 batch_size=int(smk.config["metrics"]["judges"]["pgd"]["batch_size"]))
    write_provenance(smk.output.index, snakemake_inputs(smk), {"metrics.judges.pgd": smk.params.pgd},
                     rule="pgd_counterfactuals", started=started,
                     extra={"mean_l2_budget": float(df["l2_budget"].mean()), "n": len(df)})
