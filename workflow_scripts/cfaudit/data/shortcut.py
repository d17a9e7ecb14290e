"""A planted shortcut: the audited classifier's training images carry a cue that goes with the class.

Real dermatology classifiers have relied on things that are not the lesion: surgical skin markings raised a
commercial CNN's melanoma scores (Winkler et al., JAMA Dermatology 2019, doi:10.1001/jamadermatol.2019.1735),
and rulers and other artefacts correlate with the diagnosis in ISIC. On the embedded data such a reliance can be
planted and then looked for. ``dataset.synthetic.shortcut`` names a cue (``ink``: a violet marker dot,
``ruler``: ruler ticks, ``hair``: ``hair_count`` hairs) and its probability in benign and in malignant images.
Only the TRAIN split of the audited classifier's pack is re-rendered (:func:`shortcut_pack`): each train image
gets the cue with the probability of its class and loses it otherwise, everything else about it unchanged
(:func:`cfaudit.traits.control.render_with_nuisances`). The eval images (anchors, scores, judges) and the pack
the generators learn from stay as they are, so the cue reaches the counterfactuals only if the classifier
pushes it there. Oracles train on this pack only when their ``train_data`` says ``shortcut``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from cfaudit.data.images import resize_square
from cfaudit.runtime import derive_seed
from cfaudit.traits.control import render_with_nuisances, traits_from_row

CUES = ("ink", "ruler", "hair")
CUE_COLUMNS = ["image_id", "label", "split", "cue", "had_cue", "has_cue"]


def assign_cues(index: pd.DataFrame, split: pd.DataFrame, metadata: pd.DataFrame, shortcut: dict, seed: int) -> pd.DataFrame:
    """Per pack row: whether it carries the cue after the shortcut (train rows: drawn with the probability of
    their class, ``default_rng(derive_seed(seed, "shortcut"))`` in pack order; eval rows: as rendered)."""
    cue = shortcut["cue"]
    if cue not in CUES:
        raise ValueError(f"dataset.synthetic.shortcut.cue is {cue!r}; one of {list(CUES)} (or none)")
    meta = metadata.set_index(metadata["image_id"].astype(str))
    sides = split.set_index(split["image_id"].astype(str))["split"]
    ids = index["image_id"].astype(str)
    missing = sorted(set(ids) - set(meta.index))
    if missing:
        raise KeyError(f"{len(missing)} pack images are not in the synthetic metadata (e.g. {missing[:3]}); the "
                       "planted shortcut needs dataset.source: synthetic")
    had = np.array([bool(getattr(traits_from_row(meta.loc[i]), cue)) for i in ids])  # hair: a count
    side = ids.map(sides).fillna("unused").to_numpy()
    p = np.where(index["label"].to_numpy(int) == 1, shortcut["p_malignant"], shortcut["p_benign"])
    draw = np.random.default_rng(derive_seed(seed, "shortcut")).random(len(index)) < p
    has = np.where(side == "train", draw, had)
    return pd.DataFrame({"image_id": ids, "label": index["label"].to_numpy(int), "split": side, "cue": cue,
                         "had_cue": had, "has_cue": has}, columns=CUE_COLUMNS)


def nuisances_with_cue(traits, cue: str, present: bool, hair_count: int) -> dict:
    """The nuisance settings of an image with the cue set to ``present`` (the other nuisances as rendered)."""
    out = {"ruler": bool(traits.ruler), "ink": bool(traits.ink), "hair": int(traits.hair)}
    out[cue] = (hair_count if present else 0) if cue == "hair" else bool(present)
    return out


def shortcut_pack(pack: np.ndarray, index: pd.DataFrame, cues: pd.DataFrame, metadata: pd.DataFrame, *, seed: int,
                  synth_size: int, hair_count: int, resize_mode: str, resample: str) -> np.ndarray:
    """A copy of ``pack`` whose rows whose cue changed are re-rendered with it (then resized as rule resize does)."""
    meta = metadata.set_index(metadata["image_id"].astype(str))
    out = pack.copy()
    size = pack.shape[1]
    changed = cues.index[cues["had_cue"] != cues["has_cue"]]
    for row in changed:
        t = traits_from_row(meta.loc[cues.at[row, "image_id"]])
        settings = nuisances_with_cue(t, cues.at[row, "cue"], bool(cues.at[row, "has_cue"]), hair_count)
        img = Image.fromarray(render_with_nuisances(t, seed, synth_size, **settings), "RGB")
        out[int(index.at[row, "row"])] = np.asarray(resize_square(img, size, resize_mode, resample))
    return out


def cue_summary(cues: pd.DataFrame) -> pd.DataFrame:
    """Share of images with the cue per split and class (what the classifier could learn from)."""
    table = cues.groupby(["split", "label"])["has_cue"].agg(["mean", "size"]).reset_index()
    return table.rename(columns={"mean": "share_with_cue", "size": "images"})
