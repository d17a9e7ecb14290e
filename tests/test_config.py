"""The schema names a bad key, fills defaults, and the shipped config files are valid."""

from pathlib import Path

import pytest
import yaml

from cfaudit.config import ConfigError, deep_update, get, load_config, validate_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_filled_in_nested_sections():
    cfg = validate_config({})
    assert cfg["image_size"] == 256
    assert cfg["dataset"]["source"] == "synthetic"
    assert cfg["dataset"]["synthetic"]["n_images"] == 400
    assert cfg["resources"]["resize"]["threads"] == 2
    assert cfg["resources"]["resize"]["gpus"] == 0  # default of the shared job definition


@pytest.mark.parametrize(
    "bad, key, words",
    [
        ({"imagesize": 64}, "<top level>", "imagesize"),
        ({"dataset": {"synthetic": {"n_imgs": 3}}}, "dataset.synthetic", "n_imgs"),
        ({"dataset": {"source": "kaggle"}}, "dataset.source", "kaggle"),
        ({"split": {"eval_fraction": "a third"}}, "split.eval_fraction", "not of type"),
        ({"split": {"eval_fraction": 1.5}}, "split.eval_fraction", "1.5"),
        ({"resources": {"resize": {"threads": 0}}}, "resources.resize.threads", "minimum"),
    ],
)
def test_schema_errors_name_the_key(bad, key, words):
    with pytest.raises(ConfigError) as err:
        validate_config(bad)
    msg = str(err.value)
    assert f"config key '{key}'" in msg
    assert words in msg


def test_shipped_config_and_presets_validate():
    for path in [REPO / "config.yaml", *sorted((REPO / "presets").glob("*.yaml"))]:
        load_config(REPO / "config.yaml", path)
    layered = load_config(REPO / "config.yaml", REPO / "presets/seed.yaml", REPO / "presets/smoke_fullres.yaml")
    assert layered["image_size"] == 256 and layered["diffusion"]["counterfactual"]["sampler"] == "ddpm"


@pytest.mark.parametrize("key", ["guided.use_ema", "diffusion.counterfactual.use_ema"])
def test_ema_sampling_without_ema_training_is_refused_before_anything_runs(key):
    section, *rest = key.split(".")
    override = {"diffusion": {"ema_decay": 0.0, "counterfactual": {"use_ema": False}}, "guided": {"use_ema": False}}
    node = override[section]
    for part in rest[:-1]:
        node = node[part]
    node[rest[-1]] = True
    with pytest.raises(ConfigError, match=rf"config key '{key}' is true but diffusion.ema_decay is 0"):
        load_config(REPO / "config.yaml", overrides=override)
    override["counterfactuals"] = {"generators": ["gan"]}  # no generator samples the diffusion model: fine
    load_config(REPO / "config.yaml", overrides=override)


def test_deep_update_merges_key_by_key():
    base = {"a": {"b": 1, "c": 2}, "d": 3}
    deep_update(base, {"a": {"c": 5}})
    assert base == {"a": {"b": 1, "c": 5}, "d": 3}


def test_snakemake_rejects_a_typo_with_the_key_named(tmp_path, run_snakemake):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text(yaml.safe_dump({"resize": {"mdoe": "crop"}}))
    proc = run_snakemake(tmp_path, cfg, extra_args=["-n"], check=False)
    assert proc.returncode != 0
    assert "config key 'resize'" in proc.stderr + proc.stdout
    assert "mdoe" in proc.stderr + proc.stdout


def test_result_settings_drop_run_only_keys_and_run_settings_put_them_back():
    from cfaudit.config import RUN_ONLY_KEYS, result_settings, run_settings

    cfg = load_config(REPO / "config.yaml")
    training = result_settings(cfg, "diffusion", drop=("counterfactual",))
    assert "log_every" not in training and "checkpoint_every" not in training and "counterfactual" not in training
    assert training["epochs"] == cfg["diffusion"]["epochs"]
    sampling = result_settings(cfg, "diffusion.counterfactual")
    assert "batch_size" not in sampling and sampling["guidance"] == cfg["diffusion"]["counterfactual"]["guidance"]
    assert run_settings(sampling, cfg, "diffusion.counterfactual") == cfg["diffusion"]["counterfactual"]
    assert run_settings(training, cfg, "diffusion") == {k: v for k, v in cfg["diffusion"].items() if k != "counterfactual"}
    for key in RUN_ONLY_KEYS:  # every listed key exists in the validated config
        get(cfg, key)


def test_guided_params_hold_only_what_can_change_the_counterfactuals():
    """cfaudit.config.guided_variants: a setting the sampler cannot act on is left out of the params (so changing
    it reruns nothing) — the retry margin when retries do not early-stop, the angle of a cone that is off — and
    kept where it acts; guided_noclf is one unguided attempt with the same mask, strength and early stop."""
    from cfaudit.config import guided_variants

    def variants(**guided):
        return guided_variants(load_config(REPO / "config.yaml", overrides={"guided": guided}))

    def stop(on_retries, retry_margin):
        return {"early_stop": {"on_retries": on_retries, "retry_margin": retry_margin}}

    assert variants(**stop(False, 0.0)) == variants(**stop(False, 0.2))
    assert "retry_margin" not in variants(**stop(False, 0.2))["guided"]["early_stop"]
    assert variants(**stop(True, 0.05))["guided"]["early_stop"]["retry_margin"] == 0.05
    assert variants(**stop(True, 0.0)) != variants(**stop(True, 0.05))
    off = {"cone": {"enabled": False, "angle": 30}}
    assert variants(**off) == variants(cone={"enabled": False, "angle": 60})
    assert variants(**off)["guided"]["cone"] == {"enabled": False}
    both = variants(**stop(True, 0.05))
    noclf = both["guided_noclf"]
    assert noclf["scales"] == [0.0] and noclf["max_retries"] == 0 and noclf["cone"] == {"enabled": False}
    assert noclf["mask"] == both["guided"]["mask"] and noclf["strength"] == both["guided"]["strength"]
    assert noclf["early_stop"] == {k: v for k, v in both["guided"]["early_stop"].items()
                                   if k not in ("retry_margin", "on_retries")}


def test_the_same_settings_in_another_key_order_give_the_same_config_order():
    """Snakemake compares recorded params as text: key order must not depend on how a file was written."""
    a = yaml.safe_load("dataset: {synthetic: {size: 48, n_images: 40}}\nseed: 3\n")
    b = yaml.safe_load("seed: 3\ndataset: {synthetic: {n_images: 40, size: 48}}\n")
    ca, cb = load_config(REPO / "config.yaml", overrides=a), load_config(REPO / "config.yaml", overrides=b)
    assert repr(ca) == repr(cb)
    assert list(ca["dataset"]["synthetic"]) == sorted(ca["dataset"]["synthetic"])
