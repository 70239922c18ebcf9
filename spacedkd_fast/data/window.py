"""The replay window: the teacher's augmented batches, kept until the student has replayed them.

A window of ``capacity`` slots (one block of N batches, plus slack when the roles overlap); slot ``i % capacity``
holds iteration ``i``. Slots are split into three tiers by a memory budget:

1. **device**: uint8 batches in a ring on the training device, while ``device_budget`` bytes allow
   (CIFAR, batch 128: 393 KB a batch, so a window at s = 1.5 is 0.237 GB);
2. **host**: beyond it, in a pinned host ring (copied out after the teacher step, back before the replay, both
   asynchronous on CUDA), while ``host_budget`` bytes allow;
3. **regenerate**: beyond both, only the batch's plan (int32 sample indices + one seed: 4 bytes a sample) is kept and
   the batch is rendered again for the replay. Rendering is a pure function of the plan, so the replay is
   byte-identical whatever the tier (an ImageNet-scale window costs O(indices + seeds)).

Batches are normalized when used, identically for teacher and student. ``prefetch(i)`` starts bringing a host or
regenerated batch to the device on a side stream, so the student's next step does not wait for it.

``storage="host"`` instead reproduces the official code's replay buffer for the benchmark baseline: every batch
takes a blocking copy to (unpinned) host memory and another one back for the replay. (The official code copies
normalized float32 batches, 4× these uint8 bytes, so the baseline is if anything faster than the original.)

With CUDA streams each slot carries two events: *ready* (recorded on the writer's stream; readers wait on it) and
*free* (recorded on the reader's stream at release; the writer waits on it before reusing the slot).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

TIERS = ("device", "host", "regenerate")


@dataclass(frozen=True)
class TierPlan:
    """How many of the window's slots each tier gets."""

    device: int
    host: int
    regenerate: int

    @staticmethod
    def for_budget(capacity: int, slot_bytes: int, device_budget: float, host_budget: float) -> TierPlan:
        device = min(capacity, int(device_budget // slot_bytes)) if slot_bytes else capacity
        host = min(capacity - device, int(host_budget // slot_bytes)) if slot_bytes else 0
        return TierPlan(device, host, capacity - device - host)

    def tier_of(self, slot: int) -> str:
        if slot < self.device:
            return "device"
        return "host" if slot < self.device + self.host else "regenerate"


class WindowCache:
    """Ring of training batches keyed by their global iteration.

    Args:
        capacity: slots; at least the block length N, plus slack when teacher and student overlap.
        image_shape: ``(C, H, W)`` of a batch's images.
        batch_size: largest per-rank batch.
        device: training device.
        normalize: ``uint8 (B, C, H, W) -> float (B, C, H, W)``, applied when a batch is consumed.
        storage: "device" (tiered) or "host" (the official blocking style, the benchmark baseline).
        tiers: slot split of the "device" storage (default: everything on the device).
        regenerate: ``plan -> (uint8 images, labels)`` on the device; required when ``tiers.regenerate > 0``.
    """

    def __init__(self, capacity: int, image_shape: tuple[int, int, int], batch_size: int, device: torch.device,
                 normalize: Callable[[Tensor], Tensor], storage: str = "device", tiers: TierPlan | None = None,
                 regenerate: Callable | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"window capacity must be >= 1, got {capacity}")
        if storage not in ("device", "host"):
            raise ValueError(f"window storage must be 'device' or 'host', got {storage!r}")
        tiers = tiers or TierPlan(capacity, 0, 0)
        if storage == "host":
            tiers = TierPlan(0, 0, 0)
        elif tiers.device + tiers.host + tiers.regenerate != capacity:
            raise ValueError(f"window tiers {tiers} do not add up to the capacity {capacity}")
        if tiers.regenerate and regenerate is None:
            raise ValueError("a window with a regenerate tier needs a regenerate(plan) function")
        self.capacity = capacity
        self.device = torch.device(device)
        self.normalize = normalize
        self.storage = storage
        self.batch_size = batch_size
        self.tiers = tiers
        self.regenerate = regenerate
        self._iteration = [-1] * capacity  # global iteration held by each slot (-1: empty)
        self._size = [0] * capacity
        self._plans: list = [None] * capacity  # regenerate tier: the batch's plan
        self._cuda = self.device.type == "cuda"
        self._ready: list[torch.cuda.Event | None] = [None] * capacity
        self._free: list[torch.cuda.Event | None] = [None] * capacity
        self._prefetched: dict[int, tuple[Tensor, Tensor, torch.cuda.Event | None]] = {}
        self._side_stream = torch.cuda.Stream(self.device) if self._cuda else None
        shape = tuple(image_shape)
        self.images = torch.empty((tiers.device, batch_size, *shape), dtype=torch.uint8, device=self.device)
        self.labels = torch.empty((tiers.device, batch_size), dtype=torch.int64, device=self.device)
        pin = self._cuda  # pinned memory only matters for (and only exists with) CUDA
        self.host_images = torch.empty((tiers.host, batch_size, *shape), dtype=torch.uint8, pin_memory=pin)
        self.host_labels = torch.empty((tiers.host, batch_size), dtype=torch.int64, pin_memory=pin)
        self._host_blocking: list[tuple[Tensor, Tensor] | None] = [None] * capacity  # storage="host"

    # ---- bookkeeping ---------------------------------------------------------------------------------------------
    def slot(self, iteration: int) -> int:
        return iteration % self.capacity

    def tier(self, iteration: int) -> str:
        return "host-blocking" if self.storage == "host" else self.tiers.tier_of(self.slot(iteration))

    def is_free(self, iteration: int) -> bool:
        """Whether the slot that ``iteration`` would use is empty."""
        return self._iteration[self.slot(iteration)] < 0

    def __contains__(self, iteration: int) -> bool:
        return self._iteration[self.slot(iteration)] == iteration

    def __len__(self) -> int:
        return sum(i >= 0 for i in self._iteration)

    def pending(self) -> list[int]:
        """Iterations currently held, in order."""
        return sorted(i for i in self._iteration if i >= 0)

    @property
    def nbytes(self) -> int:
        """Device bytes of the ring (the host tier and the plans live in host memory)."""
        return self.images.numel() + self.labels.numel() * 8

    @property
    def host_nbytes(self) -> int:
        plans = sum(p.nbytes for p in self._plans if p is not None)
        return self.host_images.numel() + self.host_labels.numel() * 8 + plans

    def describe(self) -> str:
        if self.storage == "host":
            return f"{self.capacity} slots in host memory (official-style blocking copies)"
        t = self.tiers
        parts = [f"{t.device} on {self.device} ({self.nbytes / 1e9:.3f} GB)"]
        if t.host:
            parts.append(f"{t.host} in pinned host memory ({self.host_images.numel() / 1e9:.3f} GB)")
        if t.regenerate:
            parts.append(f"{t.regenerate} regenerated from plans (4 B/sample)")
        return f"{self.capacity} slots: " + ", ".join(parts)

    # ---- the teacher side ----------------------------------------------------------------------------------------
    def put(self, iteration: int, images: Tensor, labels: Tensor, plan=None) -> None:
        """Store the batch of ``iteration`` (uint8 ``(b, C, H, W)``, labels ``(b,)``, b ≤ batch_size) and its plan
        (needed by the regenerate tier)."""
        slot = self.slot(iteration)
        if self._iteration[slot] >= 0:
            raise RuntimeError(f"window slot {slot} still holds iteration {self._iteration[slot]} (capacity "
                               f"{self.capacity}); it must be released before iteration {iteration} is stored")
        tier = self.tier(iteration)
        if tier == "regenerate" and plan is None:
            raise ValueError(f"iteration {iteration} falls in the regenerate tier but no plan was given")
        b = plan.indices.numel() if tier == "regenerate" else images.shape[0]  # the pixels are not needed there
        stream = torch.cuda.current_stream(self.device) if self._cuda else None
        if self._cuda and self._free[slot] is not None:
            stream.wait_event(self._free[slot])
        if tier == "device":
            self.images[slot, :b].copy_(images)
            self.labels[slot, :b].copy_(labels)
        elif tier == "host":
            index = slot - self.tiers.device
            self.host_images[index, :b].copy_(images, non_blocking=True)
            self.host_labels[index, :b].copy_(labels, non_blocking=True)
        elif tier == "regenerate":
            self._plans[slot] = plan
        else:  # the official code's blocking device -> host copy
            self._host_blocking[slot] = (images.cpu(), labels.cpu())
        if self._cuda:
            event = torch.cuda.Event()
            event.record(stream)
            self._ready[slot] = event
        self._iteration[slot] = iteration
        self._size[slot] = b

    # ---- the student side ----------------------------------------------------------------------------------------
    def prefetch(self, iteration: int) -> None:
        """Start bringing a host-tier or regenerate-tier batch to the device on a side stream (no-op otherwise)."""
        if iteration not in self or iteration in self._prefetched or self.tier(iteration) not in ("host",
                                                                                                    "regenerate"):
            return
        slot = self.slot(iteration)
        consumer = torch.cuda.current_stream(self.device) if self._cuda else None
        context = torch.cuda.stream(self._side_stream) if self._cuda else contextlib.nullcontext()
        with context:
            if self._cuda:
                self._side_stream.wait_stream(consumer)
                self._side_stream.wait_event(self._ready[slot])
            images, labels = self._fetch(iteration, slot)
            event = None
            if self._cuda:
                event = torch.cuda.Event()
                event.record(self._side_stream)
        self._prefetched[iteration] = (images, labels, event)

    def raw(self, iteration: int) -> tuple[Tensor, Tensor]:
        """The stored uint8 images and labels of ``iteration`` on the device (views for the device tier); the
        current stream waits for the writer."""
        slot = self._check(iteration)
        if iteration in self._prefetched:
            images, labels, event = self._prefetched.pop(iteration)
            if event is not None:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(event)
                images.record_stream(stream)
                labels.record_stream(stream)
            return images, labels
        if self._cuda and self._ready[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready[slot])
        return self._fetch(iteration, slot)

    def get(self, iteration: int) -> tuple[Tensor, Tensor]:
        """Normalized float inputs and labels of ``iteration`` on the device."""
        images, labels = self.raw(iteration)
        return self.normalize(images), labels

    def release(self, iteration: int) -> None:
        """The student is done with ``iteration``: its slot may be reused once the current stream gets here."""
        slot = self._check(iteration)
        if self._cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._free[slot] = event
        self._iteration[slot] = -1
        self._plans[slot] = None
        self._host_blocking[slot] = None
        self._prefetched.pop(iteration, None)

    def _fetch(self, iteration: int, slot: int) -> tuple[Tensor, Tensor]:
        b, tier = self._size[slot], self.tier(iteration)
        if tier == "device":
            return self.images[slot, :b], self.labels[slot, :b]
        if tier == "host":
            index = slot - self.tiers.device
            return (self.host_images[index, :b].to(self.device, non_blocking=True),
                    self.host_labels[index, :b].to(self.device, non_blocking=True))
        if tier == "regenerate":
            return self.regenerate(self._plans[slot])
        images, labels = self._host_blocking[slot]
        return images.to(self.device), labels.to(self.device)

    def _check(self, iteration: int) -> int:
        slot = self.slot(iteration)
        if self._iteration[slot] != iteration:
            raise KeyError(f"iteration {iteration} is not in the replay window (slot {slot} holds "
                           f"{self._iteration[slot]})")
        return slot

    # ---- checkpointing -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The held batches as CPU uint8 tensors and labels, and their plans as ``(indices, seed)`` (plain tensors
        and ints, so the checkpoint loads with ``weights_only=True``)."""
        entries = []
        for iteration in self.pending():
            slot = self.slot(iteration)
            plan = self._plans[slot]
            plan = (plan.indices, plan.seed) if plan is not None else None
            if self.tier(iteration) == "regenerate":
                entries.append((iteration, None, None, plan))
            else:
                images, labels = self._fetch(iteration, slot)
                entries.append((iteration, images.cpu(), labels.cpu(), plan))
        return {"storage": self.storage, "entries": entries}

    def load_state_dict(self, state: dict) -> None:
        if state["storage"] != self.storage:
            raise ValueError(f"the checkpointed window used {state['storage']!r} storage, this run uses "
                             f"{self.storage!r}")
        from spacedkd_fast.data.pipeline import BatchPlan

        for iteration, images, labels, plan in state["entries"]:
            plan = BatchPlan(iteration, *plan) if plan is not None else None
            if self.tier(iteration) == "regenerate":  # keep only the plan, whatever the saved run kept
                slot = self.slot(iteration)
                self._iteration[slot], self._size[slot], self._plans[slot] = iteration, plan.indices.numel(), plan
                continue
            if images is None:  # saved from a regenerate slot, but this run's budget keeps pixels here
                images, labels = self.regenerate(plan)
            self.put(iteration, images.to(self.device), labels.to(self.device), plan=plan)
