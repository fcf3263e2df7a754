"""DeViT collaborative inference (Xu et al., arXiv:2309.05015): each part of an `effai train devit` decomposition in
its own process/device, the fusion head on a coordinator, torch.distributed (gloo over TCP) in between.

    decomp = load_run("runs/devit")                       # parts + fusion head, split hashes and widths checked
    decomp.ensemble()(x)                                  # single-process reference
    result = run_local(decomp, "runs/devit", RunSpec())   # coordinator here + one process per part
"""

from effai.devit_runtime.local import run_local
from effai.devit_runtime.parts import Decomposition, Fusion, Part, load_fusion, load_part, load_run
from effai.devit_runtime.coordinator import RunResult, coordinate
from effai.devit_runtime.device import serve
from effai.devit_runtime.messages import RunSpec
from effai.devit_runtime.network import DeviceLost

__all__ = ["Decomposition", "DeviceLost", "Fusion", "Part", "RunResult", "RunSpec", "coordinate", "load_fusion",
           "load_part", "load_run", "run_local", "serve"]
