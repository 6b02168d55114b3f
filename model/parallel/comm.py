"""Process groups of a parallel model and the collectives its forward pass uses.

Two groups over the same ranks:
- the device group (NCCL on GPUs, gloo on the CPU), the default group, for the model's collectives; its timeout
  bounds every collective, so a dead or hung peer turns into an error instead of a hang;
- the control group (always gloo, CPU tensors), over which rank 0 broadcasts each step to the workers. Workers wait
  on it while the server is idle, so its timeout is long; a peer that dies closes its sockets and the wait fails at
  once.
"""

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

IDLE_TIMEOUT = datetime.timedelta(days=365)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13


class Comm:
    """All-reduce and all-gather over every rank of the device group. Capturable in CUDA graphs (NCCL)."""

    def __init__(self, group, rank: int, world_size: int):
        self.group = group
        self.rank = rank
        self.world_size = world_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; every rank gets the same bits (routing computed from it stays identical)."""
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """[S, n] per rank -> [S, world * n], rank r's columns at r * n."""
        rows, cols = x.shape
        out = x.new_empty(self.world_size * rows, cols)  # [W*S, n]
        _all_gather(out, x.contiguous(), group=self.group)
        return out.view(self.world_size, rows, cols).permute(1, 0, 2).reshape(rows, self.world_size * cols)


@dataclass
class ProcessGroups:
    rank: int
    world_size: int
    device: torch.device
    comm: Comm
    control: object  # gloo group for step messages

    def barrier(self) -> None:
        """On the control group: waits as long as start-up may take (loading a large checkpoint)."""
        dist.barrier(group=self.control)

    def min_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_groups(rank: int, world_size: int, device: torch.device, store: dist.Store | None,
                        collective_timeout_s: float) -> ProcessGroups:
    """Join the world (through `store`, or torchrun's env:// when None) and create both groups."""
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process; one parallel model at a time")
    timeout = datetime.timedelta(seconds=collective_timeout_s)
    kwargs = dict(backend=backend_for(device), rank=rank, world_size=world_size, timeout=timeout)
    if device.type == "cuda":
        # NVLink multicast off unless asked for: a fault in it can take a shared node's GPUs out of service
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        torch.cuda.set_device(device)
        kwargs["device_id"] = device  # NCCL communicators are created eagerly, before the first collective
    if store is not None:
        kwargs["store"] = store
    else:
        kwargs["init_method"] = "env://"
    dist.init_process_group(**kwargs)
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    logger.info("rank %d/%d joined (%s on %s)", rank, world_size, kwargs["backend"], device)
    return ProcessGroups(rank, world_size, device, Comm(dist.group.WORLD, rank, world_size), control)
