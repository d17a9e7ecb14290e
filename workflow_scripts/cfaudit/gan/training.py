"""Training the GAN baseline against the audited classifier (DeGrave et al. 2023, Nat. Biomed. Eng.,
doi:10.1038/s41551-023-01160-9; code github.com/suinleelab/derm_audit, train.py).

The generator is conditioned on the classifier's own opinion, never on ground truth: the classifier's
probability of malignancy on the real image is cut into ``n_bins`` equal bins over [0, 1]. Per batch:

* discriminator step (hinge loss): real images vs G(x, random target bin);
* every ``n_critic``-th discriminator step, a generator step on the same batch with
  ``lambda_gan * hinge(D(G(x, y_t)))``
  ``+ lambda_rec * L1(G(x, y_orig), x) + lambda_cycle * L1(G(G(x, y_t), y_orig), x)``
  ``+ lambda_cls * [BCE(bin_centre(y_t), p(G(x, y_t))) + BCE(p(x), p(G(x, y_orig)))]``
  where p is the classifier's probability of malignancy; the classifier is frozen, its gradient w.r.t. the
  image drives the generator;
* a batch is ``micro_batch * accumulation`` images (gradients accumulated over micro-batches); an epoch is
  one pass over the shuffled training images (incomplete last batch dropped);
* augmentation: Resize(scale * size) once, then per sample a random crop back to size and a brightness
  factor uniform in [1 - brightness, 1 + brightness];
* Adam (lr, betas from config) for both networks; bf16 autocast on a GPU (``precision``), fp32 on the CPU.

All random draws (data order, crops, brightness, target bins) come from one ``torch.Generator`` seeded from
config, on the CPU, so a run is reproducible across devices and resumable: after every
``checkpoint_every`` epochs the full state (both networks, both optimisers, the RNG state, the history) is
written atomically to ``resume.pt``; a restarted job whose fingerprint (config except ``epochs`` and
``checkpoint_every``, classifier, data) matches continues from it and ends with the same weights as an
uninterrupted run.

Each epoch also measures a fixed probe (up to ``probe_size`` training images, eval mode, bins 0 and
``n_bins - 1``): the classifier-consistency BCE and the share of outputs the classifier puts on the
requested side of 0.5 (flip rates), logged as ``probe_*`` columns; row 0 is the untrained generator.

:func:`train_gan` runs the named steps of :class:`GANTrainer`; the loss figure is cfaudit.figures.loss_figure
with the panels of :func:`loss_panels`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from cfaudit.data.pack import float_to_uint8_tensor, uint8_to_float, uint8_to_unit
from cfaudit.gan.checkpoint import (
    GANCheckpointError,
    checkpoint_dict,
    from_published,
    read_checkpoint,
    save_checkpoint,
)
from cfaudit.gan.networks import Discriminator, Generator, GeneratorArch
from cfaudit.precision import autocast, resolve_precision
from cfaudit.provenance import without_timings

log = logging.getLogger("cfaudit.gan")

LOSS_COLUMNS = ["epoch", "d_steps", "g_steps", "d_loss", "d_real", "d_fake", "g_loss", "g_adv", "g_rec",
                "g_cycle", "g_cls_target", "g_cls_rec", "probe_cls", "probe_to_benign", "probe_to_malignant",
                "seconds", "images_per_s"]
RESUME_NAME = "resume.pt"
# Fingerprint excludes these: more epochs continue a finished run; checkpoint cadence changes no result.
NOT_FINGERPRINTED = ("epochs", "checkpoint_every")


# ------------------------------------------------------------------------------------------------------------
# Bins and losses
# ------------------------------------------------------------------------------------------------------------
def bin_edges(n_bins: int, device=None) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, n_bins + 1, device=device)


def bin_centres(n_bins: int, device=None) -> torch.Tensor:
    e = bin_edges(n_bins, device)
    return (e[:-1] + e[1:]) / 2


def prob_to_bin(p: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin index of probabilities: bin i holds (edge_i, edge_{i+1}] (bin 0 also holds 0)."""
    edges = bin_edges(n_bins, p.device).to(p.dtype)
    return (torch.bucketize(p.detach().contiguous(), edges) - 1).clamp(0, n_bins - 1)


