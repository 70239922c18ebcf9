"""The replay window: the teacher's batches, kept until the student has replayed them.

One window for every kind of batch, with one tier policy and pluggable storage:

* **Tiers**, chosen for each batch when it is stored, in order: **device** (kept on the training device while its
  budget allows), **host** (pinned host memory within its budget, copied back asynchronously for the replay) and
  **regenerate** (only the batch's *plan* is kept, and the batch is produced again for the replay; a plan is
  whatever makes the batch again: sample indices + an augmentation seed for the package's sources, 4 bytes a
  sample, or the data iteration for a user Dataset). Producing a batch is a pure function of its plan, so the
  replay is byte-identical whatever the tier. A window without a way to regenerate refuses a batch that fits
  neither budget, saying how to make room.
* **Storage** (:class:`RingStorage`, :class:`CopyStorage`, :class:`BlockingHostStorage`) holds the bytes:
  preallocated uint8 rings for the package's augmented images (a device-tier batch comes back as a view, no copy),
  copies of any tensor structure for user batches, or the official code's blocking host copies (a benchmark
  baseline: ``window_storage="host"``).

Budgets count the bytes a storage reserves for a batch (a ring reserves a whole slot), so the policy reads the same
for both: device first while its budget allows, then host, then regenerate.

With CUDA streams the writer's stream records a *ready* event on each batch (readers wait on it, and the tensors
handed out are recorded on the reader's stream), and a ring slot carries a *free* event recorded at release (the
next writer of the slot waits on it). ``prefetch(i)`` starts bringing a host or regenerate-tier batch to the device
on a side stream, so the student's next step does not wait for it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

TIERS = ("device", "host", "regenerate")


def batch_nbytes(batch) -> int:
    """Bytes of a batch's tensors (any structure)."""
    return sum(x.numel() * x.element_size() for x in pytree.tree_leaves(batch))


@dataclass(frozen=True)
class TierBudget:
    """The tier policy: device bytes first, then pinned host bytes, then regenerate (or refuse, without a way to
    regenerate). ``choose`` is the only place a tier is decided."""

    device: float
    host: float

    def choose(self, size: int, used: dict[str, int]) -> str:
        if used["device"] + size <= self.device:
            return "device"
        if used["host"] + size <= self.host:
            return "host"
        return "regenerate"


# ================================================================================================== storage
class CopyStorage:
    """Copies of batches of any tensor structure (a tensor, or tuple/list/dict of tensors): on the device, or in
    host memory (pinned with CUDA). A copy, so a caller reusing its buffers cannot change what will be replayed.
    Shapes may vary between batches (an epoch's short last batch); the structure (which tensors, their dtypes)
    may not."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._structure: tuple | None = None  # (treespec, dtypes) of the first batch

    def check(self, iteration: int, batch) -> None:
        """Raise, naming the batch, when it is not tensors or its structure differs from the first batch's."""
        leaves, spec = pytree.tree_flatten(batch)
        bad = [type(x).__name__ for x in leaves if not isinstance(x, Tensor)]
        if not leaves or bad:
            raise TypeError(f"a batch must be a tensor or a tuple/list/dict of tensors; iteration {iteration} got "
                            f"{'nothing' if not leaves else ', '.join(sorted(set(bad)))} in {type(batch).__name__}")
        structure = (spec, tuple(x.dtype for x in leaves))
        if self._structure is None:
            self._structure = structure
        elif structure != self._structure:
            raise ValueError(f"batch {iteration} is {_describe(*structure)}; the earlier batches were "
                             f"{_describe(*self._structure)}")

    def reserve(self, batch) -> int:
        return batch_nbytes(batch)

    def store(self, batch, tier: str):
        leaves, spec = pytree.tree_flatten(batch)
        if tier == "device":
            stored = [x.detach().to(self.device, copy=True) for x in leaves]
        else:
            pin = self.device.type == "cuda"  # pinned: asynchronous copies (only with CUDA)
            stored = [torch.empty(x.shape, dtype=x.dtype, pin_memory=pin).copy_(x.detach(), non_blocking=pin)
                      for x in leaves]
        return stored, spec

    def load(self, handle):
        leaves, spec = handle
        return pytree.tree_unflatten([x.to(self.device, non_blocking=True) for x in leaves], spec)

    def free(self, handle, event) -> None:
        pass  # the copies are freed with their last reference; readers recorded their streams on them

    def to_cpu(self, handle):
        leaves, spec = handle
        return pytree.tree_unflatten([x.cpu() for x in leaves], spec)

    def describe(self, window: ReplayWindow) -> str:
        host = f", then pinned host memory within {window.budget.host / 1e9:.2f} GB" if window.budget.host else ""
        return (f"up to {window.capacity} batches as produced, on {self.device} within "
                f"{window.budget.device / 1e9:.2f} GB{host}, then fetched again")


