"""The PGD control: an adversarial counterfactual with the guided counterfactual's own mask and L2 budget.

For each guided counterfactual ``g`` of anchor ``a`` toward target ``y``: the mask is the set of pixels where
``g`` differs from ``a`` (any channel, 8-bit), the budget is ``eps = ||g - a||_2`` (intensities in [0, 1],
over all pixels and channels). Projected gradient descent (Madry et al. 2018, arXiv:1706.06083) on the audited
classifier then maximises log P(y) over ``a + delta`` with ``delta`` inside the mask, ``||delta||_2 <= eps`` and
the image in range: ``steps`` steps of size ``step_factor * eps / steps`` along the L2-normalised gradient, each
followed by projection. No random start: the control is deterministic.

A generator whose counterfactuals transfer to independent oracles no better than this control makes
adversarial, not semantic, changes (the judges' verdict, :mod:`cfaudit.judges`).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import torch

from cfaudit.counterfactuals import INDEX_COLUMNS, fresh_image_dir, image_path, index_rows, read_anchor_pixels, save_png
from cfaudit.files import write_csv

GENERATOR = "pgd"
log = logging.getLogger("cfaudit.pgd")


def budget_and_mask(anchor: np.ndarray, guided: np.ndarray) -> tuple[float, np.ndarray]:
    """(L2 norm of guided - anchor in [0, 1] units, (H, W) bool mask of pixels that differ) of uint8 images."""
    diff = (guided.astype(np.float64) - anchor.astype(np.float64)) / 255.0
    return float(np.sqrt((diff ** 2).sum())), np.any(guided != anchor, axis=-1)


def _per_image_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def masked_l2_pgd(clf, anchors: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor, budgets: torch.Tensor,
                  steps: int = 40, step_factor: float = 2.5) -> torch.Tensor:
    """PGD toward ``targets`` inside ``masks`` with per-image L2 ``budgets``.

    ``anchors``: (N, 3, H, W) in [-1, 1]; ``masks``: (N, 1, H, W) 0/1; ``budgets``: (N,) L2 in [0, 1] intensity
    units. Returns the adversarial images (N, 3, H, W) in [-1, 1]. The classifier is frozen and in eval mode, so
    each image's result depends only on its own inputs.
    """
    from cfaudit.guided import target_log_prob

    a = anchors.detach().float()
    m = masks.float()
    eps = (2.0 * budgets.float()).view(-1, 1, 1, 1)  # [-1, 1] units are twice [0, 1] units
    alpha = step_factor * eps / max(1, steps)
    delta = torch.zeros_like(a)
    targets = targets.long()
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            logits = clf((a + delta).clamp(-1, 1)).float()
            obj = target_log_prob(logits, targets, clf.positive_index).sum()
            (grad,) = torch.autograd.grad(obj, delta)
        with torch.no_grad():
            grad = grad * m
            delta = delta + alpha * grad / _per_image_norm(grad).clamp_min(1e-12)
            delta = delta * m
            delta = delta * torch.clamp(eps / _per_image_norm(delta).clamp_min(1e-12), max=1.0)
            delta = (a + delta).clamp(-1, 1) - a
    return (a + delta.detach()).clamp(-1, 1)


def run_pgd(*, classifier_spec, guided_index, pack, pack_index, out_index, out_dir, cfg: dict, device,
            batch_size: int = 32) -> pd.DataFrame:
    """Rule pgd_counterfactuals: one PGD counterfactual per guided counterfactual; PNGs + index."""
    from cfaudit.classifiers import load_classifier
    from cfaudit.data.pack import float_to_uint8, uint8_to_float
    from cfaudit.scoring import load_raw

    t_begin = time.perf_counter()
    out_dir = fresh_image_dir(out_dir)
    clf = load_classifier(classifier_spec, device)
    guided = pd.read_csv(guided_index)
    guided["anchor_id"] = guided["anchor_id"].astype(str)
    anchors_u8 = read_anchor_pixels(pack, pack_index, guided["anchor_id"].tolist())
    settings = {"method": "masked L2 PGD on the audited classifier (budget and mask of the guided counterfactual)",
                "steps": int(cfg["steps"]), "step_factor": float(cfg["step_factor"]), "classifier": clf.name,
                "classifier_sha256": clf.spec.get("sha256", ""), "guided_index": str(guided_index)}
    frames = []
    for lo in range(0, len(guided), batch_size):
        rows = guided.iloc[lo:lo + batch_size]
        a_u8 = anchors_u8[lo:lo + batch_size]
        g_u8 = np.stack([load_raw(p) for p in rows["path"]])
        if g_u8.shape != a_u8.shape:
            raise ValueError(f"guided counterfactuals in {guided_index} are {g_u8.shape[1:3]} px but the anchors "
                             f"are {a_u8.shape[1:3]} px: PGD needs both at one size; rerun the guided stage")
        budgets, masks = zip(*(budget_and_mask(a, g) for a, g in zip(a_u8, g_u8)))
        x = masked_l2_pgd(clf, uint8_to_float(a_u8).to(device), torch.as_tensor(rows["target_label"].to_numpy()).to(device),
                          torch.as_tensor(np.stack(masks)[:, None]).to(device),
                          torch.as_tensor(np.array(budgets)).to(device), int(cfg["steps"]), float(cfg["step_factor"]))
        adv = float_to_uint8(x)
        for img, (a, t) in zip(adv, zip(rows["anchor_id"], rows["target_label"])):
            save_png(img, image_path(out_dir, a, t))
        for (a, lbl, t), b, mk, img, anc in zip(rows[["anchor_id", "anchor_label", "target_label"]].itertuples(index=False),
                                               budgets, masks, adv, a_u8):
            row = index_rows([a], [lbl], int(t), GENERATOR, out_dir, 0, settings)[0]
            row.update({"l2_budget": round(b, 6), "l2_achieved": round(budget_and_mask(anc, img)[0], 6),
                        "mask_fraction": round(float(mk.mean()), 6)})
            frames.append(row)
    df = pd.DataFrame(frames).sort_values(["anchor_id", "target_label"]).reset_index(drop=True)
    write_csv(df[INDEX_COLUMNS + ["l2_budget", "l2_achieved", "mask_fraction"]], out_index)
    log.info("pgd: %d counterfactuals in %.1f s; mean L2 budget %.4f, achieved %.4f", len(df),
             time.perf_counter() - t_begin, df["l2_budget"].mean() if len(df) else float("nan"),
             df["l2_achieved"].mean() if len(df) else float("nan"))
    return df
