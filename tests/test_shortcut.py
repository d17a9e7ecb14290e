"""The planted shortcut (cfaudit.data.shortcut) and the artefact traits (hair, ink, ruler outside the lesion)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from scipy import stats

from cfaudit.data.images import resize_square
from cfaudit.data.shortcut import CUES, assign_cues, cue_summary, shortcut_pack
from cfaudit.data.synthetic import generate_dataset, render, sample_traits
from cfaudit.traits.control import render_with_nuisances, traits_from_row
from cfaudit.traits.features import ARTEFACT_FEATURES, image_features
from cfaudit.traits.shortcut import artefact_markdown, artefact_table, cue_effect, ranking_line, trait_ranking

SEED, SYNTH, SIZE = 11, 96, 64


def traits(i: int, label: int = 0, **nuisances):
    rng = np.random.default_rng([SEED, i])
    t = sample_traits(rng, f"SYN_{i:05d}", label)
    return dataclasses.replace(t, **nuisances) if nuisances else t


def rendered(t):
    """The dataset's own render of ``t`` (its per-image stream, as generate_dataset draws it)."""
    rng = np.random.default_rng([SEED, int(t.image_id.split("_")[1])])
    sample_traits(rng, t.image_id, t.label)
    return render(t, SYNTH, rng)


def working_size(img: np.ndarray) -> np.ndarray:
    return np.asarray(resize_square(Image.fromarray(img, "RGB"), SIZE, "crop", "lanczos"))


# ---------------------------------------------------------------------------------------------- re-rendering
@pytest.mark.parametrize("i", [0, 1, 2, 3])
def test_an_image_re_rendered_with_its_own_nuisances_is_byte_identical(i):
    t = traits(i, i % 2)
    same = render_with_nuisances(t, SEED, SYNTH, ruler=t.ruler, ink=t.ink, hair=t.hair)
    assert np.array_equal(same, render(t, SYNTH, _advanced(t)))


def _advanced(t):
    rng = np.random.default_rng([SEED, int(t.image_id.split("_")[1])])
    sample_traits(rng, t.image_id, t.label)
    return rng


def test_adding_ink_changes_only_the_corner_where_the_dot_goes():
    for i in range(6):
        t = traits(i, i % 2, ink=False)
        base = render_with_nuisances(t, SEED, SYNTH, ruler=t.ruler, ink=False, hair=t.hair)
        inked = render_with_nuisances(t, SEED, SYNTH, ruler=t.ruler, ink=True, hair=t.hair)
        changed = np.abs(inked.astype(int) - base).max(-1) > 0
        ys, xs = np.nonzero(changed)
        assert changed.sum() > 20  # a dot of radius 0.035 x 96 px
        assert ys.max() < 0.33 * SYNTH and xs.max() < 0.33 * SYNTH  # centre in 8-25 % of the side, radius 3.5 %
        assert np.array_equal(render_with_nuisances(t, SEED, SYNTH, ruler=t.ruler, ink=False, hair=t.hair),
                              rendered(dataclasses.replace(t, ink=False)))


def test_ink_at_the_lesion_centre_is_the_same_dot_on_the_lesion():
    for i in range(4):
        t = traits(i, i % 2, ink=False)
        base = render_with_nuisances(t, SEED, SYNTH, ruler=t.ruler, ink=False, hair=t.hair)
        corner = render_with_nuisances(t, SEED, SYNTH, ruler=t.ruler, ink=True, hair=t.hair)
        centre = render_with_nuisances(t, SEED, SYNTH, ruler=t.ruler, ink=True, hair=t.hair, ink_at_lesion_centre=True)
        ys, xs = np.nonzero(np.abs(centre.astype(int) - base).max(-1) > 8)
        rng = _advanced(t)  # the renderer's first draws: the lesion centre's offsets in 2x-supersampled pixels
        cx, cy = SYNTH + rng.normal(0, 2 * SYNTH * 0.04), SYNTH + rng.normal(0, 2 * SYNTH * 0.04)
        assert abs(xs.mean() - cx / 2) < 1.0 and abs(ys.mean() - cy / 2) < 1.0
        n_corner = (np.abs(corner.astype(int) - base).max(-1) > 8).sum()
        assert 0.7 < len(xs) / n_corner < 1.4  # the same dot
        # nothing else moved: away from the dot the images are equal
        far = np.hypot(*np.mgrid[0:SYNTH, 0:SYNTH][::-1] - np.array([cx / 2, cy / 2])[:, None, None]) > 0.1 * SYNTH  # radius 3.5 % + blur and Lanczos tails
        assert np.array_equal(centre[far], base[far])


