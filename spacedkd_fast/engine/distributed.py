"""torch.distributed setup for ``torchrun --nproc_per_node=K -m spacedkd_fast.train``.

nccl on GPUs, gloo on CPU.

* **One communicator for both roles.** Teacher and student gradient all-reduces (DDP) and evaluation counts go
  through the same process group. With overlap they are issued from two CUDA streams, and NCCL does not promise
  progress for two communicators whose kernels share the GPU in different orders on different ranks (a known
  deadlock); one communicator serializes them in the order the host issued them, which is the same on every rank
  (the schedule is deterministic).
* **A CPU control group** (gloo) for decisions every rank must take together, such as stopping on a signal:
  :func:`any_rank` costs a host round trip on loopback, never a GPU sync.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # processes on this machine (they share its host memory)
    group: object = None  # data collectives of both roles (None: the default group)
    control_group: object = None  # gloo, CPU tensors: agreements between ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group that torchrun describes in the environment (single process: no-op)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.new_group()
    return DistInfo(rank=rank, world=world, local_rank=local_rank, local_world=local_world, group=None,
                    control_group=control)


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo, group=None) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group if group is not None else info.group)
    return tensor


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is True on any rank (a collective: every rank must call it, at the same
    point of its schedule)."""
    if not info.enabled:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=info.control_group)
    return bool(value.item())


def broadcast_from_main(value, info: DistInfo):
    """Rank 0's ``value`` (any picklable object) on every rank (a collective)."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=info.control_group)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier(group=info.control_group)


def shutdown(info: DistInfo) -> None:
    """Leave the process group cleanly (a barrier first, so no rank tears down gloo/nccl threads while another
    still talks to it; exiting without this can abort with "terminate called without an active exception")."""
    if info.enabled and dist.is_initialized():
        try:
            dist.barrier(group=info.control_group)
        finally:
            dist.destroy_process_group()
