"""What a run tells the person watching it: the opening lines, the progress bar, the clocks behind the throughput
figures of step and epoch records, and the end-of-run summary."""

from __future__ import annotations

import sys
import time

import torch

from spacedkd_fast.engine.records import Summary


class Clock:
    """Wall time, images seen and time spent waiting for data: per session, since the last step record and since
    the last epoch record.

    ``data_wait_s`` counts the host seconds the loop spent getting batches: rendering one inline, the prefetch queue
    running dry, fetching or regenerating a replayed one (on a GPU mostly queued on a side stream, so not counted).
    Near 0 means the data path is not the bottleneck."""

    def __init__(self) -> None:
        self.data_wait_s = 0.0
        self._start = time.perf_counter()
        self._record = (self._start, 0, 0.0)
        self._step = (self._start, 0)

    def start(self, trainer) -> None:
        self._start = time.perf_counter()
        seen = trainer.position.images_seen
        self._record = (self._start, seen, self.data_wait_s)
        self._step = (self._start, seen)

    def elapsed(self, trainer, now: float | None = None) -> float:
        return trainer.position.elapsed_before + (now if now is not None else time.perf_counter()) - self._start

    def step_timing(self, trainer) -> dict:
        now, seen = time.perf_counter(), trainer.position.images_seen
        start, before = self._step
        self._step = (now, seen)
        return {"images_per_s": (seen - before) / max(now - start, 1e-9), "elapsed_s": self.elapsed(trainer, now)}

    def record_timing(self, trainer) -> dict:
        now, seen = time.perf_counter(), trainer.position.images_seen
        start, before, waited = self._record
        self._record = (now, seen, self.data_wait_s)
        return {"images_per_s": (seen - before) / max(now - start, 1e-9),
                "data_wait_fraction": (self.data_wait_s - waited) / max(now - start, 1e-9),
                "elapsed_s": self.elapsed(trainer, now)}

    def summary(self, trainer) -> Summary:
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        session = time.perf_counter() - self._start
        wall = trainer.position.elapsed_before + session
        last = trainer.records.history[-1] if trainer.records.history else {}
        return Summary(epochs=trainer.cfg.epochs, teacher_acc=last.get("teacher_acc"),
                       student_acc=last.get("student_acc"), exit_acc=last.get("exit_acc"),
                       images_per_s=trainer.position.images_seen / max(wall, 1e-9), wall_s=wall,
                       out=str(trainer.outputs.folder) if trainer.outputs.folder is not None else None,
                       data_wait_s=self.data_wait_s, session_s=session,
                       skipped_samples=getattr(getattr(trainer.feed, "source", None), "skipped_samples", 0))


def log_step(trainer, role, iteration: int) -> None:
    """Tell the callbacks about a step; every ``log_every`` steps of a role, a step record with the mean loss since
    its last one (one host sync). ``iteration``: the data iteration the step trained on. Rank 0 only."""
    if not trainer.dist.is_main:
        return
    offset = trainer._student_epoch_offset if trainer.position.phase == "student" else 0
    step = {"role": role.name, "step": role.steps, "iteration": iteration,
            "epoch": (iteration + 1) / trainer.iters_per_epoch + offset}
    trainer.callbacks.on_step_end(trainer, step)
    every = trainer.cfg.log_every
    if every and not role.steps % every:
        record = {"kind": "step", **step, "loss": role.step_loss.take(), "lr": role.last_lr,
                  **trainer.clock.step_timing(trainer)}
        trainer._progress.set_postfix_str(f"{role.name} loss {record['loss']:.4g}", refresh=False)
        trainer.callbacks.on_log(trainer, record)


def describe_run(trainer) -> list[str]:
    """The lines a run opens with: what trains on what, where, in which order, and where the outputs go."""
    feed, cfg = trainer.feed, trainer.cfg
    what = "images" if feed.kind == "package" else "samples"
    ranks = f" x{trainer.dist.world} ranks" if trainer.dist.enabled else ""
    if not trainer.mode.spaced:
        schedule = f"{trainer.iters_per_epoch} iterations/epoch × {cfg.epochs} epochs"
    else:
        schedule = trainer.schedule.describe()
        if trainer.schedule.block_length > 0:
            schedule += f"; replay window {trainer.driver.window.describe()}"
    return [f"spacedkd_fast: {cfg.mode} on {feed.name} ({feed.num_train} train / {feed.num_test} test {what}), "
            f"{trainer.device}{ranks}, {'overlapped' if trainer.overlap else 'sequential'}; {schedule}; data: "
            f"{trainer.data_backend}",
            f"spacedkd_fast: outputs in {trainer.run_folder}" if trainer.run_folder is not None else
            "spacedkd_fast: no output folder (out=None): no metrics, no checkpoint, nothing to resume from"]


def total_actions(trainer) -> int:
    """Optimizer steps of the whole run (the progress bar's total)."""
    schedule, mode = trainer.schedule, trainer.mode
    total = schedule.total_iterations
    if len(mode.phases) > 1:
        return total + trainer._student_epoch_offset * trainer.iters_per_epoch
    return total + sum(b.length for b in schedule.blocks if mode.replays(b))


def progress_bar(trainer):
    if not (trainer.cfg.progress and trainer.dist.is_main):
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total_actions(trainer), initial=trainer.actions, unit="step", dynamic_ncols=True,
                mininterval=0.5, desc=f"{trainer.cfg.mode} s={trainer.schedule.space:g}", leave=False)


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def say(text: str) -> None:
    """One line to stderr in one write: ``print(..., file=sys.stderr)`` writes the text and its newline separately,
    so the lines of two ranks sharing torchrun's stderr could run into one another."""
    sys.stderr.write(f"{text}\n")
    sys.stderr.flush()
