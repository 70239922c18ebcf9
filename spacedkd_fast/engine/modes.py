"""The training modes as data: which networks a mode trains, and the step each kind of batch gets.

The engine walks one timeline of fresh batches (the teacher's) and, where the mode replays, the student's replay of
its blocks (:mod:`spacedkd_fast.engine.driver`). A :class:`Mode` carries the step functions themselves
(:mod:`spacedkd_fast.engine.roles`), so the loop calls ``phase.fresh(...)`` / ``mode.replay(...)`` and never asks
which mode it runs:

======== ================== =============================== ================== =================================
mode     networks           fresh batch (per phase)         s = 0 iteration    replayed batch
======== ================== =============================== ================== =================================
online   teacher, student   teacher CE                      + student KD from  student KD from the block's
                                                            the teacher's      snapshot
                                                            pre-update outputs
self     student (BYOT)     CE on the deepest exit          one BYOT step      BYOT step (exits learn from exit 0)
base     student            CE                              —                  —
offline  teacher, student   teacher CE; then student KD     —                  —
                            from the frozen teacher
======== ================== =============================== ================== =================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from spacedkd_fast.engine import roles as R
from spacedkd_fast.schedule import Block

# A step: ``(objectives, role, inputs, labels, data iteration, teacher) -> the role's pre-update (logits, features)``
# (or None). ``teacher`` is a module answering ``teacher(x) -> (logits, features)``, or None.
Step = Callable


@dataclass(frozen=True)
class Phase:
    """A stretch of the fresh-batch timeline: the role ``trains`` takes the step ``fresh`` on each fresh batch."""

    name: str  # "teacher" | "student" (offline's second phase); checkpoints record it
    trains: str  # the role stepping on fresh batches: "teacher" | "student"
    fresh: Step
    teacher: str | None = None  # a trained, frozen role whose network teaches the fresh step (offline's student)


@dataclass(frozen=True)
class Mode:
    name: str
    roles: tuple[str, ...]  # the networks trained ("student" is the only one of a one-network mode)
    phases: tuple[Phase, ...]
    replay: Step | None = None  # the student's step on a replayed batch; None: no spacing (nothing is replayed)
    online: Step | None = None  # the fresh step of an s = 0 iteration where it differs from the phase's
    online_student: bool = False  # at s = 0 the student steps on each batch at once, from the teacher's
    #                               pre-update outputs (a second network trained beside the teacher)
    snapshots: bool = False  # replays distil from snapshots of the teacher taken at block ends
    multi_exit: bool = False  # one multi-exit network whose deepest exit teaches the others

    @property
    def spaced(self) -> bool:
        """Whether the space interval applies (the student replays the teacher's blocks)."""
        return self.replay is not None

    @property
    def has_teacher(self) -> bool:
        return "teacher" in self.roles

    @property
    def overlappable(self) -> bool:
        """Two networks training at the same time: their steps may overlap (two CUDA streams)."""
        return self.has_teacher and self.spaced

    @property
    def extendable(self) -> bool:
        """Whether a finished run can be extended with more epochs (not one whose first phase trains a teacher that
        a second phase then freezes: offline KD)."""
        return len(self.phases) == 1

    def replays(self, block: Block) -> bool:
        """Whether the student replays ``block`` (an s = 0 block only with a student of its own; never a dropped
        tail)."""
        return self.spaced and block.replay and (self.online_student or not block.online)

    def fresh_step(self, phase: Phase, block: Block | None) -> Step:
        """The step of a fresh batch of ``block`` in ``phase``."""
        if block is not None and block.online and self.online is not None:
            return self.online
        return phase.fresh

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)


MODES: dict[str, Mode] = {
    "online": Mode("online", ("teacher", "student"), (Phase("teacher", "teacher", R.ce_step),),
                   replay=R.distill_step, online_student=True, snapshots=True),
    "self": Mode("self", ("student",), (Phase("teacher", "student", R.ce_deepest_step),), replay=R.byot_step,
                 online=R.byot_step, multi_exit=True),
    "base": Mode("base", ("student",), (Phase("teacher", "student", R.ce_step),)),
    "offline": Mode("offline", ("teacher", "student"),
                    (Phase("teacher", "teacher", R.ce_step),
                     Phase("student", "student", R.distill_step, teacher="teacher"))),
}
