"""Classifier-guided diffusion counterfactuals (cfaudit.guided) with a tiny ContextUnet and a tiny classifier."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cfaudit.classifiers import AuditedClassifier
from cfaudit.config import ConfigError, load_config
from cfaudit.counterfactuals import INDEX_COLUMNS, TARGETS, gather
from cfaudit.data.pack import uint8_to_float
from cfaudit.diffusion.schedule import LinearSchedule
from cfaudit.guided import (OUTCOME_COLUMNS, change_mask, classifier_gradient, guided_ladder, guided_sample, on_target_side,
                            project, relative_change_mask, run_shard, target_log_prob)
from cfaudit.models import model_from_spec

SIZE = 16
T = 40


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    spec = {"arch": "contextunet", "image_size": SIZE, "n_classes": 2, "timesteps": T, "kwargs": {"n_feat": 8, "bottleneck": 2}}
    model = model_from_spec(spec).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, {"spec": spec, "sha256": "test", "precision": "fp32"}


def tiny_classifier(seed=1, threshold=0.5, input_size=12):
    """A frozen 2-class CNN behind the audited-classifier interface (differentiable resize 16 -> 12 inside)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 8, 3, padding=1), nn.GELU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    spec = {"kind": "checkpoint", "name": "tiny", "arch": "tiny", "num_classes": 2, "positive_index": 1,
            "input_size": input_size, "resize_size": input_size, "normalization": "minus_one_one", "score_space": "softmax",
            "threshold": threshold, "sha256": "test"}
    return AuditedClassifier(net, spec).eval()


def base_cfg(**over):
    cfg = {
        "strength": 0.6, "sampler": "ddim", "steps": 8, "cfg_guidance": 1.0, "scales": [0.3], "max_retries": 0,
        "scale_mode": "fixed", "normalize_gradient": "rms", "l1_weight": 0.0, "consensus": False,
        "mask": {"enabled": False, "threshold": 0.1, "dilation": 1, "start": 0.0},
        "early_stop": {"enabled": False, "margin": 0.0, "resume": False, "finish": "denoise"},
        "batch_size": 4, "use_ema": False, "seed": None,
    }
    for k, v in over.items():
        if isinstance(v, dict):
            cfg[k] = {**cfg.get(k, {}), **v}
        else:
            cfg[k] = v
    return cfg


