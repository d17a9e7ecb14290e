# Scoring stage: the audited classifier's verdict on every original and counterfactual (from the saved 8-bit
# files), one job per generator so that one generator's change rescoring the others is gone; gather_scores joins
# them into results/scores/scores.csv (what the metrics read). Then the seed's panels (anchor | benign CF |
# malignant CF) per generator, from that generator's scores and the originals'.

PANELS = f"{RESULTS}/panels"
SCORING = result_settings(config, "classifier.scoring")


rule score:
    """Score the originals ({generator}=original) or one generator's counterfactuals with the audited classifier."""
    input:
        spec=CLASSIFIER_SPEC,
        anchors=rules.anchors.output.anchors,
        pack_index=rules.resize.output.index,
        split=rules.split.output.split,
        indexes=lambda wc: [] if wc.generator == ORIGINAL else [cf_index(wc.generator)],
    output:
        scores=f"{SCORES_DIR}/{{generator}}.csv",
        prov=prov(f"{SCORES_DIR}/{{generator}}.csv"),
    wildcard_constraints:
        generator="|".join([ORIGINAL, *GENERATORS]),
    params:
        scoring=SCORING,
    threads: job_threads("score")
    resources:
        **job_resources("score"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/scoring/score_{{generator}}.log",
    benchmark:
        f"{BENCH}/score_{{generator}}.tsv"
    script:
        entry_script("score.py")


localrules:
    gather_scores,


rule gather_scores:
    """One long table of the originals' and every generator's scores (in the configured generator order)."""
    input:
        parts=expand(rules.score.output.scores, generator=[ORIGINAL, *GENERATORS]),
    output:
        scores=SCORES,
        prov=prov(SCORES),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/scoring/gather_scores.log",
    script:
        entry_script("gather_scores.py")


rule panels:
    """combined_{index:05d}_{label}_{p_orig}_{p_benign}_{p_malignant}.png per anchor + one contact sheet."""
    input:
        scores=[f"{SCORES_DIR}/{ORIGINAL}.csv", f"{SCORES_DIR}/{{generator}}.csv"],
        anchors=rules.anchors.output.anchors,
    output:
        panels=directory(f"{PANELS}/{{generator}}/combined"),
        sheet=f"{PANELS}/{{generator}}/contact_sheet.png",
        prov=prov(f"{PANELS}/{{generator}}/contact_sheet.png"),
    wildcard_constraints:
        generator="|".join(GENERATORS) or "NO_GENERATOR",
    params:
        panels=config["classifier"]["panels"],
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/scoring/panels_{{generator}}.log",
    script:
        entry_script("panels.py")


ALL_TARGETS.append(SCORES)
ALL_TARGETS.extend(expand(rules.panels.output.sheet, generator=GENERATORS))
