"""The `trained` classifier kind: a torchvision architecture trained from scratch on the train split.

Training sees images exactly as the scorer feeds them: uint8 pack -> [-1, 1] -> the classifier's own
Resize/CenterCrop/normalisation (:func:`cfaudit.classifiers.resize_center_crop`, :func:`normalize`). The
held-out AUROC is measured on the eval split, which the classifier never sees.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cfaudit.classifiers import build_arch, main_logits, normalize, resize_center_crop
from cfaudit.data.pack import uint8_to_float
from cfaudit.precision import autocast, resolve_precision

log = logging.getLogger("cfaudit.classifier_training")


@dataclass
class TrainSettings:
    """Mirror of config ``classifier.trained`` (see schemas/classifier.schema.yaml)."""

    arch: str = "resnet18"
    arch_kwargs: dict = field(default_factory=dict)
    input_size: int = 64
    normalization: str = "minus_one_one"
    epochs: int = 12
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    flips: bool = True
    rot90: bool = True
    rotate: bool = False
    scale_jitter: float = 0.0
    translate: float = 0.0
    balance_classes: bool = True
    bf16: bool = True
    eval_batch_size: int = 128
    adversarial_epsilon: float = 0.0
    adversarial_steps: int = 3

    @classmethod
    def from_config(cls, cfg: dict) -> "TrainSettings":
        known = {k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg}
        return cls(**known)


class Preprocessed(nn.Module):
    """Network + the classifier's preprocessing, for training (the scorer wraps the same steps)."""

    def __init__(self, net: nn.Module, input_size: int, normalization: str):
        super().__init__()
        self.net = net
        self.input_size = input_size
        self.normalization = normalization
        self.positive_index = 1  # class 1 = malignant (what cfaudit.pgd.masked_l2_pgd reads)

    def forward(self, x):
        x = normalize(resize_center_crop(x, self.input_size, self.input_size), self.normalization)
        return main_logits(self.net(x))


def augment(x: torch.Tensor, gen: torch.Generator, flips: bool, rot90: bool) -> torch.Tensor:
    """Per-sample random horizontal/vertical flips and 90° rotations (dermoscopy has no canonical orientation)."""
    n = x.shape[0]
    if flips:
        h = torch.rand(n, generator=gen) < 0.5
        v = torch.rand(n, generator=gen) < 0.5
        x = torch.where(h.view(-1, 1, 1, 1).to(x.device), x.flip(3), x)
        x = torch.where(v.view(-1, 1, 1, 1).to(x.device), x.flip(2), x)
    if rot90 and x.shape[2] == x.shape[3]:
        t = (torch.rand(n, generator=gen) < 0.5).view(-1, 1, 1, 1).to(x.device)
        x = torch.where(t, x.transpose(2, 3), x)
    return x


def random_affine(x: torch.Tensor, gen: torch.Generator, rotate: bool, scale_jitter: float, translate: float) -> torch.Tensor:
    """Per-sample random rotation (any angle), zoom (1 ± scale_jitter) and shift (± translate of the side),
    bilinear with reflection at the borders; the identity when all are off."""
    if not (rotate or scale_jitter or translate):
        return x
    n = x.shape[0]
    ang = torch.rand(n, generator=gen) * 2 * math.pi if rotate else torch.zeros(n)
    sc = 1.0 + (torch.rand(n, generator=gen) * 2 - 1) * scale_jitter
    tx, ty = ((torch.rand(2, n, generator=gen) * 2 - 1) * 2 * translate).unbind(0)
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def training_views(model: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, gen: torch.Generator,
                   settings: TrainSettings) -> torch.Tensor:
    """One batch as the network trains on it: augmented (flips, quarter turns, affine), then, for adversarial
    training, replaced by its PGD views; channels-last on a GPU."""
    x = augment(uint8_to_float(images_u8), gen, settings.flips, settings.rot90)
    x = random_affine(x, gen, settings.rotate, settings.scale_jitter, settings.translate)
    if settings.adversarial_epsilon > 0:
        x = adversarial_views(model, x, labels, settings)
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cuda" else x


