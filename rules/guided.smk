# Guided stage: classifier-guided diffusion counterfactuals (DiME / FastDiME / MaskDiME style) on the diffusion
# stage's trained model: SDEdit start, CFG toward the target, plus the gradient of the audited classifier's loss
# (and an L1 to the anchor) on each step's clean-image estimate; adaptive mask, early stop, a ladder of scales.
# train_diffusion + classifier_spec -> guided_counterfactuals (one job per shard) -> gather_guided
# -> results/counterfactuals/guided/index.csv (scored, paneled and measured like the other generators).

GUIDED_CFG = config["guided"]
GUIDED_CF = f"{RESULTS}/counterfactuals/guided"
GUIDED_SHARDS = list(range(config["counterfactuals"]["shards"]))
GUIDED_SEED = GUIDED_CFG["seed"] if GUIDED_CFG["seed"] is not None else config["seed"]
GUIDED_CLASSIFIER_SPEC = f"{RESULTS}/classifier/classifier.json"  # the classifier contract (rules/classifier.smk)


localrules:
    gather_guided,


rule guided_counterfactuals:
    """Classifier-guided counterfactuals (both targets) of anchors shard::n_shards: 8-bit PNGs + a shard index with per-image outcomes."""
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
    params:
        shard=lambda wc: int(wc.shard),
        n_shards=len(GUIDED_SHARDS),
        out_dir=lambda wc: f"{GUIDED_CF}/shard_{wc.shard}",
        guided=GUIDED_CFG,
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
        f"{LOGS}/guided/guided_counterfactuals_{{shard}}.log",
    benchmark:
        f"{BENCH}/guided_counterfactuals_{{shard}}.tsv"
    script:
        entry_script("guided_counterfactuals.py")


rule gather_guided:
    """One index of every guided counterfactual; fails if any (anchor, target) pair is missing."""
    input:
        shards=expand(f"{GUIDED_CF}/shard_{{shard}}/index.csv", shard=GUIDED_SHARDS),
        anchors=rules.anchors.output.anchors,
    output:
        index=f"{GUIDED_CF}/index.csv",
    params:
        generator="guided",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/guided/gather_guided.log",
    script:
        entry_script("gather_counterfactuals.py")


if "guided" in config["counterfactuals"]["generators"]:
    ALL_TARGETS.append(rules.gather_guided.output.index)
