"""The replay window: the teacher's augmented batches, kept until the student has replayed them.

Two storages:

* ``device`` (default): a preallocated ring of uint8 slots ``(capacity, B, C, H, W)`` plus labels on the training
  device. A slot costs B·C·H·W bytes (CIFAR, B = 128: 393 KB), so a CIFAR window at s = 1.5 (586 batches) is
  0.23 GB. Batches are normalized when used, identically for teacher and student.
* ``host``: the official code's style, kept as the benchmark baseline: every batch takes a blocking copy to
  (unpinned) host memory and another one back for the replay. (The official code copies normalized float32
  batches, 4× the bytes of these uint8 ones, so this baseline is if anything faster than the original.)

With CUDA streams (teacher and student overlapped) each slot carries two events: *ready* (recorded on the writer's
stream after the batch was written; the reader waits on it) and *free* (recorded on the reader's stream after the
student step; the writer waits on it before reusing the slot).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class WindowCache:
    """Ring buffer of training batches keyed by their global iteration.

    Args:
        capacity: slots; at least the block length N, plus slack when teacher and student overlap.
        image_shape: ``(C, H, W)`` of a batch's images.
        batch_size: largest per-rank batch.
        device: training device.
        normalize: ``uint8 (B, C, H, W) -> float (B, C, H, W)`` used when a batch is consumed.
        storage: "device" or "host".
    """

    def __init__(self, capacity: int, image_shape: tuple[int, int, int], batch_size: int, device: torch.device,
                 normalize: Callable[[Tensor], Tensor], storage: str = "device") -> None:
        if capacity < 1:
            raise ValueError(f"window capacity must be >= 1, got {capacity}")
        if storage not in ("device", "host"):
            raise ValueError(f"window storage must be 'device' or 'host', got {storage!r}")
        self.capacity = capacity
        self.device = torch.device(device)
        self.normalize = normalize
        self.storage = storage
        self.batch_size = batch_size
        self._iteration = [-1] * capacity  # global iteration held by each slot (-1: empty)
        self._size = [0] * capacity
        self._use_events = self.device.type == "cuda"
        self._ready: list[torch.cuda.Event | None] = [None] * capacity
        self._free: list[torch.cuda.Event | None] = [None] * capacity
        if storage == "device":
            self.images = torch.empty((capacity, batch_size, *image_shape), dtype=torch.uint8, device=self.device)
            self.labels = torch.empty((capacity, batch_size), dtype=torch.int64, device=self.device)
        else:
            self._host: list[tuple[Tensor, Tensor] | None] = [None] * capacity

    # ---- slots ---------------------------------------------------------------------------------------------------
    def slot(self, iteration: int) -> int:
        return iteration % self.capacity

    def is_free(self, iteration: int) -> bool:
        """Whether the slot that ``iteration`` would use is empty."""
        return self._iteration[self.slot(iteration)] < 0

    def __contains__(self, iteration: int) -> bool:
        return self._iteration[self.slot(iteration)] == iteration

    def __len__(self) -> int:
        return sum(i >= 0 for i in self._iteration)

    @property
    def nbytes(self) -> int:
        """Bytes of the device storage (0 for host storage)."""
        if self.storage != "device":
            return 0
        return self.images.numel() * self.images.element_size() + self.labels.numel() * self.labels.element_size()

    def put(self, iteration: int, images: Tensor, labels: Tensor) -> None:
        """Store the batch of ``iteration`` (uint8 images ``(b, C, H, W)``, labels ``(b,)``, b ≤ batch_size)."""
        slot = self.slot(iteration)
        if self._iteration[slot] >= 0:
            raise RuntimeError(f"window slot {slot} still holds iteration {self._iteration[slot]} (capacity "
                               f"{self.capacity}); it must be released before iteration {iteration} is stored")
        b = images.shape[0]
        if self._use_events and self._free[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self._free[slot])
        if self.storage == "device":
            self.images[slot, :b].copy_(images)
            self.labels[slot, :b].copy_(labels)
        else:  # the official code's blocking device -> host copy
            self._host[slot] = (images.cpu(), labels.cpu())
        if self._use_events:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._ready[slot] = event
        self._iteration[slot] = iteration
        self._size[slot] = b

    def raw(self, iteration: int) -> tuple[Tensor, Tensor]:
        """The stored uint8 images and labels of ``iteration`` on the device (views for device storage)."""
        slot = self._check(iteration)
        self._wait_ready(slot)
        if self.storage == "host":
            images, labels = self._host[slot]
            return images.to(self.device), labels.to(self.device)
        b = self._size[slot]
        return self.images[slot, :b], self.labels[slot, :b]

    def get(self, iteration: int) -> tuple[Tensor, Tensor]:
        """Normalized float inputs and labels of ``iteration`` on the device (the consumer's stream waits for the
        writer)."""
        images, labels = self.raw(iteration)
        return self.normalize(images), labels

    def release(self, iteration: int) -> None:
        """The student is done with ``iteration``: its slot may be reused (after the consumer's stream gets here)."""
        slot = self._check(iteration)
        if self._use_events:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._free[slot] = event
        self._iteration[slot] = -1
        if self.storage == "host":
            self._host[slot] = None

    def pending(self) -> list[int]:
        """Iterations currently held, in order."""
        return sorted(i for i in self._iteration if i >= 0)

    def _check(self, iteration: int) -> int:
        slot = self.slot(iteration)
        if self._iteration[slot] != iteration:
            raise KeyError(f"iteration {iteration} is not in the replay window (slot {slot} holds "
                           f"{self._iteration[slot]})")
        return slot

    def _wait_ready(self, slot: int) -> None:
        if self._use_events and self._ready[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready[slot])

    # ---- checkpointing -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The held uint8 batches and labels, on CPU."""
        entries = []
        for iteration in self.pending():
            slot = self.slot(iteration)
            if self.storage == "device":
                b = self._size[slot]
                entries.append((iteration, self.images[slot, :b].cpu(), self.labels[slot, :b].cpu()))
            else:
                x, y = self._host[slot]
                entries.append((iteration, x, y))
        return {"storage": self.storage, "entries": entries}

    def load_state_dict(self, state: dict) -> None:
        if state["storage"] != self.storage:
            raise ValueError(f"checkpointed window used {state['storage']!r} storage, this run uses "
                             f"{self.storage!r}")
        for iteration, x, y in state["entries"]:
            slot = self.slot(iteration)
            self._iteration[slot] = iteration
            self._size[slot] = x.shape[0]
            if self.storage == "device":
                self.images[slot, :x.shape[0]].copy_(x)
                self.labels[slot, :y.shape[0]].copy_(y)
            else:
                self._host[slot] = (x, y)