def test_a_cue_is_only_placed_where_it_can_go():
    from cfaudit.traits.shortcut import CUE_PLACEMENTS, cue_pair_images

    assert CUE_PLACEMENTS["ink"] == ("as planted", "lesion centre")
    with pytest.raises(ValueError, match="ruler.*lesion centre"):
        cue_pair_images(pd.DataFrame({"image_id": []}), pd.DataFrame({"image_id": []}), "ruler", seed=1, synth_size=SYNTH,
                        image_size=SIZE, hair_count=10, resize_mode="crop", resample="lanczos", placement="lesion centre")


def test_adding_a_ruler_changes_only_the_bottom_band_and_hair_keeps_the_existing_hairs():
    t = traits(4, 1, ruler=False, ink=False, hair=2)
    base = render_with_nuisances(t, SEED, SYNTH, ruler=False, ink=False, hair=2)
    ruled = render_with_nuisances(t, SEED, SYNTH, ruler=True, ink=False, hair=2)
    ys, _ = np.nonzero(np.abs(ruled.astype(int) - base).max(-1) > 0)
    assert ys.min() > 0.75 * SYNTH
    more = render_with_nuisances(t, SEED, SYNTH, ruler=False, ink=False, hair=8)
    fewer = render_with_nuisances(t, SEED, SYNTH, ruler=False, ink=False, hair=0)
    # the two original hairs stay where they were: every pixel they darken is as dark or darker with eight
    hairs = base.astype(int).sum(-1) < fewer.astype(int).sum(-1) - 30
    assert hairs.sum() > 10 and np.all(more.astype(int).sum(-1)[hairs] <= base.astype(int).sum(-1)[hairs] + 6)


# ---------------------------------------------------------------------------------------------- the pack
@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    meta = generate_dataset(out / "images", 60, 0.5, SYNTH, SEED)
    pack = np.stack([working_size(np.asarray(Image.open(out / "images" / f))) for f in meta["file"]])
    index = pd.DataFrame({"row": np.arange(len(meta)), "image_id": meta["image_id"], "label": meta["label"]})
    rng = np.random.default_rng(0)
    split = pd.DataFrame({"image_id": meta["image_id"], "split": np.where(rng.random(len(meta)) < 0.7, "train", "eval")})
    return meta, pack, index, split


@pytest.mark.parametrize("cue", CUES)
def test_shortcut_pack_changes_train_images_only_and_plants_the_cue_by_class(tiny_dataset, cue):
    meta, pack, index, split = tiny_dataset
    shortcut = {"cue": cue, "p_benign": 0.0, "p_malignant": 1.0, "hair_count": 10}
    cues = assign_cues(index, split, meta, shortcut, SEED)
    assert cues.equals(assign_cues(index, split, meta, shortcut, SEED))  # seeded
    train = cues["split"] == "train"
    assert (cues.loc[train, "has_cue"] == (cues.loc[train, "label"] == 1)).all()  # p 1 vs 0: the class decides
    assert (cues.loc[~train, "has_cue"] == cues.loc[~train, "had_cue"]).all()
    new = shortcut_pack(pack, index, cues, meta, seed=SEED, synth_size=SYNTH, hair_count=10, resize_mode="crop",
                        resample="lanczos")
    changed = np.array([not np.array_equal(a, b) for a, b in zip(pack, new)])
    assert np.array_equal(changed, (cues["had_cue"] != cues["has_cue"]).to_numpy())
    assert not changed[~train.to_numpy()].any() and changed.any()
    for row in np.flatnonzero(changed)[:3]:  # a re-rendered row: the image with the cue as planted, resized
        t = traits_from_row(meta.iloc[row])
        want = {"ruler": t.ruler, "ink": t.ink, "hair": t.hair}
        want[cue] = (10 if cues.at[row, "has_cue"] else 0) if cue == "hair" else bool(cues.at[row, "has_cue"])
        assert np.array_equal(new[row], working_size(render_with_nuisances(t, SEED, SYNTH, **want)))
    summary = cue_summary(cues).set_index(["split", "label"])["share_with_cue"]
    assert summary[("train", 1)] == 1.0 and summary[("train", 0)] == 0.0


