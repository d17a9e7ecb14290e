# Diffusion stage (the seed's method): a class-conditional noise predictor trained on ground-truth labels,
# then SDEdit counterfactuals (noise each eval anchor to s*T, denoise towards benign and towards malignant
# with classifier-free guidance w). train_diffusion -> diffusion_counterfactuals (one job per shard)
# -> gather_counterfactuals -> results/counterfactuals/diffusion/index.csv. Depends only on the data stage.

DIFF_CFG = config["diffusion"]
DIFF_DIR = f"{RESULTS}/diffusion"
# training params: everything but the counterfactual settings and the run-only keys (log/checkpoint intervals)
DIFF_TRAINING = result_settings(config, "diffusion", drop=("counterfactual",))
DIFF_SAMPLING = result_settings(config, "diffusion.counterfactual")  # without the inference batch size


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
        prov=prov(f"{DIFF_DIR}/checkpoint.pt", f"{DIFF_DIR}/loss.csv", f"{DIFF_DIR}/loss.png"),
    params:
        diffusion=DIFF_TRAINING,
        image_size=config["image_size"],
        seed=seed_of(DIFF_CFG["seed"]),
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
        index=f"{CF_DIR}/diffusion/shard_{{shard}}/index.csv",
        images=directory(f"{CF_DIR}/diffusion/shard_{{shard}}/images"),
        prov=prov(f"{CF_DIR}/diffusion/shard_{{shard}}/index.csv"),
    wildcard_constraints:
        shard=r"\d+",
    params:
        n_shards=len(SHARDS),
        counterfactual=DIFF_SAMPLING,
        precision=DIFF_CFG["precision"],
        channels_last=DIFF_CFG["channels_last"],
        seed=seed_of(DIFF_CFG["counterfactual"]["seed"]),
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


if "diffusion" in GENERATORS:
    ALL_TARGETS.append(rules.train_diffusion.output.curve)
