"""Entry script of rule train_robust_classifier: the cone projection's adversarially trained auxiliary classifier."""

import json

from cfaudit.classifier_training import run_training
from cfaudit.classifiers import load_classifier
from cfaudit.data.pack import load_pack
from cfaudit.files import atomic_write_text
from cfaudit.oracles import write_trained_spec
from cfaudit.provenance import now, snakemake_inputs, write_provenance
from cfaudit.robust import robust_recipe, robustness_record
from cfaudit.runtime import job_device, script_logging

smk = snakemake  # noqa: F821 (injected by Snakemake)
with script_logging(smk.log[0]) as log:
    started = now()
    recipe = {**smk.params.recipe, "eval_batch_size": robust_recipe(smk.config)["eval_batch_size"]}
    device = job_device(smk.config["compute"], smk.threads)  # not a param: a device change reruns nothing
    record = run_training(smk.input.pack, smk.input.index, smk.input.split, smk.output.weights, smk.output.heldout,
                          smk.output.history, smk.output.eval_scores, recipe, smk.params.seed, device,
                          threads=smk.threads, rule="train_robust_classifier")
    write_trained_spec("robust", smk.params.recipe, smk.output.weights, smk.output.heldout, smk.output.spec, "robust",
                       "robust auxiliary classifier of the guided method's cone projection (generation only; never a judge)")
    write_provenance(smk.output.spec, [*snakemake_inputs(smk), smk.output.weights],
                     {"guided.cone.model": smk.params.recipe, "seed": smk.params.seed},
                     rule="train_robust_classifier", started=started)
    eval_x, eval_idx = load_pack(smk.input.pack, smk.input.index, smk.input.split, "eval")
    robustness = robustness_record(load_classifier(smk.output.spec, device), eval_x, eval_idx["label"].to_numpy(),
                                   float(smk.params.recipe["adversarial_epsilon"]))
    atomic_write_text(smk.output.robustness, json.dumps(robustness, indent=2))
    write_provenance(smk.output.robustness, [smk.output.spec, smk.input.pack, smk.input.index, smk.input.split],
                     {"guided.cone.model": smk.params.recipe}, rule="train_robust_classifier", started=started)
    log.info("robust classifier: held-out AUROC under attack (radius in [0, 1] units: AUROC) %s", robustness["auroc"])
    log.info("robust classifier (%s, input %d, L2 eps %g, %d PGD steps) trained in %.1f s: held-out AUROC %.4f",
             record["arch"], record["input_size"], smk.params.recipe["adversarial_epsilon"],
             smk.params.recipe["adversarial_steps"], record["train_seconds"], record.get("auroc", float("nan")))