def test_cue_probabilities_are_honoured_and_bad_cues_refused(tiny_dataset):
    meta, _, index, split = tiny_dataset
    big_index = pd.concat([index] * 40, ignore_index=True)
    big_split = split
    cues = assign_cues(big_index, big_split, meta, {"cue": "ink", "p_benign": 0.1, "p_malignant": 0.8}, SEED)
    train = cues[cues["split"] == "train"]
    share = train.groupby("label")["has_cue"].mean()
    assert abs(share[0] - 0.1) < 0.04 and abs(share[1] - 0.8) < 0.04
    with pytest.raises(ValueError, match="dataset.synthetic.shortcut.cue"):
        assign_cues(index, split, meta, {"cue": "sticker", "p_benign": 0, "p_malignant": 1}, SEED)
    with pytest.raises(KeyError, match="dataset.source: synthetic"):
        assign_cues(index.assign(image_id="ISIC_0000001"), split, meta, {"cue": "ink", "p_benign": 0, "p_malignant": 1}, SEED)


def test_a_shortcut_on_real_data_is_refused_with_the_key():
    from cfaudit.config import ConfigError, validate_config

    cfg = {"dataset": {"source": "folder", "folder": {"images": "x", "labels": "y.csv"},
                       "synthetic": {"shortcut": {"cue": "ruler"}}}}
    with pytest.raises(ConfigError, match="dataset.synthetic.shortcut.cue"):
        validate_config(cfg)


# ---------------------------------------------------------------------------------------------- artefact traits
def test_artefact_traits_measure_known_amounts_outside_the_lesion():
    rows = []
    for i in range(24):
        t = traits(i, i % 2, ruler=bool(i % 2), ink=bool(i % 3 == 0), hair=[0, 2, 5, 10][i % 4])
        f, res = image_features(working_size(rendered(t)))
        assert not (res.ruler & res.mask).any() and f["ink"] == pytest.approx((res.ink & ~res.mask).sum() / (~res.mask).sum())
        rows.append({"ruler": t.ruler, "ink": t.ink, "hair": t.hair, **{f"m_{k}": f[k] for k in ARTEFACT_FEATURES}})
    df = pd.DataFrame(rows)
    ruled = df[df["ruler"]]["m_ruler"]
    assert (ruled >= 16).mean() >= 0.8 and ruled.max() <= 22  # 20 ticks drawn (every 8 px over 80 % of 192 px)
    assert (df[~df["ruler"]]["m_ruler"] == 0).all()
    assert (df[df["ink"]]["m_ink"] > 0.002).all() and (df[~df["ink"]]["m_ink"] == 0).all()
    # hairs are 1/3 px wide at 64 px: coverage ranks the hair count only roughly (rho 0.66 on these 24 images)
    assert stats.spearmanr(df["hair"], df["m_hair"]).correlation > 0.55
    assert df[df["hair"] == 10]["m_hair"].mean() > 3 * df[df["hair"] == 0]["m_hair"].mean()


# ---------------------------------------------------------------------------------------------- statistics
def _paired(effects: dict, generator="guided") -> pd.DataFrame:
    rows = []
    for target in (1, 0):
        for feature, (diff, rb, sig) in effects.items():
            rows.append({"generator": generator, "target_label": target, "stratum": "all", "feature": feature, "n": 20,
                         "mean_diff": diff, "ci_low": diff - 0.1, "ci_high": diff + 0.1, "rank_biserial": rb, "d_z": rb,
                         "p_holm": 0.001 if sig else 0.5, "significant": sig})
    return pd.DataFrame(rows)


