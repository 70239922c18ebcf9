"""torch.distributed setup for ``torchrun --nproc_per_node=K -m spacedkd_fast.train``.

nccl on GPUs, gloo on CPU. Teacher and student get process groups of their own so that their gradient
all-reduces, issued from two CUDA streams, do not queue behind each other on one communicator.
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
    teacher_group: object = None
    student_group: object = None

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
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    return DistInfo(rank=rank, world=world, local_rank=local_rank, teacher_group=dist.new_group(),
                    student_group=dist.new_group())


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo, group=None) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def shutdown(info: DistInfo) -> None:
    """Leave the process group cleanly (a barrier first, so no rank tears down gloo/nccl threads while another
    still talks to it; exiting without this can abort with "terminate called without an active exception")."""
    if info.enabled and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
