"""Configuration: validation against the schema (which also fills in defaults) and dotted look-ups."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

SCHEMA = Path(__file__).parent / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """The configuration does not match the schema; the message names the offending key."""


def validate_config(config: dict) -> dict:
    """Validate ``config`` in place with ``snakemake.utils.validate`` and fill in schema defaults.

    Raises ConfigError whose message starts with the dotted path of the bad key, e.g.
    ``config key 'dataset.synthetic': Additional properties are not allowed ('n_imgs' was unexpected)``.
    """
    import jsonschema
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    try:
        validate(config, str(SCHEMA), set_default=True)
    except WorkflowError as err:
        cause = err.__context__
        if not isinstance(cause, jsonschema.ValidationError):
            raise ConfigError(f"invalid configuration: {err}") from err
        where = ".".join(str(p) for p in cause.absolute_path) or "<top level>"
        raise ConfigError(
            f"config key '{where}': {cause.message}. "
            f"See docs/configuration.md (schema: {SCHEMA.name})."
        ) from None
    fill_defaults(config, load_schema(SCHEMA))
    check_ema_use(config)
    check_shortcut(config)
    sort_keys_in_place(config)
    return config


def shortcut_enabled(config: dict) -> bool:
    """Whether the audited classifier trains on the pack with the planted cue (cfaudit.data.shortcut)."""
    return config["dataset"]["synthetic"]["shortcut"]["cue"] != "none"


def check_shortcut(config: dict) -> None:
    """The planted shortcut re-renders embedded images: refuse it for ISIC or folder data."""
    source = config["dataset"]["source"]
    if shortcut_enabled(config) and source != "synthetic":
        cue = config["dataset"]["synthetic"]["shortcut"]["cue"]
        raise ConfigError(f"config key 'dataset.synthetic.shortcut.cue' is {cue!r} but dataset.source is {source!r}: "
                          "a cue can only be planted in the embedded images. Set the cue to none or use "
                          "dataset.source: synthetic.")


def sort_keys_in_place(node: dict) -> None:
    """Order every mapping of the config by key, in place. Snakemake's params rerun trigger compares the
    recorded params as text, so the same settings written in another order (an overlay, a preset, a config
    dumped with sorted keys) would otherwise rerun every rule whose params hold a section of the config."""
    items = sorted(node.items(), key=lambda kv: str(kv[0]))
    node.clear()
    for key, value in items:
        if isinstance(value, dict):
            sort_keys_in_place(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    sort_keys_in_place(item)
        node[key] = value


def check_ema_use(config: dict) -> None:
    """Refuse, before anything runs, a generator set to sample with EMA weights a training without EMA keeps.

    Without this the mismatch surfaces only after the diffusion model has trained. guided.use_ema null (the
    default) is resolved here: EMA exactly when diffusion.ema_decay > 0.
    """
    if config["guided"]["use_ema"] is None:  # null: EMA exactly when the training keeps it
        config["guided"]["use_ema"] = config["diffusion"]["ema_decay"] > 0
    if config["diffusion"]["ema_decay"] > 0:
        return
    generators = config["counterfactuals"]["generators"]
    for key, users in (("diffusion.counterfactual.use_ema", ("diffusion",)),
                       ("guided.use_ema", ("guided", "guided_noclf"))):
        if get(config, key) and set(users) & set(generators):
            raise ConfigError(f"config key '{key}' is true but diffusion.ema_decay is 0, so the diffusion model keeps "
                              f"no EMA weights: set {key}: false or diffusion.ema_decay > 0 (e.g. 0.995)")


def load_schema(path: Path) -> dict:
    """One schema file as a dict (the top file, config.schema.yaml, names the section files by ``$ref``)."""
    import yaml

    with open(path) as fh:
        return yaml.safe_load(fh)


def resolve_ref(ref: str, root: dict, here: Path) -> tuple[dict, dict, Path]:
    """(target schema, its document, its file) of a ``$ref`` met in ``root`` (read from ``here``).

    Two forms occur: ``#/$defs/name`` inside the same document and ``section.schema.yaml``, a sibling file.
    The one place that follows references, for filling defaults and for docs/configuration.md.
    """
    if ref.startswith("#/"):
        target = root
        for part in ref[2:].split("/"):
            target = target[part]
        return target, root, here
    path = here.parent / ref
    loaded = load_schema(path)
    return loaded, loaded, path


def fill_defaults(instance: dict, schema: dict, root: dict | None = None, here: Path = SCHEMA) -> None:
    """Fill schema defaults into nested sections, following ``$ref`` into sibling schema files.

    snakemake.utils.validate fills defaults only where no ``$ref`` intervenes; the sections live in
    their own files, so the defaults are completed here after validation has passed.
    """
    root = schema if root is None else root
    if schema.get("$ref"):
        fill_defaults(instance, *resolve_ref(schema["$ref"], root, here))
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if isinstance(instance.get(key), dict):
            fill_defaults(instance[key], sub, root, here)


def load_config(*paths: str | Path, overrides: dict | None = None) -> dict:
    """Merge YAML files left to right (later wins, key by key), apply ``overrides``, validate."""
    import yaml

    merged: dict = {}
    for p in paths:
        with open(p) as fh:
            deep_update(merged, yaml.safe_load(fh) or {})
    deep_update(merged, overrides or {})
    return validate_config(merged)


def deep_update(base: dict, new: dict) -> dict:
    """Recursively merge ``new`` into ``base`` (as Snakemake merges config files)."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def get(config: dict, dotted: str) -> Any:
    """``get(cfg, "dataset.synthetic.n_images")``; a missing key raises KeyError naming the full path."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"config has no key '{dotted}'")
        node = node[part]
    return node


def config_slice(config: dict, keys: list[str]) -> dict:
    """The values of the dotted ``keys`` of ``config``, for provenance records and rule params."""
    return {k: get(config, k) for k in keys}


# Settings that cannot change a result: how a job runs, not what it computes. Rules keep them out of their params
# (Snakemake's params rerun trigger would otherwise rerun every job below), and the entry scripts read them from
# the config at run time (`run_settings`). docs/reproducibility.md "Rerunning stale stages" lists them;
# tests/test_rerun.py checks that changing them schedules nothing.
RUN_ONLY_KEYS = {
    "compute": "device choice (auto / cuda / cpu) and CPU fallback",
    "dataset.isic.retries": "download retries",
    "dataset.isic.backoff_s": "download back-off",
    "dataset.isic.timeout_s": "request timeout",
    "dataset.isic.command_timeout_s": "isic-cli timeout",
    "dataset.isic.workers": "parallel downloads",
    "classifier.trained.eval_batch_size": "inference batch size",
    "classifier.deepderm.retries": "download retries",
    "classifier.deepderm.timeout_s": "download timeout",
    "classifier.checkpoint.retries": "download retries",
    "classifier.checkpoint.timeout_s": "download timeout",
    "classifier.scoring.batch_size": "inference batch size",
    "classifier.scoring.workers": "data-loading workers",
    "gan.train.checkpoint_every": "resume-checkpoint interval",
    "gan.generate.batch_size": "inference batch size in eval mode (in train mode rules/gan.smk keeps it as a param)",
    "gan.pretrained.retries": "download retries",
    "gan.pretrained.timeout_s": "download timeout",
    "diffusion.checkpoint_every": "resume-checkpoint interval",
    "diffusion.log_every": "logging interval",
    "diffusion.counterfactual.batch_size": "inference batch size (noise is drawn per anchor)",
    "guided.batch_size": "inference batch size (noise is drawn per anchor)",
    "metrics.fid.download_timeout_s": "download timeout",
    "metrics.fid.batch_size": "inference batch size",
    "metrics.judges.pgd.batch_size": "batch size (every image has its own budget and steps)",
    "metrics.judges.diagnostics.batch_size": "inference batch size",
    "resources": "threads, memory, runtime and GPUs of each job",
}


def _drop(node: dict, dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if head in node:
        if rest:
            if isinstance(node[head], dict):
                _drop(node[head], rest)
        else:
            del node[head]


def result_settings(config: dict, section: str, drop: tuple[str, ...] = ()) -> dict:
    """``config[section]`` (dotted) without its run-only keys and without ``drop``: what a rule's params hold,
    so that only a setting that can change the rule's outputs reruns it."""
    out = copy.deepcopy(get(config, section))
    for key in [*RUN_ONLY_KEYS, *(f"{section}.{d}" for d in drop)]:
        if key.startswith(section + "."):
            _drop(out, key[len(section) + 1:])
    return out