def test_artefact_table_ranks_the_cue_among_traits_and_marks_it():
    paired = _paired({"ink": (0.004, 0.9, True), "diameter": (0.05, 0.95, True), "ruler": (0.0, 0.0, False),
                      "hair": (0.001, 0.2, False), "asymmetry": (0.1, 0.5, True), "change_inside_share": (0.5, 1.0, True)})
    labels = pd.DataFrame({"feature": ["ink", "ruler", "hair"], "mean_diff": [0.001, 0.0, 0.0], "p_holm": [0.04, 1, 1],
                           "significant": [True, False, False]})
    table = artefact_table(paired, labels, cue="ink")
    ink = table[(table["feature"] == "ink") & (table["target_label"] == 1)].iloc[0]
    assert ink["planted"] and ink["rank"] == 2 and ink["n_traits"] == 5  # the change share is not a trait
    assert ink["originals_diff"] == 0.001 and ink["originals_significant"]
    assert list(trait_ranking(paired, "guided", 1)["feature"][:3]) == ["diameter", "ink", "asymmetry"]
    line = ranking_line(paired, "guided", "ink")
    assert "2. `ink` ↑\\* **(planted cue)**" in line and line.index("diameter") < line.index("ink")
    md = "\n".join(artefact_markdown(paired, table, "ink", None))
    assert "Planted shortcut: `ink`" in md and "`ink` (planted cue)" in md
    assert "| kept (median) |" in md and md.count(" | – |") == len(table)  # no per-image features: nothing to keep
    effect = pd.concat([cue_effect({"audited": np.zeros(4)}, {"audited": np.full(4, d)}, {"audited": "audited"},
                                   {"audited": "shortcut"}, resamples=50, seed=1, placement=place)
                        for place, d in (("as planted", 0.5), ("lesion centre", 0.1))])
    md = "\n".join(artefact_markdown(paired, table, "ink", effect))
    assert "| audited | audited | shortcut | as planted | 4 | 0.000 → 0.500 |" in md
    assert "| audited | audited | shortcut | lesion centre | 4 | 0.000 → 0.100 |" in md
    assert "Planted shortcut" not in "\n".join(artefact_markdown(paired, artefact_table(paired, labels), "none"))


def test_retention_counts_the_anchors_with_an_artefact_and_what_their_counterfactuals_keep():
    from cfaudit.traits.shortcut import artefact_retention

    ink = [0.004, 0.006, 0.0, 0.002]  # three anchors carry ink
    rows = [{"image_id": f"A{i}", "role": "anchor", "anchor_id": f"A{i}", "generator": "original", "target_label": 0,
             "hair": 0.0, "ink": v, "ruler": 20.0 * (i == 0), "ink_lesion": 0.0} for i, v in enumerate(ink)]
    kept_to_malignant = [0.004, 0.0, 0.003, 0.0015]  # ratios 1, 0, (anchor without ink), 0.75
    rows += [{"image_id": f"A{i}_to1", "role": "counterfactual", "anchor_id": f"A{i}", "generator": "g", "target_label": 1,
              "hair": 0.0, "ink": v, "ruler": 0.0, "ink_lesion": 0.0} for i, v in enumerate(kept_to_malignant)]
    table = artefact_retention(pd.DataFrame(rows)).set_index("feature")
    assert table.at["ink", "anchors_with"] == 3
    assert table.at["ink", "kept_median"] == pytest.approx(np.median([1.0, 0.0, 0.75]))
    assert table.at["ink", "kept_half_share"] == pytest.approx(2 / 3)
    assert table.at["ruler", "anchors_with"] == 1 and table.at["ruler", "kept_half_share"] == 0.0
    assert table.at["hair", "anchors_with"] == 0 and np.isnan(table.at["hair", "kept_median"])


