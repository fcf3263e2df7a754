"""The CDFKD-MFS image generator (DAFL/DFAD-style), exactly as the released code builds it for 32x32 images.

    z (nz) -> Linear -> 128 x s/4 x s/4 -> BN -> up2 -> conv3x3 128 + BN(eps .8) + LeakyReLU .2
           -> up2 -> conv3x3 64 + BN(eps .8) + LeakyReLU .2 -> conv3x3 C -> tanh -> BN(affine=False)

Hao et al., "CDFKD-MFS: Collaborative Data-free Knowledge Distillation via Multi-level Feature Sharing",
IEEE TMM 2022, arXiv:2205.11845 (code: Hao840/CDFKD-MFS nets/gan.py `Generator`). The final BatchNorm without
affine parameters makes every output channel zero-mean, unit-variance over the batch (in training mode), i.e.
images in the teachers' *normalized* input space; `eps=0.8` is the reference's (positional) BatchNorm eps on both
conv blocks. Upsampling is nearest (F.interpolate's default), as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from effai.errors import UsageError


class Generator(nn.Module):
    def __init__(self, nz: int = 256, img_size: int = 32, channels: int = 3) -> None:
        super().__init__()
        if img_size % 4 or img_size < 8:
            raise UsageError(f"the CDFKD generator upsamples s/4 twice; input size {img_size} must be a multiple of 4 "
                             "and >= 8 (e.g. 16, 32, 64)")
        self.nz, self.init_size, self.channels = nz, img_size // 4, channels
        self.project = nn.Linear(nz, 128 * self.init_size ** 2)
        self.bn0 = nn.BatchNorm2d(128)
        self.block1 = nn.Sequential(nn.Conv2d(128, 128, 3, 1, 1), nn.BatchNorm2d(128, eps=0.8), nn.LeakyReLU(0.2))
        self.block2 = nn.Sequential(nn.Conv2d(128, 64, 3, 1, 1), nn.BatchNorm2d(64, eps=0.8), nn.LeakyReLU(0.2))
        self.out = nn.Sequential(nn.Conv2d(64, channels, 3, 1, 1), nn.Tanh(), nn.BatchNorm2d(channels, affine=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(z.shape[0], 128, self.init_size, self.init_size)
        x = F.interpolate(self.bn0(x), scale_factor=2)
        x = F.interpolate(self.block1(x), scale_factor=2)
        return self.out(self.block2(x))
