"""What the judges can tell apart on a run with the embedded (synthetic) data: the true trait change vs PGD.

The judges compare each generator with PGD on the audited classifier at the generator's own per-image L2 budget
(:mod:`cfaudit.pgd`). Whether any generator can beat that control depends on the oracles: weak classifiers
trained on the same few hundred images share non-robust features, so PGD may transfer to them as well as a real
change does. On synthetic data the real change is known: the positive control ``planted_shift``
(:mod:`cfaudit.traits.control`) re-renders each anchor with the planted traits of the other class. This module
runs PGD with *its* budget and mask and scores both with the audited classifier and every oracle. Where PGD
transfers as often as the planted change, "above PGD" is out of reach for any generator in that direction, and
the report of a run should be read that way (docs/judges.md).

    python -m cfaudit.ceiling --directory runs/demo [--fractions 1 0.5 0.25]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cfaudit.judges import DIRECTIONS, flip_indicators


def _scores(clf, images_u8: np.ndarray) -> np.ndarray:
    from cfaudit.guided import final_scores

    return final_scores(clf, images_u8, "cpu").numpy()


def oracle_names(results: Path) -> list[str]:
    """The oracles of the run's judges table (results/oracles/ may keep folders of oracles no longer configured);
    every oracle folder when there is no judges table yet."""
    table = results / "metrics/judges.csv"
    if table.exists():
        judges = pd.read_csv(table)
        named = judges.loc[judges["metric"] == "oracle flip rate", "judge"].unique()  # + 'mean of oracles'
        return sorted(n for n in named if (results / "oracles" / n / "oracle.json").exists())
    return sorted(p.parent.name for p in results.glob("oracles/*/oracle.json"))


def ceiling_table(results: Path, fractions=(1.0, 0.5, 0.25), steps: int = 40, step_factor: float = 2.5) -> pd.DataFrame:
    """Flip rates per (candidate, direction, judge) of the planted change and of PGD at ``fractions`` of its budget.

    ``results``: a run's results/ folder with traits/planted_shift/index.csv, data/pack.npy + pack_index.csv,
    classifier/classifier.json and oracles/<name>/oracle.json (:func:`oracle_names`). The 'oracles' judge is the per-anchor mean over the
    oracles that got the anchor right, as in the judges' table."""
    from cfaudit.classifiers import load_classifier
    from cfaudit.counterfactuals import read_anchor_pixels
    from cfaudit.data.pack import float_to_uint8, uint8_to_float
    from cfaudit.pgd import budget_and_mask, masked_l2_pgd
    from cfaudit.scoring import load_raw

    planted = pd.read_csv(results / "traits/planted_shift/index.csv", dtype={"anchor_id": str})
    planted = planted[planted["target_label"] != planted["anchor_label"]].reset_index(drop=True)
    anchors = read_anchor_pixels(results / "data/pack.npy", results / "data/pack_index.csv", planted["anchor_id"].tolist())
    changed = np.stack([load_raw(results.parent / p) for p in planted["path"]])  # paths relative to the run
    budgets, masks = map(np.array, zip(*(budget_and_mask(a, c) for a, c in zip(anchors, changed))))
    targets = planted["target_label"].to_numpy()
    audited = load_classifier(results / "classifier/classifier.json")
    candidates = {"planted_shift": changed}
    for f in fractions:
        x = masked_l2_pgd(audited, uint8_to_float(torch.from_numpy(anchors)), torch.tensor(targets),
                          torch.as_tensor(masks[:, None]), torch.as_tensor(budgets * f), steps, step_factor)
        candidates[f"pgd x{f:g}"] = float_to_uint8(x)
    judges = {"audited": audited} | {n: load_classifier(results / f"oracles/{n}/oracle.json") for n in oracle_names(results)}
    before = {name: _scores(clf, anchors) for name, clf in judges.items()}
    rows = []
    for cand, images in candidates.items():
        flips = {name: flip_indicators(before[name], _scores(clf, images), targets, clf.threshold)
                 for name, clf in judges.items()}
        oracles = [n for n in judges if n != "audited"]
        if oracles:
            with warnings.catch_warnings():  # an anchor no oracle got right: nan, as in the judges
                warnings.simplefilter("ignore", RuntimeWarning)
                flips["oracles"] = np.nanmean(np.stack([flips[n] for n in oracles]), axis=0)
        for direction, (_, tgt) in DIRECTIONS.items():
            sel = targets == tgt
            for name, v in flips.items():
                v = v[sel]
                rows.append({"candidate": cand, "direction": direction, "judge": name,
                             "flip_rate": float(np.nanmean(v)) if np.isfinite(v).any() else float("nan"),
                             "n": int(np.isfinite(v).sum()), "mean_l2": float(budgets[sel].mean())})
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--directory", default=".", help="the run's working directory (the one holding results/)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25],
                    help="PGD budgets as fractions of each planted change's own L2")
    args = ap.parse_args(argv)
    results = Path(args.directory) / "results"
    if not (results / "traits/planted_shift/index.csv").exists():
        print(f"{results}/traits/planted_shift/index.csv is missing: the positive control runs only on the embedded "
              "data (dataset.source: synthetic, traits.positive_control: true); make it with "
              "`snakemake --directory DIR results/traits/planted_shift/index.csv`", file=sys.stderr)
        return 2
    table = ceiling_table(results, tuple(args.fractions))
    wide = table.pivot_table(index=["candidate", "direction"], columns="judge", values="flip_rate", sort=False)
    print(wide.round(2).to_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