def test_cue_effect_matches_an_independent_computation():
    rng = np.random.default_rng(3)
    without = {"audited": rng.random(30), "oracle_a": rng.random(30)}
    with_cue = {"audited": without["audited"] + 0.3, "oracle_a": without["oracle_a"] + rng.normal(0, 0.1, 30)}
    table = cue_effect(without, with_cue, {"audited": "audited", "oracle_a": "oracle"},
                       {"audited": "shortcut", "oracle_a": "clean"}, resamples=500, seed=1,
                       placement="lesion centre").set_index("classifier")
    assert set(table["placement"]) == {"lesion centre"}
    d = with_cue["oracle_a"] - without["oracle_a"]
    assert table.at["oracle_a", "mean_delta"] == pytest.approx(d.mean())
    assert table.at["oracle_a", "p_wilcoxon"] == pytest.approx(stats.wilcoxon(d).pvalue)
    assert table.at["oracle_a", "share_raised"] == pytest.approx((d > 0).mean())
    assert table.at["audited", "ci_low"] == pytest.approx(0.3) and table.at["audited", "share_raised"] == 1.0
    assert table.at["oracle_a", "ci_low"] < d.mean() < table.at["oracle_a", "ci_high"]


# ---------------------------------------------------------------------------------------------- the DAG
def test_only_the_classifiers_that_ask_for_it_train_on_the_shortcut_pack(tmp_path, run_snakemake, tiny_config):
    from conftest import write_config

    tiny_config["dataset"]["synthetic"]["shortcut"] = {"cue": "ink"}
    tiny_config["metrics"] = {"oracles": {"models": [
        {"name": "sc", "arch": "resnet34", "seed": 71, "train_data": "shortcut"},
        {"name": "clean", "arch": "shufflenet_v2_x0_5", "seed": 72}]}}
    cfg = write_config(tmp_path / "shortcut.yaml", tiny_config)
    proc = run_snakemake(tmp_path, cfg, extra_args=["-n", "--forceall", "-p"])
    jobs = {}
    for block in proc.stdout.split("\n\n"):
        rule = next((line.split()[1].rstrip(":") for line in block.splitlines() if line.startswith("rule ")), None)
        inputs = next((line for line in block.splitlines() if line.strip().startswith("input:")), "")
        outputs = next((line for line in block.splitlines() if line.strip().startswith("output:")), "")
        if rule:
            jobs.setdefault(rule, []).append((inputs, outputs))
    assert "results/data/shortcut/pack.npy" in jobs["train_classifier"][0][0]
    for rule in ("train_diffusion", "train_gan"):
        assert "results/data/pack.npy" in jobs[rule][0][0] and "shortcut" not in jobs[rule][0][0]
    oracle_inputs = {("sc" if "oracles/sc/" in o else "clean"): i for i, o in jobs["train_oracle"]}
    assert "shortcut/pack.npy" in oracle_inputs["sc"] and "shortcut" not in oracle_inputs["clean"]
    assert "shortcut_cue_effect" in jobs and "results/traits/shortcut/cue_effect.csv" in jobs["traits"][0][0]
    # guided's prior alone is measured as the reference of the 'against the prior alone' tables, pgd is not
    measured = [o for _, o in jobs["traits_features"]]
    assert any("features/guided_noclf.csv" in o for o in measured) and not any("features/pgd.csv" in o for o in measured)
    tiny_config["dataset"]["synthetic"]["shortcut"] = {"cue": "none"}
    clean = run_snakemake(tmp_path, write_config(tmp_path / "clean.yaml", tiny_config), extra_args=["-n", "--forceall"])
    assert "shortcut_pack" not in clean.stdout and "shortcut_cue_effect" not in clean.stdout


def test_the_shortcut_preset_validates_and_plants_ink():
    from cfaudit.config import load_config
    from conftest import REPO

    cfg = load_config(REPO / "config.yaml", REPO / "presets/shortcut_demo.yaml")
    assert cfg["dataset"]["synthetic"]["shortcut"]["cue"] == "ink"
    assert [m.get("train_data", "clean") for m in cfg["metrics"]["oracles"]["models"]] == ["shortcut", "clean"]
    assert yaml.safe_load((REPO / "presets/shortcut_demo.yaml").read_text())["dataset"]["synthetic"]["shortcut"]["p_malignant"] > 0.5
