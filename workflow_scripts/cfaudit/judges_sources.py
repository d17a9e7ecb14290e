"""Where an unmet check of the judges' criteria table comes from: the counterfactuals behind it.

The criteria table (:func:`cfaudit.judges_stage.criteria_table`) says which check of the method under test failed
and by how much. A researcher's next question is which images make it fail: a realism FD or a pooled out-of-gamut
share is often carried by a few counterfactuals, a lost flip is one image, a flip-rate gap is a list of anchors.
These functions name them (anchor → target) beside the same numbers for the baseline, so the report says where an
unmet check comes from and where to look — without changing what any check measures (the table's numbers are
computed before and apart from them).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cfaudit import judges as J
from cfaudit.data.split import CLASS_NAMES

SHOWN = {"gan": "the GAN", "diffusion": "SDEdit"}
Source = tuple  # (line of text, DataFrame of the (anchor_id, target_label) pairs it names)
METHOD = "guided"
LIST_LIMIT = 8


def pair_list(anchor_ids, targets, limit: int = LIST_LIMIT) -> str:
    """'SYN_1 → malignant, SYN_2 → benign, … (+3 more)': the first ``limit`` pairs in the given order."""
    pairs = [f"{a} → {CLASS_NAMES.get(int(t), t)}" for a, t in zip(anchor_ids, targets)]
    more = f", … (+{len(pairs) - limit} more)" if len(pairs) > limit else ""
    return ", ".join(pairs[:limit]) + more


def feature_outliers(features: dict, generator: str) -> pd.DataFrame:
    """Counterfactuals of ``generator`` whose judge features lie farther (squared Euclidean) from the reference
    images' mean than every reference image does, farthest first; ``ratio`` = their distance over the farthest
    reference image's. An FD's mean term grows with such points, so a few of them can carry it."""
    ref = np.asarray(features["reference"], np.float64)
    mu = ref.mean(0)
    farthest = float(((ref - mu) ** 2).sum(1).max())
    dist = (((np.asarray(features[f"gen:{generator}"], np.float64) - mu) ** 2).sum(1))
    out = pd.DataFrame({"anchor_id": features[f"anchor:{generator}"].astype(str),
                        "target_label": features[f"target:{generator}"].astype(int), "ratio": dist / farthest})
    return out[out["ratio"] > 1.0].sort_values("ratio", ascending=False, kind="stable").reset_index(drop=True)


def gamut_concentration(per_image: pd.DataFrame, generator: str, top: int = 5) -> tuple[float, pd.DataFrame]:
    """(share of the sum of the generator's per-image out-of-gamut shares held by its ``top`` counterfactuals with
    the largest, those rows), over its counterfactuals toward the other class — the judge's out-of-gamut number is
    the mean of those shares, so this is how much of it a few images carry."""
    d = per_image[(per_image["generator"] == generator) & (per_image["anchor_label"] != per_image["target_label"])]
    d = d.assign(off=d["out_of_gamut_share"].fillna(0.0)).sort_values("off", ascending=False, kind="stable")
    total = float(d["off"].sum())
    head = d.head(top)
    return (float(head["off"].sum()) / total if total > 0 else 0.0), head[head["off"] > 0]


def lost_flips(survival: pd.DataFrame) -> pd.DataFrame:
    """Rows of a survival table (``judges_stage._survival``: per anchor and direction, a 0/1 column per transform,
    nan without a flip) whose flip is lost under at least one transform, with the transforms that lose it."""
    cols = [c for c in J.TRANSFORMS if c in survival]
    lost = survival[(survival[cols] == 0).any(axis=1)].copy()
    lost["lost_under"] = [", ".join(c for c in cols if r[c] == 0) for _, r in lost.iterrows()]
    lost["target_label"] = lost["direction"].map({k: v[1] for k, v in J.DIRECTIONS.items()})
    return lost.reset_index(drop=True)


def paired_gap(consensus: dict, generator: str, other: str, direction: str) -> pd.Series:
    """Per anchor of ``direction`` judged for both: ``other``'s mean oracle flip minus ``generator``'s (the judges'
    paired difference, per anchor and with the opposite sign)."""
    a = consensus[generator].query("direction == @direction").set_index("anchor_id")["flipped"]
    b = consensus[other].query("direction == @direction").set_index("anchor_id")["flipped"]
    return (b - a.reindex(b.index)).dropna()


def flips_behind(gap: pd.Series, direction: str) -> pd.DataFrame:
    """The anchors of a :func:`paired_gap` where the other generator's mean oracle flip is higher, largest gap
    first."""
    gap = gap[gap > 0].sort_values(ascending=False, kind="stable")
    return pd.DataFrame({"anchor_id": gap.index.astype(str), "gap": gap.to_numpy(),
                         "target_label": J.DIRECTIONS[direction][1]})


def sampler_trace(index: pd.DataFrame, pairs: pd.DataFrame) -> str:
    """How the guided sampler made the named pairs, beside all its pairs (from its index.csv): how many came from a
    retry and at which guidance scales, how many were guided to the last step (no early stop) and their median
    mask share — the sampler's side of why those counterfactuals differ from the rest. '' without the pairs."""
    keys = set(zip(pairs["anchor_id"].astype(str), pairs["target_label"].astype(int)))
    mine = index[[k in keys for k in zip(index["anchor_id"].astype(str), index["target_label"].astype(int))]]
    if mine.empty:
        return ""

    def describe(d):
        retries = d[d["attempts"] > 1]
        scales = "/".join(f"{s:g}" for s in sorted(retries["scale"].unique()))
        every = int((d["guided_steps"] >= d["steps"]).sum())
        return (f"{len(retries)} from a retry" + (f" (scale {scales})" if len(retries) else "")
                + f", {every} guided at every step, median mask {d['mask_fraction'].median():.2f} of the image")

    return (f"Sampler ({METHOD}'s index.csv): of the {len(mine)} named, {describe(mine)}; of all {len(index)}, "
            f"{describe(index)}.")


