# Metrics stage: Table 1, closeness, realism (FID/KID or classifier-feature FD/KID), the seed's figures and
# the HTML report's captions. Every table and figure gets a <file>.prov.json sidecar (cfaudit/provenance.py).
# Params hold only metrics.* values (+ the generator list), so changing a metrics key reruns only these rules.
# Report: snakemake --report results/report.html (landing page: rules/report.smk)

METRICS_DIR = f"{RESULTS}/metrics"
FIGURES_DIR = f"{RESULTS}/figures"
FID_TORCH_HOME = "resources/torch_home"
MET = config["metrics"]
MET_GENERATORS = GENERATORS
MET_SEED = seed_of(MET["bootstrap"]["seed"])
MET_CF_INDEXES = [cf_index(g) for g in MET_GENERATORS]
MET_FID = result_settings(config, "metrics.fid")  # without download timeout and batch size
MET_FID_PLACEMENT = {k: MET_FID[k] for k in ("weights_path", "weights_url", "check_hash")}
MET_FID_RESOLUTION = MET["fid"]["resolution"] or config["image_size"]
# Training-loss records (seed Figure 6) of the models behind the configured generators.
MET_LOSS_MODELS = {
    name: path
    for name, path, gens in [
        ("diffusion", f"{RESULTS}/diffusion/loss.csv", {"diffusion", "guided"}),
        ("gan", f"{RESULTS}/gan/loss.csv", {"gan"} if GAN_CFG["source"] == "train" else set()),  # published: none
    ]
    if gens & set(MET_GENERATORS)
}

# Oracles (rules/judges.smk): independent judges; the first one's features measure realism without FID weights.
from cfaudit.oracles import check_oracles  # noqa: E402

ORACLES = check_oracles(config)  # refuses an oracle that shares the audited classifier's architecture or seed
ORACLE_DIR = f"{RESULTS}/oracles"
REALISM_ORACLE_SPEC = [f"{ORACLE_DIR}/{name}/oracle.json" for name in ORACLES][:1]

localrules:
    place_fid_weights,


rule place_fid_weights:
    """pytorch-fid's Inception weights into resources/torch_home (local file or URL); records why when impossible."""
    output:
        status=f"{FID_TORCH_HOME}/fid_weights.json",
    params:
        fid=MET_FID_PLACEMENT,
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/metrics/place_fid_weights.log",
    script:
        entry_script("place_fid_weights.py")


rule table1:
    """Table 1: best-F1 and fixed-threshold metrics, AUROC, flip rates, with seeded bootstrap intervals."""
    input:
        scores=SCORES,
        anchors=rules.anchors.output.anchors,
        spec=CLASSIFIER_SPEC,
        oracle_scores=[f"{ORACLE_DIR}/{name}/scores.csv" for name in ORACLES],
        oracle_specs=[f"{ORACLE_DIR}/{name}/oracle.json" for name in ORACLES],
    output:
        csv=f"{METRICS_DIR}/table1.csv",
        md=f"{METRICS_DIR}/table1.md",
        html=report(f"{METRICS_DIR}/table1.html", caption="report/table1.rst", category="1. Table 1",
                    labels={"table": "Table 1"}),
        prov=[prov(f"{METRICS_DIR}/table1.{ext}") for ext in ("csv", "md", "html")],
    params:
        generators=MET_GENERATORS,
        oracles=list(ORACLES),
        bootstrap=MET["bootstrap"],
        seed=MET_SEED,
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/metrics/table1.log",
    script:
        entry_script("table1.py")


rule closeness:
    """L1, L2, SSIM and share of changed pixels of each counterfactual vs its anchor, per generator and direction."""
    input:
        indexes=MET_CF_INDEXES,
        anchors=rules.anchors.output.anchors,
    output:
        summary=f"{METRICS_DIR}/closeness.csv",
        per_image=f"{METRICS_DIR}/closeness_per_image.csv",
        html=report(f"{METRICS_DIR}/closeness.html", caption="report/closeness.rst",
                    category="3. Realism and closeness", labels={"table": "closeness to the anchor"}),
        prov=[prov(f"{METRICS_DIR}/{n}") for n in ("closeness.csv", "closeness_per_image.csv", "closeness.html")],
    params:
        generators=MET_GENERATORS,
        closeness=MET["closeness"],
        bootstrap=MET["bootstrap"],
        seed=MET_SEED,
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/metrics/closeness.log",
    script:
        entry_script("closeness.py")


