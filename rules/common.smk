from snakemake.exceptions import WorkflowError

# Shared paths and helpers for every rules file.

RESULTS = "results"
DATA = f"{RESULTS}/data"
LOGS = "logs"
BENCH = "benchmarks"

CLASSIFIER_SPEC = f"{RESULTS}/classifier/classifier.json"  # the classifier contract every consumer loads
SCORES = f"{RESULTS}/scores/scores.csv"

# Each rules file appends the deliverables it adds to `rule all`.
ALL_TARGETS = []
SYNTH = "resources/synthetic"
ISIC = "resources/isic"


def entry_script(name):
    """Path of an entry script in workflow_scripts/ (relative to this rules file)."""
    return f"../workflow_scripts/{name}"


def job_resources(name):
    """Scheduler resources of a heavy rule from config['resources'][name] (mem_mb, runtime, gpu)."""
    r = config["resources"][name]
    # mem_mb grows with the attempt (1x, 2x, 3x): a job a scheduler killed for memory is resubmitted with
    # more when the profile sets `retries` (local runs have no retries, so they see the configured value).
    out = {"mem_mb": lambda wildcards, attempt: r["mem_mb"] * attempt, "runtime": r["runtime"]}
    if r["gpus"]:
        out["gpu"] = r["gpus"]
    return out


def job_threads(name):
    return config["resources"][name]["threads"]


# One pinned environment for every rule (same pins as requirements.lock); used with --sdm conda.
CONDA_ENV = "../envs/cfaudit.yaml"


def ground_truth_inputs(wildcards):
    """Originals + their metadata for the configured dataset.source."""
    if config["dataset"]["source"] == "synthetic":
        return {"images": f"{SYNTH}/images", "metadata": f"{SYNTH}/metadata.csv"}
    if config["dataset"]["source"] == "isic":
        return {"images": f"{ISIC}/download", "metadata": f"{ISIC}/manifest.csv"}
    folder = config["dataset"]["folder"]
    for key in ("images", "labels"):
        if not folder[key]:
            raise WorkflowError(f"dataset.source is 'folder' but dataset.folder.{key} is empty: set it in your config")
        if not os.path.exists(folder[key]):
            raise WorkflowError(f"dataset.folder.{key} = {folder[key]!r} does not exist (relative paths are taken from the working directory)")
    return {"images": folder["images"], "metadata": folder["labels"]}


def classifier_spec_inputs(wildcards):
    """Weights the classifier spec is written from: the trained stand-in, or placed DeepDerm/checkpoint weights."""
    if CLF_KIND == "trained":
        return {"weights": rules.train_classifier.output.weights, "heldout": rules.train_classifier.output.heldout}
    return {"weights": f"{WEIGHTS_DIR}/{CLF_KIND}.pth"}


def prov(path):
    """The provenance sidecar of an output (declared so Snakemake tracks and cleans it)."""
    return f"{path}.prov.json"


def gan_checkpoint(wildcards):
    """The generator the counterfactuals come from: the published one, or one trained here."""
    return GAN_PRETRAINED if GAN_CFG["source"] == "pretrained" else rules.train_gan.output.checkpoint
