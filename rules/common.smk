from snakemake.exceptions import WorkflowError

from cfaudit.config import result_settings, shortcut_enabled
from cfaudit.names import ORIGINAL  # the originals' share of the score tables

# Shared paths, constants and helpers for every rules file. Rule params hold only settings that can change the
# rule's outputs (cfaudit.config.RUN_ONLY_KEYS lists those that cannot; scripts read them at run time).

RESULTS = "results"
DATA = f"{RESULTS}/data"
LOGS = "logs"
BENCH = "benchmarks"

CLASSIFIER_SPEC = f"{RESULTS}/classifier/classifier.json"  # the classifier contract every consumer loads
SCORES_DIR = f"{RESULTS}/scores"
SCORES = f"{SCORES_DIR}/scores.csv"  # every generator's scores + the originals' (gather_scores)
CF_DIR = f"{RESULTS}/counterfactuals"
GENERATORS = list(config["counterfactuals"]["generators"])
SHARDS = list(range(config["counterfactuals"]["shards"]))
SHARDED_GENERATORS = [g for g in ("gan", "diffusion", "guided", "guided_noclf") if g in GENERATORS]

# Each rules file appends the deliverables it adds to `rule all`.
ALL_TARGETS = []
SYNTH = "resources/synthetic"
# a planted shortcut in the audited classifier's train images (cfaudit.data.shortcut; embedded data only)
SHORTCUT_ON = shortcut_enabled(config)  # validate_config refuses a cue on ISIC or folder data
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


def prov(*paths):
    """The provenance sidecar(s) of outputs (declared so Snakemake tracks and cleans them); one path -> a str."""
    sidecars = [f"{p}.prov.json" for p in paths]
    return sidecars[0] if len(sidecars) == 1 else sidecars


def seed_of(value):
    """A stage's seed: its own setting, or the top-level seed when that is null."""
    return config["seed"] if value is None else value


def cf_index(generator):
    """The one index of a generator's counterfactuals (what scoring, metrics and traits read)."""
    return f"{CF_DIR}/{generator}/index.csv"


def gan_checkpoint(wildcards):
    """The generator the counterfactuals come from: the published one, or one trained here."""
    return GAN_PRETRAINED if GAN_CFG["source"] == "pretrained" else rules.train_gan.output.checkpoint
