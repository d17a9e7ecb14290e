"""Seeded, stratified train / eval split, and the choice of eval anchors for counterfactuals."""

from __future__ import annotations

import numpy as np
import pandas as pd

CLASS_NAMES = {0: "benign", 1: "malignant"}


class SplitError(ValueError):
    pass


def check_both_classes(index: pd.DataFrame) -> None:
    counts = index["label"].value_counts().to_dict()
    for c, name in CLASS_NAMES.items():
        n = counts.get(c, 0)
        if n < 2:
            raise SplitError(
                f"the dataset has {n} {name} image(s) after labelling and quarantine; a train/eval split needs at "
                f"least 2 of each class. Check results/data/label_report.json and quarantine.csv, or use a "
                f"larger dataset."
            )


def stratified_split(index: pd.DataFrame, eval_fraction: float, seed: int) -> pd.DataFrame:
    """Assign each image to ``train`` or ``eval``, class by class, so both splits keep the class ratio.

    Per class, ``round(n_c * eval_fraction)`` images go to eval, clamped so that each split keeps at least
    one image of the class; a class with fewer than two images, or a dataset with one class, is an error
    (metrics and a class-conditional generator need both classes on both sides).
    """
    check_both_classes(index)
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


def grouped_stratified_split(index: pd.DataFrame, groups: pd.Series, eval_fraction: float, seed: int) -> pd.DataFrame:
    """Like :func:`stratified_split`, but every group (lesion or patient) lands on one side.

    Groups are visited in a seeded random order and a group goes to eval while that keeps each class's eval
    count within its target ``round(n_c * eval_fraction)``; the result is stratified up to the size of the groups.
    Groups with one image each give the same class counts as :func:`stratified_split`. A split that leaves a
    class without images on one side is an error that names the group sizes.
    """
    check_both_classes(index)
    df = index[["image_id", "label"]].assign(group_id=groups.astype(str).to_numpy())
    per_group = df.groupby("group_id")["label"].agg(n="size", malignant="sum").sort_index()
    targets = {c: int(round((df["label"] == c).sum() * eval_fraction)) for c in (0, 1)}
    rng = np.random.default_rng(seed)
    chosen, counts = set(), {0: 0, 1: 0}
    for gid in per_group.index.to_numpy()[rng.permutation(len(per_group))]:
        m = int(per_group.at[gid, "malignant"])
        add = {0: int(per_group.at[gid, "n"]) - m, 1: m}
        if all(counts[c] + add[c] <= targets[c] for c in (0, 1)):
            chosen.add(gid)
            counts = {c: counts[c] + add[c] for c in (0, 1)}
    out = df.assign(split=np.where(df["group_id"].isin(chosen), "eval", "train"))
    for c, name in CLASS_NAMES.items():
        sides = set(out.loc[out["label"] == c, "split"])
        if sides != {"train", "eval"}:
            raise SplitError(
                f"grouping by lesion/patient left no {name} image on the {'eval' if 'eval' not in sides else 'train'} "
                f"side ({len(per_group)} groups, largest {int(per_group['n'].max())} images); use more images or "
                f"another split.eval_fraction, or set split.group_column: '' to split by image (lesions then leak)")
    return out[["image_id", "label", "split", "group_id"]].sort_values("image_id").reset_index(drop=True)


def split_report(split: pd.DataFrame, group_column: str | None) -> dict:
    """Counts per side and class, and (grouped splits) groups per side and groups found on both sides (0)."""
    report = {"group_column": group_column,
              "images": {f"{s}/{CLASS_NAMES[int(c)]}": int(n) for (s, c), n in split.groupby(["split", "label"]).size().items()}}
    if "group_id" in split:
        sides = split.groupby("group_id")["split"].nunique()
        report["groups"] = {s: int(split.loc[split["split"] == s, "group_id"].nunique()) for s in ("train", "eval")}
        report["groups_on_both_sides"] = int((sides > 1).sum())
    return report


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
