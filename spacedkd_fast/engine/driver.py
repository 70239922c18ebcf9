"""The block driver: the spacing schedule walked by two cursors, the one piece of Spaced KD's bookkeeping.

Both ways of running Spaced KD use it: :class:`~spacedkd_fast.engine.trainer.Trainer` (which interleaves the
teacher's fresh steps with the student's replays, on one or two CUDA streams) and
:class:`~spacedkd_fast.engine.replay.SpacedReplay` (your own loop). The driver owns

* the **fresh cursor**: the next teacher iteration; :meth:`keep` stores its batch in the replay window when its
  block is replayed, and :meth:`finish_fresh` snapshots the teacher when the batch ends such a block;
* the **replay cursor**: the next block the student replays and its position in it; :meth:`next_replay` hands out
  the next replayed batch with the teacher it distils from, :meth:`finish_replay` releases it;
* the window and the teacher snapshots, and one ``state_dict`` holding all of it (the resume format of both APIs).

**s = 0 (online KD) means the same in both APIs:** the student steps on the same batch right after the teacher,
distilling from the teacher's outputs of that batch computed *before* the teacher's update (the outputs of the
teacher's own training forward pass: the official code's s = 0 baseline, and free, since no second teacher forward
is needed). Those outputs are handed to :meth:`finish_fresh` and come back, wrapped as a
:class:`RecordedTeacher`, with the batch. For s > 0 the student distils from a frozen snapshot of the teacher taken
after the block's last update. Which blocks the student replays is the caller's rule (``replays``): self KD's s = 0
iteration is one BYOT step on the fresh batch, with nothing replayed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from spacedkd_fast.data.window import ReplayWindow
from spacedkd_fast.schedule import Block, SpacingSchedule


class RecordedTeacher:
    """The teacher's pre-update outputs of one batch, answering like the teacher would on that batch: an s = 0
    student calls it like a snapshot (``teacher(x)``), whatever ``x`` is, and gets those outputs back. A plain
    callable, not a module: one is made every s = 0 iteration (an ``nn.Module``'s set-up costs ~8 µs)."""

    __slots__ = ("outputs",)

    def __init__(self, outputs: Any) -> None:
        self.outputs = outputs

    def __call__(self, *args, **kwargs):
        return self.outputs


class Replay(NamedTuple):
    """One batch for the student: its data iteration, its block, the stored batch and the teacher to distil from
    (a block-end snapshot, a :class:`RecordedTeacher` at s = 0, or None where the caller has no teacher)."""

    iteration: int
    block: Block
    stored: Any
    teacher: nn.Module | RecordedTeacher | None


class BlockDriver:
    """Spaced KD's schedule position, replay window and teacher snapshots.

    Args:
        schedule: the blocks.
        window: where kept batches live (None: nothing is ever kept, e.g. a mode without replay).
        snapshots: a :class:`~spacedkd_fast.engine.roles.SnapshotPool`, or None when replays need no teacher
            snapshot (self KD replays against the live network).
        replays: ``block -> bool``, whether the student replays the block (default: the schedule's own flag,
            False for a dropped tail).
        device: where snapshots live (their CUDA events).
        load: ``stored -> batch``, what a replayed batch is handed out as (default: as stored).
    """

    def __init__(self, schedule: SpacingSchedule, window: ReplayWindow | None, snapshots=None, *,
                 replays: Callable[[Block], bool] = lambda block: block.replay,
                 device: torch.device | str = "cpu", load: Callable = lambda stored: stored) -> None:
        self.schedule, self.window, self.snapshots = schedule, window, snapshots
        self.replays, self.load = replays, load
        self.device = torch.device(device)
        self.fresh = 0  # the next fresh (teacher) iteration
        self.replay_block = self._next_replayed(0)  # index of the next block the student replays
        self.replay_offset = 0  # the student's position in it
        # s = 0: iteration -> (its batch, the teacher's recorded outputs, the CUDA event after they were written)
        self.recorded: dict[int, tuple[Any, RecordedTeacher, Any]] = {}

    # ---- the schedule ----------------------------------------------------------------------------------------------
    @property
    def fresh_done(self) -> bool:
        return self.fresh >= self.schedule.total_iterations

    @property
    def replays_done(self) -> bool:
        return self.replay_block >= len(self.schedule.blocks)

    @property
    def done(self) -> bool:
        return self.fresh_done and self.replays_done

    def _next_replayed(self, index: int) -> int:
        blocks = self.schedule.blocks
        while index < len(blocks) and not self.replays(blocks[index]):
            index += 1
        return index

    def fresh_block(self) -> Block:
        """The block of the next fresh iteration."""
        return self.schedule.block_at(self.fresh)

    def keeps(self, block: Block) -> bool:
        """Whether the fresh batches of ``block`` go into the window (a spaced block the student replays)."""
        return not block.online and self.replays(block)

    # ---- the fresh side ------------------------------------------------------------------------------------------
    def fresh_ready(self) -> bool:
        """Whether the next fresh step may run now: the s = 0 student has consumed the previous batch, the window has
        room for this one, and at a block end a snapshot buffer is free."""
        if self.fresh_done:
            return False
        if self.recorded:
            return False
        block = self.fresh_block()
        if not self.keeps(block):
            return True
        if not self.window.is_free():
            return False
        at_end = self.fresh == block.stop - 1
        return not (at_end and self.snapshots is not None and not self.snapshots.available())

    def keep(self, stored, plan=None) -> None:
        """Before the teacher's step on the next fresh batch: store it when its block is replayed."""
        if self.keeps(self.fresh_block()):
            self.window.put(self.fresh, stored, plan)

    def finish_fresh(self, teacher: nn.Module | None = None, outputs: Any = None, batch: Any = None) -> Block:
        """After the teacher's step on the fresh batch: at the end of a replayed block, snapshot ``teacher``; in an
        s = 0 block the student replays, record ``batch`` and the teacher's pre-update ``outputs`` of it for the
        student (on CUDA with an event: the student may read them on another stream). Returns the batch's block."""
        i, block = self.fresh, self.fresh_block()
        if block.online and self.replays(block):
            if outputs is None:
                raise ValueError(f"iteration {i} is an s = 0 (online KD) iteration: its student distils from the "
                                 f"teacher's outputs of this batch before the teacher's update; pass them "
                                 f"(teacher_outputs=)")
            event = None
            if self.device.type == "cuda":
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.device))
            self.recorded[i] = (batch, RecordedTeacher(detach_outputs(outputs)), event)
        elif self.keeps(block) and i == block.stop - 1 and self.snapshots is not None:
            if teacher is None:
                raise ValueError(f"iteration {i} ends a block: the teacher is needed for its snapshot")
            self.snapshots.take(block.index, teacher, self.device)
        self.fresh += 1
        return block

    # ---- the replay side -----------------------------------------------------------------------------------------
    def replay_ready(self) -> bool:
        """Whether the student's next replay has its batch and its teacher."""
        if self.replays_done:
            return False
        block = self.schedule.blocks[self.replay_block]
        if block.online:
            return block.start in self.recorded
        return self.fresh >= block.stop

    def next_replay(self) -> Replay:
        """The student's next batch (call when :meth:`replay_ready`); the current stream waits for its writer."""
        block = self.schedule.blocks[self.replay_block]
        i = block.start + self.replay_offset
        if block.online:
            batch, teacher, event = self.recorded[i]
            if event is not None:  # written on the teacher's stream: wait for it, and keep it alive for this one
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(event)
                for t in torch.utils._pytree.tree_leaves((batch, teacher.outputs)):
                    if isinstance(t, Tensor):
                        t.record_stream(stream)
            return Replay(i, block, batch, teacher)
        teacher = self.snapshots.get(block.index, self.device) if self.snapshots is not None else None
        return Replay(i, block, self.load(self.window.get(i)), teacher)

    def prefetch_next(self) -> None:
        """Start bringing the batch after the current replay to the device (host and regenerate tiers)."""
        block = self.schedule.blocks[self.replay_block]
        nxt = block.start + self.replay_offset + 1
        if nxt >= block.stop:
            following = self._next_replayed(self.replay_block + 1)
            if following >= len(self.schedule.blocks):
                return
            nxt = self.schedule.blocks[following].start
        if self.window is not None and nxt in self.window:
            self.window.prefetch(nxt)

    def finish_replay(self) -> Block | None:
        """The student's step on the current replay is done: release it. Returns its block when that block is now
        fully replayed (the snapshot released too), else None."""
        block = self.schedule.blocks[self.replay_block]
        i = block.start + self.replay_offset
        if block.online:
            self.recorded.pop(i)
        else:
            self.window.release(i)
        self.replay_offset += 1
        if self.replay_offset < block.length:
            return None
        if not block.online and self.snapshots is not None:
            self.snapshots.release(block.index, self.device)
        self.replay_block, self.replay_offset = self._next_replayed(self.replay_block + 1), 0
        return block

    def flush(self, teacher: nn.Module) -> list[Replay]:
        """The batches of the open block (a loop that stops before its end), against a snapshot of ``teacher`` as it
        stands now; the caller hands each to :meth:`release_flushed` after the student's step."""
        pending = self.window.pending() if self.window is not None else []
        if not pending:
            return []
        snapshot = self.snapshots.take(-1, teacher, self.device) if self.snapshots is not None else teacher
        block = self.schedule.block_at(pending[0])
        return [Replay(i, block, self.load(self.window.get(i)), snapshot) for i in pending]

    def release_flushed(self, replay: Replay, last: bool) -> None:
        self.window.release(replay.iteration)
        if last and self.snapshots is not None:
            self.snapshots.release(-1, self.device)

    # ---- checkpointing ---------------------------------------------------------------------------------------------
    def position(self) -> dict:
        """Where both cursors stand (plain ints; the checkpoint's ``position``)."""
        return {"t_iter": self.fresh, "s_block": self.replay_block, "s_offset": self.replay_offset}

    def state_dict(self) -> dict:
        """Everything to continue identically: the position, the snapshots of blocks still being replayed, and the
        window (under DDP the window is this rank's own; a trainer stores it with the rank's state). Take it
        between whole iterations: an s = 0 batch whose student step is still due is not saved."""
        if self.recorded:
            raise RuntimeError("BlockDriver.state_dict: an s = 0 student step is still due (take state between whole "
                               "iterations)")
        return {"position": self.position(),
                "snapshots": self.snapshots.state_dict() if self.snapshots is not None else {},
                "window": self.window.state_dict() if self.window is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        position = state["position"]
        self.fresh, self.replay_block, self.replay_offset = (position["t_iter"], position["s_block"],
                                                             position["s_offset"])
        if self.snapshots is not None:
            self.snapshots.load_state_dict(state.get("snapshots") or {}, self.device)
        if self.window is not None and state.get("window") is not None:
            self.window.load_state_dict(state["window"])


def detach_outputs(outputs):
    """The teacher's outputs as the s = 0 student may keep them: every tensor detached."""
    if type(outputs) is tuple and all(t is None or type(t) is Tensor for t in outputs):  # (logits, features)
        return tuple(None if t is None else t.detach() for t in outputs)
    return torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, outputs)
