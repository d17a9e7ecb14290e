"""Seeded, stratified train / eval split, and the choice of eval anchors for counterfactuals."""

from __future__ import annotations

import numpy as np
import pandas as pd

CLASS_NAMES = {0: "benign", 1: "malignant"}


class SplitError(ValueError):
    pass


def stratified_split(index: pd.DataFrame, eval_fraction: float, seed: int) -> pd.DataFrame:
    """Assign each image to ``train`` or ``eval``, class by class, so both splits keep the class ratio.

    Per class, ``round(n_c * eval_fraction)`` images go to eval, clamped so that each split keeps at least
    one image of the class; a class with fewer than two images, or a dataset with one class, is an error
    (metrics and a class-conditional generator need both classes on both sides).
    """
    counts = index["label"].value_counts().to_dict()
    for c, name in CLASS_NAMES.items():
        n = counts.get(c, 0)
        if n < 2:
            raise SplitError(
                f"the dataset has {n} {name} image(s) after labelling and quarantine; a train/eval split needs at "
                f"least 2 of each class. Check results/data/label_report.json and quarantine.csv, or use a "
                f"larger dataset."
            )
    rng = np.random.default_rng(seed)
    split = pd.Series("train", index=index.index, dtype=object)
    for c in (0, 1):
        members = index.index[index["label"] == c].to_numpy()
        members = members[np.argsort(index.loc[members, "image_id"].to_numpy())]  # order-independent input
        rng.shuffle(members)
        n_eval = min(max(1, int(round(len(members) * eval_fraction))), len(members) - 1)
        split.loc[members[:n_eval]] = "eval"
    out = index[["image_id", "label"]].copy()
    out["split"] = split.values
    return out.sort_values("image_id").reset_index(drop=True)


def choose_anchors(split: pd.DataFrame, max_anchors: int | None, seed: int) -> pd.DataFrame:
    """All eval images, or a stratified seeded subset of ``max_anchors`` of them (both classes kept)."""
    ev = split[split["split"] == "eval"].sort_values("image_id").reset_index(drop=True)
    if max_anchors is None or max_anchors >= len(ev):
        return ev[["image_id", "label"]]
    rng = np.random.default_rng(seed + 1)
    frac = max_anchors / len(ev)
    picks = []
    for c in (0, 1):
        members = ev.index[ev["label"] == c].to_numpy()
        k = max(1, int(round(len(members) * frac))) if len(members) else 0
        picks.extend(rng.choice(members, size=min(k, len(members)), replace=False))
    return ev.loc[sorted(picks), ["image_id", "label"]].reset_index(drop=True)