class RingStorage:
    """Preallocated rings of uint8 images ``(b, C, H, W)`` and int64 labels ``(b,)``: ``device_slots`` on the
    device, ``host_slots`` in pinned host memory (a slot holds one batch of up to ``batch_size``). A device-tier
    batch comes back as a view of its slot."""

    def __init__(self, image_shape: tuple[int, ...], batch_size: int, device: torch.device, device_slots: int,
                 host_slots: int) -> None:
        self.image_shape, self.batch_size = tuple(image_shape), batch_size
        self.device = torch.device(device)
        self.slot_bytes = batch_size * (math.prod(self.image_shape) + 8)
        cuda = self.device.type == "cuda"
        self._rings = {
            "device": (torch.empty((device_slots, batch_size, *self.image_shape), dtype=torch.uint8,
                                   device=self.device),
                       torch.empty((device_slots, batch_size), dtype=torch.int64, device=self.device)),
            "host": (torch.empty((host_slots, batch_size, *self.image_shape), dtype=torch.uint8, pin_memory=cuda),
                     torch.empty((host_slots, batch_size), dtype=torch.int64, pin_memory=cuda)),
        }
        self._free_slots = {tier: list(range(len(images)))[::-1] for tier, (images, _) in self._rings.items()}
        self._free_event: dict[tuple[str, int], Any] = {}

    @classmethod
    def for_budget(cls, capacity: int, image_shape, batch_size: int, device, budget: TierBudget) -> RingStorage:
        """Rings sized by the tier policy: as many slots per tier as it would fill with ``capacity`` batches."""
        slot_bytes = batch_size * (math.prod(image_shape) + 8)
        used = {"device": 0, "host": 0}
        for _ in range(capacity):
            tier = budget.choose(slot_bytes, used)
            if tier == "regenerate":
                break
            used[tier] += slot_bytes
        return cls(image_shape, batch_size, device, used["device"] // slot_bytes if slot_bytes else capacity,
                   used["host"] // slot_bytes if slot_bytes else 0)

    def check(self, iteration: int, batch) -> None:
        images, labels = batch
        if images.shape[0] > self.batch_size or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"batch {iteration}: images {tuple(images.shape)} do not fit the window's slots of "
                             f"{self.batch_size} x {self.image_shape}")

    def reserve(self, batch) -> int:
        return self.slot_bytes

    def store(self, batch, tier: str):
        images, labels = batch
        slot = self._free_slots[tier].pop()
        event = self._free_event.pop((tier, slot), None)
        if event is not None:  # the slot's last reader may still be running on its stream
            torch.cuda.current_stream(self.device).wait_event(event)
        ring_images, ring_labels = self._rings[tier]
        b = images.shape[0]
        async_copy = tier == "host" and self.device.type == "cuda"
        ring_images[slot, :b].copy_(images, non_blocking=async_copy)
        ring_labels[slot, :b].copy_(labels, non_blocking=async_copy)
        return tier, slot, b

    def load(self, handle):
        tier, slot, b = handle
        images, labels = self._rings[tier]
        if tier == "device":
            return images[slot, :b], labels[slot, :b]
        return (images[slot, :b].to(self.device, non_blocking=True),
                labels[slot, :b].to(self.device, non_blocking=True))

    def free(self, handle, event) -> None:
        tier, slot, _ = handle
        if event is not None:
            self._free_event[(tier, slot)] = event
        self._free_slots[tier].append(slot)

    def to_cpu(self, handle):
        tier, slot, b = handle
        images, labels = self._rings[tier]
        return images[slot, :b].cpu(), labels[slot, :b].cpu()

    @property
    def slots(self) -> dict[str, int]:
        """Slots per tier: ``{"device": n, "host": m}`` (a window's other batches are regenerated)."""
        return {tier: len(images) for tier, (images, _) in self._rings.items()}

    @property
    def device_nbytes(self) -> int:
        images, labels = self._rings["device"]
        return images.numel() + labels.numel() * 8

    def describe(self, window: ReplayWindow) -> str:
        device, host = self.slots["device"], self.slots["host"]
        parts = [f"{device} on {self.device} ({self.device_nbytes / 1e9:.3f} GB)"]
        if host:
            parts.append(f"{host} in pinned host memory ({self._rings['host'][0].numel() / 1e9:.3f} GB)")
        if window.capacity > device + host:
            parts.append(f"{window.capacity - device - host} regenerated from plans (4 B/sample)")
        return f"{window.capacity} slots: " + ", ".join(parts)


