# Independent judges: oracle classifiers, adversarial diagnostics and the controls (cfaudit/judges.py).
# An oracle is trained on the train split with another architecture and seed than the audited classifier and is
# NEVER an input of a generator rule (tests/test_judges.py checks the DAG). The PGD control and guided_noclf
# (rules/guided.smk) are generators in every table, so a reader compares the guided method with them.
# train_oracle (one job per oracle) -> score_oracle (one job per oracle and generator) -> gather_oracle_scores -> judges; diagnostics (audited classifier under JPEG, blur,
# shift; gamut; high frequencies) -> judges -> results/metrics/judges.{csv,md,html}.
# The device (config `compute`) is read by the new scripts at run time, not a param: it cannot change a result.
from cfaudit.oracles import oracle_recipe

# ORACLES / ORACLE_DIR: rules/metrics.smk (the realism rule reads the first oracle's spec)
JUDGES = MET["judges"]
# an oracle's training recipe without its inference batch size (run-only; the script reads it at run time)
ORACLE_RECIPES = {name: {k: v for k, v in oracle_recipe(config, entry).items() if k != "eval_batch_size"}
                  for name, entry in ORACLES.items()}
ORACLE_SEEDS = {name: int(entry["seed"]) for name, entry in ORACLES.items()}
CONTROL_GENERATORS = ("pgd", "guided_noclf")
if "pgd" in MET_GENERATORS and "guided" not in MET_GENERATORS:
    raise WorkflowError("counterfactuals.generators lists 'pgd' without 'guided': the PGD control takes its mask and "
                        "L2 budget from the guided counterfactuals; add 'guided' or drop 'pgd'")