def adversarial_views(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, settings: TrainSettings) -> torch.Tensor:
    """The batch moved by L2 PGD toward the wrong class (Madry et al. 2018, arXiv:1706.06083): at most
    ``adversarial_epsilon`` (L2 over the whole image, [0, 1] intensity units, as the PGD control's budget) in
    ``adversarial_steps`` steps of 2.5 eps / steps, no random start. Training on these views is adversarial
    training; its gradients are perceptually aligned (Santurkar et al. 2019), which is what DVCE's cone needs.
    The attack runs in eval mode (batch norm on its running statistics, as the MadryLab ``robustness`` library's
    AttackerModel does), so each image's view depends on that image alone and the attack's forward passes leave
    the running statistics alone."""
    from cfaudit.pgd import masked_l2_pgd

    ones = torch.ones_like(x[:, :1])
    budgets = torch.full((x.shape[0],), float(settings.adversarial_epsilon), device=x.device)
    model.eval()
    try:
        return masked_l2_pgd(model, x, 1 - labels, ones, budgets, int(settings.adversarial_steps)).detach()
    finally:
        model.train()


@torch.no_grad()
def predict_scores(model: nn.Module, images_u8: torch.Tensor, batch_size: int, positive_index: int = 1,
                   amp_dtype: torch.dtype | None = None) -> np.ndarray:
    """Softmax probability of the positive class for uint8 NHWC images (already on the model's device)."""
    model.eval()
    out = []
    dev = images_u8.device
    for i in range(0, images_u8.shape[0], batch_size):
        x = uint8_to_float(images_u8[i:i + batch_size])
        with autocast(dev, amp_dtype):
            logits = model(x)
        out.append(torch.softmax(logits.float(), 1)[:, positive_index].cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def heldout_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict:
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).astype(int)
    both = len(np.unique(labels)) == 2
    pred = probs > threshold
    return {
        "n_eval": int(len(labels)),
        "n_eval_malignant": int(labels.sum()),
        "auroc": float(roc_auc_score(labels, probs)) if both else float("nan"),
        "accuracy_at_threshold": float((pred == labels.astype(bool)).mean()) if len(labels) else float("nan"),
        "threshold": threshold,
    }


