"""Run outputs: config.json, metrics.jsonl, curves.png, batches.jsonl, checkpoints, and the summary table.

Checkpoints never lose work: each is written atomically (temporary file, then rename); ``last.pt`` is the newest,
``previous.pt`` the one before it (a crash while writing, or a truncated copy, leaves that one to resume from),
``best.pt`` the weights at the best student test accuracy so far. A folder that holds another run is not written
into unless asked (``overwrite``); resuming is the way to continue one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

CHECKPOINT = "last.pt"
PREVIOUS = "previous.pt"
BEST = "best.pt"
# What a run leaves in its folder (``ranks/``: DDP ranks' own checkpoint state).
RUN_FILES = ("config.json", "metrics.jsonl", CHECKPOINT, PREVIOUS, BEST, "batches.jsonl", "curves.png", "ranks")


def check_run_folder(folder: str | os.PathLike, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run in a folder that holds another one (``resume`` continues it instead).

    Raises:
        FileExistsError: naming the folder and what it holds, unless ``overwrite``.
    """
    folder = Path(folder)
    if resume or not folder.is_dir():
        return
    found = [name for name in RUN_FILES if (folder / name).exists()]
    if found and not overwrite:
        raise FileExistsError(f"--out {folder} holds another run ({', '.join(found)}); continue it with --resume "
                              f"{folder}, choose another --out, or pass --overwrite to replace it")


def clear_run_folder(folder: str | os.PathLike) -> None:
    """Remove what an earlier run left in ``folder`` (``--overwrite``); other files stay."""
    import shutil

    folder = Path(folder)
    for name in RUN_FILES:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def load_checkpoint(folder: str | os.PathLike, log=print) -> tuple[dict, Path]:
    """The newest readable checkpoint of a run folder: ``last.pt``, else (unreadable or missing) ``previous.pt``,
    with one line saying why it fell back.

    Raises:
        FileNotFoundError: neither exists. ValueError: neither can be read (both reasons named).
    """
    folder = Path(folder)
    problems = []
    for name in (CHECKPOINT, PREVIOUS):
        path = folder / name
        if not path.exists():
            problems.append(f"{name}: missing")
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain containers only
        except Exception as exc:  # noqa: BLE001 - a torn or foreign file raises many types
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            reason = reason.split(". ")[0][:160]  # torch's own message goes on for a paragraph
            problems.append(f"{name}: unreadable ({type(exc).__name__}: {reason})")
            continue
        if problems:
            log(f"spacedkd_fast: --resume {folder}: {problems[-1]}; resuming from {name} instead")
        return state, path
    if all(p.endswith("missing") for p in problems):
        raise FileNotFoundError(f"--resume {folder}: there is no {CHECKPOINT} (or {PREVIOUS}) in that folder")
    raise ValueError(f"--resume {folder}: no readable checkpoint: {'; '.join(problems)}")


def batch_digest(images: Tensor, labels: Tensor) -> str:
    """sha1 of a batch's uint8 pixels and int64 labels (host copy: only used with --trace-batches)."""
    h = hashlib.sha1()
    h.update(images.detach().to("cpu", torch.uint8).contiguous().numpy().tobytes())
    h.update(labels.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves a torn file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class RunOutputs:
    """Files of one run in ``folder`` (all writes are no-ops when ``folder`` is None or on ranks other than 0)."""

    def __init__(self, folder: str | os.PathLike | None, *, enabled: bool = True, trace_batches: bool = False,
                 resume: bool = False) -> None:
        self.folder = Path(folder) if folder is not None and enabled else None
        self.trace = trace_batches and self.folder is not None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            mode = "a" if resume else "w"
            self._metrics = open(self.folder / "metrics.jsonl", mode, buffering=1)
            self._batches = open(self.folder / "batches.jsonl", mode, buffering=1) if self.trace else None

    def write_config(self, config: dict) -> None:
        if self.folder is not None:
            (self.folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def metrics(self, record: dict) -> None:
        if self.folder is not None:
            self._metrics.write(json.dumps(record) + "\n")

    def batch(self, role: str, step: int, images: Tensor, labels: Tensor, teacher_updates: int | None = None) -> None:
        if self.trace:
            record = {"role": role, "step": step, "batch": batch_digest(images, labels)}
            if teacher_updates is not None:
                record["teacher_updates"] = teacher_updates
            self._batches.write(json.dumps(record) + "\n")

    def checkpoint(self, state: dict) -> Path | None:
        """Write ``last.pt``; the one it replaces becomes ``previous.pt`` (a rename: never a half-written file)."""
        if self.folder is None:
            return None
        path = self.folder / CHECKPOINT
        if path.exists():
            os.replace(path, self.folder / PREVIOUS)
        atomic_save(state, path)
        return path

    def best(self, state: dict) -> Path | None:
        """Write ``best.pt`` (the weights at the best student test accuracy so far)."""
        if self.folder is None:
            return None
        path = self.folder / BEST
        atomic_save(state, path)
        return path

    def curves(self, history: list[dict]) -> None:
        """curves.png: test accuracy against epoch for the teacher and the student (and BYOT exits)."""
        if self.folder is None or not history:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
        epochs = [r["epoch"] for r in history]
        for key, label in (("teacher_acc", "teacher"), ("student_acc", "student"), ("ensemble_acc", "ensemble")):
            values = [r.get(key) for r in history]
            if any(v is not None for v in values):
                ax.plot(epochs, [100 * v if v is not None else float("nan") for v in values], marker="o", label=label)
        exits = [r.get("exit_acc") for r in history]
        if any(exits):
            for e in range(len(next(x for x in exits if x))):
                ax.plot(epochs, [100 * x[e] if x else float("nan") for x in exits], linestyle="--",
                        label=f"exit {e}" + (" (deepest)" if e == 0 else ""))
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.folder / "curves.png")
        plt.close(fig)

    def close(self) -> None:
        if self.folder is not None:
            self._metrics.close()
            if self._batches is not None:
                self._batches.close()


def summary_table(rows: list[tuple[str, str]]) -> str:
    """A two-column box table for the end of a run."""
    width_k = max(len(k) for k, _ in rows)
    width_v = max(len(v) for _, v in rows)
    line = f"+{'-' * (width_k + 2)}+{'-' * (width_v + 2)}+"
    body = [f"| {k:<{width_k}} | {v:>{width_v}} |" for k, v in rows]
    return "\n".join([line, *body, line])