rule train_oracle:
    """Train one oracle (metrics.oracles.models) on the train split; held-out AUROC; oracle.json (a classifier spec)."""
    input:
        pack=lambda wc: training_pack(ORACLES[wc.oracle].get("train_data", "clean")),
        index=rules.resize.output.index,
        split=rules.split.output.split,
    output:
        weights=f"{ORACLE_DIR}/{{oracle}}/model.pt",
        heldout=f"{ORACLE_DIR}/{{oracle}}/heldout.json",
        history=f"{ORACLE_DIR}/{{oracle}}/history.csv",
        eval_scores=f"{ORACLE_DIR}/{{oracle}}/eval_scores.csv",
        spec=f"{ORACLE_DIR}/{{oracle}}/oracle.json",
        prov=prov(f"{ORACLE_DIR}/{{oracle}}/heldout.json", f"{ORACLE_DIR}/{{oracle}}/oracle.json"),
    wildcard_constraints:
        oracle="|".join(ORACLES) or "NO_ORACLE",
    params:
        name=lambda wc: wc.oracle,
        recipe=lambda wc: ORACLE_RECIPES[wc.oracle],
        seed=lambda wc: ORACLE_SEEDS[wc.oracle],
    threads: job_threads("train_oracle")
    resources:
        **job_resources("train_oracle"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/judges/train_oracle_{{oracle}}.log",
    benchmark:
        f"{BENCH}/train_oracle_{{oracle}}.tsv"
    script:
        entry_script("train_oracle.py")


rule score_oracle:
    """One oracle's scores of the anchors ({generator}=original) or of one generator's counterfactuals."""
    input:
        spec=rules.train_oracle.output.spec,
        anchors=rules.anchors.output.anchors,
        pack_index=rules.resize.output.index,
        split=rules.split.output.split,
        indexes=lambda wc: [] if wc.generator == ORIGINAL else [cf_index(wc.generator)],
    output:
        scores=f"{ORACLE_DIR}/{{oracle}}/scores/{{generator}}.csv",
        prov=prov(f"{ORACLE_DIR}/{{oracle}}/scores/{{generator}}.csv"),
    wildcard_constraints:
        oracle="|".join(ORACLES) or "NO_ORACLE",
        generator="|".join([ORIGINAL, *GENERATORS]),
    params:
        scoring={**SCORING, "originals": "anchors"},
    threads: job_threads("score_oracle")
    resources:
        **job_resources("score_oracle"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/judges/score_oracle_{{oracle}}_{{generator}}.log",
    script:
        entry_script("score.py")


localrules:
    gather_oracle_scores,


rule gather_oracle_scores:
    """One oracle's score table (the anchors and every generator), same contract as results/scores/scores.csv."""
    input:
        parts=expand(f"{ORACLE_DIR}/{{oracle}}/scores/{{generator}}.csv", generator=[ORIGINAL, *GENERATORS],
                     allow_missing=True),
    output:
        scores=f"{ORACLE_DIR}/{{oracle}}/scores.csv",
        prov=prov(f"{ORACLE_DIR}/{{oracle}}/scores.csv"),
    wildcard_constraints:
        oracle="|".join(ORACLES) or "NO_ORACLE",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/judges/gather_oracle_scores_{{oracle}}.log",
    script:
        entry_script("gather_scores.py")


rule pgd_counterfactuals:
    """The PGD control: masked L2 PGD on the audited classifier with each guided counterfactual's mask and budget."""
    input:
        classifier=CLASSIFIER_SPEC,
        guided=cf_index("guided"),
        pack=rules.resize.output.pack,
        index=rules.resize.output.index,
    output:
        index=cf_index("pgd"),
        images=directory(f"{CF_DIR}/pgd/images"),
        prov=prov(cf_index("pgd")),
    params:
        pgd=result_settings(config, "metrics.judges.pgd"),  # without the batch size: it changes no pixel
    threads: job_threads("pgd_counterfactuals")
    priority: 1  # scheduling only: the judges wait on it, so it starts as soon as guided is gathered
    resources:
        **job_resources("pgd_counterfactuals"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/judges/pgd_counterfactuals.log",
    benchmark:
        f"{BENCH}/pgd_counterfactuals.tsv"
    script:
        entry_script("pgd_counterfactuals.py")


rule diagnostics:
    """Audited scores after JPEG q75 / blur 0.5 px / 1-px shift, out-of-gamut share and HF ratio of every change."""
    input:
        spec=CLASSIFIER_SPEC,
        indexes=MET_CF_INDEXES,
        anchors=rules.anchors.output.anchors,
        pack=rules.resize.output.pack,
        pack_index=rules.resize.output.index,
        split=rules.split.output.split,
    output:
        per_image=f"{METRICS_DIR}/diagnostics_per_image.csv",
        gamut=f"{METRICS_DIR}/diagnostics_gamut.json",
        prov=prov(f"{METRICS_DIR}/diagnostics_per_image.csv"),
    params:
        generators=MET_GENERATORS,
        diagnostics={"hf_cutoff": JUDGES["diagnostics"]["hf_cutoff"],
                     "pixel_change_tolerance": MET["closeness"]["pixel_change_tolerance"],
                     "size": MET["closeness"]["size"]},  # anchor-vs-counterfactual pixels: closeness's size
    threads: job_threads("diagnostics")
    resources:
        **job_resources("diagnostics"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/judges/diagnostics.log",
    script:
        entry_script("diagnostics.py")


rule judges:
    """'Are the counterfactuals semantic?': audited vs oracle flips, survival, gamut, realism, closeness, verdicts."""
    input:
        scores=SCORES,
        anchors=rules.anchors.output.anchors,
        spec=CLASSIFIER_SPEC,
        oracle_scores=expand(rules.gather_oracle_scores.output.scores, oracle=list(ORACLES)),
        oracle_specs=expand(rules.train_oracle.output.spec, oracle=list(ORACLES)),
        diagnostics=rules.diagnostics.output.per_image,
        closeness=rules.closeness.output.per_image,
        realism=rules.realism.output.csv,
        features=rules.realism.output.features,
        guided_index=[cf_index("guided")] if "guided" in MET_GENERATORS else [],
    output:
        csv=f"{METRICS_DIR}/judges.csv",
        differences=f"{METRICS_DIR}/judges_differences.csv",
        md=f"{METRICS_DIR}/judges.md",
        html=report(f"{METRICS_DIR}/judges.html", caption="report/judges.rst",
                    category="1. Table 1", labels={"table": "Are the counterfactuals semantic?"}),
        prov=prov(*[f"{METRICS_DIR}/judges{ext}" for ext in (".csv", "_differences.csv", ".md", ".html")]),
    params:
        oracles=list(ORACLES),
        generators=MET_GENERATORS,
        bootstrap=MET["bootstrap"],
        fd_resamples=JUDGES["fd_resamples"],
        seed=MET_SEED,
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/judges/judges.log",
    script:
        entry_script("judges.py")


if MET_GENERATORS:
    ALL_TARGETS.extend([*rules.judges.output, *expand(rules.train_oracle.output.heldout, oracle=list(ORACLES))])


rule shortcut_cue_effect:
    """Planted shortcut: each anchor re-rendered with and without the cue, scored by the audited classifier and every oracle."""
    input:
        anchors=rules.anchors.output.anchors,
        metadata=rules.synthetic_dataset.output.metadata,
        spec=CLASSIFIER_SPEC,
        oracle_specs=[f"{ORACLE_DIR}/{name}/oracle.json" for name in ORACLES],
    output:
        table=CUE_EFFECT,
        prov=prov(CUE_EFFECT),
    params:
        shortcut=config["dataset"]["synthetic"]["shortcut"],
        oracles=list(ORACLES),
        train_data={name: entry.get("train_data", "clean") for name, entry in ORACLES.items()},
        seed=config["seed"],
        synth_size=config["dataset"]["synthetic"]["size"],
        image_size=config["image_size"],
        resize=config["resize"],
        bootstrap=TRAITS["statistics"]["bootstrap"],
        ci_level=TRAITS["statistics"]["ci_level"],
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/traits/shortcut_cue_effect.log",
    script:
        entry_script("shortcut_cue_effect.py")
