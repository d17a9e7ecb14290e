"""Entry script of rule train_oracle: one independent judge, trained on the train split (never used by a generator)."""

from cfaudit.classifier_training import run_training
from cfaudit.oracles import check_oracles, oracle_recipe, write_oracle_spec
from cfaudit.provenance import now, snakemake_inputs, write_provenance
from cfaudit.runtime import job_device, script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    started = now()
    entry = check_oracles(smk.config)[smk.params.name]
    recipe = {**smk.params.recipe, "eval_batch_size": oracle_recipe(smk.config, entry)["eval_batch_size"]}
    device = job_device(smk.config["compute"], smk.threads)  # not a param: a device change reruns nothing
    record = run_training(smk.input.pack, smk.input.index, smk.input.split, smk.output.weights, smk.output.heldout,
                          smk.output.history, smk.output.eval_scores, recipe, smk.params.seed, device,
                          threads=smk.threads, rule="train_oracle")
    spec = write_oracle_spec(smk.params.name, smk.params.recipe, smk.output.weights, smk.output.heldout, smk.output.spec)
    write_provenance(smk.output.spec, [*snakemake_inputs(smk), smk.output.weights],
                     {"metrics.oracles": {"name": smk.params.name, **smk.params.recipe}, "seed": smk.params.seed},
                     rule="train_oracle", started=started)
    log.info("oracle %s (%s, input %d) trained in %.1f s: held-out AUROC %.4f (n=%d eval, %d malignant)",
             smk.params.name, record["arch"], record["input_size"], record["train_seconds"],
             record.get("auroc", float("nan")), record.get("n_eval", 0), record.get("n_eval_malignant", 0))
