"""Data parallelism on torch.distributed: gloo on CPU, nccl on GPU; ranks started by effai.train.launch (or torchrun).

Each of W processes takes a contiguous 1/W slice of every global batch; DDP averages gradients, and batch
normalization is synchronized across processes, so W processes compute what one process computes on the whole
global batch. torch's SyncBatchNorm only runs on GPUs, so on CPU effai uses `GlobalBatchNorm2d`, which all-reduces
the per-channel sums (with autograd) to normalize with global-batch statistics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistInfo:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def init(device: torch.device) -> DistInfo:
    """Join the group: through effai's private FileStore (`--nproc`), else torchrun's env:// (an explicit opt-in)."""
    info = DistInfo.from_env()
    if info.world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        path = os.environ.get("EFFAI_DDP_STORE")
        if path:
            dist.init_process_group(backend, store=dist.FileStore(path, info.world), rank=info.rank,
                                    world_size=info.world)
        else:
            dist.init_process_group(backend)
    return info


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch across all processes (CPU SyncBatchNorm).

        mean = sum_all(x) / n_all,   var = sum_all(x^2) / n_all - mean^2   (biased; running var uses n/(n-1))

    Its collectives run on a process group of their own: sharing DDP's group lets the statistics' all-reduce in
    backward interleave with DDP's asynchronous gradient buckets, which silently corrupts gradients.
    """

    group: object = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        n = torch.tensor([x.numel() / c], dtype=x.dtype)
        stats = all_reduce(torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), n]), group=self.group)
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c:2 * c] / total - mean * mean).clamp_min(0)
        with torch.no_grad():
            m = self.momentum if self.momentum is not None else 0.1
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * total / (total - 1).clamp_min(1))
            self.num_batches_tracked.add_(1)
        y = (x - mean.view(1, c, 1, 1)) * torch.rsqrt(var.view(1, c, 1, 1) + self.eps)
        return y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1) if self.affine else y


def convert_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Synchronize every BatchNorm2d across processes (SyncBatchNorm on GPU, GlobalBatchNorm2d on CPU)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if GlobalBatchNorm2d.group is None and dist.is_initialized():
        GlobalBatchNorm2d.group = dist.new_group(backend="gloo")
    for name, child in list(model.named_children()):
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            convert_batchnorm(child, device)
    return model


def revert_batchnorm(model: nn.Module) -> nn.Module:
    """Back to plain BatchNorm2d (same state_dict keys) for evaluation, folding and export."""
    for name, child in list(model.named_children()):
        if isinstance(child, (GlobalBatchNorm2d, nn.SyncBatchNorm)):
            new = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            revert_batchnorm(child)
    return model


def all_equal_params(model: nn.Module) -> bool:
    """True when every process holds bit-identical parameters (ranks in sync)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return True
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).to(_collective_device())
    ref = flat.clone()
    dist.broadcast(ref, 0)
    ok = torch.tensor([float(torch.equal(flat, ref))], device=flat.device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_ranks(*values: float) -> tuple[float, ...]:
    """Sum scalars over all processes (training metrics of the global batch); identity in one process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return tuple(t.cpu().tolist())


def all_ranks_true(flag: bool, device: torch.device | None = None) -> bool:
    """True only when `flag` holds on every process (so all ranks stop together, none hangs in a collective)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
