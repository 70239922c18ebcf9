"""The training modes as data: which networks a mode trains, and what each kind of step computes.

The engine walks one timeline of fresh batches (the teacher's) and, where the mode replays, the student's replay of
its blocks; a :class:`Mode` says what happens at each point, so the loop has no per-mode branches:

======== ================== =============================== ================ ===================================
mode     networks           fresh batch (per phase)         s = 0 iteration  replayed batch
======== ================== =============================== ================ ===================================
online   teacher, student   teacher CE                      + student KD     student KD from the block's snapshot
self     student (BYOT)     CE on the deepest exit          BYOT step        BYOT step (exits learn from exit 0)
base     student            CE                              —                —
offline  teacher, student   teacher CE; then student KD     —                —
                            from the frozen teacher
======== ================== =============================== ================ ===================================

Step names resolve to the functions in :mod:`spacedkd_fast.engine.roles` (``STEPS``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    """A stretch of the fresh-batch timeline: ``trains`` takes the step ``fresh`` on each fresh batch."""

    name: str  # "teacher" | "student" (offline's second phase); checkpoints record it
    trains: str  # the role stepping on fresh batches: "teacher" | "student"
    fresh: str  # "ce" | "ce_deepest" | "distill_frozen"


@dataclass(frozen=True)
class Mode:
    name: str
    roles: tuple[str, ...]  # the networks trained ("student" is the only one of a one-network mode)
    phases: tuple[Phase, ...]
    replay: str | None = None  # the student's step on a replayed batch: "distill_snapshot" | "byot"; None: no spacing
    online: str | None = None  # an s = 0 iteration: "teacher_outputs" (the student learns from the teacher's
    #                            pre-update outputs of that batch, a second role's step) | "byot" (one step)
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
    def student_learns_online(self) -> bool:
        """An s = 0 iteration is a second (student) step beside the teacher's."""
        return self.online == "teacher_outputs"

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)


MODES: dict[str, Mode] = {
    "online": Mode("online", ("teacher", "student"), (Phase("teacher", "teacher", "ce"),),
                   replay="distill_snapshot", online="teacher_outputs"),
    "self": Mode("self", ("student",), (Phase("teacher", "student", "ce_deepest"),), replay="byot", online="byot",
                 multi_exit=True),
    "base": Mode("base", ("student",), (Phase("teacher", "student", "ce"),)),
    "offline": Mode("offline", ("teacher", "student"),
                    (Phase("teacher", "teacher", "ce"), Phase("student", "student", "distill_frozen"))),
}