class BlockingHostStorage:
    """The official code's replay buffer, for the benchmark baseline: every batch takes a blocking copy to
    (unpinned) host memory and another one back for the replay, whatever the budgets."""

    fixed_tier = "host"

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)

    def check(self, iteration: int, batch) -> None:
        pass

    def reserve(self, batch) -> int:
        return 0

    def store(self, batch, tier: str):
        leaves, spec = pytree.tree_flatten(batch)
        return [x.cpu() for x in leaves], spec

    def load(self, handle):
        leaves, spec = handle
        return pytree.tree_unflatten([x.to(self.device) for x in leaves], spec)

    def free(self, handle, event) -> None:
        pass

    def to_cpu(self, handle):
        leaves, spec = handle
        return pytree.tree_unflatten(list(leaves), spec)

    def describe(self, window: ReplayWindow) -> str:
        return f"{window.capacity} slots in host memory (official-style blocking copies)"


# =================================================================================================== the window
@dataclass
class _Entry:
    tier: str
    handle: Any  # the storage's handle; None in the regenerate tier
    plan: Any
    size: int = 0  # bytes the storage reserved for it
    ready: Any = None  # CUDA event recorded by the writer


class ReplayWindow:
    """Batches keyed by their (global) iteration, at most ``capacity`` at a time.

    Args:
        storage: a :class:`RingStorage`, :class:`CopyStorage` or :class:`BlockingHostStorage`.
        capacity: batches held at once (a block of N, plus slack when the roles overlap).
        budget: the tier policy's byte budgets.
        regenerate: ``plan -> batch`` on the device, byte-identical to the stored batch; None: a batch beyond both
            budgets is refused.
        plan_to_state / plan_from_state: ``plan -> state`` (plain tensors and ints, for a checkpoint) and
            ``(iteration, state) -> plan``.
    """

    def __init__(self, storage, *, capacity: int, budget: TierBudget, regenerate: Callable | None = None,
                 plan_to_state: Callable = lambda plan: plan,
                 plan_from_state: Callable = lambda iteration, state: state) -> None:
        if capacity < 1:
            raise ValueError(f"window capacity must be >= 1, got {capacity}")
        self.storage, self.capacity, self.budget = storage, capacity, budget
        self.regenerate = regenerate
        self._plan_to_state, self._plan_from_state = plan_to_state, plan_from_state
        self.device = storage.device
        self._cuda = self.device.type == "cuda"
        self._entries: dict[int, _Entry] = {}
        self._used = {"device": 0, "host": 0}  # bytes reserved per tier
        self._prefetched: dict[int, tuple[Any, Any]] = {}
        self._side_stream = torch.cuda.Stream(self.device) if self._cuda else None

    # ---- bookkeeping ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, iteration: int) -> bool:
        return iteration in self._entries

    def is_free(self) -> bool:
        """Whether another batch may be stored now."""
        return len(self._entries) < self.capacity

    def pending(self) -> list[int]:
        """Iterations held, in order."""
        return sorted(self._entries)

    def tier_of(self, iteration: int) -> str:
        return self._entries[iteration].tier

    def nbytes(self, tier: str) -> int:
        """Bytes reserved in ``tier`` ("device" or "host") now."""
        return self._used[tier]

    def describe(self) -> str:
        return self.storage.describe(self)

    # ---- the writer's side -----------------------------------------------------------------------------------------
    def put(self, iteration: int, batch, plan=None) -> str:
        """Store ``batch`` (on the current stream) for ``iteration``; returns the tier it went to."""
        if iteration in self._entries:
            raise RuntimeError(f"iteration {iteration} is already in the replay window")
        if not self.is_free():
            raise RuntimeError(f"the replay window is full ({self.capacity} batches); iteration {iteration} must wait "
                               f"until one is released")
        self.storage.check(iteration, batch)
        size = self.storage.reserve(batch)
        tier = getattr(self.storage, "fixed_tier", None) or self.budget.choose(size, self._used)
        if tier == "regenerate":
            if self.regenerate is None or plan is None:
                raise RuntimeError(
                    f"the replay window is full: batch {iteration} ({size / 1e6:.1f} MB) fits neither the device "
                    f"budget ({self._used['device'] / 1e9:.2f} of {self.budget.device / 1e9:.2f} GB used) nor the "
                    f"host budget ({self._used['host'] / 1e9:.2f} of {self.budget.host / 1e9:.2f} GB); raise "
                    f"window_budget or host_budget")
            entry = _Entry("regenerate", None, plan)
        else:
            entry = _Entry(tier, self.storage.store(batch, tier), plan, size)
            self._used[tier] += size
        if self._cuda:
            entry.ready = torch.cuda.Event()
            entry.ready.record(torch.cuda.current_stream(self.device))
        self._entries[iteration] = entry
        return tier

    # ---- the reader's side -----------------------------------------------------------------------------------------
    def prefetch(self, iteration: int) -> None:
        """Start bringing a host-tier or regenerate-tier batch to the device on a side stream (no-op otherwise)."""
        entry = self._entries.get(iteration)
        if entry is None or entry.tier == "device" or iteration in self._prefetched:
            return
        consumer = torch.cuda.current_stream(self.device) if self._cuda else None
        with torch.cuda.stream(self._side_stream) if self._cuda else contextlib.nullcontext():
            if self._cuda:
                self._side_stream.wait_stream(consumer)
                self._side_stream.wait_event(entry.ready)
            batch = self._produce(entry)
            event = None
            if self._cuda:
                event = torch.cuda.Event()
                event.record(self._side_stream)
        self._prefetched[iteration] = (batch, event)

    def get(self, iteration: int):
        """The stored batch of ``iteration`` on the device; the current stream waits for its writer."""
        entry = self._entry(iteration)
        if iteration in self._prefetched:
            batch, event = self._prefetched.pop(iteration)
        else:
            if entry.ready is not None:
                torch.cuda.current_stream(self.device).wait_event(entry.ready)
            batch, event = self._produce(entry), None
        if self._cuda:
            stream = torch.cuda.current_stream(self.device)
            if event is not None:
                stream.wait_event(event)
            for t in pytree.tree_leaves(batch):
                t.record_stream(stream)  # written on another stream, read on this one: freed after both
        return batch

    def release(self, iteration: int) -> None:
        """The reader is done with ``iteration``: its storage may be reused once the current stream gets here."""
        entry = self._entry(iteration)
        del self._entries[iteration]
        self._prefetched.pop(iteration, None)
        if entry.tier != "regenerate":
            event = None
            if self._cuda:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.device))
            self.storage.free(entry.handle, event)
            self._used[entry.tier] -= entry.size

    def _produce(self, entry: _Entry):
        return self.regenerate(entry.plan) if entry.tier == "regenerate" else self.storage.load(entry.handle)

    def _entry(self, iteration: int) -> _Entry:
        entry = self._entries.get(iteration)
        if entry is None:
            raise KeyError(f"iteration {iteration} is not in the replay window (it holds {self.pending()})")
        return entry

    # ---- checkpointing ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The held batches as CPU tensors (None in the regenerate tier) with their plans, as plain containers (a
        checkpoint loads with ``weights_only=True``)."""
        if self._cuda:
            torch.cuda.synchronize(self.device)  # host-tier copies are asynchronous
        entries, spec = [], None
        for iteration in self.pending():
            entry = self._entries[iteration]
            leaves = None
            if entry.tier != "regenerate":
                leaves, batch_spec = pytree.tree_flatten(self.storage.to_cpu(entry.handle))
                spec = spec or pytree.treespec_dumps(batch_spec)
            plan = self._plan_to_state(entry.plan) if entry.plan is not None else None
            entries.append((iteration, leaves, plan))
        return {"entries": entries, "spec": spec}

    def load_state_dict(self, state: dict) -> None:
        """Put the saved batches back (each in the tier this window's budgets choose now). Also reads the layouts
        of earlier versions: the uint8 ring's ``{"storage", "entries": [(i, images, labels, plan)]}`` and the user
        window's ``{"window": {"entries", "spec"}, "regenerate": [iterations]}``."""
        for iteration, batch, plan in _saved_entries(state):
            plan = self._plan_from_state(iteration, plan) if plan is not None else None
            if batch is None:  # saved from the regenerate tier: put() keeps the plan only, or the pixels if they fit
                if self.regenerate is None or plan is None:
                    raise ValueError(f"the saved window holds batch {iteration} as a plan only, and this window "
                                     f"cannot regenerate batches")
                batch = self.regenerate(plan)
            batch = pytree.tree_map(lambda t: t.to(self.device) if isinstance(t, Tensor) else t, batch)
            self.put(iteration, batch, plan)


def _saved_entries(state: dict):
    """``(iteration, batch or None, plan state or None)`` of a window state_dict, whatever its version."""
    if "storage" in state:  # the uint8 ring of format-2 checkpoints
        for iteration, images, labels, plan in state["entries"]:
            yield iteration, (None if images is None else (images, labels)), plan
        return
    if "regenerate" in state:  # the user window of format-2 checkpoints
        inner = state["window"]
        spec = pytree.treespec_loads(inner["spec"]) if inner["spec"] is not None else None
        for iteration, leaves in inner["entries"]:
            yield iteration, pytree.tree_unflatten(leaves, spec), iteration
        for iteration in state["regenerate"]:
            yield iteration, None, iteration
        return
    spec = pytree.treespec_loads(state["spec"]) if state["spec"] is not None else None
    for iteration, leaves, plan in state["entries"]:
        yield iteration, (None if leaves is None else pytree.tree_unflatten(leaves, spec)), plan


class _Shown(str):
    def __repr__(self) -> str:
        return str(self)


def _describe(spec, dtypes) -> str:
    """A batch structure with its dtypes, e.g. ``(float32, int64)`` or ``{'image': float32, 'label': int64}``."""
    return repr(pytree.tree_unflatten([_Shown(str(d).removeprefix("torch.")) for d in dtypes], spec))
