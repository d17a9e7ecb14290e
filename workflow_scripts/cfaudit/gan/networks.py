"""The GAN baseline's networks (DeGrave et al. 2023, after Singla et al.'s "Explanation by Progressive
Exaggeration"), written as this project's own modules after github.com/suinleelab/derm_audit models/cgan.py
(DeGrave et al. 2023, Nat. Biomed. Eng., doi:10.1038/s41551-023-01160-9).

Generator (CycleGAN-style, conditioned on one of ``n_bins`` bins of the audited classifier's probability):

    reflect-pad 3, conv 7x7 (3 -> c), CCBN, ReLU                      ``stem``
    2 x [conv 3x3 stride 2 pad 1 (c -> 2c -> 4c), CCBN, ReLU]          ``down.0``, ``down.1``
    n_blocks x residual [reflect-pad 1, conv 3x3, CCBN, ReLU,
                         reflect-pad 1, conv 3x3, CCBN] + skip         ``blocks.i``
    2 x [transposed conv 3x3 stride 2 pad 1 output_padding 1
         (4c -> 2c -> c), CCBN, ReLU]                                  ``up.0``, ``up.1``
    reflect-pad 3, conv 7x7 (c -> 3), tanh                             ``head``

and the output is cropped (top-left, as the reference) to the input's height and width: 299 in -> 300 after
the up-sampling -> 299 out. With ``base_channels = 64, n_blocks = 9, n_bins = 10`` (``PUBLISHED_ARCH``)
it has the published checkpoint's 11.49 M parameters; ``checkpoint.py`` maps the published key names onto
these modules. Smaller widths / fewer blocks exist only for fast CPU presets.

CCBN (categorical conditional batch norm): ``BatchNorm2d(affine=False)`` followed by a per-bin scale and
shift from two ``Embedding(n_bins, C)`` tables initialised to 1 and 0. In eval mode the batch norm uses its
running statistics, so an image's output does not depend on the rest of its batch; in train mode it does.

Discriminator (the one used in training): 4 spectral-normalised 4x4 stride-2 convs (3 -> d -> 2d -> 4d -> 8d,
d = 64 published) each followed by LeakyReLU 0.2, a sum over space, and a spectral-normalised Linear(8d, 1).
It ignores the bin.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


@dataclass(frozen=True)
class GeneratorArch:
    base_channels: int = 64
    n_blocks: int = 9
    n_bins: int = 10

    def as_dict(self) -> dict:
        return asdict(self)


PUBLISHED_ARCH = GeneratorArch(64, 9, 10)


class CCBN(nn.Module):
    """Categorical conditional batch norm: normalise without affine, then scale/shift looked up per bin."""

    def __init__(self, channels: int, n_bins: int = 10):
        super().__init__()
        self.channels = channels
        self.n_bins = n_bins
        self.batchnorm = nn.BatchNorm2d(channels, affine=False)
        self.embed_gamma = nn.Embedding(n_bins, channels)
        self.embed_beta = nn.Embedding(n_bins, channels)
        nn.init.ones_(self.embed_gamma.weight)
        nn.init.zeros_(self.embed_beta.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.batchnorm(x)
        gamma = self.embed_gamma(y).view(-1, self.channels, 1, 1).to(h.dtype)
        beta = self.embed_beta(y).view(-1, self.channels, 1, 1).to(h.dtype)
        return h * gamma + beta


class ConvNormReLU(nn.Module):
    """conv (or transposed conv) -> CCBN -> ReLU."""

    def __init__(self, conv: nn.Module, channels: int, n_bins: int):
        super().__init__()
        self.conv = conv
        self.norm = CCBN(channels, n_bins)
        self.act = nn.ReLU()

    def forward(self, x, y):
        return self.act(self.norm(self.conv(x), y))


class Stem(nn.Module):
    def __init__(self, out_channels: int, n_bins: int):
        super().__init__()
        self.pad = nn.ReflectionPad2d(3)
        self.conv = nn.Conv2d(3, out_channels, kernel_size=7)
        self.norm = CCBN(out_channels, n_bins)
        self.act = nn.ReLU()

    def forward(self, x, y):
        return self.act(self.norm(self.conv(self.pad(x)), y))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, n_bins: int):
        super().__init__()
        self.pad = nn.ReflectionPad2d(1)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3)
        self.norm1 = CCBN(channels, n_bins)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3)
        self.norm2 = CCBN(channels, n_bins)

    def forward(self, x, y):
        h = self.act(self.norm1(self.conv1(self.pad(x)), y))
        h = self.norm2(self.conv2(self.pad(h)), y)
        return x + h


class Head(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.pad = nn.ReflectionPad2d(3)
        self.conv = nn.Conv2d(in_channels, 3, kernel_size=7)

    def forward(self, x):
        return torch.tanh(self.conv(self.pad(x)))


class Generator(nn.Module):
    """Bin-conditioned image-to-image generator; ``forward(x, y)`` with x (N,3,H,W) in [-1,1], y (N,) bins."""

    def __init__(self, arch: GeneratorArch = PUBLISHED_ARCH):
        super().__init__()
        if arch.base_channels < 1 or arch.n_blocks < 0 or arch.n_bins < 2:
            raise ValueError(f"invalid generator architecture {arch}")
        self.arch = arch
        c, k = arch.base_channels, arch.n_bins
        self.stem = Stem(c, k)
        self.down = nn.ModuleList([
            ConvNormReLU(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), 2 * c, k),
            ConvNormReLU(nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), 4 * c, k),
        ])
        self.blocks = nn.ModuleList([ResidualBlock(4 * c, k) for _ in range(arch.n_blocks)])
        self.up = nn.ModuleList([
            ConvNormReLU(nn.ConvTranspose2d(4 * c, 2 * c, 3, stride=2, padding=1, output_padding=1), 2 * c, k),
            ConvNormReLU(nn.ConvTranspose2d(2 * c, c, 3, stride=2, padding=1, output_padding=1), c, k),
        ])
        self.head = Head(c)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform conv weights and zero biases (the reference's initialisation)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"generator expects images (N, 3, H, W) in [-1, 1], got {tuple(x.shape)}")
        y = y.to(device=x.device, dtype=torch.long).reshape(-1)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"{x.shape[0]} images but {y.shape[0]} bins")
        h, w = x.shape[-2:]
        t = self.stem(x, y)
        for layer in self.down:
            t = layer(t, y)
        for block in self.blocks:
            t = block(t, y)
        for layer in self.up:
            t = layer(t, y)
        return self.head(t)[:, :, :h, :w]


class Discriminator(nn.Module):
    """Spectral-normalised patch critic summed over space; ``forward(x)`` -> (N,) realness scores."""

    def __init__(self, base_channels: int = 64):
        super().__init__()
        d = base_channels
        chans = [3, d, 2 * d, 4 * d, 8 * d]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            conv = nn.Conv2d(cin, cout, kernel_size=4, stride=2, padding=1)
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
            layers += [spectral_norm(conv), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        linear = nn.Linear(8 * d, 1)
        nn.init.xavier_uniform_(linear.weight)
        nn.init.zeros_(linear.bias)
        self.linear = spectral_norm(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).sum(dim=(2, 3))
        return self.linear(h).squeeze(1)


def n_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
