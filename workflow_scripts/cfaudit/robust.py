"""The robust auxiliary classifier of the guided method's cone projection (DVCE, Augustin et al., NeurIPS 2022).

An adversarially trained classifier's input gradient points along changes a person would see (Santurkar et al.,
NeurIPS 2019); the audited classifier's does not. DVCE guides along the robust model's gradient turned toward the
audited classifier's until they are at most ``guided.cone.angle`` apart (:func:`cfaudit.guided.cone_project`), so
every step still raises the audited classifier's target score. Rule ``train_robust_classifier`` trains the model
on the train split with L2 PGD adversarial training (:func:`cfaudit.classifier_training.adversarial_views`).

The model takes part in generation, so it must never judge: its architecture and seed differ from every oracle's
(:func:`check_robust`), and no oracle is an input of the guided rule (tests/test_judges.py checks the DAG).
"""

from __future__ import annotations

from cfaudit.oracles import RECIPE_KEYS, check_oracles, oracle_recipe

ROBUST_KEYS = (*RECIPE_KEYS, "adversarial_epsilon", "adversarial_steps")


def robust_recipe(config: dict) -> dict:
    """The robust model's training settings: classifier.trained with ``guided.cone.model`` on top."""
    return oracle_recipe(config, config["guided"]["cone"]["model"], ROBUST_KEYS)


def check_robust(config: dict) -> None:
    """Refuse a robust model that shares an oracle's architecture or seed (the judges must stay independent of
    everything that made a counterfactual), naming the keys."""
    model = config["guided"]["cone"]["model"]
    for name, entry in check_oracles(config).items():
        if entry["arch"] == model["arch"]:
            raise ValueError(f"config key 'guided.cone.model.arch': {model['arch']!r} is the architecture of oracle "
                             f"{name!r} (metrics.oracles.models); the robust model guides, so it must differ from "
                             "every judge: pick another torchvision model")
        if int(entry["seed"]) == int(model["seed"]):
            raise ValueError(f"config key 'guided.cone.model.seed': {model['seed']} is the seed of oracle {name!r} "
                             "(metrics.oracles.models); pick another")


def robustness_record(model, images_u8, labels, epsilon: float, steps: int = 10, batch_size: int = 64) -> dict:
    """Held-out AUROC of ``model`` (a classifier spec's module, softmax, positive index 1) on uint8 NHWC images, clean
    and under L2 PGD toward the wrong class (:func:`cfaudit.pgd.masked_l2_pgd`, ``steps`` steps, whole image) at
    radius ``epsilon`` ([0, 1] units, the radius it was trained at): whether the helper is robust at all, in its own
    file. One radius, not a sweep: the attack costs ``steps`` forward/backward passes per radius, and the demo's
    10-minute budget has no room for more (BENCHMARKS.md, #15)."""
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from cfaudit.data.pack import uint8_to_float
    from cfaudit.pgd import masked_l2_pgd

    labels = np.asarray(labels).astype(int)
    x_all = uint8_to_float(torch.as_tensor(np.ascontiguousarray(images_u8)))
    y_all = torch.as_tensor(labels).long()
    out = {"n_eval": int(len(labels)), "attack": f"L2 PGD toward the wrong class, {steps} steps, no random start",
           "auroc": {}}
    if len(np.unique(labels)) < 2:
        return out
    for radius in (0.0, epsilon):
        probs = []
        for i in range(0, len(x_all), batch_size):
            x, y = x_all[i:i + batch_size], y_all[i:i + batch_size]
            if radius > 0:
                x = masked_l2_pgd(model, x, 1 - y, torch.ones_like(x[:, :1]), torch.full((len(x),), radius), steps)
            with torch.no_grad():
                probs.append(model.prob_malignant(x))
        out["auroc"][f"{radius:g}"] = round(float(roc_auc_score(labels, torch.cat(probs).numpy())), 4)
    return out
