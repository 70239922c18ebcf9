"""The spacing schedule, as data.

Spaced KD trains the teacher in blocks of ``N = floor(s · iters_per_epoch)`` fresh batches; after each block the
student replays exactly those batches, in the teacher's order, distilling from the teacher as it stands at the
block's end. This module turns ``(s, iters_per_epoch, epochs, ...)`` into the list of blocks and the evaluation
points; the engine walks that list. Everything here is pure Python and CPU-testable.

Phases, in order:
  1. Online KD (``s = 0``, and every epoch before ``start_epoch``): blocks of one batch, marked ``online``. The
     student steps on the same batch right after the teacher, from the teacher logits of that batch's forward pass,
     taken *before* the teacher's update (the official code's s = 0 baseline).
  2. Spaced KD: blocks of N batches from iteration ``start_epoch · iters_per_epoch`` on. Blocks may span epoch
     boundaries (the global iteration counter never resets).
  3. The final partial block (fewer than N batches) is replayed by default; ``replay_tail=False`` drops it, as the
     official code does (its student never sees those batches).

A run extended after it ended (``--resume DIR --epochs N``) keeps the blocks it had: its old length is a
*boundary* (``boundaries``, in epochs), no block crosses it, and the partial block before it stays a tail.

Iterations are 0-based global teacher iterations: iteration ``i`` belongs to epoch ``i // iters_per_epoch``.
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Block:
    """A run of consecutive teacher iterations ``[start, stop)`` that the student replays as a unit.

    Attributes:
        index: position in the schedule (0-based).
        start: first global teacher iteration of the block.
        length: number of teacher iterations (batches) in the block.
        online: s = 0 block (length 1): the student uses the teacher's pre-update logits of the same iteration.
        replay: whether the student replays the block (False only for a dropped tail).
    """

    index: int
    start: int
    length: int
    online: bool
    replay: bool

    @property
    def stop(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class SpacingSchedule:
    """Blocks of a spaced-KD run.

    Args:
        space: s, the space interval in epochs (float, ≥ 0). 0 is ordinary online KD.
        iters_per_epoch: teacher iterations (batches) per epoch, ≥ 1.
        epochs: number of epochs, ≥ 1.
        start_epoch: spacing starts at this epoch (0 = from the first iteration); earlier epochs are online KD.
        replay_tail: replay the final partial block (False reproduces the official code, which drops it).
        boundaries: epochs (< ``epochs``) at which an earlier, shorter schedule of the run ended: blocks end there.
    """

    space: float
    iters_per_epoch: int
    epochs: int
    start_epoch: int = 0
    replay_tail: bool = True
    boundaries: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.space, bool) or not isinstance(self.space, (int, float)) or not math.isfinite(self.space):
            raise ValueError(f"space (s, in epochs) must be a finite number, got {self.space!r}")
        if self.space < 0:
            raise ValueError(f"space (s, in epochs) must be >= 0, got {self.space}")
        if self.iters_per_epoch < 1:
            raise ValueError(f"iters_per_epoch must be >= 1, got {self.iters_per_epoch}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not 0 <= self.start_epoch <= self.epochs:
            raise ValueError(f"start_epoch must be in [0, epochs={self.epochs}], got {self.start_epoch}")
        if any(not 0 < b < self.epochs for b in self.boundaries) or list(self.boundaries) != sorted(
                set(self.boundaries)):
            raise ValueError(f"boundaries must be increasing epochs in (0, epochs={self.epochs}), got "
                             f"{self.boundaries}")
        if self.space > 0 and self.block_length == 0:
            raise ValueError(
                f"space s={self.space} epochs gives blocks of floor(s·iters_per_epoch) = 0 iterations at "
                f"{self.iters_per_epoch} iterations per epoch; use s=0 for online KD or s >= "
                f"{1 / self.iters_per_epoch:.4g}")

    @property
    def block_length(self) -> int:
        """N = floor(s · iters_per_epoch); 0 for online KD."""
        # The small epsilon keeps e.g. s = 1.5 at 390 iterations exactly 585 despite binary rounding of s.
        return int(math.floor(self.space * self.iters_per_epoch + 1e-9))

    @property
    def total_iterations(self) -> int:
        return self.epochs * self.iters_per_epoch

    @functools.cached_property
    def blocks(self) -> tuple[Block, ...]:
        """All blocks in order; together they cover iterations ``[0, total_iterations)`` exactly once."""
        blocks: list[Block] = []
        spaced_from = self.total_iterations if self.space == 0 else self.start_epoch * self.iters_per_epoch
        for i in range(spaced_from):
            blocks.append(Block(index=len(blocks), start=i, length=1, online=True, replay=True))
        start = spaced_from
        n = self.block_length
        ends = [b * self.iters_per_epoch for b in self.boundaries] + [self.total_iterations]
        while start < self.total_iterations:
            end = next(e for e in ends if e > start)  # the segment this block lies in
            length = min(n, end - start)
            is_tail = length < n
            blocks.append(Block(index=len(blocks), start=start, length=length, online=False,
                                replay=self.replay_tail or not is_tail))
            start += length
        return tuple(blocks)

    @functools.cached_property
    def _block_starts(self) -> list[int]:
        return [b.start for b in self.blocks]

    def block_at(self, iteration: int) -> Block:
        """The block holding teacher iteration ``iteration`` (0 ≤ iteration < total_iterations)."""
        return self.blocks[bisect.bisect_right(self._block_starts, iteration) - 1]

    @property
    def student_iterations(self) -> int:
        """Student optimizer steps over the whole run (replayed batches)."""
        return sum(b.length for b in self.blocks if b.replay)

    def epoch_of(self, iteration: int) -> int:
        """Epoch (0-based) of a global teacher iteration."""
        return iteration // self.iters_per_epoch

    @functools.cached_property
    def _replayed(self) -> tuple[tuple[Block, ...], dict[int, int]]:
        replayed = tuple(b for b in self.blocks if b.replay)
        return replayed, {b.index: position for position, b in enumerate(replayed)}

    def student_eval_epochs(self, block: Block | None) -> range:
        """Epochs (1-based epoch ends) at which the student is evaluated right after replaying ``block``.

        The student evaluated for epoch ``e`` is the student that has replayed every replayed block ending at or
        before iteration ``e · iters_per_epoch``: the state the official (sequential) code evaluates at its epoch
        ends. That definition does not depend on how teacher and student steps are interleaved. ``block=None``
        means "before any replay" (the epochs that end before the first replayed block does).
        """
        replayed, position = self._replayed
        if block is None:
            lo, nxt = 1, replayed[0].stop if replayed else None
        else:
            k = position[block.index]
            lo = max(1, -(-block.stop // self.iters_per_epoch))  # first epoch end at or after the block's end
            nxt = replayed[k + 1].stop if k + 1 < len(replayed) else None
        hi = self.epochs if nxt is None else min(self.epochs, (nxt - 1) // self.iters_per_epoch)
        return range(lo, hi + 1)

    def describe(self) -> str:
        """One line for logs."""
        if self.space == 0:
            return f"online KD (s = 0): {self.total_iterations} iterations"
        tail = self.blocks[-1]
        return (f"spaced KD: s = {self.space:g} epochs → blocks of N = {self.block_length} iterations "
                f"({self.iters_per_epoch}/epoch), {sum(not b.online for b in self.blocks)} blocks from epoch "
                f"{self.start_epoch}, last block {tail.length} iterations"
                f"{'' if tail.replay else ' (dropped: not replayed)'}")
