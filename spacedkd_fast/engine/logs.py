"""The run folder's append-only logs follow the checkpoint: a resumed run's logs equal an uninterrupted run's.

A checkpoint records how long each append-only file was when it was written (:func:`positions`, after the writers
flushed). Resuming from it (``last.pt``, or ``previous.pt`` after a fallback) cuts every such file back to that
length and removes those created after it (:func:`cut_back`): the records a crashed or killed run wrote after its
checkpoint describe steps the resumed run takes again, and would otherwise appear twice. The files are the
metrics (``metrics.jsonl``, ``epochs.csv``, ``steps.csv``), the batch trace (``batches.jsonl``) and TensorBoard's
event files (a resumed run writes a new event file after the cut one: the scalars read the same).
"""

from __future__ import annotations

import os
from pathlib import Path

APPEND_ONLY = ("metrics.jsonl", "epochs.csv", "steps.csv", "batches.jsonl")
EVENTS_FOLDER = "tensorboard"


def _files(folder: Path) -> list[Path]:
    files = [folder / name for name in APPEND_ONLY if (folder / name).is_file()]
    events = folder / EVENTS_FOLDER
    if events.is_dir():
        files += sorted(p for p in events.rglob("*") if p.is_file())
    return files


def positions(folder: str | os.PathLike) -> dict[str, int]:
    """``{path relative to the folder: size in bytes}`` of the append-only files now."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in _files(folder)}


def cut_back(folder: str | os.PathLike, saved: dict[str, int] | None) -> list[str]:
    """Cut the append-only files back to the lengths ``saved`` (a checkpoint's ``positions``); remove those
    it does not name. Returns what changed (for a log line). A checkpoint written before logs were recorded
    (``saved`` is None) leaves the files as they are."""
    if saved is None:
        return []
    folder = Path(folder)
    changed = []
    for path in _files(folder):
        name = path.relative_to(folder).as_posix()
        if name not in saved:
            path.unlink()
            changed.append(f"removed {name}")
        elif path.stat().st_size > saved[name]:
            with open(path, "r+b") as f:
                f.truncate(saved[name])
            changed.append(f"cut {name} back to {saved[name]} bytes")
    return changed