def positive_log_probs(logits: torch.Tensor, positive_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log(1 - p)) of the positive class, computed stably from logits (any number of classes)."""
    lsm = torch.log_softmax(logits.float(), dim=1)
    log_p = lsm[:, positive_index]
    rest = torch.cat([lsm[:, :positive_index], lsm[:, positive_index + 1:]], dim=1)
    return log_p, torch.logsumexp(rest, dim=1)


def bce_to_classifier(target: torch.Tensor, logits: torch.Tensor, positive_index: int) -> torch.Tensor:
    """Binary cross-entropy between target probabilities and the classifier's probability of malignancy."""
    log_p, log_q = positive_log_probs(logits, positive_index)
    return -(target * log_p + (1 - target) * log_q).mean()


def hinge_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def hinge_g(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------
def to_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize float images (N,3,H,W) in [-1,1] to size x size (bicubic, antialiased); no-op if already there."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)


def images_at(images_uint8: np.ndarray, size: int, device, chunk: int = 256) -> torch.Tensor:
    """uint8 (N,H,W,3) -> float (N,3,size,size) in [-1,1] on ``device``, resized in chunks."""
    out = []
    for i in range(0, len(images_uint8), chunk):
        t = torch.as_tensor(np.ascontiguousarray(images_uint8[i:i + chunk])).to(device)
        out.append(to_size(uint8_to_float(t), size))
    return torch.cat(out) if out else torch.empty(0, 3, size, size, device=device)


class Augmenter:
    """Resize(scale * size) once for the whole set (kept as uint8 on the device), random crop + brightness per draw."""

    def __init__(self, images: torch.Tensor, size: int, scale: float, brightness: float):
        self.size = size
        self.brightness = float(brightness)
        self.big = max(size, int(round(scale * size)))
        up = torch.cat([to_size(images[i:i + 256], self.big) for i in range(0, len(images), 256)])
        self.store = float_to_uint8_tensor(up)  # (N,3,big,big)

    def __len__(self) -> int:
        return self.store.shape[0]

    def draw(self, idx: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        n, s, dev = len(idx), self.size, self.store.device
        span = self.big - s + 1
        top = torch.randint(0, span, (n,), generator=rng)
        left = torch.randint(0, span, (n,), generator=rng)
        factor = 1.0 + (torch.rand(n, generator=rng) * 2 - 1) * self.brightness
        rows = (top[:, None] + torch.arange(s)).to(dev)
        cols = (left[:, None] + torch.arange(s)).to(dev)
        sel = self.store[idx.to(dev)]  # (n,3,big,big)
        crop = sel[torch.arange(n, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (n,s,s,3)
        x = uint8_to_unit(crop)
        x = (x * factor.to(dev).view(-1, 1, 1, 1)).clamp(0, 1)
        return x.mul(2).sub(1).contiguous()


# ------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    generator: Generator
    discriminator: Discriminator
    checkpoint: dict
    history: pd.DataFrame
    epochs_run: int
    resumed_from: int | None
    seconds: float
    settings: dict = field(default_factory=dict)


def arch_from_config(gan_cfg: dict) -> GeneratorArch:
    a = gan_cfg["arch"]
    return GeneratorArch(base_channels=a["base_channels"], n_blocks=a["n_blocks"], n_bins=a["n_bins"])


def fingerprint(gan_cfg: dict, seed: int, extra: dict) -> str:
    train = {k: v for k, v in gan_cfg["train"].items() if k not in NOT_FINGERPRINTED}
    blob = json.dumps({"train": train, "arch": gan_cfg["arch"], "seed": seed, **extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def critic(discriminator: Discriminator, x: torch.Tensor) -> torch.Tensor:
    """The discriminator always runs in fp32: under autocast, spectral norm's power iteration would store its
    u / v vectors in bf16. It is small next to the generator and the classifier."""
    if x.is_cuda:
        with torch.autocast("cuda", enabled=False):
            return discriminator(x.float())
    return discriminator(x.float())


@torch.no_grad()
def probe(generator: Generator, classifier: nn.Module, x: torch.Tensor, n_bins: int, amp_dtype: torch.dtype | None,
          batch: int = 32) -> dict:
    """Eval-mode classifier consistency on a fixed set: BCE to the bin centre for bins 0 and n_bins-1, and
    the share of outputs the classifier puts below / at-or-above 0.5."""
    was_training = generator.training
    generator.eval()
    centres = bin_centres(n_bins, x.device)
    pos = classifier.positive_index
    losses, to_benign, to_malig = [], [], []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        for b in (0, n_bins - 1):
            y = torch.full((len(xb),), b, dtype=torch.long, device=x.device)
            with autocast(x.device, amp_dtype):
                logits = classifier(generator(xb, y).float())
            losses.append(bce_to_classifier(centres[y], logits, pos).item() * len(xb))
            p = torch.softmax(logits.float(), 1)[:, pos]
            (to_benign if b == 0 else to_malig).append((p < 0.5) if b == 0 else (p >= 0.5))
    generator.train(was_training)
    n = len(x)
    return {
        "probe_cls": sum(losses) / (2 * n),
        "probe_to_benign": torch.cat(to_benign).float().mean().item(),
        "probe_to_malignant": torch.cat(to_malig).float().mean().item(),
    }


def _restore(path: Path, fp: str, epochs: int, generator, discriminator, g_opt, d_opt, rng, device):
    """Load a resume checkpoint if it belongs to this run; returns its metadata or None."""
    if not path.exists():
        return None
    try:
        ckpt = read_checkpoint(path)
    except GANCheckpointError as err:
        log.warning("ignoring unreadable resume checkpoint (%s); starting fresh", err)
        return None
    meta = ckpt.get("cfaudit", {})
    if meta.get("fingerprint") != fp:
        log.info("resume checkpoint %s belongs to other settings / data / classifier; starting fresh", path)
        return None
    done = int(meta["epochs_completed"])
    if done > epochs:
        log.info("resume checkpoint has %d epochs, more than the %d configured; starting fresh", done, epochs)
        return None
    generator.load_state_dict(from_published(ckpt["generator"], generator.arch, str(path)))
    discriminator.load_state_dict(ckpt["discriminator"])
    g_opt.load_state_dict(ckpt["g_opt"])
    d_opt.load_state_dict(ckpt["d_opt"])
    rng.set_state(meta["rng_state"])
    generator.to(device)
    discriminator.to(device)
    log.info("resuming from %s after epoch %d (of %d)", path, done, epochs)
    return meta


class _EpochMeans:
    """Per-epoch means of the loss terms; the running sums stay on the device (no GPU sync per step)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value.detach().float()
        self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict:
        return {key: (total / self.counts[key]).item() for key, total in self.sums.items()}


def _frozen(classifier: nn.Module, device: torch.device) -> nn.Module:
    classifier.eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    return classifier.to(device)


class GANTrainer:
    """One run in named steps: set-up (the constructor: frozen classifier, seeded networks and optimisers, the
    augmented data and the probe set), :meth:`resume`, :meth:`d_step` / :meth:`g_step` on one batch,
    :meth:`run_epoch`, :meth:`save` (the resume file) and :meth:`result`. Every random draw comes from ``self.rng``
    (on the CPU), in the same order on every device."""

    def __init__(self, train_images: np.ndarray, classifier: nn.Module, gan_cfg: dict, *, seed: int, device,
                 work_dir, data_fingerprint: dict | None):
        self.t_start = time.perf_counter()
        self.gan_cfg, self.cfg, self.seed, self.device = gan_cfg, gan_cfg["train"], seed, torch.device(device)
        cfg, device = self.cfg, self.device
        self.arch = arch_from_config(gan_cfg)
        self.size, self.pos = int(classifier.input_size), int(classifier.positive_index)
        self.mb, self.acc, self.n_critic = int(cfg["micro_batch"]), int(cfg["accumulation"]), int(cfg["n_critic"])
        self.batch, self.n = self.mb * self.acc, len(train_images)
        if self.n < self.batch:
            raise ValueError(f"gan.train: a batch is micro_batch x accumulation = {self.batch} images but only {self.n} "
                             f"training images exist; lower gan.train.micro_batch or gan.train.accumulation")
        _, self.amp_dtype = resolve_precision(cfg["precision"], device, key="gan.train.precision", cpu_bf16=False)
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        self.resume_path = Path(work_dir) / RESUME_NAME
        self.fp = fingerprint(gan_cfg, seed, {"size": self.size, "n_train": self.n, **(data_fingerprint or {})})
        self.classifier = _frozen(classifier, device)
        self._networks()
        x_all = images_at(train_images, self.size, device)
        self.aug = Augmenter(x_all, self.size, float(cfg["augment_scale"]), float(cfg["brightness"]))
        probe_idx = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed + 1))[:min(int(cfg["probe_size"]), self.n)]
        self.x_probe = x_all[probe_idx.to(device)]
        self.lam = {k: float(cfg[k]) for k in ("lambda_gan", "lambda_rec", "lambda_cycle", "lambda_cls")}
        self.n_bins, self.epochs = self.arch.n_bins, int(cfg["epochs"])
        self.centres = bin_centres(self.n_bins, device)
        self.done, self.d_steps, self.g_steps, self.resumed_from, self.meta = 0, 0, 0, None, None

    def _networks(self) -> None:
        """Seeded generator and discriminator (channels_last on a GPU), their Adam optimisers, the run's RNG."""
        torch.manual_seed(self.seed)
        self.generator = Generator(self.arch).to(self.device)
        self.discriminator = Discriminator(int(self.gan_cfg["arch"]["d_base_channels"])).to(self.device)
        if self.device.type == "cuda":
            self.generator = self.generator.to(memory_format=torch.channels_last)
            self.discriminator = self.discriminator.to(memory_format=torch.channels_last)
        betas, lr = tuple(float(b) for b in self.cfg["betas"]), float(self.cfg["lr"])
        self.g_opt = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=betas)
        self.d_opt = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=betas)
        self.rng = torch.Generator().manual_seed(self.seed)

    def probe(self) -> dict:
        return probe(self.generator, self.classifier, self.x_probe, self.n_bins, self.amp_dtype)

    def resume(self) -> None:
        """Continue from ``resume.pt`` when it belongs to this run; else row 0 is the untrained generator's probe."""
        meta = _restore(self.resume_path, self.fp, self.epochs, self.generator, self.discriminator, self.g_opt,
                        self.d_opt, self.rng, self.device)
        if meta is None:
            self.history = [{"epoch": 0, "d_steps": 0, "g_steps": 0, **self.probe(), "seconds": 0.0}]
        else:
            self.history = list(meta["history"])
            self.done, self.d_steps, self.g_steps = int(meta["epochs_completed"]), int(meta["d_steps"]), int(meta["g_steps"])
            self.resumed_from = self.done
        self.meta = meta

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.amp_dtype):
            return self.classifier(x).float()

    def d_step(self, micro: list[torch.Tensor], means: _EpochMeans) -> None:
        """Discriminator step (hinge): real images vs G(x, random target bin), gradients accumulated over ``micro``."""
        self.d_opt.zero_grad(set_to_none=True)
        d_tot = d_real = d_fake = 0.0
        for x in micro:
            y_t = torch.randint(0, self.n_bins, (len(x),), generator=self.rng).to(self.device)
            with torch.no_grad(), autocast(self.device, self.amp_dtype):
                fake = self.generator(x, y_t)
            scores = critic(self.discriminator, torch.cat([x, fake.float()]))
            real_s, fake_s = scores[:len(x)], scores[len(x):]
            loss = self.lam["lambda_gan"] * hinge_d(real_s, fake_s)
            (loss / self.acc).backward()
            d_tot = d_tot + loss.detach() / self.acc
            d_real = d_real + real_s.detach().mean() / self.acc
            d_fake = d_fake + fake_s.detach().mean() / self.acc
        self.d_opt.step()
        self.d_steps += 1
        means.add("d_loss", d_tot)
        means.add("d_real", d_real)
        means.add("d_fake", d_fake)

    def g_loss(self, x: torch.Tensor) -> dict:
        """The generator's weighted loss on one micro-batch (``g_loss``) and its unweighted terms."""
        lam, pos, n_bins = self.lam, self.pos, self.n_bins
        with torch.no_grad():
            p_x = torch.softmax(self.classify(x), 1)[:, pos]
            y_orig = prob_to_bin(p_x, n_bins)
        y_t = torch.randint(0, n_bins, (len(x),), generator=self.rng).to(self.device)
        with autocast(self.device, self.amp_dtype):
            fake = self.generator(x, y_t)
            recon = self.generator(x, y_orig)
            cycle = self.generator(fake, y_orig)
        adv = hinge_g(critic(self.discriminator, fake))
        l_rec = F.l1_loss(recon.float(), x)
        l_cyc = F.l1_loss(cycle.float(), x)
        cls_t = bce_to_classifier(self.centres[y_t], self.classify(fake), pos)
        cls_r = bce_to_classifier(p_x, self.classify(recon), pos)
        loss = (lam["lambda_gan"] * adv + lam["lambda_rec"] * l_rec + lam["lambda_cycle"] * l_cyc
                + lam["lambda_cls"] * (cls_t + cls_r))
        return {"g_loss": loss, "g_adv": adv, "g_rec": l_rec, "g_cycle": l_cyc, "g_cls_target": cls_t, "g_cls_rec": cls_r}

    def g_step(self, micro: list[torch.Tensor], means: _EpochMeans) -> None:
        """Generator step (the discriminator frozen), gradients accumulated over ``micro``."""
        self.discriminator.requires_grad_(False)
        self.g_opt.zero_grad(set_to_none=True)
        parts = dict.fromkeys(("g_loss", "g_adv", "g_rec", "g_cycle", "g_cls_target", "g_cls_rec"), 0.0)
        for x in micro:
            terms = self.g_loss(x)
            (terms["g_loss"] / self.acc).backward()
            for k, v in terms.items():
                parts[k] = parts[k] + v.detach() / self.acc
        self.g_opt.step()
        self.discriminator.requires_grad_(True)
        self.g_steps += 1
        for k, v in parts.items():
            means.add(k, v)

    def run_epoch(self, epoch: int) -> dict:
        """One pass over the shuffled images (incomplete last batch dropped), then the probe; its history row."""
        t0, means = time.perf_counter(), _EpochMeans()
        perm = torch.randperm(self.n, generator=self.rng)
        n_batches = self.n // self.batch
        for b in range(n_batches):
            x_batch = self.aug.draw(perm[b * self.batch:(b + 1) * self.batch], self.rng).to(self.device)
            if self.device.type == "cuda":
                x_batch = x_batch.contiguous(memory_format=torch.channels_last)
            micro = [x_batch[m * self.mb:(m + 1) * self.mb] for m in range(self.acc)]
            self.d_step(micro, means)
            if self.d_steps % self.n_critic == 0:
                self.g_step(micro, means)
        row = {"epoch": epoch, "d_steps": self.d_steps, "g_steps": self.g_steps, **means.means(), **self.probe()}
        row["seconds"] = time.perf_counter() - t0
        row["images_per_s"] = n_batches * self.batch / row["seconds"]
        self.history.append(row)
        log.info("epoch %d/%d: %s", epoch, self.epochs, ", ".join(
            f"{k}={row[k]:.4g}" for k in LOSS_COLUMNS[3:] if k in row and isinstance(row[k], float)))
        return row

    def save(self, epoch: int) -> None:
        """The resume file after ``epoch``: both networks and optimisers, the RNG state and the history."""
        meta_out = {"fingerprint": self.fp, "epochs_completed": epoch, "d_steps": self.d_steps, "g_steps": self.g_steps,
                    "rng_state": self.rng.get_state(), "history": self.history, "im_size": self.size, "seed": self.seed,
                    "classifier": getattr(self.classifier, "name", type(self.classifier).__name__),
                    "d_base_channels": int(self.gan_cfg["arch"]["d_base_channels"])}
        save_checkpoint(checkpoint_dict(self.generator, self.discriminator, self.g_opt, self.d_opt, epoch - 1, meta_out),
                        self.resume_path)

    def run(self, on_epoch_end=None) -> None:
        """The remaining epochs, with a resume file every ``checkpoint_every`` epochs and after the last."""
        self.generator.train()
        self.discriminator.train()
        for epoch in range(self.done + 1, self.epochs + 1):
            row = self.run_epoch(epoch)
            if epoch == self.epochs or epoch % int(self.cfg["checkpoint_every"]) == 0:
                self.save(epoch)
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
        if self.meta is not None and self.done == self.epochs:
            log.info("resume checkpoint already has all %d epochs", self.epochs)

    def result(self) -> TrainResult:
        settings = {"im_size": self.size, "bf16": self.amp_dtype is not None, "device": str(self.device), "n_train": self.n,
                    "batch": self.batch, "batches_per_epoch": self.n // self.batch, "fingerprint": self.fp}
        return TrainResult(self.generator, self.discriminator, read_checkpoint(self.resume_path),
                           history_table(self.history), self.epochs - self.done, self.resumed_from,
                           time.perf_counter() - self.t_start, settings)


def train_gan(train_images: np.ndarray, classifier: nn.Module, gan_cfg: dict, *, seed: int,
              device="cpu", work_dir: str | os.PathLike, data_fingerprint: dict | None = None,
              on_epoch_end=None) -> TrainResult:
    """Train (or resume training of) the GAN on uint8 images (N,H,W,3) against a frozen ``classifier``.

    ``gan_cfg`` is the validated ``gan`` config section. The generator works at ``classifier.input_size``;
    images are resized to it. ``work_dir`` holds ``resume.pt``. ``on_epoch_end(epoch, row)`` is called after
    each epoch's checkpoint (tests use it to simulate a kill).
    """
    trainer = GANTrainer(train_images, classifier, gan_cfg, seed=seed, device=device, work_dir=work_dir,
                         data_fingerprint=data_fingerprint)
    trainer.resume()
    trainer.run(on_epoch_end)
    return trainer.result()


def history_table(history: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(history)
    for c in LOSS_COLUMNS:
        if c not in df:
            df[c] = math.nan
    return df[LOSS_COLUMNS]


def loss_panels(table: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, str]]:
    """The GAN's loss figure as :func:`cfaudit.figures.loss_figure` panels: the adversarial (hinge) pair, the
    generator's unweighted terms (both from epoch 1), and the eval-mode probe (epoch 0 = the untrained generator)."""
    t = table[table["epoch"] > 0]
    probe_names = {"probe_cls": "probe_cls (BCE)", "probe_to_benign": "probe flip to benign",
                   "probe_to_malignant": "probe flip to malignant"}
    return {
        "adversarial (hinge)": (t[["epoch", "d_loss", "g_adv"]], ""),
        "generator terms (unweighted)": (t[["epoch", "g_rec", "g_cycle", "g_cls_target", "g_cls_rec"]], ""),
        "eval-mode probe (epoch 0 = untrained)": (table[["epoch", *probe_names]].rename(columns=probe_names), ""),
    }


def run_train_gan(pack, index, split, classifier_spec, out_checkpoint, out_loss, out_curve, gan_cfg: dict,
                  seed: int, device, work_dir) -> dict:
    """Rule train_gan: load the train split and the audited classifier, train (or resume), write the final
    checkpoint, the per-epoch loss table and its plot. Returns a record for the provenance sidecars."""
    from cfaudit.classifiers import load_classifier
    from cfaudit.data.pack import load_pack
    from cfaudit.figures import loss_figure
    from cfaudit.files import sha256_file, write_csv

    images, idx = load_pack(pack, index, split, "train")
    if len(idx) == 0:
        raise ValueError(f"{split} has no 'train' rows: nothing to train the GAN on")
    classifier = load_classifier(classifier_spec, device)
    data_fp = {"classifier_spec_sha256": sha256_file(classifier_spec),
               "train_images_sha256": hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()}
    result = train_gan(images, classifier, gan_cfg, seed=seed, device=device, work_dir=work_dir,
                       data_fingerprint=data_fp)
    final = dict(result.checkpoint)
    final["cfaudit"] = {**final["cfaudit"], "history": without_timings(final["cfaudit"]["history"])}
    save_checkpoint(final, out_checkpoint)
    write_csv(result.history, out_loss)
    loss_figure(loss_panels(result.history), out_curve, dpi=100, panel_title="{name}", ylabel="mean per epoch", log_y=False,
                title=f"GAN vs classifier '{getattr(classifier, 'name', '?')}' ({result.settings['im_size']} px)")
    # the resume state only outlives a killed job: once the outputs exist nothing undeclared stays in results/
    (Path(work_dir) / RESUME_NAME).unlink(missing_ok=True)
    last = result.history.iloc[-1].to_dict()
    return {
        "seed": seed, "train_seconds_this_job": round(result.seconds, 2),
        "train_seconds_all_epochs": round(float(result.history["seconds"].sum()), 2),
        "epochs": int(gan_cfg["train"]["epochs"]), "epochs_run_this_job": result.epochs_run,
        "resumed_after_epoch": result.resumed_from, "classifier": getattr(classifier, "name", None),
        "final_probe": {k: last[k] for k in ("probe_cls", "probe_to_benign", "probe_to_malignant")},
        **result.settings,
    }