def anchors(n=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    # smooth blobs so the tiny models see structure, in [-1, 1]
    x = torch.nn.functional.avg_pool2d(torch.rand(n, 3, SIZE, SIZE, generator=g) * 2 - 1, 3, 1, 1)
    return x.clamp(-1, 1)


def target_prob(clf, images):
    with torch.no_grad():
        return target_log_prob(clf(images), torch.tensor([1] * len(images)), clf.positive_index).exp()


@pytest.mark.parametrize("sampler,mode,scale", [("ddim", "fixed", 0.3), ("ddpm", "variance", 20.0)])
def test_guidance_raises_target_probability_with_fixed_seed(sampler, mode, scale):
    model, _ = tiny_unet()
    clf = tiny_classifier()
    sched = LinearSchedule(T)
    a = anchors(4)
    seeds = [11, 12, 13, 14]
    cfg = base_cfg(sampler=sampler, scale_mode=mode)
    for target in TARGETS:
        tg = torch.full((4,), target)
        plain, _, _ = guided_sample(model, sched, clf, a, tg, seeds, cfg, 0.0)
        again, _, _ = guided_sample(model, sched, clf, a, tg, seeds, cfg, 0.0)
        assert torch.equal(plain, again)  # deterministic from the seed
        guided, info, n = guided_sample(model, sched, clf, a, tg, seeds, cfg, scale)
        with torch.no_grad():
            lp_plain = target_log_prob(clf(plain), tg, 1)
            lp_guided = target_log_prob(clf(guided), tg, 1)
        assert (lp_guided > lp_plain).all(), (target, lp_plain, lp_guided)
        assert (info["guided_steps"] == n).all()


def test_mask_keeps_pixels_outside_on_the_anchor_noising_path():
    model, _ = tiny_unet()
    clf = tiny_classifier()
    sched = LinearSchedule(T)
    a = anchors(2)
    seeds = [3, 4]
    cfg = base_cfg(sampler="ddpm", scale_mode="variance", mask={"enabled": True, "threshold": 0.9, "dilation": 0, "start": 0.25})
    trace = []
    out, info, n_steps = guided_sample(model, sched, clf, a, torch.tensor([1, 0]), seeds, cfg, 20.0, trace=trace)
    # the fixed starting noise, recomputed independently: each anchor's stream starts with it
    n0 = torch.stack([torch.randn((3, SIZE, SIZE), generator=torch.Generator().manual_seed(s)) for s in seeds])
    masked_steps = [s for s in trace if s["mask"] is not None]
    assert len(trace) == n_steps and 0 < len(masked_steps) < n_steps  # mask.start: the first quarter runs unmasked
    partial = 0
    for step in masked_steps:
        want = a if step["t_prev"] == 0 else sched.q_sample(a, step["t_prev"], n0)
        outside = (step["mask"] == 0).expand_as(step["x"])
        assert torch.equal(step["x"][outside], want[outside])
        frac = step["mask"].mean().item()
        partial += 0 < frac < 1
    assert partial >= 1  # the mask really splits the image somewhere
    last = masked_steps[-1]
    assert last["t_prev"] == 0
    outside = (last["mask"] == 0).expand_as(out)
    assert outside.any() and torch.equal(out[outside], a[outside])  # the final image IS the anchor outside the mask
    inside = ~outside
    assert (out[inside] - a[inside]).abs().mean() > 0.01
    assert torch.allclose(info["mask_fraction"], last["mask"].flatten(1).mean(1))


def test_early_stop_margins_a_softmax_score_can_never_pass_are_refused():
    """guided.check_margins: on every attempt of the ladder threshold ± (margin + k * retry_margin) must lie inside
    (0, 1) for a softmax score, else that attempt's early stop could never fire; logit scores have no bound."""
    from cfaudit.guided import check_margins

    es = {"enabled": True, "margin": 0.3, "retry_margin": 0.2}
    cfg = {"early_stop": es, "scales": [0.1, 0.3, 0.9], "max_retries": 2}
    with pytest.raises(ValueError, match=r"retry_margin.*attempt 2 of the ladder"):
        check_margins(cfg, 0.5, "softmax")  # 0.3, 0.5, 0.7: attempt 2 needs a score above 1.0
    check_margins({**cfg, "early_stop": {**es, "retry_margin": 0.05}}, 0.5, "softmax")  # 0.3, 0.35, 0.4
    check_margins({**cfg, "max_retries": 0}, 0.5, "softmax")  # only the first attempt (0.3) is tried
    check_margins(cfg, 0.5, "logit")
    check_margins({**cfg, "early_stop": {**es, "enabled": False}}, 0.5, "softmax")
    check_margins({**cfg, "early_stop": {**es, "on_retries": False}}, 0.5, "softmax")  # retries guide every step
    with pytest.raises(ValueError, match="at most -0.05"):  # the benign side: threshold 0.25 - 0.3 < 0
        check_margins({**cfg, "early_stop": {**es, "retry_margin": 0.0}}, 0.25, "softmax")


def test_change_mask_threshold_and_dilation():
    a = torch.zeros(1, 3, 9, 9)
    x = a.clone()
    x[0, :, 4, 4] = 0.5
    assert change_mask(x, a, 0.1, 0).sum() == 1
    assert change_mask(x, a, 0.1, 1).sum() == 9
    assert change_mask(x, a, 0.6, 2).sum() == 0


def test_change_mask_cap_keeps_the_largest_changes_and_the_push_adds_its_own():
    """mask.max_fraction: where more than that share passes the threshold, only the largest changes are kept (per
    image); 1 changes nothing. ``push``: also where x0 - push passes the threshold (the union, under the same cap)."""
    a = torch.zeros(2, 3, 10, 10)
    x = a.clone()
    x[0] = torch.linspace(0.01, 1.0, 100).view(1, 10, 10)  # 100 distinct changes, 90 of them above 0.1
    x[1, :, 0, :3] = 0.5  # 3 changed pixels: under any cap used here
    assert change_mask(x, a, 0.1, 0)[0].sum() == 90 and torch.equal(change_mask(x, a, 0.1, 0, 1.0), change_mask(x, a, 0.1, 0))
    capped = change_mask(x, a, 0.1, 0, 0.25)
    assert capped[0].sum() == 25 and capped[1].sum() == 3
    assert capped[0, 0].flatten()[-25:].all()  # the 25 largest changes
    push = torch.zeros_like(x)
    push[1, :, 9, 9] = -0.4  # moves one unchanged pixel of image 1 past the threshold
    m = change_mask(x, a, 0.1, 0, 0.25, push=push)
    assert m[1].sum() == 4 and m[1, 0, 9, 9] == 1 and torch.equal(m[0], capped[0])


def test_change_mask_smooth_opens_dense_changes_not_isolated_pixels():
    """mask.smooth: the change map is box-averaged before the threshold, so a lone strong pixel stays out while a
    dense region of moderate change opens; checked against a direct numpy window mean."""
    a = torch.zeros(1, 3, 12, 12)
    x = a.clone()
    x[0, :, 2, 2] = 0.9  # isolated: window mean 0.9 / 25 = 0.036
    x[0, :, 6:11, 6:11] = 0.2  # dense 5x5 block
    m = change_mask(x, a, 0.105, 0, smooth=2)[0, 0].numpy()  # 0.105: no window mean lies on it
    d = np.pad(x[0].abs().mean(0).numpy(), 2)
    counts = np.pad(np.ones((12, 12)), 2)
    win = lambda arr, i, j: arr[i:i + 5, j:j + 5].sum()  # noqa: E731 (window centred on (i, j) of the padded map)
    expected = np.array([[win(d, i, j) / win(counts, i, j) > 0.105 for j in range(12)] for i in range(12)])
    assert np.array_equal(m.astype(bool), expected)
    assert m[2, 2] == 0 and m[8, 8] == 1 and change_mask(x, a, 0.1, 0)[0, 0, 2, 2] == 1
    assert torch.equal(change_mask(x, a, 0.1, 1, smooth=0), change_mask(x, a, 0.1, 1))


def test_classifier_gradient_consensus_l1_and_scores():
    clf = tiny_classifier()
    x0 = anchors(2, seed=9)
    a = anchors(2, seed=10)
    tg = torch.tensor([1, 0])
    g_raw, score = classifier_gradient(clf, x0, a, tg, l1_weight=0.0, normalize="none")
    with torch.no_grad():
        assert torch.allclose(score, clf.prob_malignant(x0), atol=1e-6)
    d = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    g_con, _ = classifier_gradient(clf, x0, a, tg, l1_weight=0.0, normalize="none", class_direction=d)
    agree = torch.sign(g_raw) == torch.sign(d)
    assert torch.equal(g_con[agree], g_raw[agree]) and (g_con[~agree] == 0).all() and agree.any() and (~agree).any()
    # the L1 term: d/dx0 of l1_weight * mean|x0 - a| is l1_weight * sign / n_pixels
    g_l1, _ = classifier_gradient(clf, x0, a, tg, l1_weight=3.0, normalize="none")
    assert torch.allclose(g_l1 - g_raw, 3.0 * torch.sign(x0 - a) / x0[0].numel(), atol=1e-7)
    g_n, _ = classifier_gradient(clf, x0, a, tg, l1_weight=3.0, normalize="rms")
    assert torch.allclose(g_n.pow(2).flatten(1).mean(1), torch.ones(2), atol=1e-5)
    g_m, _ = classifier_gradient(clf, x0, a, tg, l1_weight=3.0, normalize="max")
    assert torch.allclose(g_m.abs().flatten(1).amax(1), torch.ones(2))
    assert torch.allclose(torch.nn.functional.cosine_similarity(g_m.flatten(1), g_n.flatten(1)), torch.ones(2), atol=1e-5)
    # a small step against the gradient raises the target probability (benign target: lowers p_malignant)
    with torch.no_grad():
        before = target_log_prob(clf(x0), tg, 1)
        after = target_log_prob(clf(x0 - 0.05 * g_n), tg, 1)
    assert (after > before).all()


def test_eot_gradient_is_the_mean_of_the_views_gradients_mapped_back():
    """EOT (guided.eot): the CE gradient averaged over the dihedral views equals, computed independently, the mean
    of each view's input gradient rotated/flipped back; one view is exactly the plain gradient; the noise of a pair
    comes from its own seed (a pair alone = the same pair in a batch)."""
    from cfaudit.guided import dihedral

    clf = tiny_classifier()
    x0, a, tg = anchors(2, seed=9), anchors(2, seed=10), torch.tensor([1, 0])
    g1, s1 = classifier_gradient(clf, x0, a, tg, l1_weight=0.0, normalize="none")
    g1e, s1e = classifier_gradient(clf, x0, a, tg, l1_weight=0.0, normalize="none", eot={"views": 1, "noise_std": 0.3},
                                   noise_seeds=[1, 2])
    assert torch.equal(g1, g1e) and torch.equal(s1, s1e)
    g8, s8 = classifier_gradient(clf, x0, a, tg, l1_weight=0.0, normalize="none", eot={"views": 8, "noise_std": 0.0},
                                 noise_seeds=[1, 2])
    assert torch.equal(s8, s1)  # the score is the clean view's
    expected = torch.zeros_like(x0)
    for k in range(8):
        v = dihedral(x0.clone(), k).requires_grad_(True)
        (gv,) = torch.autograd.grad((-target_log_prob(clf(v), tg, 1)).sum(), v)
        back = gv.flip(3) if k >= 4 else gv  # undo the flip, then the quarter turns
        expected += torch.rot90(back, -(k % 4), dims=(2, 3)) / 8
    assert torch.allclose(g8, expected, rtol=1e-4, atol=1e-10) and g8.abs().max() > 1e-6
    assert len({tuple(dihedral(x0, k).flatten().tolist()) for k in range(8)}) == 8  # 8 distinct symmetries
    kw = dict(l1_weight=0.0, normalize="none", eot={"views": 4, "noise_std": 0.2}, step=3)
    gb, _ = classifier_gradient(clf, x0, a, tg, noise_seeds=[11, 12], **kw)
    ga, _ = classifier_gradient(clf, x0[1:], a[1:], tg[1:], noise_seeds=[12], **kw)
    assert torch.allclose(gb[1:], ga, rtol=1e-4, atol=1e-10)
    cos = torch.nn.functional.cosine_similarity(gb.flatten(1), g1.flatten(1))
    assert (cos < 0.99).all()  # the views change the direction


def test_guide_until_leaves_an_unguided_tail():
    """guide_until f: no pair is guided after the first ceil(f * steps) steps; 1.0 is the default behaviour."""
    model, _ = tiny_unet()
    sched, clf, a, tg = LinearSchedule(T), tiny_classifier(), anchors(3), torch.tensor([1, 0, 1])
    full, info_full, n = guided_sample(model, sched, clf, a, tg, [1, 2, 3], base_cfg(), 0.3)
    same, _, _ = guided_sample(model, sched, clf, a, tg, [1, 2, 3], base_cfg(guide_until=1.0), 0.3)
    assert torch.equal(full, same) and (info_full["guided_steps"] == n).all()
    trace_half, trace_none = [], []
    half, info, _ = guided_sample(model, sched, clf, a, tg, [1, 2, 3], base_cfg(guide_until=0.5), 0.3, trace=trace_half)
    assert (info["guided_steps"] == -(-n // 2)).all() and not torch.equal(half, full)
    # guidance acted in the guided head: after its last guided step the state differs from the unguided run's
    none, _, _ = guided_sample(model, sched, clf, a, tg, [1, 2, 3], base_cfg(), 0.0, trace=trace_none)
    assert not torch.equal(trace_half[-(-n // 2) - 1]["x"], trace_none[-(-n // 2) - 1]["x"])


class TopLeft(nn.Module):
    """A classifier body that sees only the top-left quarter of its input (its gradient is zero elsewhere)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        h, w = x.shape[2] // 2, x.shape[3] // 2
        return self.net(x[:, :, :h, :w])


class LabelBlind(nn.Module):
    """A denoiser that ignores the class label (every label, the null one included, is read as class 0)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, y):
        return self.model(x, t, torch.zeros_like(y))


class ClassPatch(nn.Module):
    """A denoiser whose class 1 differs from class 0 (and the null label) in one square only (rows/cols 10..13)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, y):
        patch = torch.zeros_like(x)
        patch[:, :, 10:14, 10:14] = 0.5
        return self.model(x, t, torch.zeros_like(y)) + (y == 1).float().view(-1, 1, 1, 1) * patch


OTHER_CLASS_MASK = {"enabled": True, "threshold": 0.1, "dilation": 1, "start": 0.25, "reference": "other_class"}


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmsolver"])
def test_mask_against_the_other_class_is_the_anchor_where_nothing_depends_on_the_class(sampler):
    """mask.reference other_class: the reference chain shares the start, the noise and the sampler state, so when
    neither the classifier term nor the class label changes anything the image is the anchor itself (what the
    prior redraws regardless of the class is not a change); with a class-aware model the target's own changes stay."""
    model, _ = tiny_unet()
    sched, a, tg, seeds = LinearSchedule(T), anchors(3), torch.tensor([1, 0, 1]), [7, 8, 9]
    cfg = base_cfg(sampler=sampler, mask=OTHER_CLASS_MASK, cfg_guidance=3.0)
    out, info, _ = guided_sample(LabelBlind(model), sched, tiny_classifier(), a, tg, seeds, cfg, 0.0)
    assert torch.equal(out, a) and (info["mask_fraction"] == 0).all()
    aware, info, _ = guided_sample(ClassPatch(model), sched, tiny_classifier(), a, tg, seeds, cfg, 0.0)
    change = (aware - a).abs().sum(1)
    assert (info["mask_fraction"] > 0).all() and (change.flatten(1).sum(1) > 0).all()
    assert change[:, 8:, 8:].sum() / change.sum() > 0.9  # around the square where the classes differ


def test_mask_against_the_other_class_keeps_the_change_where_the_classifier_looks():
    """With a class-blind prior and a classifier that sees only the top-left quarter, the change against the other
    class stays mostly there; the anchor-referenced mask also keeps what the prior redrew everywhere else."""
    model, _ = tiny_unet()
    model = LabelBlind(model)
    sched, a, tg, seeds = LinearSchedule(T), anchors(3), torch.tensor([1, 0, 1]), [7, 8, 9]
    clf = tiny_classifier()
    clf.net = TopLeft(clf.net)
    vs_other, info_o, _ = guided_sample(model, sched, clf, a, tg, seeds, base_cfg(mask=OTHER_CLASS_MASK), 0.3)
    vs_anchor, info_a, _ = guided_sample(model, sched, clf, a, tg, seeds,
                                         base_cfg(mask={**OTHER_CLASS_MASK, "reference": "anchor"}), 0.3)
    change, h = (vs_other - a).abs().sum(1), SIZE // 2
    far = (slice(None), slice(h + 2, None), slice(h + 2, None))  # the bottom-right, 2 px beyond the quarter
    # the tiny random UNet carries a change across the whole 16-px image, so "most of it", not "all of it"
    assert change.sum() > 0 and change[:, :h, :h].sum() / change.sum() > 0.5
    assert (info_o["mask_fraction"] < info_a["mask_fraction"]).all()
    assert change[far].sum() < 0.5 * (vs_anchor - a).abs().sum(1)[far].sum()
    with torch.no_grad():  # the classifier's part survives: the target is more likely than in the anchor itself
        assert (target_log_prob(clf(vs_other), tg, 1) > target_log_prob(clf(a), tg, 1)).all()


def test_mask_against_the_other_class_takes_in_what_the_classifier_pushes():
    """Masked from the first step with a class-blind prior, the two chains agree everywhere, so only the
    classifier's push can open the mask: the image changes where the classifier looks, toward the target."""
    model, _ = tiny_unet()
    sched, a, tg, seeds = LinearSchedule(T), anchors(3), torch.tensor([1, 0, 1]), [7, 8, 9]
    clf = tiny_classifier()
    clf.net = TopLeft(clf.net)
    cfg = base_cfg(mask={**OTHER_CLASS_MASK, "start": 0.0}, normalize_gradient="max")
    out, info, _ = guided_sample(LabelBlind(model), sched, clf, a, tg, seeds, cfg, 0.3)
    change, h = (out - a).abs().sum(1), SIZE // 2
    assert (change.flatten(1).sum(1) > 0).all() and (info["mask_fraction"] < 0.9).all()
    assert change[:, :h, :h].sum() / change.sum() > 0.5
    with torch.no_grad():
        assert (target_log_prob(clf(out), tg, 1) > target_log_prob(clf(a), tg, 1)).all()
    blind, info0, _ = guided_sample(LabelBlind(model), sched, clf, a, tg, seeds, cfg, 0.0)
    assert torch.equal(blind, a) and (info0["mask_fraction"] == 0).all()


PROJECT = {"enabled": True, "strength": 0.4, "steps": 3, "threshold": 0.15, "dilation": 1}


def bumped(a: torch.Tensor) -> torch.Tensor:
    """The anchors with a bright square (rows/cols 4..7) and a faint one (rows/cols 11..12): a guided change and
    sub-threshold noise."""
    x = a.clone()
    x[:, :, 4:8, 4:8] = (x[:, :, 4:8, 4:8] + 0.8).clamp(-1, 1)
    x[:, :, 11:13, 11:13] += 0.01
    return x


def test_relative_change_mask_is_aces_mask():
    """Channel-summed |x - a| over its per-image max > threshold, dilated; an unchanged image has an empty mask."""
    a = anchors(2)
    x = bumped(a)
    x[1] = a[1]
    m = relative_change_mask(x, a, 0.15, 0)
    d = (x[0] - a[0]).abs().sum(0)
    assert torch.equal(m[0, 0].bool(), d > 0.15 * d.max()) and m[1].sum() == 0
    assert m[0, 0, 11:13, 11:13].sum() == 0  # the faint change is below 15 % of the peak
    grown = relative_change_mask(x, a, 0.15, 1)[0, 0]
    assert grown.sum() > m[0, 0].sum() and torch.equal(grown * m[0, 0], m[0, 0])


def test_projection_redraws_only_the_changed_region_per_pair():
    """guided.project: outside the changed region the result IS the anchor (the faint change is removed too);
    inside, the prior redraws the change; each pair depends only on its own anchor, target and seed."""
    model, _ = tiny_unet()
    sched, a, tg = LinearSchedule(T), anchors(3), torch.tensor([1, 0, 1])
    x = bumped(a)
    cfg = base_cfg(project=PROJECT)
    out = project(model, sched, x, a, tg, [1, 2, 3], cfg)
    m = relative_change_mask(x, a, PROJECT["threshold"], PROJECT["dilation"])
    assert torch.equal(out * (1 - m), a * (1 - m))
    assert (out - x).abs()[m.expand_as(x).bool()].mean() > 0.02  # redrawn, not copied
    alone = project(model, sched, x[1:2], a[1:2], tg[1:2], [2], cfg)
    assert torch.allclose(alone, out[1:2], atol=1e-6)
    assert torch.equal(out, project(model, sched, x, a, tg, [1, 2, 3], cfg))  # deterministic
    other_seed = project(model, sched, x[1:2], a[1:2], tg[1:2], [9], cfg)
    assert not torch.allclose(other_seed, alone)


def test_the_ladder_scores_the_projected_image():
    """With project on, the saved image is the projected one and its recorded score is the classifier's score of
    that 8-bit image (so a flip the prior undoes is retried, not counted)."""
    from cfaudit.guided import final_scores

    model, _ = tiny_unet()
    sched, clf, a, tg = LinearSchedule(T), tiny_classifier(), anchors(3), torch.tensor([1, 0, 1])
    cfg = base_cfg(scales=[0.3, 0.9], max_retries=1)
    plain, _ = guided_ladder(model, sched, clf, a, tg, [1, 2, 3], cfg)
    proj, outcome = guided_ladder(model, sched, clf, a, tg, [1, 2, 3], {**cfg, "project": PROJECT})
    assert not np.array_equal(plain, proj)
    assert np.allclose(final_scores(clf, proj, "cpu").numpy(), outcome["final_score"].to_numpy(), atol=1e-6)


def test_the_ladder_retries_from_the_listed_strengths():
    """guided.strengths: attempt k starts at strengths[k] (the last entry beyond the list); a retried pair's image
    is exactly a single guided_sample at that attempt's strength, scale and margin."""
    from cfaudit.guided import ladder_strengths

    assert ladder_strengths(base_cfg(scales=[0.1, 0.2, 0.3], max_retries=2)) == [0.6, 0.6, 0.6]
    assert ladder_strengths(base_cfg(scales=[0.1, 0.2, 0.3], max_retries=2, strengths=[0.5, 0.7])) == [0.5, 0.7, 0.7]
    model, _ = tiny_unet()
    sched, a, tg = LinearSchedule(T), anchors(3), torch.tensor([1, 0, 1])
    clf = tiny_classifier(threshold=2.0)  # nothing is ever on the malignant side: malignant targets use every attempt
    cfg = base_cfg(scales=[0.1, 0.2], max_retries=1, strengths=[0.3, 0.8])
    images, outcome = guided_ladder(model, sched, clf, a, tg, [1, 2, 3], cfg)
    assert outcome["attempts"].tolist()[0] == 2
    last, _, n_steps = guided_sample(model, sched, clf, a[:1], tg[:1], [1], {**cfg, "strength": 0.8}, 0.2)
    from cfaudit.data.pack import float_to_uint8

    assert np.array_equal(images[0], float_to_uint8(last)[0]) and outcome["steps"].iloc[0] == n_steps


def test_retries_without_early_stop_are_retries_whose_margin_the_score_cannot_pass():
    """early_stop.on_retries: false guides every step of a retry — exactly what a retry margin beyond a softmax
    score's range did before check_margins refused it (same images, steps and flags), while the first attempt keeps
    its early stop."""
    from cfaudit.guided import attempt_early_stop

    es = {"enabled": True, "margin": 0.1, "resume": True, "finish": "denoise"}
    cfg = base_cfg(scales=[0.0, 0.3], max_retries=1, early_stop={**es, "retry_margin": 0.0, "on_retries": False})
    assert attempt_early_stop(cfg, 0)["enabled"] and not attempt_early_stop(cfg, 1)["enabled"]
    assert attempt_early_stop({**cfg, "early_stop": {**es, "retry_margin": 0.2}}, 1)["margin"] == pytest.approx(0.3)
    model, _ = tiny_unet()
    sched, clf, a, tg = LinearSchedule(T), tiny_classifier(), anchors(3), torch.tensor([1, 0, 1])
    explicit, out_explicit = guided_ladder(model, sched, clf, a, tg, [4, 5, 6], cfg)
    unreachable = base_cfg(scales=[0.0, 0.3], max_retries=1, early_stop={**es, "retry_margin": 0.95})  # 0.5 + 1.05
    silent, out_silent = guided_ladder(model, sched, clf, a, tg, [4, 5, 6], unreachable)
    assert (out_explicit["attempts"] == 2).any()  # some pair was retried
    assert np.array_equal(explicit, silent) and out_explicit.equals(out_silent)


def test_gradient_through_the_unet_is_the_chain_rule_through_one_call():
    """gradient_through: unet = d CE(clf(x0(x_t))) / d x_t x sqrt(abar_t), x0(x_t) the CFG one-step estimate, computed
    here independently with autograd; it differs from the FastDiME gradient on x0; per-pair independent."""
    import math

    from cfaudit.diffusion.samplers import guided_eps
    from cfaudit.guided import GuidedRun

    model, _ = tiny_unet()
    sched, clf, a, tg = LinearSchedule(T), tiny_classifier(), anchors(3), torch.tensor([1, 0, 1])
    cfg = base_cfg(gradient_through="unet", cfg_guidance=1.5)
    run = GuidedRun(model, sched, clf, a, tg, [1, 2, 3], cfg, 0.3)
    t = run.ts[1]
    x_t = sched.q_sample(a, t, torch.randn(a.shape, generator=torch.Generator().manual_seed(0)))
    ab = float(sched.alpha_bar[t])
    leaf = x_t.clone().requires_grad_(True)
    x0 = (leaf - math.sqrt(1 - ab) * guided_eps(model, leaf, t, tg, 1.5)) / math.sqrt(ab)
    ce = -target_log_prob(clf(x0), tg, clf.positive_index)
    (expected,) = torch.autograd.grad(ce.sum(), leaf)
    _, _, x0_clamped = run.estimate(x_t, t)
    idx = torch.arange(3)
    g, _ = classifier_gradient(clf, x0_clamped, a, tg, l1_weight=0.0, normalize="none",
                               through=(x_t, *run.unet_estimate(t, idx)))
    assert torch.allclose(g, expected * math.sqrt(ab), atol=1e-5, rtol=1e-4)
    g_x0, _ = classifier_gradient(clf, x0_clamped, a, tg, l1_weight=0.0, normalize="none")
    assert torch.nn.functional.cosine_similarity(g.flatten(1), g_x0.flatten(1)).max() < 0.99  # the UNet's Jacobian acts
    full, _, _ = guided_sample(model, sched, clf, a, tg, [1, 2, 3], cfg, 0.3)
    one, _, _ = guided_sample(model, sched, clf, a[1:2], tg[1:2], [2], cfg, 0.3)
    assert torch.allclose(full[1:2], one, atol=1e-5)
    assert not torch.allclose(full, guided_sample(model, sched, clf, a, tg, [1, 2, 3], base_cfg(cfg_guidance=1.5), 0.3)[0])


def test_target_side_and_log_prob_with_positive_index_zero():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    lp1 = target_log_prob(logits, torch.tensor([1, 1]), positive_index=0)
    assert torch.allclose(lp1.exp(), torch.softmax(logits, 1)[:, 0])
    score = torch.tensor([0.2, 0.55, 0.7, 0.5])
    assert on_target_side(score, torch.tensor([1, 1, 1, 0]), 0.5).tolist() == [False, True, True, True]
    assert on_target_side(score, torch.tensor([1, 1, 1, 0]), 0.5, margin=0.1).tolist() == [False, False, True, False]


def test_early_stop_and_finish_modes():
    model, _ = tiny_unet()
    sched = LinearSchedule(T)
    a = anchors(2)
    tg = torch.tensor([1, 1])
    # threshold -1: every estimate is already on the malignant side -> guidance stops before the first gradient step
    clf = tiny_classifier(threshold=-1.0)
    cfg = base_cfg(early_stop={"enabled": True, "margin": 0.0, "resume": True, "finish": "denoise"})
    out, info, _ = guided_sample(model, sched, clf, a, tg, [1, 2], cfg, 5.0)
    plain, _, _ = guided_sample(model, sched, clf, a, tg, [1, 2], cfg, 0.0)
    assert info["early_stopped"].all() and (info["guided_steps"] == 0).all()
    assert torch.equal(out, plain)  # stopped at once and denoised plainly = the unguided run
    cfg_x0 = base_cfg(early_stop={"enabled": True, "margin": 0.0, "resume": True, "finish": "x0"})
    out_x0, info_x0, _ = guided_sample(model, sched, clf, a, tg, [1, 2], cfg_x0, 5.0)
    assert info_x0["early_stopped"].all() and not torch.equal(out_x0, plain)  # the first step's clean estimate
    # unreachable threshold: never stops, every step guided
    clf_hard = tiny_classifier(threshold=2.0)
    _, info_hard, n = guided_sample(model, sched, clf_hard, a, tg, [1, 2], cfg, 5.0)
    assert not info_hard["early_stopped"].any() and (info_hard["guided_steps"] == n).all()


class ScriptedClassifier(nn.Module):
    """The malignant logit follows a script, one value per call (plus a tiny image term, so gradients exist)."""

    positive_index, threshold, score_space, name, spec, input_size = 1, 0.5, "softmax", "scripted", {}, SIZE

    def __init__(self, values):
        super().__init__()
        self.values, self.calls = list(values), 0

    def forward(self, x):
        v = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        z = 0.01 * x.mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(z), z + v], 1)

    def score(self, logits):
        return torch.softmax(logits.float(), 1)[:, 1]


def test_early_stop_resumes_when_the_estimate_falls_back():
    model, _ = tiny_unet()
    sched = LinearSchedule(T)
    a = anchors(1)
    # p_malignant per step: 0.95 (stop), 0.95, 0.05 (back: resume), 0.05, 0.55 (inside the margin: keep going),
    # 0.95 (stop), 0.95, 0.95
    script = [3.0, 3.0, -3.0, -3.0, 0.2, 3.0, 3.0, 3.0]
    es = {"enabled": True, "margin": 0.1, "finish": "denoise"}
    clf = ScriptedClassifier(script)
    _, info, n = guided_sample(model, sched, clf, a, torch.tensor([1]), [5], base_cfg(early_stop={**es, "resume": True}), 0.3)
    assert n == len(script) and clf.calls == n
    assert info["guided_steps"].tolist() == [3] and info["early_stopped"].tolist() == [True]
    clf = ScriptedClassifier(script)
    _, info, _ = guided_sample(model, sched, clf, a, torch.tensor([1]), [5], base_cfg(early_stop={**es, "resume": False}), 0.3)
    assert info["guided_steps"].tolist() == [0] and clf.calls == 1  # stopped for good after the first estimate


def test_ladder_retries_up_to_the_limit_and_is_batch_independent():
    model, _ = tiny_unet()
    sched = LinearSchedule(T)
    a = anchors(3)
    tg = torch.tensor([1, 0, 1])
    cfg = base_cfg(scales=[0.0, 0.2, 0.4, 0.8], max_retries=2)
    # unreachable for malignant targets (score > 2 never), always reached for benign ones (score <= 2)
    clf = tiny_classifier(threshold=2.0)
    imgs, out = guided_ladder(model, sched, clf, a, tg, [7, 8, 9], cfg)
    assert list(out.columns) == OUTCOME_COLUMNS
    assert out["attempts"].tolist() == [3, 1, 3] and out["scale"].tolist() == [0.4, 0.0, 0.4]
    assert out["flipped"].tolist() == [False, True, False]
    # the kept image of a failing pair is its last attempt: same as running that scale directly
    direct, _, _ = guided_sample(model, sched, clf, a[:1], tg[:1], [7], cfg, 0.4)
    from cfaudit.data.pack import float_to_uint8

    assert np.array_equal(imgs[0], float_to_uint8(direct)[0])
    # one pair alone gives the same image as inside the batch (per-anchor noise, per-image gradient)
    alone, _ = guided_ladder(model, sched, clf, a[2:], tg[2:], [9], cfg)
    assert np.array_equal(alone[0], imgs[2])
    # final_score is the classifier's score of the saved 8-bit image
    with torch.no_grad():
        s = clf.prob_malignant(uint8_to_float(torch.from_numpy(imgs)))
    assert np.allclose(out["final_score"], s.numpy(), atol=1e-6)


def test_run_shard_writes_pngs_and_index_with_outcomes(tmp_path):
    model, meta = tiny_unet()
    clf = tiny_classifier()
    sched = LinearSchedule(T)
    rng = np.random.default_rng(0)
    pack = (rng.random((5, SIZE, SIZE, 3)) * 255).astype(np.uint8)
    np.save(tmp_path / "pack.npy", pack)
    ids = [f"img{i}" for i in range(5)]
    pd.DataFrame({"row": range(5), "image_id": ids, "label": [0, 1, 0, 1, 0]}).to_csv(tmp_path / "pack_index.csv", index=False)
    anc = pd.DataFrame({"image_id": ids[:4], "label": [0, 1, 0, 1], "png": ""})
    cfg = base_cfg(scales=[0.2, 0.6], max_retries=1, mask={"enabled": True, "threshold": 0.2, "dilation": 1, "start": 0.5},
                   early_stop={"enabled": True, "margin": 0.05, "resume": True, "finish": "denoise"}, batch_size=1)
    frames = []
    for shard in (0, 1):
        df, _ = run_shard(model, sched, meta, clf, anc, tmp_path / "pack.npy", tmp_path / "pack_index.csv",
                          tmp_path / f"shard_{shard}", shard, 2, cfg, 1234, "cpu")
        df.to_csv(tmp_path / f"shard_{shard}.csv", index=False)
        frames.append(df)
        assert list(df.columns) == INDEX_COLUMNS + OUTCOME_COLUMNS
    full = gather([tmp_path / "shard_0.csv", tmp_path / "shard_1.csv"], tmp_path / "index.csv", anchors=anc)
    assert len(full) == 8 and set(full["generator"]) == {"guided"}
    for p in full["path"]:
        assert (tmp_path / p).exists() or __import__("os").path.exists(p)
    s = json.loads(full["settings"][0])
    assert s["scales_tried"] == [0.2, 0.6] and s["t_start"] == sched.t_start(0.6) and s["seed"] == 1234
    assert s["mask"]["enabled"] and s["classifier"] == "tiny" and s["threshold"] == 0.5
    # same anchors with a different batch size and shard count -> identical images
    cfg2 = copy.deepcopy(cfg)
    cfg2["batch_size"] = 4
    one, _ = run_shard(model, sched, meta, clf, anc, tmp_path / "pack.npy", tmp_path / "pack_index.csv", tmp_path / "one",
                       0, 1, cfg2, 1234, "cpu")
    merged = full.set_index(["anchor_id", "target_label"])
    for _, r in one.iterrows():
        other = merged.loc[(r["anchor_id"], r["target_label"])]
        assert np.array_equal(np.asarray(__import__("PIL.Image").Image.open(r["path"])),
                              np.asarray(__import__("PIL.Image").Image.open(other["path"])))
        assert r["scale"] == other["scale"] and r["flipped"] == other["flipped"]


def test_config_section_validates_and_names_bad_keys(repo_root):
    cfg = load_config(repo_root / "config.yaml")
    g = cfg["guided"]
    assert set(g) >= {"strength", "scales", "max_retries", "mask", "early_stop", "consensus", "l1_weight", "scale_mode"}
    with pytest.raises(ConfigError, match="guided"):
        load_config(repo_root / "config.yaml", overrides={"guided": {"scale": [1.0]}})
    with pytest.raises(ConfigError, match="guided.mask"):
        load_config(repo_root / "config.yaml", overrides={"guided": {"mask": {"enabled": "yes"}}})
    with pytest.raises(ConfigError, match="guided.mask.reference"):
        load_config(repo_root / "config.yaml", overrides={"guided": {"mask": {"reference": "prior"}}})


# ----------------------------------------------------------------------------------------------------------
# DVCE's cone projection (guided.cone)
# ----------------------------------------------------------------------------------------------------------
def _angle_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cos = torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double())
    return torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))


