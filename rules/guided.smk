# Guided stage: classifier-guided diffusion counterfactuals (DiME / FastDiME / MaskDiME style) on the diffusion
# stage's trained model: SDEdit start, CFG toward the target, plus the gradient of the audited classifier's loss
# (and an L1 to the anchor) on each step's clean-image estimate; adaptive mask, early stop, a ladder of scales.
# train_diffusion + classifier_spec -> guided_counterfactuals (one job per shard) -> gather_counterfactuals
# -> results/counterfactuals/guided/index.csv (scored, paneled and measured like the other generators).

GUIDED_CFG = config["guided"]
GUIDED_SAMPLING = result_settings(config, "guided")  # without the inference batch size
# guided_noclf (a control of the judges, rules/judges.smk): the same sampler, strength, mask, CFG and noise with
# the classifier-gradient scale 0, i.e. what the diffusion prior alone does from the same start.
GUIDED_VARIANTS = {
    "guided": GUIDED_SAMPLING,
    "guided_noclf": {**GUIDED_SAMPLING, "scales": [0.0], "max_retries": 0},
}


rule guided_counterfactuals:
    """Classifier-guided (or, as guided_noclf, unguided) counterfactuals (both targets) of anchors shard::n_shards: 8-bit PNGs + a shard index with per-image outcomes."""
    input:
        checkpoint=rules.train_diffusion.output.checkpoint,
        classifier=CLASSIFIER_SPEC,
        pack=rules.resize.output.pack,
        index=rules.resize.output.index,
        anchors=rules.anchors.output.anchors,
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
