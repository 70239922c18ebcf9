"""Callbacks: what the engine tells the outside world, and the built-in outputs that listen.

Subclass :class:`Callback` and pass instances as ``Trainer(..., callbacks=[...])``. The engine calls, on rank 0
only (DDP ranks agree on every figure):

* ``on_fit_start(trainer)``;
* ``on_step_end(trainer, step)`` after every optimizer step: ``{"role", "step" (the role's step count),
  "iteration" (the data iteration it trained on), "epoch" (its fractional data position)}``; nothing is read back
  from the device for it;
* ``on_log(trainer, record)`` every ``log_every`` optimizer steps of each role, with the scalars of those steps:
  ``{"kind": "step", "role", "step", "iteration", "epoch", "loss" (mean over the steps since the role's last
  record), "lr", "images_per_s", "elapsed_s"}`` (reading the loss is a host sync, so it happens only then);
* ``on_evaluate(trainer, record)`` after each test-set evaluation: ``{"role", "epoch", "accuracy", "loss", "lr"}``
  (``accuracy`` of the role's network; for self KD the student's best shallow exit);
* ``on_epoch_end(trainer, record)`` with each complete epoch record (``{"kind": "epoch", "epoch",
  "teacher_acc", "student_acc", ...}``, in epoch order);
* ``on_checkpoint(trainer)`` before ``last.pt`` is written: flush what you write, so that a resumed run's files
  continue from where the checkpoint's weights are (the built-in files are then cut back to that point);
* ``on_fit_end(trainer, summary)``.

The built-in outputs are callbacks too: :class:`MetricsFiles` (``metrics.jsonl`` with both record kinds,
``steps.csv`` and ``epochs.csv`` twins, ``curves.png``) and :class:`TensorBoard` (``--tensorboard``).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from spacedkd_fast.engine.outputs import write_optional

STEP_COLUMNS = ("role", "step", "iteration", "epoch", "loss", "lr", "images_per_s", "elapsed_s")
EPOCH_COLUMNS = ("epoch", "teacher_acc", "student_acc", "ensemble_acc", "teacher_loss", "student_loss", "lr_teacher",
                 "lr_student", "images_per_s", "data_wait_fraction", "elapsed_s")


class Callback:
    """Base class: override the hooks you need (each does nothing here)."""

    def on_fit_start(self, trainer) -> None:
        pass

    def on_step_end(self, trainer, step: dict) -> None:
        pass

    def on_log(self, trainer, record: dict) -> None:
        pass

    def on_evaluate(self, trainer, record: dict) -> None:
        pass

    def on_epoch_end(self, trainer, record: dict) -> None:
        pass

    def on_checkpoint(self, trainer) -> None:
        pass

    def on_fit_end(self, trainer, summary) -> None:
        pass


class Callbacks(Callback):
    """Several callbacks called in order."""

    def __init__(self, callbacks) -> None:
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be spacedkd_fast.engine.Callback instances, got {type(cb).__name__}")

    def _each(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def on_fit_start(self, trainer) -> None:
        self._each("on_fit_start", trainer)

    def on_step_end(self, trainer, step: dict) -> None:
        self._each("on_step_end", trainer, step)

    def on_log(self, trainer, record: dict) -> None:
        self._each("on_log", trainer, record)

    def on_evaluate(self, trainer, record: dict) -> None:
        self._each("on_evaluate", trainer, record)

    def on_epoch_end(self, trainer, record: dict) -> None:
        self._each("on_epoch_end", trainer, record)

    def on_checkpoint(self, trainer) -> None:
        self._each("on_checkpoint", trainer)

    def on_fit_end(self, trainer, summary) -> None:
        self._each("on_fit_end", trainer, summary)


def epoch_records(records: list[dict]) -> list[dict]:
    """The epoch records of a metrics.jsonl (step records carry ``"kind": "step"``)."""
    return [r for r in records if r.get("kind", "epoch") == "epoch"]


def read_metrics(folder: str | os.PathLike) -> list[dict]:
    """Every record of ``folder/metrics.jsonl`` (a torn last line, from a crash mid-write, is skipped)."""
    path = Path(folder) / "metrics.jsonl"
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class MetricsFiles(Callback):
    """``metrics.jsonl`` (epoch and step records, one JSON object a line), its CSV twins ``epochs.csv`` and
    ``steps.csv``, and ``curves.png`` (test accuracy; training loss and learning rate) at the end of ``fit``.

    A resumed run appends to the files it left."""

    def __init__(self, folder: str | os.PathLike, *, resume: bool = False, num_exits: int = 0) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        mode = "a" if resume else "w"
        self._jsonl = open(self.folder / "metrics.jsonl", mode, buffering=1)
        exits = tuple(f"exit_acc_{e}" for e in range(num_exits))
        self._csv = {
            "step": self._open_csv("steps.csv", STEP_COLUMNS, mode),
            "epoch": self._open_csv("epochs.csv", EPOCH_COLUMNS[:4] + exits + EPOCH_COLUMNS[4:], mode),
        }

    def _open_csv(self, name: str, columns: tuple, mode: str):
        path = self.folder / name
        new = mode == "w" or not path.exists() or path.stat().st_size == 0
        f = open(path, mode, buffering=1, newline="")
        writer = csv.DictWriter(f, fieldnames=columns, restval="", extrasaction="ignore")
        if new:
            writer.writeheader()
        return f, writer

    def _write(self, record: dict) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        row = dict(record)
        for e, acc in enumerate(record.get("exit_acc") or []):
            row[f"exit_acc_{e}"] = acc
        self._csv[record["kind"]][1].writerow(row)

    def on_log(self, trainer, record: dict) -> None:
        self._write(record)

    def on_epoch_end(self, trainer, record: dict) -> None:
        self._write(record)

    def on_checkpoint(self, trainer) -> None:
        if not self._jsonl.closed:
            self._jsonl.flush()
            for f, _ in self._csv.values():
                f.flush()

    def on_fit_end(self, trainer, summary) -> None:
        self.close()
        path = self.folder / "curves.png"  # a figure the run can do without: a failed write is one warning
        write_optional(path, lambda: plot_curves(read_metrics(self.folder), path), trainer.log)

    def close(self) -> None:
        if not self._jsonl.closed:
            self._jsonl.close()
            for f, _ in self._csv.values():
                f.close()


class TensorBoard(Callback):
    """Event files in ``folder`` (``--tensorboard``: ``<out>/tensorboard``): per-step loss, lr and throughput per
    role at the global optimizer step, test accuracies per epoch. Needs the ``tensorboard`` package."""

    def __init__(self, folder: str | os.PathLike) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ModuleNotFoundError('--tensorboard needs the tensorboard package: pip install tensorboard (or '
                                      'pip install "spacedkd_fast[tensorboard]")') from exc
        self.writer = SummaryWriter(str(folder))

    def on_log(self, trainer, record: dict) -> None:
        step = trainer.actions
        for key in ("loss", "lr"):
            if record.get(key) is not None:
                self.writer.add_scalar(f"{record['role']}/{key}", record[key], step)
        self.writer.add_scalar("throughput/images_per_s", record["images_per_s"], step)

    def on_epoch_end(self, trainer, record: dict) -> None:
        for key in ("teacher_acc", "student_acc", "ensemble_acc"):
            if record.get(key) is not None:
                self.writer.add_scalar(f"accuracy/{key.removesuffix('_acc')}", record[key], record["epoch"])
        for e, acc in enumerate(record.get("exit_acc") or []):
            self.writer.add_scalar(f"accuracy/exit_{e}", acc, record["epoch"])

    def on_checkpoint(self, trainer) -> None:
        self.writer.flush()

    def on_fit_end(self, trainer, summary) -> None:
        self.writer.close()


def plot_curves(records: list[dict], path: str | os.PathLike) -> None:
    """curves.png: test accuracy against epoch (teacher, student, BYOT exits), and when step records exist the
    training loss and the learning rate of each role against the data position (epochs)."""
    epochs_ = epoch_records(records)
    steps = [r for r in records if r.get("kind") == "step"]
    if not epochs_ and not steps:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if steps else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.0), dpi=110, squeeze=False)
    ax = axes[0][0]
    x = [r["epoch"] for r in epochs_]
    for key, label in (("teacher_acc", "teacher"), ("student_acc", "student"), ("ensemble_acc", "ensemble")):
        values = [r.get(key) for r in epochs_]
        if any(v is not None for v in values):
            ax.plot(x, [100 * v if v is not None else float("nan") for v in values], marker="o", label=label)
    exits = [r.get("exit_acc") for r in epochs_]
    if any(exits):
        for e in range(len(next(x for x in exits if x))):
            ax.plot(x, [100 * v[e] if v else float("nan") for v in exits], linestyle="--",
                    label=f"exit {e}" + (" (deepest)" if e == 0 else ""))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("test accuracy")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    if steps:
        for ax, key, title in ((axes[0][1], "loss", "training loss"), (axes[0][2], "lr", "learning rate")):
            for role in sorted({r["role"] for r in steps}):
                points = [(r["epoch"], r[key]) for r in steps if r["role"] == role and r.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), label=role)
            ax.set_xlabel("epoch (data position)")
            ax.set_title(title)
            if key == "loss":
                ax.set_yscale("log")
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
    for row in axes:
        for ax in row:
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def builtin_callbacks(folder, cfg, resume: bool, num_exits: int) -> list[Callback]:
    """The run folder's metrics files and TensorBoard (rank 0's ``folder``; None: none): callbacks like the user's."""
    if folder is None:
        if cfg.tensorboard:
            raise ValueError("--tensorboard writes into the run folder; give out= (or --out)")
        return []
    built: list[Callback] = [MetricsFiles(folder, resume=resume, num_exits=num_exits)]
    if cfg.tensorboard:
        built.append(TensorBoard(Path(folder) / "tensorboard"))
    return built
