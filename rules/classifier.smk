# Classifier stage: the audited classifier -> results/classifier/classifier.json (every consumer's input).
# kind trained: rule train_classifier trains a torchvision architecture from scratch on the train split;
# kind deepderm / checkpoint: rule place_classifier_weights copies or downloads the weights (sha256-checked).

CLF = config["classifier"]
CLF_KIND = CLF["kind"]
CLF_DIR = f"{RESULTS}/classifier"
WEIGHTS_DIR = "resources/weights"
CLF_SOURCES = {k: {s: CLF[k][s] for s in ("url", "local_path", "sha256")} for k in ("deepderm", "checkpoint")}
CLF_TRAINING = result_settings(config, "classifier.trained", drop=("threshold", "seed"))


localrules:
    place_classifier_weights,


rule place_classifier_weights:
    """Copy (local_path) or download (url, on the submit host) the classifier weights; verify the sha256."""
    output:
        weights=f"{WEIGHTS_DIR}/{{kind}}.pth",
    wildcard_constraints:
        kind="deepderm|checkpoint",
    params:
        source=lambda wc: CLF_SOURCES[wc.kind],
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/classifier/place_{{kind}}.log",
    script:
        entry_script("place_classifier_weights.py")


rule train_classifier:
    """Train classifier.trained.arch from scratch on the train split; held-out AUROC on the eval split."""
    input:
        pack=training_pack(),
        index=rules.resize.output.index,
        split=rules.split.output.split,
    output:
        weights=f"{CLF_DIR}/trained/model.pt",
        heldout=f"{CLF_DIR}/trained/heldout.json",
        history=f"{CLF_DIR}/trained/history.csv",
        eval_scores=f"{CLF_DIR}/trained/eval_scores.csv",
        prov=prov(f"{CLF_DIR}/trained/heldout.json"),
    params:
        trained=CLF_TRAINING,
        seed=seed_of(CLF["trained"]["seed"]),
    threads: job_threads("train_classifier")
    resources:
        **job_resources("train_classifier"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/classifier/train_classifier.log",
    benchmark:
        f"{BENCH}/train_classifier.tsv"
    script:
        entry_script("train_classifier.py")


rule classifier_spec:
    """Write results/classifier/classifier.json after a strict load and one forward pass of the weights."""
    input:
        unpack(classifier_spec_inputs),
    output:
        spec=CLASSIFIER_SPEC,
        prov=prov(CLASSIFIER_SPEC),
    params:
        classifier={"kind": CLF_KIND, "score_space": CLF["score_space"],
                    CLF_KIND: result_settings(config, f"classifier.{CLF_KIND}")},
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/classifier/classifier_spec.log",
    script:
        entry_script("classifier_spec.py")


ALL_TARGETS.append(CLASSIFIER_SPEC)
if CLF_KIND == "trained":
    ALL_TARGETS.append(rules.train_classifier.output.heldout)
