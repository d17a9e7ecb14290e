# GAN stage (DeGrave et al. 2023): a generator conditioned on bins of the audited classifier's probability.
# gan.source pretrained: rule place_gan_weights places a published checkpoint (sha256-checked);
# gan.source train: rule train_gan trains one against the audited classifier (resumable).
# Then gan_counterfactuals (one job per shard) -> gather_gan -> results/counterfactuals/gan/index.csv.

GAN_CFG = config["gan"]
GAN_DIR = f"{RESULTS}/gan"
GAN_CF = f"{RESULTS}/counterfactuals/gan"
GAN_PRETRAINED = "resources/gan/pretrained_generator.pth"
GAN_CLASSIFIER_SPEC = f"{RESULTS}/classifier/classifier.json"  # the classifier contract (rules/classifier.smk)
GAN_SHARDS = list(range(config["counterfactuals"]["shards"]))


localrules:
    place_gan_weights,
    gather_gan,


rule place_gan_weights:
    """Copy (gan.pretrained.local_path) or download (url, on the submit host) a published generator; verify sha256."""
    output:
        weights=GAN_PRETRAINED,
    params:
        pretrained=GAN_CFG["pretrained"],
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
        classifier=GAN_CLASSIFIER_SPEC,
    output:
        checkpoint=f"{GAN_DIR}/generator.pt",
        loss=f"{GAN_DIR}/loss.csv",
        curve=f"{GAN_DIR}/loss.png",
    params:
        gan={k: GAN_CFG[k] for k in ("arch", "train")},
        seed=GAN_CFG["train"]["seed"] if GAN_CFG["train"]["seed"] is not None else config["seed"],
        compute=config["compute"],
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
        classifier=GAN_CLASSIFIER_SPEC,
        pack=rules.resize.output.pack,
        index=rules.resize.output.index,
        anchors=rules.anchors.output.anchors,
    output:
        index=f"{GAN_CF}/shard_{{shard}}/index.csv",
    wildcard_constraints:
        shard=r"\d+",
    params:
        shard=lambda wc: int(wc.shard),
        n_shards=len(GAN_SHARDS),
        out_dir=lambda wc: f"{GAN_CF}/shard_{wc.shard}",
        gan={"source": GAN_CFG["source"], "generate": GAN_CFG["generate"],
             "pretrained": {"trust_pickle": GAN_CFG["pretrained"]["trust_pickle"]}},
        compute=config["compute"],
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


rule gather_gan:
    """One index of every GAN counterfactual; fails if any (anchor, target) pair is missing."""
    input:
        shards=expand(f"{GAN_CF}/shard_{{shard}}/index.csv", shard=GAN_SHARDS),
        anchors=rules.anchors.output.anchors,
    output:
        index=f"{GAN_CF}/index.csv",
    params:
        generator="gan",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/gan/gather_gan.log",
    script:
        entry_script("gather_counterfactuals.py")


if "gan" in config["counterfactuals"]["generators"]:
    ALL_TARGETS.append(rules.gather_gan.output.index)
    if GAN_CFG["source"] == "train":
        ALL_TARGETS.append(rules.train_gan.output.curve)