def _fd_source(features: dict | None, baselines: list[str]) -> Source | None:
    if features is None or f"gen:{METHOD}" not in features:
        return None
    n = {g: len(features[f"gen:{g}"]) for g in [METHOD, *baselines] if f"gen:{g}" in features}
    out = {g: feature_outliers(features, g) for g in n}
    mine = out[METHOD]
    text = (f"realism FD: {len(mine)} of {n[METHOD]} {METHOD} counterfactuals lie farther from the real images' "
            "mean judge feature than any real image")
    if len(mine):
        text += (f" ({mine['ratio'].min():.1f}–{mine['ratio'].max():.1f}× the farthest real image's squared "
                 f"distance): {pair_list(mine['anchor_id'], mine['target_label'])}")
    others = [f"{SHOWN.get(g, g)} {len(out[g])} of {n[g]}" + (f" (up to {out[g]['ratio'].max():.1f}×)" if len(out[g]) else "")
              for g in baselines if g in out]
    return text + ("; " + ", ".join(others) if others else "") + ".", mine


def _gamut_source(per_image: pd.DataFrame) -> Source:
    share, head = gamut_concentration(per_image, METHOD)
    gan_share, _ = gamut_concentration(per_image, "gan")
    names = pair_list(head["anchor_id"], head["target_label"])
    return (f"out-of-gamut share: the {len(head)} {METHOD} counterfactuals with the largest out-of-gamut share carry "
            f"{share:.0%} of its mean ({names}); the GAN's five carry {gan_share:.0%} of its."), head


def _survival_source(survival: dict) -> Source:
    def flips(g):
        return int(survival[g][list(J.TRANSFORMS)].notna().any(axis=1).sum())

    lost = lost_flips(survival[METHOD])
    k, n = len(lost), flips(METHOD)
    kg, ng = (len(lost_flips(survival["gan"])), flips("gan")) if "gan" in survival else (0, 0)
    where = {t: int(lost["lost_under"].str.contains(t, regex=False).sum()) for t in J.TRANSFORMS}
    return (f"flip survival: {METHOD} loses {k} of its {n} audited flips under at least one transform "
            f"({', '.join(f'{t} {c}' for t, c in where.items())}): "
            f"{pair_list(lost['anchor_id'], lost['target_label'])}; the GAN {kg} of {ng}."), lost


