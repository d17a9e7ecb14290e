# Diffusion stage (the seed's method): a class-conditional noise predictor trained on ground-truth labels,
# then SDEdit counterfactuals (noise each eval anchor to s*T, denoise towards benign and towards malignant
# with classifier-free guidance w). train_diffusion -> diffusion_counterfactuals (one job per shard)
# -> gather_diffusion -> results/counterfactuals/diffusion/index.csv. Depends only on the data stage.

DIFF_CFG = config["diffusion"]
DIFF_DIR = f"{RESULTS}/diffusion"
DIFF_CF = f"{RESULTS}/counterfactuals/diffusion"
DIFF_SHARDS = list(range(config["counterfactuals"]["shards"]))
DIFF_SEED = DIFF_CFG["seed"] if DIFF_CFG["seed"] is not None else config["seed"]
DIFF_CF_SEED = DIFF_CFG["counterfactual"]["seed"] if DIFF_CFG["counterfactual"]["seed"] is not None else config["seed"]


localrules:
    gather_diffusion,


rule train_diffusion:
    """Train the noise predictor (MSE on eps, label dropout, optional EMA); resumes from train_state.pt after a kill."""
    input:
        pack=rules.resize.output.pack,
        index=rules.resize.output.index,
        split=rules.split.output.split,
    output:
        checkpoint=f"{DIFF_DIR}/checkpoint.pt",
        loss=f"{DIFF_DIR}/loss.csv",
        curve=f"{DIFF_DIR}/loss.png",
    params:
        # everything but the counterfactual settings: changing s, w or the sampler never retrains
        diffusion={k: v for k, v in DIFF_CFG.items() if k != "counterfactual"},
        image_size=config["image_size"],
        seed=DIFF_SEED,
        compute=config["compute"],
    threads: job_threads("train_diffusion")
    resources:
        **job_resources("train_diffusion"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/diffusion/train_diffusion.log",
    benchmark:
        f"{BENCH}/train_diffusion.tsv"
    script:
        entry_script("train_diffusion.py")


rule diffusion_counterfactuals:
    """SDEdit counterfactuals (both targets) of anchors shard::n_shards: 8-bit PNGs + a shard index."""
    input:
        checkpoint=rules.train_diffusion.output.checkpoint,
        pack=rules.resize.output.pack,
        index=rules.resize.output.index,
        anchors=rules.anchors.output.anchors,
    output:
        index=f"{DIFF_CF}/shard_{{shard}}/index.csv",
    wildcard_constraints:
        shard=r"\d+",
    params:
        shard=lambda wc: int(wc.shard),
        n_shards=len(DIFF_SHARDS),
        out_dir=lambda wc: f"{DIFF_CF}/shard_{wc.shard}",
        counterfactual=DIFF_CFG["counterfactual"],
        precision=DIFF_CFG["precision"],
        channels_last=DIFF_CFG["channels_last"],
        seed=DIFF_CF_SEED,
        compute=config["compute"],
    threads: job_threads("diffusion_counterfactuals")
    resources:
        **job_resources("diffusion_counterfactuals"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/diffusion/diffusion_counterfactuals_{{shard}}.log",
    benchmark:
        f"{BENCH}/diffusion_counterfactuals_{{shard}}.tsv"
    script:
        entry_script("diffusion_counterfactuals.py")


rule gather_diffusion:
    """One index of every diffusion counterfactual; fails if any (anchor, target) pair is missing."""
    input:
        shards=expand(f"{DIFF_CF}/shard_{{shard}}/index.csv", shard=DIFF_SHARDS),
        anchors=rules.anchors.output.anchors,
    output:
        index=f"{DIFF_CF}/index.csv",
    params:
        generator="diffusion",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/diffusion/gather_diffusion.log",
    script:
        entry_script("gather_counterfactuals.py")


if "diffusion" in config["counterfactuals"]["generators"]:
    ALL_TARGETS.extend([rules.gather_diffusion.output.index, rules.train_diffusion.output.curve])
