"""The two step functions the generation loop drives: the decoder .pte in the ExecuTorch runtime, and the same
static-cache module in torch (for parity). Both: step(tokens list, start position, visual) -> last logits (V,)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class ExecuTorchDecoder:
    """The .pte's `forward` method; its KV cache persists between calls (mutable buffers), later positions are
    overwritten and masked, so a new prompt just starts again at position 0."""
    runtime = "executorch-xnnpack"

    def __init__(self, pte: Path) -> None:
        from executorch.runtime import Runtime

        self.method = Runtime.get().load_program(Path(pte)).load_method("forward")

    def step(self, tokens: list[int], start: int, visual: Any = None) -> np.ndarray:
        import torch

        args = [torch.tensor([tokens], dtype=torch.long), torch.arange(start, start + len(tokens), dtype=torch.long)]
        if visual is not None:
            args.append(torch.as_tensor(visual, dtype=torch.float32))
        return self.method.execute(args)[0][0, -1].detach().numpy().copy()


class TorchDecoder:
    """The static-cache module (effai.export.kv_decoder.static_cache_module) run eagerly."""
    runtime = "torch"

    def __init__(self, module: Any) -> None:
        self.module = module

    def step(self, tokens: list[int], start: int, visual: Any = None) -> np.ndarray:
        import torch

        args = [torch.tensor([tokens], dtype=torch.long), torch.arange(start, start + len(tokens), dtype=torch.long)]
        if visual is not None:
            args.append(torch.as_tensor(visual, dtype=torch.float32))
        with torch.no_grad():
            return self.module(*args)[0, -1].float().numpy().copy()
