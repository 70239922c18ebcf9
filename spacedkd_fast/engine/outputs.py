"""Run outputs: config.json, batches.jsonl, checkpoints, and the summary table (metrics: ``callbacks.py``).

Checkpoints never lose work: each is written atomically (temporary file, then rename); ``last.pt`` is the newest,
``previous.pt`` the one before it (a crash while writing, or a truncated copy, leaves that one to resume from),
``best.pt`` the weights at the best student test accuracy so far. A folder that holds another run is not written
into unless asked (``overwrite``); resuming is the way to continue one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from spacedkd_fast.models.weights import load_error_reason

CHECKPOINT = "last.pt"
PREVIOUS = "previous.pt"
BEST = "best.pt"
# What a run leaves in its folder (``ranks/``: DDP ranks' own checkpoint state).
RUN_FILES = ("config.json", "metrics.jsonl", CHECKPOINT, PREVIOUS, BEST, "epochs.csv", "steps.csv", "batches.jsonl",
             "curves.png", "tensorboard", "ranks")


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
            problems.append(f"{name}: unreadable ({type(exc).__name__}: {load_error_reason(exc)})")
            continue
        if problems:
            log(f"spacedkd_fast: --resume {folder}: {problems[-1]}; resuming from {name} instead")
        return state, path
    if all(p.endswith("missing") for p in problems):
        raise FileNotFoundError(f"--resume {folder}: there is no {CHECKPOINT} (or {PREVIOUS}) in that folder")
    raise ValueError(f"--resume {folder}: no readable checkpoint: {'; '.join(problems)}")


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
    """Files of one run in ``folder``: config.json, batches.jsonl, the checkpoints (all writes are no-ops when
    ``folder`` is None or on ranks other than 0). The metrics files are a callback:
    :class:`~spacedkd_fast.engine.callbacks.MetricsFiles`."""

    def __init__(self, folder: str | os.PathLike | None, *, enabled: bool = True, trace_batches: bool = False,
                 resume: bool = False) -> None:
        self.folder = Path(folder) if folder is not None and enabled else None
        self.trace = trace_batches and self.folder is not None
        self._batches = None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            if self.trace:
                self._batches = open(self.folder / "batches.jsonl", "a" if resume else "w", buffering=1)  # noqa: SIM115

    def write_config(self, config: dict) -> None:
        if self.folder is not None:
            (self.folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def batch(self, role: str, step: int, digest: str, teacher_updates: int | None = None) -> None:
        """One line of batches.jsonl: which batch (its sha1) an optimizer step of ``role`` trained on."""
        if self.trace:
            record = {"role": role, "step": step, "batch": digest}
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

    def flush(self) -> None:
        """Everything written so far reaches the files (before a checkpoint records their lengths)."""
        if self._batches is not None:
            self._batches.flush()

    def close(self) -> None:
        if self._batches is not None:
            self._batches.close()


def summary_table(rows: list[tuple[str, str]]) -> str:
    """A two-column box table for the end of a run."""
    width_k = max(len(k) for k, _ in rows)
    width_v = max(len(v) for _, v in rows)
    line = f"+{'-' * (width_k + 2)}+{'-' * (width_v + 2)}+"
    body = [f"| {k:<{width_k}} | {v:>{width_v}} |" for k, v in rows]
    return "\n".join([line, *body, line])