def _flip_source(consensus: dict, other: str, direction: str) -> Source:
    gap = paired_gap(consensus, METHOD, other, direction)
    behind = flips_behind(gap, direction)
    label = "PGD" if other == "pgd" else "the GAN"
    text = (f"oracle flips {J.ARROWS[direction]} vs {label}: {len(behind)} anchor{'' if len(behind) == 1 else 's'} "
            f"where {label}'s counterfactual flips more "
            f"oracles than {METHOD}'s" + (f": {pair_list(behind['anchor_id'], behind['target_label'])}"
                                          if len(behind) else ""))
    if other == "pgd":
        text += (" — PGD works at guided's own per-image L2 budget; whether any generator can beat it on this data "
                 "is the ceiling (docs/judges.md; python -m cfaudit.ceiling on the embedded data)")
        if len(gap) and gap.mean() < 0:
            text += (f"; {METHOD} is ahead on average (+{-gap.mean():.2f} over {len(gap)} anchors) but the paired "
                     "interval reaches 0: too few anchors to call it")
        elif len(gap) and gap.mean() == 0:
            text += f"; a tie on average over {len(gap)} anchors, and 'above' needs the interval above 0"
    return text + ".", behind


def unmet_sources(criteria: pd.DataFrame, per_image: pd.DataFrame, features: dict | None, survival: dict,
                  consensus: dict, index: pd.DataFrame | None = None) -> list[Source]:
    """One (line, pairs) per unmet check of ``criteria`` (:func:`cfaudit.judges_stage.criteria_table`): the line
    names the counterfactuals or anchors behind it, ``pairs`` (anchor_id, target_label) are they, worst first;
    ``survival`` / ``consensus``: {generator: the judges' per-anchor tables}; ``index``: the method's
    counterfactual index, whose sampler columns (:func:`sampler_trace`) end each line when given."""
    arrows = {v: k for k, v in J.ARROWS.items()}
    lines, fd_done = [], False
    for r in criteria[criteria["met"] == "no"].itertuples(index=False):
        c = r.criterion
        if c.startswith("oracle flip rate"):
            other = "pgd" if "PGD" in c else "gan"
            if other in consensus and METHOD in consensus:
                lines.append(_flip_source(consensus, other, arrows[r.direction]))
        elif c.startswith("realism FD") and not fd_done:
            fd_done = True
            line = _fd_source(features, [g for g in ("gan", "diffusion") if features and f"gen:{g}" in features])
            lines += [line] if line else []
        elif c.startswith("out-of-gamut"):
            lines.append(_gamut_source(per_image))
        elif c.startswith("flip survival") and METHOD in survival:
            lines.append(_survival_source(survival))
    if index is None:
        return lines
    return [(" ".join(filter(None, [text, sampler_trace(index, pairs)])), pairs) for text, pairs in lines]


def _png_data_uri(image, size: int) -> str:
    """A small PNG data URI of a PIL image at ``size`` px (pixels kept when enlarging, LANCZOS when shrinking)."""
    import base64
    import io

    from PIL import Image

    if image.width > size:
        image = image.resize((size, size), Image.LANCZOS)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnails_html(pairs: pd.DataFrame, scores: pd.DataFrame, limit: int = 4, size: int = 96) -> str:
    """Anchor | guided counterfactual of the first ``limit`` pairs, as inline images (so the judges page and the
    report show what the line names). ``scores``: the scores table with ``anchor_id`` (paths of both images)."""
    import html

    from PIL import Image

    from cfaudit.names import ORIGINAL

    cells = []
    for anchor, target in list(zip(pairs["anchor_id"].astype(str), pairs["target_label"].astype(int)))[:limit]:
        orig = scores[(scores["generator"] == ORIGINAL) & (scores["image_id"].astype(str) == anchor)]
        cf = scores[(scores["generator"] == METHOD) & (scores["anchor_id"].astype(str) == anchor)
                    & (scores["target_label"] == target)]
        if orig.empty or cf.empty:
            continue
        imgs = "".join(f"<img src='{_png_data_uri(Image.open(p), size)}' width='{size}' height='{size}' "
                       "style='image-rendering:pixelated;margin-right:2px'>" for p in (orig["path"].iloc[0], cf["path"].iloc[0]))
        cap = html.escape(f"{anchor} → {CLASS_NAMES.get(target, target)}")
        cells.append(f"<figure style='display:inline-block;margin:0 12px 6px 0'>{imgs}"
                     f"<figcaption style='font-size:11px'>{cap}</figcaption></figure>")
    return "<div>" + "".join(cells) + "</div>" if cells else ""
