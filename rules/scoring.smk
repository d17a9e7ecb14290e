# Scoring stage: the audited classifier's verdict on every original and counterfactual (from the saved
# 8-bit files), and the seed's panels (anchor | benign CF | malignant CF) per generator.

PANELS = f"{RESULTS}/panels"
SCORED_GENERATORS = list(config["counterfactuals"]["generators"])


rule score:
    """Score originals + counterfactuals of every configured generator into one long table."""
    input:
        spec=CLASSIFIER_SPEC,
        anchors=rules.anchors.output.anchors,
        pack_index=rules.resize.output.index,
        split=rules.split.output.split,
        indexes=expand(f"{RESULTS}/counterfactuals/{{g}}/index.csv", g=SCORED_GENERATORS),
    output:
        scores=SCORES,
    params:
        scoring=config["classifier"]["scoring"],
        generators=SCORED_GENERATORS,
        compute=config["compute"],
    threads: job_threads("score")
    resources:
        **job_resources("score"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/scoring/score.log",
    benchmark:
        f"{BENCH}/score.tsv"
    script:
        entry_script("score.py")


rule panels:
    """combined_{index:05d}_{label}_{p_orig}_{p_benign}_{p_malignant}.png per anchor + one contact sheet."""
    input:
        scores=SCORES,
        anchors=rules.anchors.output.anchors,
    output:
        panels=directory(f"{PANELS}/{{generator}}/combined"),
        sheet=f"{PANELS}/{{generator}}/contact_sheet.png",
    wildcard_constraints:
        generator="|".join(SCORED_GENERATORS) or "NO_GENERATOR",
    params:
        panels=config["classifier"]["panels"],
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/scoring/panels_{{generator}}.log",
    script:
        entry_script("panels.py")


ALL_TARGETS.append(SCORES)
ALL_TARGETS.extend(expand(rules.panels.output.sheet, generator=SCORED_GENERATORS))
