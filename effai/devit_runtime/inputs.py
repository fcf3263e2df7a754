"""The image stream of a collaborative run, rebuilt identically by every process from a short spec: `random[:SEED]`,
or `digits | DIR | X.npz` (the data set's held-out split). By default each device reads it locally, so only CLS
features cross the network; with `send_images` the coordinator sends each batch to every device instead.
Specs: docs/distill.md, "effai/devit_runtime/inputs.py".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effai.errors import UsageError


@dataclass
class Stream:
    x: torch.Tensor                    # float32 N x C x H x W, normalized
    y: torch.Tensor | None             # labels when the source has them
    source: str

    def batch(self, b: int, size: int) -> torch.Tensor:
        return self.x[b * size:(b + 1) * size]

    def batches(self, size: int) -> int:
        return self.x.shape[0] // size


def load_stream(spec: str, input_size: tuple[int, int, int], mean: list[float], std: list[float], images: int,
                val_seed: int = 42, val_fraction: float = 0.2) -> Stream:
    c, h, w = input_size
    if images < 1:
        raise UsageError(f"--images {images} must be >= 1")
    if spec == "random" or spec.startswith("random:"):
        try:
            seed = int(spec.partition(":")[2] or 0)
        except ValueError:
            raise UsageError(f"--data {spec}: write random or random:SEED (an integer)") from None
        g = torch.Generator().manual_seed(seed)
        return Stream(torch.randn(images, c, h, w, generator=g), None, spec)
    from effai.data import datasets as data_mod

    if h != w:
        raise UsageError(f"--data {spec} needs square inputs; the parts take {h}x{w}; use --data random")
    full = data_mod.load(spec, h, c)
    _, val = data_mod.split(full, val_fraction, val_seed)
    n = min(images, len(val))
    x = (val.x[:n].float() / 255 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return Stream(x.contiguous(), val.y[:n], f"{spec} held-out split (seed {val_seed}), {n} images")