def test_cone_projection_turns_only_what_lies_outside_the_cone():
    """Checked against a 2-D rotation computed independently (numpy, in the plane of v and the axis): inside the
    cone v is returned as is; outside it ends exactly on the rim, with v's norm, between v and the axis; exactly
    opposite it becomes the axis's rim direction's norm-kept limit (the axis itself); a zero axis leaves v."""
    from cfaudit.guided import cone_project

    rng = np.random.default_rng(3)
    axis = torch.tensor(rng.normal(size=(4, 3, 5, 5)), dtype=torch.float32)
    ortho = torch.tensor(rng.normal(size=(4, 3, 5, 5)), dtype=torch.float32)
    af, of = axis.flatten(1).numpy().astype(np.float64), ortho.flatten(1).numpy().astype(np.float64)
    u = af / np.linalg.norm(af, axis=1, keepdims=True)
    w = of - (of * u).sum(1, keepdims=True) * u
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    angles = np.array([10.0, 50.0, 120.0, 179.0])  # v at these angles from the axis, norms 0.5..2
    norms = np.array([0.5, 1.0, 1.5, 2.0])
    v = norms[:, None] * (np.cos(np.radians(angles))[:, None] * u + np.sin(np.radians(angles))[:, None] * w)
    out = cone_project(torch.tensor(v, dtype=torch.float32).view_as(axis), axis, 30.0).flatten(1).numpy()
    expected = v.copy()
    for k in range(1, 4):  # outside: the rim of the 30 degree cone in the same plane, same norm
        expected[k] = norms[k] * (np.cos(np.radians(30)) * u[k] + np.sin(np.radians(30)) * w[k])
    assert np.allclose(out, expected, atol=1e-5)
    assert np.allclose(np.linalg.norm(out, axis=1), norms, atol=1e-5)
    opposite = cone_project(-2.0 * axis, axis, 30.0)
    assert torch.allclose(opposite.flatten(1), 2.0 * axis.flatten(1), atol=1e-5)  # norm 2|axis| along the axis
    assert torch.equal(cone_project(axis, torch.zeros_like(axis), 30.0), axis)


