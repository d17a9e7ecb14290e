"""Oracle classifiers: independent judges trained on the train split, never used to make a counterfactual.

Each oracle (config ``metrics.oracles.models``) differs from the audited classifier in architecture and seed and,
by default, in input size and augmentation, so that it shares as few non-robust features with the audited
classifier as the data allow. Rule ``train_oracle`` trains one per job with the stand-in's recipe
(``classifier.trained``, :mod:`cfaudit.classifier_training`) overridden by the oracle's own keys, and writes a
classifier spec (``oracle.json``) that the scoring and realism code load like ``classifier.json``.
"""

from __future__ import annotations

from pathlib import Path

# keys of an oracle entry that override the classifier.trained recipe
RECIPE_KEYS = ("arch", "arch_kwargs", "input_size", "normalization", "epochs", "batch_size", "lr", "weight_decay",
               "warmup_epochs", "flips", "rot90", "rotate", "scale_jitter", "translate", "balance_classes", "bf16",
               "eval_batch_size", "threshold")


def audited_identity(config: dict) -> tuple[str, int | None]:
    """(architecture, training seed or None) of the audited classifier as configured."""
    clf = config["classifier"]
    if clf["kind"] == "trained":
        seed = clf["trained"]["seed"] if clf["trained"]["seed"] is not None else config["seed"]
        return clf["trained"]["arch"], int(seed)
    if clf["kind"] == "deepderm":
        return "inception_v3", None
    return clf["checkpoint"]["arch"], None


def oracle_recipe(config: dict, entry: dict, keys: tuple[str, ...] = RECIPE_KEYS) -> dict:
    """The training settings of one oracle (or of another model trained here, with its own ``keys``):
    classifier.trained with the entry's keys on top (score space softmax); input_size null = image_size."""
    recipe = {k: v for k, v in config["classifier"]["trained"].items() if k in keys}
    recipe.update({k: v for k, v in entry.items() if k in keys and v is not None})
    if entry.get("input_size") is None:
        recipe["input_size"] = int(config["image_size"])
    return recipe


def check_oracles(config: dict) -> dict[str, dict]:
    """{name: entry} of the configured oracles; refuses an oracle that is not independent of the audited
    classifier (same architecture or same seed), duplicate names, and names that are not file-safe."""
    models = config["metrics"]["oracles"]["models"]
    arch, seed = audited_identity(config)
    out = {}
    for i, entry in enumerate(models):
        name = str(entry["name"])
        where = f"config key 'metrics.oracles.models[{i}]' ({name!r})"
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"{where}: name must be letters, digits, '_' or '-' (it names a folder)")
        if name in out:
            raise ValueError(f"{where}: the name is used twice")
        if entry["arch"] == arch:
            raise ValueError(f"{where}: arch {arch!r} is the audited classifier's; an oracle must differ in "
                             "architecture (pick another torchvision model)")
        if seed is not None and int(entry["seed"]) == seed:
            raise ValueError(f"{where}: seed {seed} is the audited classifier's training seed; pick another")
        out[name] = entry
    return out


def write_oracle_spec(name: str, recipe: dict, weights, heldout_path, out_spec) -> dict:
    """oracle.json: a classifier spec of kind 'trained' (softmax score, the recipe's threshold) after a strict load."""
    return write_trained_spec(f"oracle_{name}", recipe, weights, heldout_path, out_spec, "oracle",
                              "oracle (judge only; never an input of a generator)")


def write_trained_spec(name: str, recipe: dict, weights, heldout_path, out_spec, record: str, role: str) -> dict:
    """A classifier spec of kind 'trained' for a model trained here (softmax score, the recipe's threshold), written
    after a strict load of ``weights``; ``record`` names its training record in the spec's provenance."""
    import json

    from cfaudit.classifiers import build_classifier, make_spec, spec_training_record, write_spec

    heldout = json.loads(Path(heldout_path).read_text())
    spec = make_spec("trained", name=name, arch=recipe["arch"], weights=weights,
                     input_size=recipe["input_size"], resize_size=recipe["input_size"], num_classes=2,
                     positive_index=1, normalization=recipe.get("normalization", "minus_one_one"),
                     score_space="softmax", threshold=float(recipe.get("threshold", 0.5)),
                     arch_kwargs=recipe.get("arch_kwargs", {}),
                     provenance={record: spec_training_record(heldout)})
    build_classifier(spec, weights)  # strict load: a bad file fails here
    spec["role"] = role
    write_spec(spec, out_spec)
    return spec
