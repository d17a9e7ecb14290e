# Data stage: originals + ground truth -> resized 8-bit images and a packed array -> train/eval split -> anchors.


rule synthetic_dataset:
    """Procedural dermoscopy-like images whose class is decided by planted ABCD-style traits."""
    output:
        images=directory(f"{SYNTH}/images"),
        metadata=f"{SYNTH}/metadata.csv",
    params:
        synthetic=result_settings(config, "dataset.synthetic", drop=("shortcut",)),
        seed=config["seed"],
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/data/synthetic_dataset.log",
    script:
        entry_script("synthetic_dataset.py")


localrules:
    isic_download,


rule isic_download:
    """ISIC Archive images + metadata through the official isic-cli (runs on the submit host: needs network)."""
    input:
        id_list=lambda wc: [config["dataset"]["isic"]["id_list"]] if config["dataset"]["isic"]["id_list"] else [],
    output:
        download=directory(f"{ISIC}/download"),
        manifest=f"{ISIC}/manifest.csv",
        prov=prov(f"{ISIC}/manifest.csv"),
    params:
        isic=result_settings(config, "dataset.isic"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/data/isic_download.log",
    script:
        entry_script("isic_download.py")


rule ground_truth:
    """Benign (0) / malignant (1) per image; Indeterminate, missing and contradictory labels are excluded and counted."""
    input:
        unpack(ground_truth_inputs),
    output:
        table=f"{DATA}/ground_truth.csv",
        excluded=f"{DATA}/excluded_labels.csv",
        report=f"{DATA}/label_report.json",
    params:
        source=config["dataset"]["source"],
        folder=config["dataset"]["folder"],
        group_column=config["split"]["group_column"],
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/data/ground_truth.log",
    script:
        entry_script("ground_truth.py")


rule resize:
    """8-bit RGB at image_size (EXIF applied, odd modes converted) as PNGs + one packed uint8 array; bad files quarantined."""
    input:
        table=rules.ground_truth.output.table,
    output:
        images=directory(f"{DATA}/images"),
        pack=f"{DATA}/pack.npy",
        index=f"{DATA}/pack_index.csv",
        quarantine=f"{DATA}/quarantine.csv",
    params:
        size=config["image_size"],
        resize=config["resize"],
    threads: job_threads("resize")
    resources:
        **job_resources("resize"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/data/resize.log",
    script:
        entry_script("resize.py")


rule split:
    """Seeded, stratified train / eval split of the usable images; each lesion/patient group on one side."""
    input:
        index=rules.resize.output.index,
        ground_truth=rules.ground_truth.output.table,
        label_report=rules.ground_truth.output.report,
    output:
        split=f"{DATA}/split.csv",
        report=f"{DATA}/split_report.json",
    params:
        eval_fraction=config["split"]["eval_fraction"],
        seed=config["seed"],
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/data/split.log",
    script:
        entry_script("split.py")


rule anchors:
    """The eval images that get counterfactuals (all, or a stratified seeded subset of split.max_anchors)."""
    input:
        split=rules.split.output.split,
        index=rules.resize.output.index,
    output:
        anchors=f"{DATA}/anchors.csv",
    params:
        max_anchors=config["split"]["max_anchors"],
        seed=config["seed"],
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/data/anchors.log",
    script:
        entry_script("anchors.py")


rule shortcut_pack:
    """The audited classifier's pack with a planted cue in its train images (dataset.synthetic.shortcut)."""
    input:
        metadata=rules.synthetic_dataset.output.metadata,
        pack=rules.resize.output.pack,
        index=rules.resize.output.index,
        split=rules.split.output.split,
    output:
        pack=f"{DATA}/shortcut/pack.npy",
        cues=f"{DATA}/shortcut/cues.csv",
        summary=f"{DATA}/shortcut/summary.csv",
        prov=prov(f"{DATA}/shortcut/cues.csv"),
    params:
        shortcut=config["dataset"]["synthetic"]["shortcut"],
        synth_size=config["dataset"]["synthetic"]["size"],
        resize=config["resize"],
        seed=config["seed"],
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/data/shortcut_pack.log",
    script:
        entry_script("shortcut_pack.py")


def training_pack(train_data="shortcut"):
    """The pack a classifier trains on: with the planted cue when a shortcut is configured and ``train_data`` asks for it."""
    if SHORTCUT_ON and train_data == "shortcut":
        return rules.shortcut_pack.output.pack
    return rules.resize.output.pack


ALL_TARGETS.extend([rules.anchors.output.anchors, rules.ground_truth.output.report, rules.resize.output.quarantine])
