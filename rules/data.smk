# Data stage: originals + ground truth -> resized 8-bit images and a packed array -> train/eval split -> anchors.


rule synthetic_dataset:
    """Procedural dermoscopy-like images whose class is decided by planted ABCD-style traits."""
    output:
        images=directory(f"{SYNTH}/images"),
        metadata=f"{SYNTH}/metadata.csv",
    params:
        synthetic=config["dataset"]["synthetic"],
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


ALL_TARGETS.extend([rules.anchors.output.anchors, rules.ground_truth.output.report, rules.resize.output.quarantine])