def run_settings(params: dict, config: dict, section: str) -> dict:
    """A rule's params section with the run-only keys of ``config[section]`` put back: what the job runs with."""
    out = copy.deepcopy(dict(params))
    for key in RUN_ONLY_KEYS:
        if key.startswith(section + "."):
            *parents, last = key[len(section) + 1:].split(".")
            node = out
            for part in parents:  # a subsection the params left out (e.g. diffusion.counterfactual) stays out
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node[last] = get(config, key)
    return out


def guided_variants(config: dict) -> dict:
    """The guided rules' params, {generator: settings}: only what can change the counterfactuals, so that a
    setting that cannot (the angle of a cone that is off, a retry margin when retries do not early-stop, the
    unsmoothed mask of every run before the key existed) reruns nothing. ``guided_noclf`` is the same sampler with
    the classifier-gradient scale 0 and one attempt (a control of the judges): no gradient, so no cone either."""
    sampling = result_settings(config, "guided", drop=("cone.model",))  # the model is the robust rule's input
    if not sampling["cone"]["enabled"]:
        sampling["cone"] = {"enabled": False}
    if not sampling["mask"].get("smooth"):
        sampling["mask"].pop("smooth", None)
    if not sampling["early_stop"].get("on_retries", True):
        sampling["early_stop"].pop("retry_margin", None)
    noclf_stop = {k: v for k, v in sampling["early_stop"].items() if k not in ("retry_margin", "on_retries")}
    return {"guided": sampling,
            "guided_noclf": {**sampling, "scales": [0.0], "max_retries": 0, "cone": {"enabled": False},
                             "early_stop": noclf_stop}}
