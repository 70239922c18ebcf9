"""Epoch records: the evaluations of a run collected per epoch, handed on complete and in epoch order, and the best
student so far. The trainer says what it measured; this module decides when an epoch's record is complete and
what it holds, the same for every mode (the mode says how many networks an epoch record waits for)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from spacedkd_fast.engine.modes import Mode
from spacedkd_fast.engine.outputs import summary_table


@dataclass
class RunPosition:
    """Where the run stands besides the schedule's cursors (the checkpoint's ``position``)."""

    phase: str  # the mode's phase ("teacher", or offline's "student")
    last_action: str = "student"  # the role that took the last step (overlap alternates)
    actions: int = 0  # optimizer steps taken
    images_seen: int = 0  # fresh training images consumed (both phases, all ranks)
    elapsed_before: float = 0.0  # wall time of the sessions before a resume


@dataclass
class Summary:
    """End-of-run figures (``Trainer.fit``'s return value)."""

    epochs: int
    teacher_acc: float | None
    student_acc: float | None
    exit_acc: list[float] | None
    images_per_s: float
    wall_s: float
    out: str | None
    data_wait_s: float = 0.0  # host time the loop spent waiting for batches (fresh or replayed), this session
    session_s: float = 0.0  # wall time of this session (wall_s includes the time before a resume)
    skipped_samples: int = 0  # streamed folders: training samples of broken files dropped from fresh batches, session

    def table(self) -> str:
        rows = [("epochs", str(self.epochs))]
        if self.teacher_acc is not None:
            rows.append(("teacher test accuracy", f"{100 * self.teacher_acc:.2f} %"))
        if self.student_acc is not None:
            rows.append(("student test accuracy", f"{100 * self.student_acc:.2f} %"))
        for i, acc in enumerate(self.exit_acc or []):
            rows.append((f"exit {i}{' (deepest)' if i == 0 else ''} test accuracy", f"{100 * acc:.2f} %"))
        rows += [("training images/s", f"{self.images_per_s:,.0f}"), ("wall time", f"{self.wall_s:.1f} s")]
        if self.session_s > 0:
            rows.append(("waiting for data", f"{self.data_wait_s:.1f} s ({100 * self.data_wait_s / self.session_s:.1f} "
                                              f"% of the run)"))
        if self.skipped_samples:
            rows.append(("skipped samples (broken files)", f"{self.skipped_samples:,}"))
        if self.out:
            rows.append(("outputs", self.out))
        return summary_table(rows)


def student_accuracy(counts: list, multi_exit: bool) -> float:
    """The student's test accuracy from evaluation counts: ``[correct, total]``, or for a BYOT network
    ``[exit_0, ..., exit_{E-1}, ensemble, total]``, whose student is its best shallow exit."""
    if multi_exit:
        return max(c / counts[-1] for c in counts[1:-2])
    return counts[0] / counts[1]


class EpochRecords:
    """Evaluations gathered per epoch until each epoch's record is complete.

    Args:
        mode: an online-KD mode waits for both networks' evaluations of an epoch; the others for one.
        timing: ``() -> dict`` of the throughput fields a record gets when it completes (images/s, data wait,
            elapsed), measured since the previous record.
    """

    def __init__(self, mode: Mode, timing: Callable[[], dict]) -> None:
        self.mode, self.timing = mode, timing
        self.history: list[dict] = []  # complete records, in epoch order
        self.pending: dict[int, dict] = {}  # epoch -> evaluations so far
        self.best_acc: float | None = None
        self.evaluated_through = 0  # one-network modes: last epoch evaluated (per phase)
        self.frozen_teacher_acc: float | None = None  # offline KD from a given teacher: measured once

    def accuracy(self, counts: torch.Tensor | None, which: str) -> float | None:
        if counts is None:
            return None
        counts = counts.tolist()
        return student_accuracy(counts, self.mode.multi_exit) if which == "student" else counts[0] / counts[1]

    def improves(self, accuracy: float | None) -> bool:
        """Whether a student accuracy beats every earlier one (and becomes the best)."""
        if accuracy is None or (self.best_acc is not None and accuracy <= self.best_acc):
            return False
        self.best_acc = accuracy
        return True

    def add(self, which: str, epochs: Iterable[int], counts, loss: float | None, lr: float) -> list[dict]:
        """Record an evaluation of ``which`` ("teacher" | "student") standing for ``epochs``; returns the records
        that are now complete, in epoch order."""
        for epoch in epochs:
            entry = self.pending.setdefault(epoch, {"kind": "epoch", "epoch": epoch})
            entry.update({f"{which}_counts": counts, f"{which}_loss": loss, f"lr_{which}": lr})
        done = []
        while self.pending and self._complete(self.pending[min(self.pending)]):
            record = self._finish(self.pending.pop(min(self.pending)))
            self.history.append(record)
            done.append(record)
        return done

    def _complete(self, entry: dict) -> bool:
        if self.mode.online_student:
            return "teacher_counts" in entry and "student_counts" in entry
        return "teacher_counts" in entry or "student_counts" in entry

    def _finish(self, entry: dict) -> dict:
        record = {k: v for k, v in entry.items() if not k.endswith("_counts")}
        if entry.get("teacher_counts") is not None:
            correct, total = entry["teacher_counts"].tolist()
            record["teacher_acc"] = correct / total
        if entry.get("student_counts") is not None:
            counts = entry["student_counts"].tolist()
            if self.mode.multi_exit:
                record["exit_acc"] = [c / counts[-1] for c in counts[:-2]]
                record["ensemble_acc"] = counts[-2] / counts[-1]
                record["teacher_acc"] = record["exit_acc"][0]  # the deepest exit
            record["student_acc"] = student_accuracy(counts, self.mode.multi_exit)
        if len(self.mode.phases) > 1 and "teacher_acc" not in record:  # offline: the frozen teacher's
            teacher_records = [r for r in self.history if "teacher_acc" in r]
            record["teacher_acc"] = teacher_records[-1]["teacher_acc"] if teacher_records else self.frozen_teacher_acc
        record.update(self.timing())
        return record

    # ---- checkpointing (the checkpoint's "history", "pending", "best_acc", position "evaluated_through") --------
    def state_dict(self) -> dict:
        return {"history": self.history, "best_acc": self.best_acc, "evaluated_through": self.evaluated_through,
                "pending": {e: {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in entry.items()}
                            for e, entry in self.pending.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state["history"])
        self.pending = {e: dict(entry) for e, entry in state["pending"].items()}
        self.best_acc = state.get("best_acc")
        self.evaluated_through = state.get("evaluated_through", 0)
