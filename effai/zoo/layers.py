"""Export-friendly building blocks shared by effai's architectures and the export rewrites."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def nearest_indices(src: int, dst: int) -> torch.Tensor:
    """Source index of each output position under torch's 'nearest' rule: floor(i * src/dst), clamped."""
    scale = torch.tensor(src / dst, dtype=torch.float32)
    return torch.clamp((torch.arange(dst, dtype=torch.float32) * scale).floor().long(), max=src - 1)


class NearestUpsample(nn.Module):
    """Nearest-neighbour resize (h, w) -> (H, W) as two constant 0/1 selection maps applied with F.linear.

        y = S_h x S_w^T,   S_h[i, j] = 1 iff j = floor(i * h / H)   (likewise S_w)

    Exactly F.interpolate(x, size=(H, W), mode="nearest") for finite x (each output sums one x*1 and zeros), but a
    plain fully-connected op that every runtime lowers: litert-torch mis-lowers nearest resizes with non-integer
    scales (3x3 -> 7x7 picks other pixels), and ExecuTorch's XNNPACK partitioner does not delegate
    upsample_nearest2d, splitting the graph. The maps are buffers, not built in forward, so exporters see constants.
    """

    def __init__(self, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> None:
        super().__init__()
        (h, w), (H, W) = src_hw, dst_hw
        self.src_hw, self.dst_hw = (h, w), (H, W)
        self.register_buffer("sel_h", F.one_hot(nearest_indices(h, H), h).float(), persistent=False)  # (H, h)
        self.register_buffer("sel_w", F.one_hot(nearest_indices(w, W), w).float(), persistent=False)  # (W, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.sel_w)                                   # (..., h, W)
        return F.linear(x.transpose(-1, -2), self.sel_h).transpose(-1, -2)   # (..., H, W)

    def extra_repr(self) -> str:
        return f"{self.src_hw} -> {self.dst_hw}"


class SepConv(nn.Sequential):
    """dw3x3 (stride) -> pw -> BN -> ReLU -> dw3x3 -> pw (to c_out) -> BN -> ReLU (OFA-KD's, from DARTS)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 2) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in), nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, 3, 1, 1, groups=c_in, bias=False), nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU(inplace=False))
