"""The audited classifier: one interface over three kinds (deepderm, trained, checkpoint).

The classifier stage writes ``results/classifier/classifier.json`` (the *spec*); every downstream rule
calls :func:`load_classifier` on it and gets an :class:`AuditedClassifier`, a frozen ``nn.Module`` that

* takes float images in [-1, 1], shape (N, 3, H, W), at ANY size, and returns logits (N, num_classes);
  the classifier's own preprocessing (Resize of the shorter side, CenterCrop, normalisation) happens
  inside, in torch, differentiably (guidance and GAN training back-propagate through it);
* ``prob_malignant(x)``: softmax probability of the positive class;
* ``score(logits)``: the configured score space, ``softmax`` (probability) or ``logit`` (raw positive-class
  logit, what DDI's evaluation code compares with 0.687); ``decide(score)``: ``score > threshold``;
* ``features(x)``: the penultimate features (input of the final Linear), e.g. for a classifier-feature
  Fréchet distance;
* attributes ``name, kind, arch, input_size, resize_size, positive_index, num_classes, score_space,
  threshold, normalization, preprocessing`` (a one-line description recorded next to every score).

Spec keys (JSON): kind, name, arch, arch_kwargs, num_classes, positive_index, weights, sha256,
input_size, resize_size, normalization, transform_input, score_space, threshold, preprocessing,
plus free-form ``provenance``.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cfaudit.files import atomic_write_text, sha256_file
from cfaudit.weights import RetryPolicy, place_verified, state_dict_mismatch

KINDS = ("trained", "deepderm", "checkpoint")
SCORE_SPACES = ("softmax", "logit")
NORMALIZATIONS = ("imagenet", "minus_one_one", "zero_one")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEEPDERM_INPUT = 299
DEEPDERM_THRESHOLD = 0.687
DEEPDERM_N_TENSORS = 580

SPEC_KEYS = ("kind", "name", "arch", "arch_kwargs", "num_classes", "positive_index", "weights", "sha256",
             "input_size", "resize_size", "normalization", "transform_input", "score_space", "threshold",
             "preprocessing")


class ClassifierError(RuntimeError):
    """A classifier spec or weights file is unusable; the message names the file and what to do."""


# ----------------------------------------------------------------------------------------------------------
# Architectures
# ----------------------------------------------------------------------------------------------------------
def build_deepderm() -> nn.Module:
    """torchvision Inception-v3 exactly as DDI builds DeepDerm (Daneshjou et al. 2022, Sci. Adv., doi:10.1126/sciadv.abq6147;
    github.com/DDI-Dataset/DDI-Code, ddi_model.py): 580 tensors, 24.39 M parameters."""
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    net.fc = nn.Linear(2048, 2)
    net.AuxLogits.fc = nn.Linear(768, 2)
    return net


def build_arch(arch: str, num_classes: int = 2, arch_kwargs: dict | None = None) -> nn.Module:
    """A torchvision classification architecture with random weights (``torchvision.models.get_model``)."""
    import torchvision

    if arch == "deepderm_inception_v3":
        return build_deepderm()
    available = set(torchvision.models.list_models(module=torchvision.models))
    if arch not in available:
        raise ClassifierError(
            f"unknown classifier architecture '{arch}': use a torchvision classification model name "
            f"(e.g. resnet18, resnet50, inception_v3, efficientnet_b0, densenet121, convnext_tiny)"
        )
    kwargs = dict(arch_kwargs or {})
    if arch in ("inception_v3", "googlenet"):
        kwargs.setdefault("init_weights", True)
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)


def final_linear(net: nn.Module, num_classes: int) -> nn.Linear:
    """The classification head: the last ``nn.Linear`` (in registration order) with ``num_classes`` outputs.

    Auxiliary heads (Inception's ``AuxLogits``) are registered before ``fc`` and so are skipped.
    """
    found = None
    for name, mod in net.named_modules():
        if isinstance(mod, nn.Linear) and mod.out_features == num_classes and "aux" not in name.lower():
            found = mod
    if found is None:
        raise ClassifierError(f"no final nn.Linear with {num_classes} outputs found in {type(net).__name__}")
    return found


def main_logits(out) -> torch.Tensor:
    """Main logits from a torchvision forward (Inception / GoogLeNet return named tuples in train mode)."""
    return out.logits if hasattr(out, "logits") else out


# ----------------------------------------------------------------------------------------------------------
# Differentiable preprocessing
# ----------------------------------------------------------------------------------------------------------
def resized_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(size)`` output shape: shorter side -> size, longer side scaled and truncated."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def resize_center_crop(x: torch.Tensor, resize_size: int, crop_size: int) -> torch.Tensor:
    """``Resize(resize_size)`` (bilinear, antialiased, shorter side) then ``CenterCrop(crop_size)``, in torch.

    Works on any float tensor (N, C, H, W) and is differentiable; a no-op when x is already crop_size².
    The crop offsets follow torchvision (``int(round((H - crop) / 2))``).
    """
    h, w = x.shape[-2:]
    if (h, w) == (crop_size, crop_size) and min(h, w) == resize_size:
        return x
    nh, nw = resized_shape(h, w, resize_size)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    if nh < crop_size or nw < crop_size:
        raise ClassifierError(f"resize_size {resize_size} is smaller than the crop {crop_size}")
    top = int(round((nh - crop_size) / 2.0))
    left = int(round((nw - crop_size) / 2.0))
    return x[..., top:top + crop_size, left:left + crop_size]


def normalize(x: torch.Tensor, normalization: str) -> torch.Tensor:
    """Map [-1, 1] images to the network's input space."""
    if normalization == "minus_one_one":
        return x
    if normalization == "zero_one":
        return (x + 1.0) * 0.5
    if normalization == "imagenet":
        mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return ((x + 1.0) * 0.5 - mean) / std
    raise ClassifierError(f"unknown normalization '{normalization}' (one of {NORMALIZATIONS})")


def describe_preprocessing(spec: dict) -> str:
    text = (f"[-1,1] -> Resize({spec['resize_size']}, shorter side, bilinear antialias) -> "
            f"CenterCrop({spec['input_size']}) -> {spec['normalization']}")
    if spec.get("transform_input"):
        text += " -> transform_input=True (net sees [-1,1])"
    return text


# ----------------------------------------------------------------------------------------------------------
# The module every consumer uses
# ----------------------------------------------------------------------------------------------------------
class AuditedClassifier(nn.Module):
    """A frozen classifier with its own preprocessing; see the module docstring for the contract."""

    def __init__(self, net: nn.Module, spec: dict):
        super().__init__()
        self.net = net
        self.spec = dict(spec)
        self.kind = spec["kind"]
        self.name = spec["name"]
        self.arch = spec["arch"]
        self.input_size = int(spec["input_size"])
        self.resize_size = int(spec["resize_size"])
        self.num_classes = int(spec["num_classes"])
        self.positive_index = int(spec["positive_index"])
        self.score_space = spec["score_space"]
        self.threshold = float(spec["threshold"])
        self.normalization = spec["normalization"]
        self.preprocessing = spec.get("preprocessing") or describe_preprocessing(spec)
        if self.score_space not in SCORE_SPACES:
            raise ClassifierError(f"score_space '{self.score_space}' is not one of {SCORE_SPACES}")
        if not 0 <= self.positive_index < self.num_classes:
            raise ClassifierError(f"positive_index {self.positive_index} outside 0..{self.num_classes - 1}")
        self._head_box: list[nn.Linear] = []  # the head, found on the first features() call (not a submodule)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True):  # the audited classifier is frozen: batch norm stays in eval mode
        super().train(mode)
        self.net.eval()
        return self

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (N, 3, H, W) in [-1, 1], got shape {tuple(x.shape)}")
        x = resize_center_crop(x, self.resize_size, self.input_size)
        return normalize(x, self.normalization)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return main_logits(self.net(self.preprocess(x))).float()

    def forward_cropped(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of images ALREADY resized and cropped to input_size (e.g. by PIL, as the weights' authors
        do on files); only the normalisation is applied here."""
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"forward_cropped expects {self.input_size}x{self.input_size} images, got {tuple(x.shape)}")
        return main_logits(self.net(normalize(x, self.normalization))).float()

    def prob_malignant(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self(x), dim=1)[:, self.positive_index]

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        if self.score_space == "softmax":
            return torch.softmax(logits.float(), dim=1)[:, self.positive_index]
        return logits[:, self.positive_index].float()

    def decide(self, score: torch.Tensor) -> torch.Tensor:
        """Prediction at the configured threshold (``score > threshold``, as DDI's evaluation code)."""
        return score > self.threshold

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: the input of the final Linear layer, flattened to (N, D)."""
        if not self._head_box:
            self._head_box.append(final_linear(self.net, self.num_classes))
        captured: list[torch.Tensor] = []
        handle = self._head_box[0].register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            self.net(self.preprocess(x))
        finally:
            handle.remove()
        return captured[-1].flatten(1).float()

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, kind={self.kind}, input_size={self.input_size}, "
                f"positive_index={self.positive_index}, score_space={self.score_space}, threshold={self.threshold}")


# ----------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike, state_dict_key: str = "", strip_prefix: str = "") -> dict:
    """``torch.load(weights_only=True)`` with errors that say which file is bad and what to do."""
    path = Path(path)
    if not path.exists():
        raise ClassifierError(f"classifier weights not found: {path}. Run the classifier stage (snakemake {path}).")
    size = path.stat().st_size
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise ClassifierError(
            f"cannot read classifier weights {path} ({size} bytes): the file is truncated or not a PyTorch "
            f"state dict ({type(err).__name__}: {str(err)[:200]}). Delete it and re-place it (rule "
            f"place_classifier_weights), checking the sha256 in config."
        ) from None
    except Exception as err:  # weights_only unpickler refusals (pickle.UnpicklingError and friends)
        raise ClassifierError(
            f"cannot load classifier weights {path} with torch.load(weights_only=True): "
            f"{type(err).__name__}: {str(err)[:300]}. Save a plain state_dict (torch.save(model.state_dict()))."
        ) from None
    if state_dict_key:
        if not isinstance(obj, dict) or state_dict_key not in obj:
            keys = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
            raise ClassifierError(f"{path} has no entry '{state_dict_key}' (state_dict_key); top-level keys: {keys}")
        obj = obj[state_dict_key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ClassifierError(
            f"{path} is not a plain state dict of tensors (got {type(obj).__name__}"
            f"{' with keys ' + str(list(obj)[:8]) if isinstance(obj, dict) else ''}); for a training checkpoint "
            f"set classifier.checkpoint.state_dict_key to the entry holding the model weights."
        )
    if strip_prefix:
        obj = {(k[len(strip_prefix):] if k.startswith(strip_prefix) else k): v for k, v in obj.items()}
    return obj


def load_strict(net: nn.Module, state: dict, path) -> nn.Module:
    """``load_state_dict(strict=True)`` with a short, readable report of what does not match."""
    own = net.state_dict()
    mismatch = state_dict_mismatch(own, state)
    if mismatch:
        heads = [k for k, _, _ in mismatch.misshaped][:2]
        raise ClassifierError(
            f"weights {path} do not match the architecture ({len(own)} tensors expected, file has {len(state)}"
            f"{f'; {len(mismatch.misshaped)} shape mismatches e.g. {heads}' if heads else ''}): "
            f"{mismatch.describe(3)}. Check classifier.kind / arch / num_classes / arch_kwargs / strip_prefix "
            f"against how the file was saved."
        )
    net.load_state_dict(state, strict=True)
    return net


# ----------------------------------------------------------------------------------------------------------
# Spec
# ----------------------------------------------------------------------------------------------------------
def make_spec(kind: str, *, name: str, arch: str, weights: str | os.PathLike, input_size: int,
              resize_size: int | None = None, num_classes: int = 2, positive_index: int = 1,
              normalization: str = "minus_one_one", transform_input: bool = False, score_space: str = "softmax",
              threshold: float = 0.5, arch_kwargs: dict | None = None, state_dict_key: str = "",
              strip_prefix: str = "", provenance: dict | None = None) -> dict:
    """Build (and check) a classifier spec; ``sha256`` of the weights file is computed here."""
    if kind not in KINDS:
        raise ClassifierError(f"classifier kind '{kind}' is not one of {KINDS}")
    if score_space not in SCORE_SPACES:
        raise ClassifierError(f"score_space '{score_space}' is not one of {SCORE_SPACES}")
    if normalization not in NORMALIZATIONS:
        raise ClassifierError(f"normalization '{normalization}' is not one of {NORMALIZATIONS}")
    weights = Path(weights)
    if not weights.exists():
        raise ClassifierError(f"classifier weights not found: {weights}")
    resize_size = int(resize_size or input_size)
    if resize_size < input_size:
        raise ClassifierError(f"resize_size {resize_size} must be >= input_size {input_size}")
    spec = {
        "kind": kind,
        "name": name,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs or {}),
        "num_classes": int(num_classes),
        "positive_index": int(positive_index),
        "weights": str(weights),
        "sha256": sha256_file(weights),
        "input_size": int(input_size),
        "resize_size": resize_size,
        "normalization": normalization,
        "transform_input": bool(transform_input),
        "score_space": score_space,
        "threshold": float(threshold),
        "state_dict_key": state_dict_key,
        "strip_prefix": strip_prefix,
    }
    spec["preprocessing"] = describe_preprocessing(spec)
    spec["provenance"] = provenance or {}
    return spec


def deepderm_spec(weights, score_space: str = "softmax", threshold: float = DEEPDERM_THRESHOLD,
                  provenance: dict | None = None) -> dict:
    """DeepDerm as its authors preprocess: Resize(299) + CenterCrop(299) + ImageNet normalisation with
    ``transform_input=True`` (so the network sees the image scaled to [-1, 1]); class 1 = malignant."""
    return make_spec("deepderm", name="deepderm", arch="deepderm_inception_v3", weights=weights,
                     input_size=DEEPDERM_INPUT, resize_size=DEEPDERM_INPUT, num_classes=2, positive_index=1,
                     normalization="imagenet", transform_input=True, score_space=score_space,
                     threshold=threshold, provenance=provenance)


def write_spec(spec: dict, path: str | os.PathLike) -> Path:
    atomic_write_text(path, json.dumps(spec, indent=2, sort_keys=False))
    return Path(path)


def read_spec(spec_path: str | os.PathLike) -> dict:
    spec_path = Path(spec_path)
    if not spec_path.exists():
        raise ClassifierError(f"classifier spec {spec_path} not found: run the classifier stage first "
                              f"(snakemake {spec_path}).")
    try:
        spec = json.loads(spec_path.read_text())
    except json.JSONDecodeError as err:
        raise ClassifierError(f"classifier spec {spec_path} is not valid JSON ({err}); rerun the classifier stage") from None
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise ClassifierError(f"classifier spec {spec_path} lacks keys {missing}; rerun the classifier stage")
    return spec


def _resolve_weights(spec: dict, spec_path: Path) -> Path:
    """The weights file of a spec. A relative path is relative to the workflow directory the spec was written in
    (the spec sits in <workdir>/results/...), so the spec's own run is searched first, nearest directory first:
    a spec read from another directory (``python -m cfaudit.ceiling --directory RUN`` after ``make demo``) must
    not pick up the current directory's file of the same name."""
    w = Path(spec["weights"])
    if w.is_absolute():
        return w
    for base in spec_path.resolve().parents:
        if (base / w).exists():
            return base / w
    return w


def build_classifier(spec: dict, weights_path=None, verify_sha256: bool = True) -> AuditedClassifier:
    """Build the network named in ``spec``, load its weights strictly, wrap it."""
    path = Path(weights_path or spec["weights"])
    if verify_sha256 and spec.get("sha256"):
        if not path.exists():
            raise ClassifierError(f"classifier weights not found: {path}")
        got = sha256_file(path)
        if got != spec["sha256"]:
            raise ClassifierError(
                f"classifier weights {path} have sha256 {got}, but the spec records {spec['sha256']}: the file "
                f"changed after the classifier stage ran. Rerun it (snakemake --forcerun place_classifier_weights "
                f"or train_classifier)."
            )
    state = read_state_dict(path, spec.get("state_dict_key", ""), spec.get("strip_prefix", ""))
    if spec["kind"] == "deepderm":
        net = build_deepderm()
    else:
        net = build_arch(spec["arch"], spec["num_classes"], spec.get("arch_kwargs"))
    load_strict(net, state, path)
    if spec.get("transform_input") and hasattr(net, "transform_input"):
        net.transform_input = True
    return AuditedClassifier(net, spec)


def load_classifier(spec_path: str | os.PathLike, device: Any = "cpu", channels_last: bool | None = None) -> AuditedClassifier:
    """Load the audited classifier described by ``results/classifier/classifier.json`` onto ``device``.

    Frozen (no parameter gradients; batch norm in eval mode); gradients still flow to the input images.
    ``channels_last`` defaults to True on CUDA.
    """
    spec_path = Path(spec_path)
    spec = read_spec(spec_path)
    clf = build_classifier(spec, _resolve_weights(spec, spec_path))
    device = torch.device(device)
    clf = clf.to(device)
    if channels_last if channels_last is not None else device.type == "cuda":
        clf = clf.to(memory_format=torch.channels_last)
    return clf.eval()


# ----------------------------------------------------------------------------------------------------------
# Placing weights (rule place_classifier_weights): local copy or download, always sha256-verified
# ----------------------------------------------------------------------------------------------------------
def place_weights(dest: str | os.PathLike, *, local_path: str = "", url: str = "", sha256: str = "",
                  retries: int = 4, timeout_s: float = 120.0, what: str = "classifier.deepderm", log=None) -> Path:
    """Put the weights file at ``dest`` from ``local_path`` (preferred when it exists) or ``url``, sha256-verified
    (:func:`cfaudit.weights.place_verified`: an empty ``sha256`` places nothing and prints the file's hash)."""
    return place_verified(dest, sha256=sha256, local_path=local_path, url=url, what=what, error=ClassifierError,
                          policy=RetryPolicy(retries=retries), timeout_s=timeout_s, logger=log)


def spec_training_record(heldout: dict) -> dict:
    """What a spec keeps of the training's held-out record: not its settings (they are in the spec) and not its
    wall-clock time, so that the same training gives the same spec and everything hashed from it (the GAN's
    fingerprint, the counterfactual indexes) repeats byte for byte; heldout.json keeps the time."""
    return {k: v for k, v in heldout.items() if k not in ("settings", "train_seconds")}


def spec_from_config(clf_cfg: dict, weights: str | os.PathLike, heldout: dict | None = None) -> dict:
    """The spec of config section ``classifier`` for its ``kind``; ``heldout`` = train_classifier's metrics."""
    kind = clf_cfg["kind"]
    space = clf_cfg["score_space"]
    if kind == "deepderm":
        return deepderm_spec(weights, space, clf_cfg["deepderm"]["threshold"],
                             provenance={"source": {k: clf_cfg["deepderm"][k] for k in ("url", "local_path", "sha256")}})
    if kind == "trained":
        t = clf_cfg["trained"]
        prov = {"trained": spec_training_record(heldout or {})}
        return make_spec("trained", name=f"trained_{t['arch']}", arch=t["arch"], weights=weights,
                         input_size=t["input_size"], resize_size=t["input_size"], num_classes=2, positive_index=1,
                         normalization=t["normalization"], score_space=space, threshold=t["threshold"],
                         arch_kwargs=t["arch_kwargs"], provenance=prov)
    if kind == "checkpoint":
        c = clf_cfg["checkpoint"]
        return make_spec("checkpoint", name=c["name"], arch=c["arch"], weights=weights, input_size=c["input_size"],
                         resize_size=c["resize_size"], num_classes=c["num_classes"],
                         positive_index=c["positive_index"], normalization=c["normalization"],
                         transform_input=bool(c["arch_kwargs"].get("transform_input", False)),
                         score_space=space, threshold=c["threshold"], arch_kwargs=c["arch_kwargs"],
                         state_dict_key=c["state_dict_key"], strip_prefix=c["strip_prefix"],
                         provenance={"source": {k: c[k] for k in ("url", "local_path", "sha256")}})
    raise ClassifierError(f"classifier.kind '{kind}' is not one of {KINDS}")


def write_checked_spec(clf_cfg: dict, weights, out_spec, heldout_path=None, log=None) -> dict:
    """Build the spec, load the classifier from it strictly (so a bad file fails here, not in every
    consumer), run one forward pass, then write ``out_spec``."""
    heldout = json.loads(Path(heldout_path).read_text()) if heldout_path else None
    spec = spec_from_config(clf_cfg, weights, heldout)
    clf = build_classifier(spec, weights)
    n_params = sum(p.numel() for p in clf.net.parameters())
    with torch.no_grad():
        x = torch.zeros(2, 3, clf.input_size, clf.input_size)
        logits = clf(x)
    if logits.shape != (2, clf.num_classes) or not torch.isfinite(logits).all():
        raise ClassifierError(f"classifier from {weights} returned {tuple(logits.shape)} / non-finite logits on a test batch")
    spec["n_parameters"] = int(n_params)
    spec["n_tensors"] = len(clf.net.state_dict())
    write_spec(spec, out_spec)
    if log:
        log.info("classifier %s (%s, %.2f M parameters, %d tensors): input %d, positive index %d, score space %s, "
                 "threshold %g; preprocessing: %s", spec["name"], spec["arch"], n_params / 1e6, spec["n_tensors"],
                 spec["input_size"], spec["positive_index"], spec["score_space"], spec["threshold"], spec["preprocessing"])
    return spec
