"""Device choice and multi-process training under `torchrun` (env RANK / WORLD_SIZE / LOCAL_RANK).

Gradients are averaged by hand (`average_gradients`, one all_reduce over a flat buffer after the
backward passes of an optimiser step) instead of wrapping the model in DistributedDataParallel:
methods call `model.encode`/`model.decode` directly, run a teacher and several forward passes per
step, and DDP only synchronises gradients of calls that go through the wrapper's `forward`. A manual
all_reduce over every trainable parameter is correct for any method and costs one collective per
optimiser step (no overlap with the backward pass, which matters little at this scale). Parameters
a step did not reach contribute zeros, so every rank takes part in the same collective.

BN running statistics stay per rank during training (as with broadcast_buffers=False) and are
averaged over ranks before every checkpoint and at the end (`average_buffers`), so every rank ends
with identical weights.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    initialised_here: bool  # this call started the process group (and must end it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' without a GPU is an error."""
    if preference not in ("auto", "cpu", "cuda"):
        from s4seg.errors import ParamsError

        raise ParamsError(f"params.yaml: device {preference!r} is not supported; choose one of: auto, cpu, cuda")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from s4seg.errors import ParamsError

        raise ParamsError("params.yaml: device is 'cuda' but no CUDA device is available; use auto or cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def setup(preference: str) -> DistContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = pick_device(preference, local_rank)
    if world_size <= 1:
        return DistContext(0, 1, device, False)
    initialised_here = not dist.is_initialized()
    if initialised_here:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        log.info("process group: rank %d of %d on %s", rank, world_size, device)
    return DistContext(dist.get_rank(), dist.get_world_size(), device, initialised_here)


def teardown(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
        if ctx.initialised_here:
            dist.destroy_process_group()


def average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """All-reduce the mean gradient of `params` over ranks (missing gradients count as zero)."""
    if world_size <= 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


@torch.no_grad()
def average_buffers(module: nn.Module, world_size: int) -> None:
    """Average floating-point buffers (BN running stats) over ranks; integer buffers are left as they are."""
    if world_size <= 1:
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf /= world_size


@torch.no_grad()
def broadcast_module(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)
