"""Entry script of rule train_classifier: the `trained` classifier kind (stand-in / your own model)."""

from cfaudit.classifier_training import run_training
from cfaudit.config import run_settings
from cfaudit.runtime import job_device, script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    device = job_device(smk.config["compute"], smk.threads)  # not a param: a device change reruns nothing
    record = run_training(
        smk.input.pack, smk.input.index, smk.input.split,
        smk.output.weights, smk.output.heldout, smk.output.history, smk.output.eval_scores,
        run_settings(smk.params.trained, smk.config, "classifier.trained"), smk.params.seed, device, threads=smk.threads,
    )
    log.info("trained %s in %.1f s: held-out AUROC %.4f (n=%d eval, %d malignant)", record["arch"],
             record["train_seconds"], record.get("auroc", float("nan")), record.get("n_eval", 0),
             record.get("n_eval_malignant", 0))