def test_classifier_gradient_with_the_cone_follows_the_robust_model_within_the_angle():
    """guided.cone: the classifier term is the robust model's gradient turned to within the angle of the audited
    classifier's, with the audited gradient's norm; the score is still the audited classifier's; an angle wide
    enough to hold the robust gradient returns its direction unchanged. A small step along it still raises the
    audited classifier's target probability (the step is within 90 degrees of its gradient)."""
    clf, robust = tiny_classifier(seed=1), tiny_classifier(seed=5)  # gradients about 50 degrees apart
    x0, a, tg = anchors(3, seed=9), anchors(3, seed=10), torch.tensor([1, 0, 1])
    g_aud, s_aud = classifier_gradient(clf, x0, a, tg, l1_weight=0.0, normalize="none")
    g_rob, _ = classifier_gradient(robust, x0, a, tg, l1_weight=0.0, normalize="none")
    between = _angle_deg(g_aud, g_rob)
    assert (between > 20).all()  # two random models disagree: the cone has something to do
    g_c, s_c = classifier_gradient(clf, x0, a, tg, l1_weight=0.0, normalize="none", cone=(robust, 20.0))
    assert torch.equal(s_c, s_aud)
    assert torch.allclose(_angle_deg(g_c, g_aud), torch.full((3,), 20.0, dtype=torch.float64), atol=0.05)
    assert torch.allclose(g_c.flatten(1).norm(dim=1), g_aud.flatten(1).norm(dim=1), rtol=1e-4)
    assert (_angle_deg(g_c, g_rob) < between).all()  # closer to the robust direction than the audited one is
    wide, _ = classifier_gradient(clf, x0, a, tg, l1_weight=0.0, normalize="none", cone=(robust, 89.9))
    inside = between < 89.9
    cos = torch.nn.functional.cosine_similarity(wide.flatten(1), g_rob.flatten(1))
    assert inside.any() and torch.allclose(cos[inside], torch.ones(int(inside.sum())), atol=1e-5)
    g_n, _ = classifier_gradient(clf, x0, a, tg, l1_weight=0.0, normalize="rms", cone=(robust, 20.0))
    with torch.no_grad():
        assert (target_log_prob(clf(x0 - 0.02 * g_n), tg, 1) > target_log_prob(clf(x0), tg, 1)).all()


def test_the_cone_needs_its_robust_model():
    model, meta = tiny_unet()
    with pytest.raises(ValueError, match="guided.cone.enabled"):
        guided_sample(model, LinearSchedule(T), tiny_classifier(), anchors(1), torch.tensor([1]), [1],
                      base_cfg(cone={"enabled": True, "angle": 30.0}), 0.3)
    robust = tiny_classifier(seed=2)
    cfg = base_cfg(cone={"enabled": True, "angle": 30.0})
    x, _, _ = guided_sample(model, LinearSchedule(T), tiny_classifier(), anchors(2), torch.tensor([1, 0]), [1, 2], cfg, 0.3,
                            robust=robust)
    plain, _, _ = guided_sample(model, LinearSchedule(T), tiny_classifier(), anchors(2), torch.tensor([1, 0]), [1, 2],
                                base_cfg(), 0.3)
    assert x.shape == plain.shape and not torch.allclose(x, plain)  # the robust model changes the guidance
