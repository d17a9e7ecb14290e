"""Entry script of rule train_oracle: one independent judge, trained on the train split (never used by a generator)."""

from cfaudit.classifier_training import run_training
from cfaudit.oracles import write_oracle_spec
from cfaudit.provenance import now, snakemake_inputs, write_provenance
from cfaudit.runtime import resolve_device, script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    started = now()
    compute = smk.config["compute"]  # not a param: a device change must not retrain
    device = resolve_device(compute["device"], compute["allow_cpu_fallback"])
    record = run_training(smk.input.pack, smk.input.index, smk.input.split, smk.output.weights, smk.output.heldout,
                          smk.output.history, smk.output.eval_scores, smk.params.recipe, smk.params.seed, device,
                          threads=smk.threads, rule="train_oracle")
    spec = write_oracle_spec(smk.params.name, smk.params.recipe, smk.output.weights, smk.output.heldout, smk.output.spec)
    write_provenance(smk.output.spec, [*snakemake_inputs(smk), smk.output.weights],
                     {"metrics.oracles": {"name": smk.params.name, **smk.params.recipe}, "seed": smk.params.seed},
                     rule="train_oracle", started=started)
    log.info("oracle %s (%s, input %d) trained in %.1f s: held-out AUROC %.4f (n=%d eval, %d malignant)",
             smk.params.name, record["arch"], record["input_size"], record["train_seconds"],
             record.get("auroc", float("nan")), record.get("n_eval", 0), record.get("n_eval_malignant", 0))
