# GAN stage (DeGrave et al. 2023): a generator conditioned on bins of the audited classifier's probability.
# gan.source pretrained: rule place_gan_weights places a published checkpoint (sha256-checked);
# gan.source train: rule train_gan trains one against the audited classifier (resumable).
# Then gan_counterfactuals (one job per shard) -> gather_counterfactuals -> results/counterfactuals/gan/index.csv.

GAN_CFG = config["gan"]
GAN_DIR = f"{RESULTS}/gan"
GAN_PRETRAINED = "resources/gan/pretrained_generator.pth"
GAN_TRAINING = {k: GAN_CFG[k] for k in ("arch",)} | {"train": result_settings(config, "gan.train", drop=("seed",))}
# eval mode (default): an image's output does not depend on its batch, so the batch size is run-only; the
# reference script's train mode is batch-dependent, so there it is a result setting.
GAN_GENERATION = {
    "source": GAN_CFG["source"],
    "generate": GAN_CFG["generate"] if GAN_CFG["generate"]["mode"] == "train" else result_settings(config, "gan.generate"),
    "pretrained": {"trust_pickle": GAN_CFG["pretrained"]["trust_pickle"]},
}


localrules:
    place_gan_weights,


rule place_gan_weights:
    """Copy (gan.pretrained.local_path) or download (url, on the submit host) a published generator; verify sha256."""
    output:
        weights=GAN_PRETRAINED,
        prov=prov(GAN_PRETRAINED),
    params:
        pretrained=result_settings(config, "gan.pretrained", drop=("trust_pickle",)),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/gan/place_gan_weights.log",
    script:
        entry_script("place_gan_weights.py")


rule train_gan:
    """Train the generator + spectral-norm discriminator against the audited classifier; per-epoch losses and curve."""
    input:
        pack=rules.resize.output.pack,
        index=rules.resize.output.index,
        split=rules.split.output.split,
        classifier=CLASSIFIER_SPEC,
    output:
        checkpoint=f"{GAN_DIR}/generator.pt",
        loss=f"{GAN_DIR}/loss.csv",
        curve=f"{GAN_DIR}/loss.png",
        prov=prov(f"{GAN_DIR}/loss.csv", f"{GAN_DIR}/loss.png", f"{GAN_DIR}/generator.pt"),
    params:
        gan=GAN_TRAINING,
        seed=seed_of(GAN_CFG["train"]["seed"]),
        work_dir=f"{GAN_DIR}/train",
    threads: job_threads("train_gan")
    resources:
        **job_resources("train_gan"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/gan/train_gan.log",
    benchmark:
        f"{BENCH}/train_gan.tsv"
    script:
        entry_script("train_gan.py")


rule gan_counterfactuals:
    """Benign (bin 0) and malignant (last bin) counterfactuals of anchors shard::n_shards, generator in eval mode."""
    input:
        checkpoint=gan_checkpoint,
        classifier=CLASSIFIER_SPEC,
        pack=rules.resize.output.pack,
        index=rules.resize.output.index,
        anchors=rules.anchors.output.anchors,
    output:
        index=f"{CF_DIR}/gan/shard_{{shard}}/index.csv",
        images=directory(f"{CF_DIR}/gan/shard_{{shard}}/images"),
    wildcard_constraints:
        shard=r"\d+",
    params:
        n_shards=len(SHARDS),
        gan=GAN_GENERATION,
    threads: job_threads("gan_counterfactuals")
    resources:
        **job_resources("gan_counterfactuals"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/gan/gan_counterfactuals_{{shard}}.log",
    benchmark:
        f"{BENCH}/gan_counterfactuals_{{shard}}.tsv"
    script:
        entry_script("gan_counterfactuals.py")


if "gan" in GENERATORS and GAN_CFG["source"] == "train":
    ALL_TARGETS.append(rules.train_gan.output.curve)
