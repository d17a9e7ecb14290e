# Guided stage: classifier-guided diffusion counterfactuals (DiME / FastDiME / MaskDiME style) on the diffusion
# stage's trained model: SDEdit start, CFG toward the target, plus the gradient of the audited classifier's loss
# (and an L1 to the anchor) on each step's clean-image estimate; adaptive mask, early stop, a ladder of scales.
# With guided.cone (DVCE's cone projection) the step follows an adversarially trained helper's gradient turned to
# within an angle of the audited classifier's; rule train_robust_classifier trains that helper on the train split.
# train_diffusion + classifier_spec [+ train_robust_classifier] -> guided_counterfactuals (one job per shard)
# -> gather_counterfactuals -> results/counterfactuals/guided/index.csv (scored, paneled and measured like the
# other generators).

from cfaudit.config import guided_variants  # noqa: E402
from cfaudit.robust import check_robust, robust_recipe  # noqa: E402

GUIDED_CFG = config["guided"]
# guided_noclf (a control of the judges, rules/judges.smk): the same sampler, strength, mask, CFG and noise with
# the classifier-gradient scale 0, i.e. what the diffusion prior alone does from the same start.
GUIDED_VARIANTS = guided_variants(config)  # params: only what can change the counterfactuals
CONE = bool(GUIDED_CFG["cone"]["enabled"])
ROBUST_DIR = f"{RESULTS}/guided/robust"
ROBUST_SPEC = f"{ROBUST_DIR}/robust.json"
if CONE:
    check_robust(config)  # the robust model guides: it may share no oracle's architecture or seed


def guided_inputs(wildcards):
    """The guided rule's inputs; the robust classifier's spec too when the cone projection is on (guided only)."""
    inputs = {"checkpoint": rules.train_diffusion.output.checkpoint, "classifier": CLASSIFIER_SPEC,
              "pack": rules.resize.output.pack, "index": rules.resize.output.index, "anchors": rules.anchors.output.anchors}
    return {**inputs, "robust": ROBUST_SPEC} if CONE and wildcards.generator == "guided" else inputs


rule train_robust_classifier:
    """Train the cone projection's robust auxiliary classifier (guided.cone.model) with L2 PGD adversarial training on the train split; robust.json (a classifier spec) and its held-out AUROC under attack (robustness.json)."""
    input:
        pack=training_pack(),
        index=rules.resize.output.index,
        split=rules.split.output.split,
    output:
        weights=f"{ROBUST_DIR}/model.pt",
        heldout=f"{ROBUST_DIR}/heldout.json",
        history=f"{ROBUST_DIR}/history.csv",
        eval_scores=f"{ROBUST_DIR}/eval_scores.csv",
        spec=ROBUST_SPEC,
        robustness=f"{ROBUST_DIR}/robustness.json",
        prov=prov(f"{ROBUST_DIR}/heldout.json", ROBUST_SPEC, f"{ROBUST_DIR}/robustness.json"),
    params:
        recipe={k: v for k, v in robust_recipe(config).items() if k != "eval_batch_size"},
        seed=GUIDED_CFG["cone"]["model"]["seed"],
    threads: job_threads("train_robust_classifier")
    resources:
        **job_resources("train_robust_classifier"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/guided/train_robust_classifier.log",
    benchmark:
        f"{BENCH}/train_robust_classifier.tsv"
    script:
        entry_script("train_robust_classifier.py")


rule guided_counterfactuals:
    """Classifier-guided (or, as guided_noclf, unguided) counterfactuals (both targets) of anchors shard::n_shards: 8-bit PNGs + a shard index with per-image outcomes."""
    input:
        unpack(guided_inputs),
    output:
        index=f"{CF_DIR}/{{generator}}/shard_{{shard}}/index.csv",
        images=directory(f"{CF_DIR}/{{generator}}/shard_{{shard}}/images"),
        prov=prov(f"{CF_DIR}/{{generator}}/shard_{{shard}}/index.csv"),
    wildcard_constraints:
        shard=r"\d+",
        generator="guided|guided_noclf",
    params:
        n_shards=len(SHARDS),
        guided=lambda wc: GUIDED_VARIANTS[wc.generator],
        precision=config["diffusion"]["precision"],
        channels_last=config["diffusion"]["channels_last"],
        seed=seed_of(GUIDED_CFG["seed"]),
    threads: job_threads("guided_counterfactuals")
    resources:
        **job_resources("guided_counterfactuals"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/guided/{{generator}}_counterfactuals_{{shard}}.log",
    benchmark:
        f"{BENCH}/{{generator}}_counterfactuals_{{shard}}.tsv"
    script:
        entry_script("guided_counterfactuals.py")
