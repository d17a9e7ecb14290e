"""The seed's ContextUnet (TeaPearce's conditional-MNIST UNet as scaled up by the seed to 256 px), generalised.

Layout at ``image_size`` H (github.com/howellx/derm_audit; H = 256, n_feat = 128 is the seed's model, 7.57 M
parameters):

    init_conv  ResidualConvBlock(3 -> n, residual)                      H
    down1      ResidualConvBlock(n -> n) + MaxPool2d(2)                  H/2
    down2      ResidualConvBlock(n -> 2n) + MaxPool2d(2)                 H/4
    to_vec     AdaptiveAvgPool2d(bottleneck) + GELU                      bottleneck x bottleneck
    up0        ConvTranspose2d(2n, 2n, k=f, s=f) + GroupNorm(8) + ReLU   H/4   (f = (H/4) / bottleneck)
    up1        cat(c1 * up0 + t1, down2) -> ConvTranspose2d(4n -> n, 2, 2) + 2 residual blocks   H/2
    up2        cat(c2 * up1 + t2, down1) -> ConvTranspose2d(2n -> n, 2, 2) + 2 residual blocks   H
    out        cat(up2, init) -> conv 2n -> n, GroupNorm(8), ReLU, conv n -> 3

The seed pooled its 64x64 down2 map to an 8x8 grid and unpooled with a fixed kernel-8 stride-8 transposed
conv, which only fits 256 px. Here the grid side (``bottleneck``, default 8 as in the seed) is kept and the
transposed conv's kernel and stride are derived from the image size, so 32, 64, 128 and 256 all work and
256 reproduces the seed exactly. Class and time conditioning: two-layer MLPs (Linear, GELU, Linear) of the
class one-hot and of t/T; feature maps are multiplied by the class embedding and the time embedding is added.

Labels are integers; ``n_classes`` (= the null label) means "no class" for classifier-free guidance, encoded
as an all-zero one-hot as in the seed's context mask. (The seed's mask also negated the kept one-hot, which
the first Linear layer absorbs; it is not reproduced.)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ResidualConvBlock(nn.Module):
    """Two (conv 3x3, BatchNorm, GELU); with ``is_res`` the residual is added and the sum divided by 1.414."""

    def __init__(self, in_channels: int, out_channels: int, is_res: bool = False):
        super().__init__()
        self.same_channels = in_channels == out_channels
        self.is_res = is_res
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, 1, 1), nn.BatchNorm2d(out_channels), nn.GELU())
        self.conv2 = nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, 1, 1), nn.BatchNorm2d(out_channels), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.conv1(x)
        x2 = self.conv2(x1)
        if not self.is_res:
            return x2
        return ((x if self.same_channels else x1) + x2) / 1.414


class UnetDown(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.model = nn.Sequential(ResidualConvBlock(in_channels, out_channels), nn.MaxPool2d(2))

    def forward(self, x):
        return self.model(x)


class UnetUp(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.model = nn.Sequential(
            nn.ConvTranspose2d(in_channels, out_channels, 2, 2),
            ResidualConvBlock(out_channels, out_channels),
            ResidualConvBlock(out_channels, out_channels),
        )

    def forward(self, x, skip):
        return self.model(torch.cat((x, skip), 1))


class EmbedFC(nn.Module):
    def __init__(self, input_dim: int, emb_dim: int):
        super().__init__()
        self.input_dim = input_dim
        self.model = nn.Sequential(nn.Linear(input_dim, emb_dim), nn.GELU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, x):
        return self.model(x.reshape(-1, self.input_dim))


class ContextUnet(nn.Module):
    """eps_theta(x_t, t, y): ``forward(x, t, labels)`` with integer t in 1..T and labels in 0..n_classes."""

    def __init__(self, in_channels: int = 3, n_feat: int = 128, n_classes: int = 2, image_size: int = 256,
                 bottleneck: int = 8, timesteps: int = 400):
        super().__init__()
        if n_feat % 8:
            raise ValueError(f"diffusion.n_feat must be a multiple of 8 (GroupNorm(8) layers); got {n_feat}")
        side = image_size // 4
        if image_size % 4 or bottleneck < 1 or side % bottleneck:
            raise ValueError(
                f"ContextUnet needs image_size divisible by 4 x diffusion.bottleneck; got image_size {image_size}, "
                f"bottleneck {bottleneck} (the 2x-pooled map is {image_size / 4:g} px). Pick a bottleneck dividing {side}."
            )
        self.in_channels, self.n_feat, self.n_classes = in_channels, n_feat, n_classes
        self.image_size, self.bottleneck, self.timesteps = image_size, bottleneck, timesteps
        up = side // bottleneck

        self.init_conv = ResidualConvBlock(in_channels, n_feat, is_res=True)
        self.down1 = UnetDown(n_feat, n_feat)
        self.down2 = UnetDown(n_feat, 2 * n_feat)
        self.to_vec = nn.Sequential(nn.AdaptiveAvgPool2d(bottleneck), nn.GELU())

        self.timeembed1 = EmbedFC(1, 2 * n_feat)
        self.timeembed2 = EmbedFC(1, n_feat)
        self.contextembed1 = EmbedFC(n_classes, 2 * n_feat)
        self.contextembed2 = EmbedFC(n_classes, n_feat)

        self.up0 = nn.Sequential(nn.ConvTranspose2d(2 * n_feat, 2 * n_feat, up, up), nn.GroupNorm(8, 2 * n_feat), nn.ReLU())
        self.up1 = UnetUp(4 * n_feat, n_feat)
        self.up2 = UnetUp(2 * n_feat, n_feat)
        self.out = nn.Sequential(
            nn.Conv2d(2 * n_feat, n_feat, 3, 1, 1), nn.GroupNorm(8, n_feat), nn.ReLU(), nn.Conv2d(n_feat, in_channels, 3, 1, 1)
        )

    def class_vector(self, labels: torch.Tensor) -> torch.Tensor:
        """One-hot of ``labels``; the null label (``n_classes``) gives all zeros (the seed's context mask)."""
        labels = labels.long()
        keep = labels < self.n_classes
        onehot = F.one_hot(labels.clamp(0, self.n_classes - 1), self.n_classes).float()
        return onehot * keep[:, None].float()

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = self.n_feat
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        x0 = self.init_conv(x)
        d1 = self.down1(x0)
        d2 = self.down2(d1)
        hidden = self.to_vec(d2)

        c = self.class_vector(labels)
        tt = (t.float() / self.timesteps)[:, None]
        cemb1 = self.contextembed1(c).view(-1, 2 * n, 1, 1)
        temb1 = self.timeembed1(tt).view(-1, 2 * n, 1, 1)
        cemb2 = self.contextembed2(c).view(-1, n, 1, 1)
        temb2 = self.timeembed2(tt).view(-1, n, 1, 1)

        u1 = self.up0(hidden)
        u2 = self.up1(cemb1 * u1 + temb1, d2)
        u3 = self.up2(cemb2 * u2 + temb2, d1)
        return self.out(torch.cat((u3, x0), 1))
