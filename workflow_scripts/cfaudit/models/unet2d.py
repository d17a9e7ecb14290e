"""A stronger class-conditional UNet from a maintained library: diffusers' ``UNet2DModel`` with class embeddings.

``num_class_embeds = n_classes + 1``: the extra embedding is the null class used for classifier-free
guidance (label dropout during training, the unconditional branch at sampling time). Timesteps are the
integer steps 1..T of the project's schedule (sinusoidal embedding inside the library model).
"""

from __future__ import annotations

import torch
from torch import nn


class ClassConditionalUNet(nn.Module):
    """eps_theta(x_t, t, y) with the same call signature as ContextUnet: ``forward(x, t, labels)``."""

    def __init__(self, image_size: int, n_classes: int = 2, channels=(64, 128, 256, 256), layers_per_block: int = 2,
                 attention=(False, False, True, True), norm_groups: int = 32, dropout: float = 0.0, in_channels: int = 3):
        super().__init__()
        from diffusers import UNet2DModel

        channels, attention = tuple(int(c) for c in channels), tuple(bool(a) for a in attention)
        if len(channels) != len(attention):
            raise ValueError(f"diffusion.unet_channels ({len(channels)} levels) and diffusion.unet_attention "
                             f"({len(attention)} levels) must have the same length")
        if any(c % norm_groups for c in channels):
            raise ValueError(f"every diffusion.unet_channels entry must be a multiple of diffusion.unet_norm_groups "
                             f"({norm_groups}); got {list(channels)}")
        if image_size % 2 ** (len(channels) - 1):
            raise ValueError(f"image_size {image_size} is not divisible by 2^{len(channels) - 1} "
                             f"(the UNet halves it {len(channels) - 1} times); change diffusion.unet_channels")
        self.n_classes, self.image_size = n_classes, image_size
        self.net = UNet2DModel(
            sample_size=image_size,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=channels,
            layers_per_block=layers_per_block,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
            norm_num_groups=norm_groups,
            dropout=dropout,
            num_class_embeds=n_classes + 1,
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return self.net(x, t, class_labels=labels.long()).sample
