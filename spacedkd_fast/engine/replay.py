"""Spaced KD in your own training loop: :class:`SpacedReplay`.

You keep your loop, models, optimizers and data; the object keeps the spacing schedule, the replay window and the
teacher snapshots::

    replay = SpacedReplay(teacher, space=1.5, iters_per_epoch=len(loader), epochs=epochs)
    for epoch in range(epochs):
        for batch in loader:
            ...                                           # your teacher step on `batch`
            for replayed, snapshot in replay.step(batch):  # the replays due now: zero, one, or a whole block
                ...                                       # your student step on `replayed`, targets from `snapshot`

``step`` stores the fresh batch (any tensor, or tuple/list/dict of tensors) on the device, and when the batch ends
a block of N = floor(s · iters_per_epoch) batches it snapshots the teacher (frozen) and hands back every batch of
that block, byte-identical and in the teacher's order, each with the snapshot. Blocks span epoch boundaries. With
``s = 0`` each batch comes straight back with the live teacher (ordinary online KD). The final partial block is
replayed at the end of the schedule (``replay_tail=False`` drops it, as the official code does); ``flush()``
replays what is pending when a loop stops early. ``state_dict()`` goes into your checkpoint between steps.

The window keeps batches on the device while ``window_budget`` bytes allow and spills the rest to pinned host
memory (copied back when replayed); the schedule is :class:`~spacedkd_fast.schedule.SpacingSchedule`, the
snapshots :class:`~spacedkd_fast.engine.roles.SnapshotPool`: the same parts the engine uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from spacedkd_fast.engine.roles import SnapshotPool, unwrap
from spacedkd_fast.engine.runtime import default_window_budgets
from spacedkd_fast.schedule import SpacingSchedule

Batch = Any  # a tensor, or a (nested) tuple / list / dict of tensors


class BatchWindow:
    """Batches of any tensor structure, keyed by iteration: on ``device`` within ``device_budget`` bytes, beyond
    that in (pinned, with CUDA) host memory within ``host_budget`` bytes.

    Stored batches are copies, so a caller that reuses its buffers cannot change what will be replayed. Batch
    shapes may vary (an epoch's short last batch); the structure (which tensors, their dtypes) may not.
    """

    def __init__(self, device: torch.device, device_budget: float, host_budget: float) -> None:
        self.device = torch.device(device)
        self.device_budget, self.host_budget = float(device_budget), float(host_budget)
        self._entries: dict[int, tuple[str, list[Tensor], Any]] = {}  # iteration -> (tier, leaves, treespec)
        self._bytes = {"device": 0, "host": 0}
        self._structure: tuple | None = None  # (treespec, dtypes) of the first batch

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, iteration: int) -> bool:
        return iteration in self._entries

    def pending(self) -> list[int]:
        return sorted(self._entries)

    def nbytes(self, tier: str) -> int:
        return self._bytes[tier]

    def tier_for(self, size: int) -> str | None:
        """The tier a batch of ``size`` bytes would go to now: "device", "host", or None (it fits neither)."""
        if self._bytes["device"] + size <= self.device_budget:
            return "device"
        if self._bytes["host"] + size <= self.host_budget:
            return "host"
        return None

    def put(self, iteration: int, batch: Batch) -> str:
        """Store a copy of ``batch``; returns the tier it went to."""
        if iteration in self._entries:
            raise RuntimeError(f"iteration {iteration} is already in the replay window")
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
        size = batch_nbytes(leaves)
        cuda = self.device.type == "cuda"
        tier = self.tier_for(size)
        if tier == "device":
            stored = [x.detach().to(self.device, copy=True) for x in leaves]
        elif tier == "host":
            stored = []
            for x in leaves:
                host = torch.empty(x.shape, dtype=x.dtype, pin_memory=cuda)  # pinned: asynchronous copies
                stored.append(host.copy_(x.detach(), non_blocking=cuda))
        else:
            raise RuntimeError(f"the replay window is full: batch {iteration} ({size / 1e6:.1f} MB) fits neither the "
                               f"device budget ({self._bytes['device'] / 1e9:.2f} of {self.device_budget / 1e9:.2f} "
                               f"GB used) nor the host budget ({self._bytes['host'] / 1e9:.2f} of "
                               f"{self.host_budget / 1e9:.2f} GB); raise window_budget or host_budget")
        self._entries[iteration] = (tier, stored, spec)
        self._bytes[tier] += size
        return tier

    def get(self, iteration: int) -> Batch:
        """The stored batch on the device (host-tier batches are copied back asynchronously)."""
        tier, leaves, spec = self._entries[iteration]
        if tier == "host":
            leaves = [x.to(self.device, non_blocking=True) for x in leaves]
        return pytree.tree_unflatten(leaves, spec)

    def release(self, iteration: int) -> None:
        tier, leaves, _ = self._entries.pop(iteration)
        self._bytes[tier] -= batch_nbytes(leaves)

    def state_dict(self) -> dict:
        """The held batches as CPU tensors (plain containers: loads with ``weights_only=True``)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the host tier is written by asynchronous copies
        return {"entries": [(i, [x.cpu() for x in self._entries[i][1]]) for i in self.pending()],
                "spec": pytree.treespec_dumps(self._structure[0]) if self._structure is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if state["spec"] is None:
            return
        spec = pytree.treespec_loads(state["spec"])
        for iteration, leaves in state["entries"]:
            self.put(iteration, pytree.tree_unflatten(leaves, spec))


def batch_nbytes(batch: Batch) -> int:
    """Bytes of a batch's tensors."""
    return sum(x.numel() * x.element_size() for x in pytree.tree_leaves(batch))


class _Shown(str):
    def __repr__(self) -> str:
        return str(self)


def _describe(spec, dtypes) -> str:
    """A batch structure with its dtypes, e.g. ``(float32, int64)`` or ``{'image': float32, 'label': int64}``."""
    return repr(pytree.tree_unflatten([_Shown(str(d).removeprefix("torch.")) for d in dtypes], spec))


class SpacedReplay:
    """The spacing schedule, replay window and teacher snapshots of Spaced KD, for a loop of your own.

    Args:
        teacher: the teacher module your loop trains (DDP / torch.compile wrappers are looked through). It is
            snapshotted at each block end, so it must not change while its block is replayed.
        space: s in epochs (≥ 0); 0 is ordinary online KD.
        iters_per_epoch: fresh batches per epoch (``len(loader)``).
        epochs: epochs of the run (the schedule's end and its final partial block).
        start_epoch: spacing starts here; earlier epochs run online KD.
        replay_tail: replay the final partial block (False: drop it, as the official code).
        teacher_bn: "train" (batch statistics, as the official code) or "eval": the snapshot's BatchNorm mode.
        device: where the window keeps batches (default: the teacher's device).
        window_budget / host_budget: bytes of device / pinned host memory for the window (default: 25 % of free
            device memory, and with CUDA 25 % of available host memory).

    ``step(batch)`` returns an iterator of ``(batch, teacher_or_snapshot)`` to consume before the next step.
    """

    def __init__(self, teacher: nn.Module, *, space: float, iters_per_epoch: int, epochs: int,
                 start_epoch: int = 0, replay_tail: bool = True, teacher_bn: str = "train",
                 device: torch.device | str | None = None, window_budget: float | None = None,
                 host_budget: float | None = None) -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"SpacedReplay: teacher must be an nn.Module, got {type(teacher).__name__}")
        if teacher_bn not in ("train", "eval"):
            raise ValueError(f"SpacedReplay: teacher_bn must be 'train' or 'eval', got {teacher_bn!r}")
        self.teacher = teacher
        self.schedule = SpacingSchedule(space, iters_per_epoch, epochs, start_epoch=start_epoch,
                                        replay_tail=replay_tail)
        if device is None:
            first = next(unwrap(teacher).parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        default_device, default_host = default_window_budgets(self.device)
        for name, value in (("window_budget", window_budget), ("host_budget", host_budget)):
            if value is not None and not value >= 0:
                raise ValueError(f"SpacedReplay: {name} must be >= 0 bytes, got {value!r}")
        self.window = BatchWindow(self.device, default_device if window_budget is None else window_budget,
                                  default_host if host_budget is None else host_budget)
        self._snapshots = SnapshotPool(teacher, 1, teacher_bn)
        self.iteration = 0  # fresh batches seen so far
        self._open: Iterator | None = None  # replays handed out and not yet consumed

    @property
    def block_length(self) -> int:
        """N, the batches of a (full) block; 0 for online KD."""
        return self.schedule.block_length

    def step(self, batch: Batch) -> Iterator[tuple[Batch, nn.Module]]:
        """Record the teacher's fresh ``batch`` (call it after the teacher's step on it) and return the replays due
        now: ``(batch, teacher)`` for an online (s = 0) iteration, every batch of the block this batch completes
        with that block's snapshot, or nothing."""
        self._check_consumed("step()")
        total = self.schedule.total_iterations
        if self.iteration >= total:
            raise RuntimeError(f"SpacedReplay.step: the schedule has {total} iterations "
                               f"({self.schedule.epochs} epochs × {self.schedule.iters_per_epoch}); this is batch "
                               f"{self.iteration + 1} (is iters_per_epoch right?)")
        i, block = self.iteration, self.schedule.block_at(self.iteration)
        if block.online:
            self.iteration += 1
            return self._hand_out(iter([(batch, self.teacher)]))
        if block.replay:
            self.window.put(i, batch)  # a bad batch raises here, before anything changed
        self.iteration += 1
        if i == block.stop - 1 and block.replay:  # the teacher as it stands now is this block's teacher
            snapshot = self._snapshots.take(block.index, self.teacher, self.device)
            return self._hand_out(self._replay(range(block.start, block.stop), block.index, snapshot))
        return iter(())

    def flush(self) -> Iterator[tuple[Batch, nn.Module]]:
        """Replay the batches of the open block now, against the teacher as it stands (for a loop that stops
        before the schedule's end; at the end there is nothing left)."""
        self._check_consumed("flush()")
        pending = self.window.pending()
        if not pending:
            return iter(())
        snapshot = self._snapshots.take(-1, self.teacher, self.device)
        return self._hand_out(self._replay(pending, -1, snapshot))

    def _replay(self, iterations, block_index: int, snapshot: nn.Module) -> Iterator[tuple[Batch, nn.Module]]:
        try:
            for i in iterations:
                yield self.window.get(i), snapshot
                self.window.release(i)
        finally:
            self._snapshots.release(block_index, self.device)

    def _hand_out(self, replays: Iterator) -> Iterator:
        def tracked():
            yield from replays
            self._open = None

        self._open = tracked()
        return self._open

    def _check_consumed(self, what: str) -> None:
        if self._open is not None:
            raise RuntimeError(f"SpacedReplay.{what}: the replays returned by the previous step() were not all "
                               f"consumed; iterate over them (the student's steps) before the next step()")

    # ---- checkpointing -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Position and the batches of the open block (CPU tensors). Call it between steps."""
        self._check_consumed("state_dict()")
        return {"iteration": self.iteration, "window": self.window.state_dict(),
                "schedule": {"space": self.schedule.space, "iters_per_epoch": self.schedule.iters_per_epoch,
                             "epochs": self.schedule.epochs, "start_epoch": self.schedule.start_epoch,
                             "replay_tail": self.schedule.replay_tail}}

    def load_state_dict(self, state: dict) -> None:
        saved = state["schedule"]
        mine = self.state_dict()["schedule"]
        if saved != mine:
            differ = ", ".join(f"{k}: saved {saved[k]!r}, here {mine[k]!r}" for k in mine if saved.get(k) != mine[k])
            raise ValueError(f"SpacedReplay.load_state_dict: the saved schedule differs ({differ})")
        if len(self.window):
            raise RuntimeError("SpacedReplay.load_state_dict: load into a fresh SpacedReplay (this one holds batches)")
        self.iteration = state["iteration"]
        self.window.load_state_dict(state["window"])