def train_classifier(train_images: np.ndarray, train_labels: np.ndarray, settings: TrainSettings, seed: int,
                     device: torch.device, eval_images: np.ndarray | None = None,
                     eval_labels: np.ndarray | None = None, threads: int | None = None):
    """Train ``settings.arch`` from scratch; returns ``(net, history list of dicts, metrics dict)``.

    ``*_images``: uint8 (N, H, W, 3); labels 0 = benign, 1 = malignant. The whole dataset goes onto the
    device once (uint8: 256 px × 10k images = 2 GB). Deterministic for a given seed on a given device.
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    labels = np.asarray(train_labels).astype(np.int64)
    if len(np.unique(labels)) < 2:
        raise ValueError(f"the train split holds only class {np.unique(labels).tolist()}: cannot train a classifier")
    net = build_arch(settings.arch, 2, settings.arch_kwargs)
    model = Preprocessed(net, settings.input_size, settings.normalization).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    x_all = torch.as_tensor(np.ascontiguousarray(train_images)).to(device)
    y_all = torch.as_tensor(labels).to(device)
    n = len(labels)
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    weight = torch.tensor(n / (2.0 * counts), dtype=torch.float32, device=device) if settings.balance_classes else None
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = max(1, math.ceil(n / settings.batch_size))
    total = steps_per_epoch * settings.epochs
    warm = max(1, int(settings.warmup_epochs * steps_per_epoch))

    def lr_at(step):  # linear warm-up then cosine decay to 0
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    _, amp = resolve_precision("auto" if settings.bf16 else "fp32", device)  # bf16 on a GPU only
    history = []
    log.info("training %s from scratch: %d images (%d malignant), input %d, %d epochs, batch %d, device %s%s",
             settings.arch, n, int(labels.sum()), settings.input_size, settings.epochs, settings.batch_size, device,
             f", adversarial (L2 PGD eps {settings.adversarial_epsilon:g}, {settings.adversarial_steps} steps)"
             if settings.adversarial_epsilon > 0 else "")
    step = 0
    for epoch in range(settings.epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(n, generator=gen).to(device)
        total_loss, seen = 0.0, 0
        for i in range(0, n, settings.batch_size):
            idx = perm[i:i + settings.batch_size]
            if idx.numel() < 2:  # batch norm needs >1 sample
                continue
            x = training_views(model, x_all[idx], y_all[idx], gen, settings)
            with autocast(device, amp):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y_all[idx], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            total_loss += float(loss.detach()) * idx.numel()
            seen += idx.numel()
        row = {"epoch": epoch + 1, "train_loss": total_loss / max(1, seen), "lr": opt.param_groups[0]["lr"],
               "seconds": time.time() - t0}
        history.append(row)
        log.info("epoch %d/%d loss %.4f (%.1f s)", epoch + 1, settings.epochs, row["train_loss"], row["seconds"])
    metrics = {}
    if eval_images is not None and len(eval_images):
        xe = torch.as_tensor(np.ascontiguousarray(eval_images)).to(device)
        probs = predict_scores(model, xe, settings.eval_batch_size, 1, amp)
        metrics = heldout_metrics(eval_labels, probs)
        metrics["eval_probs"] = probs.tolist()
        log.info("held-out AUROC %.4f on %d eval images (%d malignant)", metrics["auroc"], metrics["n_eval"],
                 metrics["n_eval_malignant"])
    model.eval()
    return model.net.cpu(), history, metrics


def run_training(pack, index, split, out_weights, out_heldout, out_history, out_eval_scores, settings: dict,
                 seed: int, device, threads: int | None = None, rule: str = "train_classifier") -> dict:
    """Rule train_classifier (and train_oracle): train on the pack's train split, measure the held-out AUROC on its eval split.

    Writes the state dict (``torch.save(net.state_dict())``, loadable with ``weights_only=True``), the
    held-out metrics JSON (+ provenance sidecar), the loss history and the per-image eval probabilities.
    """
    import json

    import pandas as pd

    from cfaudit.data.pack import load_pack
    from cfaudit.files import atomic_write_text, save_torch, write_csv
    from cfaudit.provenance import now, write_provenance
    from cfaudit.runtime import seed_everything

    started = now()
    seed_everything(seed)
    s = TrainSettings.from_config(settings)
    train_x, train_idx = load_pack(pack, index, split, "train")
    eval_x, eval_idx = load_pack(pack, index, split, "eval")
    if len(train_idx) == 0:
        raise ValueError(f"{split} has no 'train' rows: nothing to train the classifier on")
    t0 = time.time()
    net, history, metrics = train_classifier(train_x, train_idx["label"].to_numpy(), s, seed, device,
                                             eval_x, eval_idx["label"].to_numpy(), threads)
    seconds = time.time() - t0
    save_torch(net.state_dict(), out_weights)
    probs = metrics.pop("eval_probs", [])
    write_csv(pd.DataFrame({"image_id": eval_idx["image_id"], "label": eval_idx["label"],
                            "prob": probs if len(probs) else np.nan}), out_eval_scores)
    write_csv(pd.DataFrame(history), out_history)
    record = {
        "arch": s.arch, "input_size": s.input_size, "seed": seed, "device": str(device),
        "n_train": int(len(train_idx)), "n_train_malignant": int(train_idx["label"].sum()),
        "train_seconds": round(seconds, 2), "image_size": int(train_x.shape[1]) if len(train_x) else None,
        **metrics, "settings": s.__dict__,
    }
    atomic_write_text(out_heldout, json.dumps(record, indent=2))
    write_provenance(out_heldout, [pack, index, split], {"training settings": settings, "seed": seed},
                     rule=rule, started=started)
    return record