rule realism:
    """FID and KID vs real non-anchor eval images at one N and resolution, or an oracle's feature FD/KID without FID weights."""
    input:
        status=rules.place_fid_weights.output.status,
        indexes=MET_CF_INDEXES,
        pack=rules.resize.output.pack,
        pack_index=rules.resize.output.index,
        split=rules.split.output.split,
        anchors=rules.anchors.output.anchors,
        spec=CLASSIFIER_SPEC,
        feature_spec=REALISM_ORACLE_SPEC,
    output:
        csv=f"{METRICS_DIR}/fid.csv",
        features=f"{METRICS_DIR}/realism_features.npz",
        html=report(f"{METRICS_DIR}/fid.html", caption="report/fid_table.rst", category="3. Realism and closeness",
                    labels={"table": "realism (FID or classifier-feature FD)"}),
        prov=[prov(f"{METRICS_DIR}/fid.csv"), prov(f"{METRICS_DIR}/fid.html")],
    params:
        generators=MET_GENERATORS,
        fid=MET_FID,
        resolution=MET_FID_RESOLUTION,
        seed=MET_SEED,
    threads: job_threads("fid")
    resources:
        **job_resources("fid"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/metrics/realism.log",
    benchmark:
        f"{BENCH}/realism.tsv"
    script:
        entry_script("realism.py")


rule curve_figures:
    """Precision-recall and ROC curves of one generator's counterfactuals, originals for reference (seed Figs 7-10)."""
    input:
        scores=[f"{SCORES_DIR}/{ORIGINAL}.csv", f"{SCORES_DIR}/{{generator}}.csv"],
        anchors=rules.anchors.output.anchors,
        spec=CLASSIFIER_SPEC,
    output:
        pr=report(f"{FIGURES_DIR}/pr_{{generator}}.png", caption="report/pr.rst", category="2. Classifier curves",
                  subcategory="{generator}", labels={"generator": "{generator}", "figure": "precision-recall"}),
        roc=report(f"{FIGURES_DIR}/roc_{{generator}}.png", caption="report/roc.rst", category="2. Classifier curves",
                   subcategory="{generator}", labels={"generator": "{generator}", "figure": "ROC"}),
        prov=[prov(f"{FIGURES_DIR}/pr_{{generator}}.png"), prov(f"{FIGURES_DIR}/roc_{{generator}}.png")],
    wildcard_constraints:
        generator="|".join(MET_GENERATORS) or "NO_GENERATOR",
    params:
        figures=MET["figures"],
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/metrics/curve_figures_{{generator}}.log",
    script:
        entry_script("figure_curves.py")


rule score_histograms:
    """Distribution of the classifier's score per target (per label for the originals), fixed threshold marked."""
    input:
        scores=SCORES,
        anchors=rules.anchors.output.anchors,
        spec=CLASSIFIER_SPEC,
    output:
        png=report(f"{FIGURES_DIR}/score_histograms.png", caption="report/histograms.rst",
                   category="2. Classifier curves", subcategory="all generators",
                   labels={"generator": "all", "figure": "score histograms"}),
        prov=prov(f"{FIGURES_DIR}/score_histograms.png"),
    params:
        generators=MET_GENERATORS,
        figures=MET["figures"],
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/metrics/score_histograms.log",
    script:
        entry_script("figure_histograms.py")


rule loss_figure:
    """Training-loss curves of the generators' models (seed Figure 6), from results/<model>/loss.csv."""
    input:
        **MET_LOSS_MODELS,
    output:
        png=report(f"{FIGURES_DIR}/training_loss.png", caption="report/loss.rst", category="4. Training",
                   labels={"figure": "training loss"}),
        prov=prov(f"{FIGURES_DIR}/training_loss.png"),
    params:
        models=list(MET_LOSS_MODELS),
        figures=MET["figures"],
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/metrics/loss_figure.log",
    script:
        entry_script("figure_loss.py")


rule realism_figure:
    """Bar chart of FID (or classifier-feature FD) and KID per generator (seed Figure 11)."""
    input:
        csv=rules.realism.output.csv,
    output:
        png=report(f"{FIGURES_DIR}/fid.png", caption="report/fid.rst", category="3. Realism and closeness",
                   labels={"figure": "realism bar chart"}),
        prov=prov(f"{FIGURES_DIR}/fid.png"),
    params:
        figures=MET["figures"],
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/metrics/realism_figure.log",
    script:
        entry_script("figure_realism.py")


METRICS_TARGETS = [*rules.table1.output, *rules.score_histograms.output]
if MET_GENERATORS:
    METRICS_TARGETS += [
        *rules.closeness.output,
        *rules.realism.output,
        *rules.realism_figure.output,
        *rules.loss_figure.output,
        *expand(rules.curve_figures.output.pr, generator=MET_GENERATORS),
        *expand(rules.curve_figures.output.roc, generator=MET_GENERATORS),
    ]
ALL_TARGETS.extend(METRICS_TARGETS)
