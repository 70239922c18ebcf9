"""Spaced KD in your own training loop: :class:`SpacedReplay`.

You keep your loop, models, optimizers and data; the object keeps the spacing schedule, the replay window and the
teacher snapshots::

    replay = SpacedReplay(teacher, space=1.5, iters_per_epoch=len(loader), epochs=epochs)
    for epoch in range(epochs):
        for batch in loader:
            logits = ...                                  # your teacher step on `batch`
            for replayed, teacher in replay.step(batch, teacher_outputs=logits):   # zero, one, or a whole block
                ...                                       # your student step on `replayed`, targets teacher(x)

``step`` stores the fresh batch (any tensor, or tuple/list/dict of tensors) on the device, and when the batch ends
a block of N = floor(s · iters_per_epoch) batches it snapshots the teacher (frozen) and hands back every batch of
that block, byte-identical and in the teacher's order, each with the snapshot. Blocks span epoch boundaries. With
``s = 0`` (and in the epochs before ``start_epoch``) each batch comes straight back with the teacher's outputs of
that batch from *before* its update (``teacher_outputs=``, the engine's and the official code's s = 0), answering
``teacher(x)`` like a snapshot would. The final partial block is replayed at the end of the schedule
(``replay_tail=False`` drops it, as the official code does); ``flush()`` replays what is pending when a loop stops
early. ``state_dict()`` goes into your checkpoint between steps.

The schedule, the window and the snapshots are the engine's own (:class:`~spacedkd_fast.engine.driver.BlockDriver`,
:class:`~spacedkd_fast.data.window.ReplayWindow`, :class:`~spacedkd_fast.engine.roles.SnapshotPool`): the window
keeps batches on the device while ``window_budget`` bytes allow and spills the rest to pinned host memory (copied
back when replayed).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from spacedkd_fast.data.window import CopyStorage, ReplayWindow, TierBudget
from spacedkd_fast.engine.driver import BlockDriver
from spacedkd_fast.engine.roles import SnapshotPool, unwrap
from spacedkd_fast.engine.runtime import default_window_budgets
from spacedkd_fast.schedule import SpacingSchedule

Batch = Any  # a tensor, or a (nested) tuple / list / dict of tensors


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

    ``step(batch, teacher_outputs=...)`` returns an iterator of ``(batch, teacher)`` to consume before the next step.
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
        schedule = SpacingSchedule(space, iters_per_epoch, epochs, start_epoch=start_epoch, replay_tail=replay_tail)
        if device is None:
            first = next(unwrap(teacher).parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        default_device, default_host = default_window_budgets(self.device)
        for name, value in (("window_budget", window_budget), ("host_budget", host_budget)):
            if value is not None and not value >= 0:
                raise ValueError(f"SpacedReplay: {name} must be >= 0 bytes, got {value!r}")
        budget = TierBudget(default_device if window_budget is None else window_budget,
                            default_host if host_budget is None else host_budget)
        # The whole open block is held at once: its replays are handed out only when it is complete.
        window = ReplayWindow(CopyStorage(self.device), capacity=max(schedule.block_length, 1), budget=budget)
        self.driver = BlockDriver(schedule, window, SnapshotPool(teacher, 1, teacher_bn), device=self.device)
        self._open: Iterator | None = None  # replays handed out and not yet consumed

    @property
    def schedule(self) -> SpacingSchedule:
        return self.driver.schedule

    @property
    def window(self) -> ReplayWindow:
        return self.driver.window

    @property
    def iteration(self) -> int:
        """Fresh batches seen so far."""
        return self.driver.fresh

    @property
    def block_length(self) -> int:
        """N, the batches of a (full) block; 0 for online KD."""
        return self.schedule.block_length

    def step(self, batch: Batch, teacher_outputs: Any = None) -> Iterator[tuple[Batch, nn.Module]]:
        """Record the teacher's fresh ``batch`` (call it after the teacher's step on it) and return the replays due
        now: ``(batch, teacher)`` for an s = 0 iteration (``teacher`` answers with ``teacher_outputs``, the
        teacher's outputs of this batch before its update: required there), every batch of the block this batch
        completes with that block's snapshot, or nothing."""
        self._check_consumed("step()")
        driver, total = self.driver, self.schedule.total_iterations
        if driver.fresh_done:
            raise RuntimeError(f"SpacedReplay.step: the schedule has {total} iterations ({self.schedule.epochs} "
                               f"epochs × {self.schedule.iters_per_epoch}); this is batch {driver.fresh + 1} (is "
                               f"iters_per_epoch right?)")
        block = driver.fresh_block()
        if block.online and teacher_outputs is None:
            raise ValueError(f"SpacedReplay.step: batch {driver.fresh} is an s = 0 (online KD) iteration: its student "
                             f"distils from the teacher's outputs of this batch before the teacher's update; pass "
                             f"them: step(batch, teacher_outputs=teacher_logits)")
        driver.keep(batch)  # a bad batch raises here, before anything changed
        driver.finish_fresh(self.teacher, teacher_outputs, batch)
        return self._hand_out(self._replays())

    def _replays(self):
        while self.driver.replay_ready():
            replay = self.driver.next_replay()
            yield replay.stored, replay.teacher
            self.driver.finish_replay()

    def flush(self) -> Iterator[tuple[Batch, nn.Module]]:
        """Replay the batches of the open block now, against the teacher as it stands (for a loop that stops
        before the schedule's end; at the end there is nothing left)."""
        self._check_consumed("flush()")
        replays = self.driver.flush(self.teacher)

        def flushed():
            for k, replay in enumerate(replays):
                yield replay.stored, replay.teacher
                self.driver.release_flushed(replay, last=k == len(replays) - 1)

        return self._hand_out(flushed())

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
        """The block driver's state (position, the batches of the open block as CPU tensors) and the schedule it
        belongs to. Call it between steps."""
        self._check_consumed("state_dict()")
        s = self.schedule
        return {**self.driver.state_dict(),
                "schedule": {"space": s.space, "iters_per_epoch": s.iters_per_epoch, "epochs": s.epochs,
                             "start_epoch": s.start_epoch, "replay_tail": s.replay_tail}}

    def load_state_dict(self, state: dict) -> None:
        saved = state["schedule"]
        mine = self.state_dict()["schedule"]
        if saved != mine:
            differ = ", ".join(f"{k}: saved {saved[k]!r}, here {mine[k]!r}" for k in mine if saved.get(k) != mine[k])
            raise ValueError(f"SpacedReplay.load_state_dict: the saved schedule differs ({differ})")
        if len(self.window):
            raise RuntimeError("SpacedReplay.load_state_dict: load into a fresh SpacedReplay (this one holds batches)")
        if "iteration" in state:  # the layout before the block driver: the position was the fresh count
            iteration, blocks = state["iteration"], self.schedule.blocks
            nxt = next((b.index for b in blocks if b.replay and b.stop > iteration), len(blocks))
            state = {"position": {"t_iter": iteration, "s_block": nxt, "s_offset": 0},
                     "window": {"entries": [(i, leaves, None) for i, leaves in state["window"]["entries"]],
                                "spec": state["window"]["spec"]}}
        self.driver.load_state_dict(state)
