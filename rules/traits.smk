# Trait analysis: classical lesion segmentation, ABCD-style features of anchors and counterfactuals, paired
# statistics of what each generator's counterfactuals add or remove, and figures (cfaudit/traits/).
# With the embedded dataset a positive control ('planted_shift': anchors re-rendered with the planted traits
# pushed toward each class) runs too, so the analysis shows it recovers known changes.
# Every table and figure has a declared <file>.prov.json sidecar (cfaudit/provenance.py).
# Params hold only traits.* values (+ generators, seed, sizes), so a traits key reruns only these rules.

TRAITS = config["traits"]
TRAITS_DIR = f"{RESULTS}/traits"
TRAITS_FIG = f"{RESULTS}/figures"
TRAITS_CONTROL = TRAITS["positive_control"] and config["dataset"]["source"] == "synthetic"
# the judges' controls (pgd, guided_noclf) are not analysed for traits
TRAITS_GENERATORS = [g for g in config["counterfactuals"]["generators"] if g not in ("pgd", "guided_noclf")] + (
    ["planted_shift"] if TRAITS_CONTROL else []
)
# guided's prior alone (guided_noclf) is measured as the reference of ranked.md's 'against the prior alone' tables
# (cfaudit.traits.statistics.VS_PRIOR), not analysed as a generator
TRAITS_REFERENCES = ["guided_noclf"] if {"guided", "guided_noclf"} <= set(config["counterfactuals"]["generators"]) else []
TRAITS_PARTS = [*TRAITS_GENERATORS, *TRAITS_REFERENCES]
TRAITS_CF_INDEXES = {g: f"{TRAITS_DIR}/planted_shift/index.csv" if g == "planted_shift" else cf_index(g)
                     for g in TRAITS_PARTS}
TRAITS_FEATURES = {k: TRAITS[k] for k in ("originals", "segmentation", "colours", "skin")}
TRAITS_CATEGORY = "5. Trait analysis"
CUE_EFFECT = f"{TRAITS_DIR}/shortcut/cue_effect.csv"  # rule shortcut_cue_effect (rules/judges.smk: it needs the oracles)


rule traits_planted_shift:
    """Positive control (embedded data): each anchor re-rendered from its own random stream with the planted traits shifted toward each class."""
    input:
        anchors=rules.anchors.output.anchors,
        metadata=f"{SYNTH}/metadata.csv",
    output:
        index=f"{TRAITS_DIR}/planted_shift/index.csv",
        images=directory(f"{TRAITS_DIR}/planted_shift/images"),
    params:
        seed=config["seed"],
        synth_size=config["dataset"]["synthetic"]["size"],
        image_size=config["image_size"],
        resize=config["resize"],
        shift=TRAITS["control_shift"],
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/traits/planted_shift.log",
    script:
        entry_script("traits_control.py")


rule traits_features:
    """Segmentation + per-image features of the anchors and other originals ({part}=original) or of one generator's
    counterfactuals (each measured against its anchor's mask)."""
    input:
        anchors=rules.anchors.output.anchors,
        pack_index=rules.resize.output.index,
        split=rules.split.output.split,
        indexes=lambda wc: [] if wc.part == ORIGINAL else [TRAITS_CF_INDEXES[wc.part]],
    output:
        features=f"{TRAITS_DIR}/features/{{part}}.csv",
        prov=prov(f"{TRAITS_DIR}/features/{{part}}.csv"),
    wildcard_constraints:
        part="|".join([ORIGINAL, *TRAITS_PARTS]),
    params:
        features=TRAITS_FEATURES,
    threads: job_threads("traits_features")
    resources:
        **job_resources("traits_features"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/traits/features_{{part}}.log",
    benchmark:
        f"{BENCH}/traits_features_{{part}}.tsv"
    script:
        entry_script("traits_features.py")


localrules:
    gather_traits_features,


rule gather_traits_features:
    """features.csv: the anchors, each followed by its counterfactuals, then the other originals."""
    input:
        parts=expand(rules.traits_features.output.features, part=[ORIGINAL, *TRAITS_PARTS]),
        anchors=rules.anchors.output.anchors,
    output:
        features=f"{TRAITS_DIR}/features.csv",
        prov=prov(f"{TRAITS_DIR}/features.csv"),
    params:
        generators=TRAITS_PARTS,
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/traits/gather_features.log",
    script:
        entry_script("gather_traits_features.py")


rule traits:
    """Paired tests (Wilcoxon, Holm, bootstrap CIs, effect sizes) per generator and direction, the ranked table and the figures."""
    input:
        features=rules.gather_traits_features.output.features,
        cue_effect=[CUE_EFFECT] if SHORTCUT_ON else [],
    output:
        paired=f"{TRAITS_DIR}/paired_stats.csv",
        labels=f"{TRAITS_DIR}/label_stats.csv",
        artefacts=f"{TRAITS_DIR}/artefacts.csv",
        ranked=f"{TRAITS_DIR}/ranked.md",
        html=report(f"{TRAITS_DIR}/ranked.html", caption="report/traits_ranked.rst", category=TRAITS_CATEGORY,
                    labels={"table": "what the counterfactuals add / remove"}),
        differences=report(f"{TRAITS_FIG}/traits_differences.png", caption="report/traits_differences.rst",
                           category=TRAITS_CATEGORY, labels={"figure": "paired differences"}),
        originals=report(f"{TRAITS_FIG}/traits_originals.png", caption="report/traits_originals.rst",
                         category=TRAITS_CATEGORY, labels={"figure": "malignant vs benign originals"}),
        segmentation=report(f"{TRAITS_FIG}/traits_segmentation.png", caption="report/traits_segmentation.rst",
                            category=TRAITS_CATEGORY, labels={"figure": "segmentation check"}),
        examples=[
            report(f"{TRAITS_FIG}/traits_examples_{g}.png", caption="report/traits_examples.rst",
                   category=TRAITS_CATEGORY, labels={"figure": f"largest changes: {g}"})
            for g in TRAITS_GENERATORS
        ],
        prov=prov(
            *[
                f"{TRAITS_DIR}/paired_stats.csv",
                f"{TRAITS_DIR}/label_stats.csv",
                f"{TRAITS_DIR}/artefacts.csv",
                f"{TRAITS_DIR}/ranked.md",
                f"{TRAITS_DIR}/ranked.html",
                f"{TRAITS_FIG}/traits_differences.png",
                f"{TRAITS_FIG}/traits_originals.png",
                f"{TRAITS_FIG}/traits_segmentation.png",
            ]
            + [f"{TRAITS_FIG}/traits_examples_{g}.png" for g in TRAITS_GENERATORS]
        ),
    params:
        generators=TRAITS_GENERATORS,
        seed=config["seed"],
        statistics=TRAITS["statistics"],
        figures=TRAITS["figures"],
        segmentation=TRAITS["segmentation"],
        cue=config["dataset"]["synthetic"]["shortcut"]["cue"],
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/traits/traits.log",
    script:
        entry_script("traits.py")


ALL_TARGETS.extend([*rules.gather_traits_features.output, *rules.traits.output])
