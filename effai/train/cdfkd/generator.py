"""The CDFKD-MFS image generators (DAFL/DFAD and DCGAN style), as the released code builds them per input size.

Hao et al., IEEE TMM 2022, arXiv:2205.11845 (code: Hao840/CDFKD-MFS nets/gan.py). `kind="auto"`: below 128 px
`small`, 128 to 223 px `large`, 224 px and up `large_bn`. Layers, output ranges and the reference's choices:
docs/distill.md, "effai/train/cdfkd/generator.py".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from effai.errors import UsageError

GENERATOR_KINDS = ("auto", "small", "large", "large_bn")


def generator_kind(kind: str, img_size: int) -> str:
    """The generator the reference uses at this input size ('auto'), or the one asked for."""
    if kind not in GENERATOR_KINDS:
        raise UsageError(f"unknown CDFKD generator '{kind}'; choose one of: {', '.join(GENERATOR_KINDS)}")
    if kind != "auto":
        return kind
    return "small" if img_size < 128 else "large" if img_size < 224 else "large_bn"


class Generator(nn.Module):
    """z (B, nz) -> images (B, C, s, s). `kind` picks the reference architecture (module docstring)."""

    def __init__(self, nz: int = 256, img_size: int = 32, channels: int = 3, kind: str = "auto") -> None:
        super().__init__()
        self.kind = generator_kind(kind, img_size)
        self.nz, self.channels = nz, channels
        if self.kind == "small":
            if img_size % 4 or img_size < 8:
                raise UsageError(f"the small CDFKD generator upsamples s/4 twice; input size {img_size} must be a "
                                 "multiple of 4 and >= 8 (e.g. 16, 32, 64)")
            self.init_size = img_size // 4
            self.project = nn.Linear(nz, 128 * self.init_size ** 2)
            self.bn0 = nn.BatchNorm2d(128)
            self.block1 = nn.Sequential(nn.Conv2d(128, 128, 3, 1, 1), nn.BatchNorm2d(128, eps=0.8), nn.LeakyReLU(0.2))
            self.block2 = nn.Sequential(nn.Conv2d(128, 64, 3, 1, 1), nn.BatchNorm2d(64, eps=0.8), nn.LeakyReLU(0.2))
            self.out = nn.Sequential(nn.Conv2d(64, channels, 3, 1, 1), nn.Tanh(),
                                     nn.BatchNorm2d(channels, affine=False))
            return
        if img_size % 16 or img_size < 16:
            raise UsageError(f"the {self.kind} CDFKD generator upsamples s/16 four times; input size {img_size} must "
                             "be a multiple of 16 (e.g. 128, 224), or use generator=small")
        self.init_size = img_size // 16
        self.project = nn.Linear(nz, 512 * self.init_size ** 2)
        layers: list[nn.Module] = [nn.BatchNorm2d(512)]
        for c_in, c_out in ((512, 256), (256, 128), (128, 64), (64, 64)):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
        layers += [nn.Conv2d(64, channels, 3, 1, 1), nn.Tanh()]
        if self.kind == "large_bn":
            layers.append(nn.BatchNorm2d(channels, affine=False))
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z.flatten(1)).view(z.shape[0], -1, self.init_size, self.init_size)
        if self.kind != "small":
            return self.main(x)
        x = F.interpolate(self.bn0(x), scale_factor=2)
        x = F.interpolate(self.block1(x), scale_factor=2)
        return self.out(self.block2(x))
