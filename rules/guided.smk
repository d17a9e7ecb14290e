# Guided stage: classifier-guided diffusion counterfactuals (DiME / FastDiME / MaskDiME style) on the diffusion
# stage's trained model: SDEdit start, CFG toward the target, plus the gradient of the audited classifier's loss
# (and an L1 to the anchor) on each step's clean-image estimate; adaptive mask, early stop, a ladder of scales.
# train_diffusion + classifier_spec -> guided_counterfactuals (one job per shard) -> gather_guided
# -> results/counterfactuals/guided/index.csv (scored, paneled and measured like the other generators).

GUIDED_CFG = config["guided"]
# guided_noclf (a control of the judges, rules/judges.smk): the same sampler, strength, mask, CFG and noise with
# the classifier-gradient scale 0, i.e. what the diffusion prior alone does from the same start.
GUIDED_VARIANTS = {
    "guided": GUIDED_CFG,
    "guided_noclf": {**GUIDED_CFG, "scales": [0.0], "max_retries": 0},
}
GUIDED_CF = f"{RESULTS}/counterfactuals/{{generator}}"
GUIDED_SHARDS = list(range(config["counterfactuals"]["shards"]))
GUIDED_SEED = GUIDED_CFG["seed"] if GUIDED_CFG["seed"] is not None else config["seed"]
GUIDED_CLASSIFIER_SPEC = f"{RESULTS}/classifier/classifier.json"  # the classifier contract (rules/classifier.smk)


localrules:
    gather_guided,


rule guided_counterfactuals:
    """Classifier-guided (or, as guided_noclf, unguided) counterfactuals (both targets) of anchors shard::n_shards: 8-bit PNGs + a shard index with per-image outcomes."""
    input:
        checkpoint=rules.train_diffusion.output.checkpoint,
        classifier=GUIDED_CLASSIFIER_SPEC,
        pack=rules.resize.output.pack,
        index=rules.resize.output.index,
        anchors=rules.anchors.output.anchors,
    output:
        index=f"{GUIDED_CF}/shard_{{shard}}/index.csv",
    wildcard_constraints:
        shard=r"\d+",
        generator="guided|guided_noclf",
    params:
        generator=lambda wc: wc.generator,
        shard=lambda wc: int(wc.shard),
        n_shards=len(GUIDED_SHARDS),
        out_dir=lambda wc: f"{RESULTS}/counterfactuals/{wc.generator}/shard_{wc.shard}",
        guided=lambda wc: GUIDED_VARIANTS[wc.generator],
        precision=config["diffusion"]["precision"],
        channels_last=config["diffusion"]["channels_last"],
        seed=GUIDED_SEED,
        compute=config["compute"],
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


rule gather_guided:
    """One index of every guided counterfactual; fails if any (anchor, target) pair is missing."""
    input:
        shards=expand(f"{GUIDED_CF}/shard_{{shard}}/index.csv", shard=GUIDED_SHARDS, allow_missing=True),
        anchors=rules.anchors.output.anchors,
    output:
        index=f"{GUIDED_CF}/index.csv",
    wildcard_constraints:
        generator="guided|guided_noclf",
    params:
        generator=lambda wc: wc.generator,
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/guided/gather_{{generator}}.log",
    script:
        entry_script("gather_counterfactuals.py")


ALL_TARGETS.extend(expand(rules.gather_guided.output.index,
                          generator=[g for g in GUIDED_VARIANTS if g in config["counterfactuals"]["generators"]]))
