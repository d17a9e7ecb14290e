"""Generator networks. ``build_diffusion_model(cfg, image_size)`` makes the configured noise predictor.

Both architectures share one call signature, ``model(x, t, labels) -> eps``: x (N,3,H,W) in [-1, 1] (noised),
t integer steps in 1..T (N,), labels (N,) with 0 = benign, 1 = malignant and ``NULL_LABEL`` (2) = no class.
A model is fully described by a small JSON-able *spec* (stored in every checkpoint), so the counterfactual
rule rebuilds exactly what was trained, whatever the current config says.
"""

from __future__ import annotations

from torch import nn

N_CLASSES = 2
NULL_LABEL = N_CLASSES  # the classifier-free-guidance "no class" label
ARCHS = ("contextunet", "unet2d")


def model_spec(cfg: dict, image_size: int) -> dict:
    """The architecture part of the ``diffusion:`` config section as a self-contained spec."""
    arch = cfg["model"]
    if arch == "contextunet":
        kwargs = {"n_feat": int(cfg["n_feat"]), "bottleneck": int(cfg["bottleneck"])}
    elif arch == "unet2d":
        kwargs = {"channels": [int(c) for c in cfg["unet_channels"]], "layers_per_block": int(cfg["unet_layers_per_block"]),
                  "attention": [bool(a) for a in cfg["unet_attention"]], "norm_groups": int(cfg["unet_norm_groups"]),
                  "dropout": float(cfg["unet_dropout"])}
    else:
        raise ValueError(f"config key 'diffusion.model': unknown architecture {arch!r}; choose one of {ARCHS}")
    return {"arch": arch, "image_size": int(image_size), "n_classes": N_CLASSES, "timesteps": int(cfg["T"]), "kwargs": kwargs}


def model_from_spec(spec: dict) -> nn.Module:
    arch, kw = spec["arch"], dict(spec["kwargs"])
    if arch == "contextunet":
        from cfaudit.models.contextunet import ContextUnet

        return ContextUnet(n_feat=kw["n_feat"], n_classes=spec["n_classes"], image_size=spec["image_size"],
                           bottleneck=kw["bottleneck"], timesteps=spec["timesteps"])
    if arch == "unet2d":
        from cfaudit.models.unet2d import ClassConditionalUNet

        return ClassConditionalUNet(image_size=spec["image_size"], n_classes=spec["n_classes"], channels=kw["channels"],
                                    layers_per_block=kw["layers_per_block"], attention=kw["attention"],
                                    norm_groups=kw["norm_groups"], dropout=kw["dropout"])
    raise ValueError(f"unknown diffusion architecture {arch!r} in model spec; expected one of {ARCHS}")


def build_diffusion_model(cfg: dict, image_size: int) -> nn.Module:
    """The noise predictor the ``diffusion:`` config section describes, at ``image_size`` pixels."""
    return model_from_spec(model_spec(cfg, image_size))


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
