"""The two step functions the generation loop drives: the decoder .pte in the ExecuTorch runtime, and the same
static-cache module in torch (for parity). Both: step(tokens list, start position, visual) -> last logits (V,)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def load_forward(pte: Path) -> Any:
    """A .pte's `forward` method in the ExecuTorch runtime; the threadpool's cpuinfo lines that loading prints on
    stderr are dropped (they are not errors), so a streamed answer is all a user sees."""
    from effai.export.quiet import runtime_quiet

    with runtime_quiet():      # also hushes torch's pytree warning that importing the runtime (torchao) logs
        from executorch.runtime import Runtime

        return Runtime.get().load_program(Path(pte)).load_method("forward")


class ExecuTorchDecoder:
    """The .pte's `forward` method; its KV cache persists between calls (mutable buffers), later positions are
    overwritten and masked, so a new prompt just starts again at position 0."""
    runtime = "executorch-xnnpack"

    def __init__(self, pte: Path) -> None:
        self.method = load_forward(pte)

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
