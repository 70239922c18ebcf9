"""The run folder: its lock, config.json, batches.jsonl, the checkpoints, and the summary table (metrics files:
``callbacks.py``; what a checkpoint holds: ``checkpoint.py``).

No kill, full disk or second process loses the last good state, and nothing blocks the corrected run:

* **Durable writes.** Every file the run cannot do without (``last.pt``, ``config.json``, the DDP rank files) and
  ``best.pt`` is written to a temporary ``.<name>.<random>`` in its own folder, flushed and fsynced, renamed over
  the target, and the folder is fsynced: a kill at any instant leaves the old file or the new one, never a torn
  one (at worst an orphaned temporary file beside it).
* **Checkpoint rotation.** The new checkpoint is written completely first. Then the old ``last.pt`` becomes
  ``previous.pt`` only if it is a valid checkpoint (an unreadable or foreign one is replaced, never moved onto
  ``previous.pt``: that would destroy the good checkpoint a fallback resumed from), and the new file becomes
  ``last.pt``. Once a checkpoint was written, the folder holds a valid one at every instant.
* **Orphans** of killed writes (``.last.pt.*``, ``.best.pt.*``, ``.config.json.*``, ``ranks/.rank*.pt.*``) are
  removed at the start of the next run in the folder, with one log line. They are never recovered: an orphan is a
  write that never committed (torn, or complete but killed before its rename), ``last.pt`` / ``previous.pt`` is
  the newest committed state, and a resume from it is exact, so all an orphan could save is the compute since
  that checkpoint, at the price of trusting a file the protocol never vouched for.
* **Failed writes.** A non-essential file (``best.pt``, ``curves.png``) that cannot be written costs one warning
  line naming the file and the OS error; the run goes on. ``last.pt`` or ``config.json`` raise
  :class:`OutputWriteError` (the file and the errno), and the file they were to replace is still intact.
* **The lock** (:class:`RunLock`): one process writes a folder (rank 0 under DDP; the other ranks write only their
  rank files, under its lock). A second one, a new run or a resume, is refused while the first runs.
* **What a folder holds** (:func:`check_run_folder`): nothing; a failed start (run files but no checkpoint: a new
  run reuses the folder); or another run (refused unless ``overwrite``; a resume continues it).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import sys
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

from spacedkd_fast.config import setting_name

try:
    import fcntl
except ImportError:  # not a POSIX system: no folder lock (see RunLock.acquire)
    fcntl = None

CHECKPOINT = "last.pt"
PREVIOUS = "previous.pt"
BEST = "best.pt"
CONFIG = "config.json"
LOCK = ".lock"  # held by the process writing the folder; records its host, pid and command
RANK_FOLDER = "ranks"  # <run>/ranks/rank<r>-<checkpoint id>.pt: the per-rank state of ranks 1.. (checkpoint.py)
# What a run leaves in its folder (``ranks/``: DDP ranks' own checkpoint state).
RUN_FILES = (CONFIG, "metrics.jsonl", CHECKPOINT, PREVIOUS, BEST, "epochs.csv", "steps.csv", "batches.jsonl",
             "curves.png", "tensorboard", RANK_FOLDER)
# Temporary files of durable writes (one per target), as a killed process leaves them.
ORPHAN_PATTERNS = (f".{CHECKPOINT}.*", f".{BEST}.*", f".{CONFIG}.*", f"{RANK_FOLDER}/.rank*.pt.*")


def setting_value(name: str, value) -> str:
    """A setting with its value as errors quote it: ``--resume runs/x`` (command line), ``resume=runs/x`` (Python);
    a switch turned on is ``--overwrite`` / ``overwrite=True``."""
    named = setting_name(name)
    if named.endswith("="):
        return f"{named}{value}"
    return named if value is True else f"{named} {value}"


# ================================================================================================ errors
class OutputWriteError(OSError):
    """A file of the run folder could not be written: ``str()`` names the file and the OS error
    (``cannot write runs/x/last.pt: [Errno 28] No space left on device``); ``errno`` / ``strerror`` / ``filename``
    are the OS error's."""

    def __init__(self, path: str | os.PathLike, error: OSError) -> None:
        super().__init__(error.errno, error.strerror or str(error))
        self.filename = str(path)

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {os_reason(self)}"

    def __reduce__(self):  # DDP broadcasts it to every rank (OSError's own pickling drops the custom signature)
        return OutputWriteError, (self.filename, OSError(self.errno, self.strerror))


class RunFolderInUse(RuntimeError):
    """Another live process holds the run folder's lock (the message names it: host, pid, command)."""


def os_reason(exc: OSError) -> str:
    """``[Errno 28] No space left on device``, or the text of an OSError without an errno."""
    return f"[Errno {exc.errno}] {exc.strerror}" if exc.errno is not None else str(exc)


# ================================================================================================ durable writes
class _ErrorKeepingFile:
    """A binary file that remembers the OSError of a failed write: torch.save turns it into ``[enforce fail at
    inline_container.cc] unexpected pos``, which names neither the file nor the cause."""

    def __init__(self, file) -> None:
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()


def torch_writer(obj) -> Callable:
    """A writer for :func:`write_durably`: ``torch.save(obj)`` into the file, with the OS error of a failed write
    raised as such."""

    def write(file) -> None:
        sink = _ErrorKeepingFile(file)
        try:
            torch.save(obj, sink)
        except Exception:
            if sink.error is not None:
                raise sink.error from None
            raise

    return write


def write_durably(path: str | os.PathLike, write: Callable, commit: Callable | None = None) -> Path:
    """Write ``path`` so that no crash leaves it torn: ``write(file)`` fills a temporary file in the same folder,
    which is flushed and fsynced, then ``commit(tmp, path)`` (default: an atomic rename over ``path``) puts it in
    place and the folder is fsynced (so the rename itself survives a power cut).

    Raises:
        OutputWriteError: naming ``path`` and the OS error (ENOSPC, EFBIG, EACCES...); ``path`` is as it was.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        (commit or os.replace)(tmp, path)
        fsync_folder(path.parent)
    except OSError as exc:
        raise OutputWriteError(path, exc) from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)``, durably (:func:`write_durably`)."""
    return write_durably(path, torch_writer(obj))


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make the renames in ``folder`` durable (where folders can be opened: not on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


def write_optional(path: str | os.PathLike, write: Callable[[], object], log=print) -> bool:
    """Run ``write()``, which writes ``path``, a file the run can do without (best.pt, curves.png): a failure is one
    warning line naming the file and the OS error, and the run goes on. Returns whether it was written."""
    try:
        write()
    except OSError as exc:
        log(f"spacedkd_fast: warning: cannot write {path}: {os_reason(exc)}; the run goes on without it")
        return False
    return True


# ================================================================================================ the lock
_HELD: weakref.WeakValueDictionary[str, RunLock] = weakref.WeakValueDictionary()  # this process's locks


class RunLock:
    """The lock of a run folder, held by the process that writes it from the start of a run until ``fit`` returns
    or raises (:meth:`release`).

    It is an ``flock`` on ``<folder>/.lock``: the kernel drops it when its process dies, however it dies, so it is
    never held by a dead process, and pid reuse cannot fool it. The file records host, pid and command, for the
    message that refuses a second process, and for the line that takes over a lock file left behind. Within one
    process a newer Trainer takes the folder over from an older one (e.g. a notebook cell run again).
    A ``RunLock()`` holds nothing (no folder, DDP ranks > 0): ``release`` is then a no-op."""

    def __init__(self, path: Path | None = None, file=None) -> None:
        self.path, self._file = path, file

    @property
    def held(self) -> bool:
        return self._file is not None

    @classmethod
    def acquire(cls, folder: str | os.PathLike, *, setting: str = "out", log=print) -> RunLock:
        """Lock ``folder`` (which exists).

        Raises:
            RunFolderInUse: another live process holds it (naming ``setting`` and that process).
        """
        path = Path(folder) / LOCK
        key = os.path.realpath(path)
        earlier = _HELD.get(key)
        if earlier is not None and earlier.held:  # this process's own, from an earlier Trainer
            lock = cls(path, earlier._file)
            earlier._file = None
            _HELD[key] = lock
            log(f"spacedkd_fast: {folder}: taking the run folder over from an earlier Trainer of this process")
            return lock
        if fcntl is None:
            log(f"spacedkd_fast: warning: {folder}: no file locks on this system; nothing stops a second process "
                f"from writing this folder")
            return cls()
        for _ in range(10):  # the holder may remove the file between our open and our flock: then lock the new one
            file = open(path, "a+")  # noqa: SIM115 - held open for the run; "a+": never truncates the holder's record
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.seek(0)
                holder = _describe_holder(file.read())
                file.close()
                raise RunFolderInUse(
                    f"{setting_value(setting, folder)}: the run folder is in use by {holder}; wait for that run to "
                    f"end, or stop it (Ctrl-C / SIGTERM writes {CHECKPOINT}) and continue it with "
                    f"{setting_name('resume')}") from None
            except OSError as exc:  # a filesystem without locks (some network / FUSE mounts)
                file.close()
                log(f"spacedkd_fast: warning: {folder}: cannot lock the run folder ({os_reason(exc)}); nothing stops "
                    f"a second process from writing it")
                return cls()
            try:
                same = os.fstat(file.fileno()).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            file.close()
        else:
            raise RunFolderInUse(f"{setting_value(setting, folder)}: cannot lock {path}: it keeps being replaced")
        file.seek(0)
        left = file.read().strip()
        if left:
            log(f"spacedkd_fast: {folder}: taking over the lock left by {_describe_holder(left)}, which no longer "
                f"holds it")
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                               "since": datetime.datetime.now().isoformat(timespec="seconds"),
                               "command": " ".join(sys.argv)[:300]}) + "\n")
        file.flush()
        lock = cls(path, file)
        _HELD[key] = lock
        return lock

    def release(self) -> None:
        """Give the folder up (idempotent): the lock file goes, then the lock."""
        if self._file is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still locked: the next process creates and locks a fresh file
        self._file.close()  # drops the flock
        self._file = None


def _describe_holder(record: str) -> str:
    try:
        holder = json.loads(record)
        return (f"pid {holder['pid']} on {holder['host']} (since {holder['since']}: "
                f"{holder.get('command') or 'a Python process'})")
    except (ValueError, KeyError, TypeError):
        return "another process"


# ================================================================================================ the folder
def check_run_folder(folder: str | os.PathLike, *, resume: bool, overwrite: bool) -> str:
    """What ``folder`` holds, for a run about to start there: ``"empty"`` (nothing of a run, or no folder),
    ``"failed start"`` (run files but no checkpoint: a run that ended before its first one, which a new run may
    replace), ``"run"`` (with a checkpoint; only with ``resume`` or ``overwrite``).

    Raises:
        NotADirectoryError: ``folder`` is a file.
        FileExistsError: it holds another run, and neither ``resume`` nor ``overwrite`` was asked for.
    """
    folder = Path(folder)
    setting = "resume" if resume else "out"
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{setting_value(setting, folder)}: is a file, not a folder; the run writes "
                                 f"{CONFIG}, {CHECKPOINT}, metrics.jsonl... into a folder: choose another "
                                 f"{setting_name(setting)}")
    found = [name for name in RUN_FILES if (folder / name).exists()]
    if not found:
        return "empty"
    if not ((folder / CHECKPOINT).exists() or (folder / PREVIOUS).exists()):
        return "failed start"
    if not (resume or overwrite):
        raise FileExistsError(f"{setting_value('out', folder)} holds another run ({', '.join(found)}); continue it "
                              f"with {setting_value('resume', folder)}, choose another {setting_name('out')}, or "
                              f"pass {setting_value('overwrite', True)} to replace it")
    return "run"


def clear_run_folder(folder: str | os.PathLike) -> None:
    """Remove what an earlier run left in ``folder`` (``overwrite``, a failed start); other files stay."""
    folder = Path(folder)
    for name in RUN_FILES:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def remove_orphans(folder: str | os.PathLike, log=print) -> list[str]:
    """Remove the temporary files of writes that a killed process never finished (one log line); see the module
    docstring for why they are not recovered. Only under the folder's lock: a live run's are not orphans."""
    folder = Path(folder)
    orphans = sorted(p for pattern in ORPHAN_PATTERNS for p in folder.glob(pattern) if p.is_file())
    for path in orphans:
        path.unlink(missing_ok=True)
    names = [str(p.relative_to(folder)) for p in orphans]
    if names:
        log(f"spacedkd_fast: {folder}: removed {len(names)} unfinished write(s) of a process that was killed "
            f"({', '.join(names)}); its last committed checkpoint is what counts")
    return names


def open_run_folder(folder: str | os.PathLike | None, *, resume: bool, overwrite: bool, dist=None,
                    log=print) -> RunLock:
    """Make ``folder`` ready for a run starting (or resuming) there, and return its lock (release it when the run
    ends): lock it, remove orphans, refuse another run, clear a failed start or (``overwrite``) an earlier run.

    Under DDP rank 0 does all this; the other ranks wait for its verdict (the same exception on every rank, so none
    is left waiting in a collective). ``folder`` None: nothing to do.
    """
    from spacedkd_fast.engine.distributed import broadcast_from_main

    main = dist is None or dist.is_main
    lock, error = RunLock(), None
    if main and folder is not None:
        folder = Path(folder)
        setting = "resume" if resume else "out"
        try:
            check_run_folder(folder, resume=resume, overwrite=overwrite)  # a file, another run: before touching it
            folder.mkdir(parents=True, exist_ok=True)
            lock = RunLock.acquire(folder, setting=setting, log=log)
            remove_orphans(folder, log)
            holds = check_run_folder(folder, resume=resume, overwrite=overwrite)  # again, now that it is ours
            if holds == "failed start" and not resume:
                found = [name for name in RUN_FILES if (folder / name).exists()]
                log(f"spacedkd_fast: {folder}: an earlier run there ended before its first checkpoint "
                    f"({', '.join(found)}); starting afresh in its place")
                clear_run_folder(folder)
            elif holds == "run" and overwrite and not resume:
                clear_run_folder(folder)
        except (OSError, RunFolderInUse) as exc:
            lock.release()
            error = exc
    if dist is not None and dist.enabled:
        error = broadcast_from_main(error, dist)
    if error is not None:
        raise error
    return lock


class RunOutputs:
    """Files of one run in ``folder``: config.json, batches.jsonl, the checkpoints (all writes are no-ops when
    ``folder`` is None or on ranks other than 0). The metrics files are a callback:
    :class:`~spacedkd_fast.engine.callbacks.MetricsFiles`."""

    def __init__(self, folder: str | os.PathLike | None, *, enabled: bool = True, trace_batches: bool = False,
                 resume: bool = False, log=print) -> None:
        self.folder = Path(folder) if folder is not None and enabled else None
        self.trace = trace_batches and self.folder is not None
        self.log = log
        self._batches = None
        self._warned: set[str] = set()  # non-essential files whose failed write was reported (once each)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            if self.trace:
                self._batches = open(self.folder / "batches.jsonl", "a" if resume else "w", buffering=1)  # noqa: SIM115

    def write_config(self, config: dict) -> None:
        if self.folder is not None:
            text = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
            write_durably(self.folder / CONFIG, lambda file: file.write(text))

    def batch(self, role: str, step: int, digest: str, teacher_updates: int | None = None) -> None:
        """One line of batches.jsonl: which batch (its sha1) an optimizer step of ``role`` trained on."""
        if self.trace:
            record = {"role": role, "step": step, "batch": digest}
            if teacher_updates is not None:
                record["teacher_updates"] = teacher_updates
            self._batches.write(json.dumps(record) + "\n")

    def checkpoint(self, state: dict) -> Path | None:
        """Write ``last.pt``: the new file in full first, then the rotation of the module docstring (the old
        ``last.pt`` becomes ``previous.pt`` only if it is a valid checkpoint).

        Raises:
            OutputWriteError: naming last.pt and the OS error; the old ``last.pt`` / ``previous.pt`` are intact.
        """
        if self.folder is None:
            return None
        # checkpoint.py (the format) reads this module's file names, hence the import here.
        from spacedkd_fast.engine.checkpoint import checkpoint_file_problem

        path, previous = self.folder / CHECKPOINT, self.folder / PREVIOUS

        def rotate(tmp: str, target: Path) -> None:
            if target.exists():
                problem = checkpoint_file_problem(target)
                if problem is None:
                    os.replace(target, previous)  # now: previous.pt valid, the new one complete in tmp
                else:
                    self.log(f"spacedkd_fast: {target}: {problem}; replacing it ({PREVIOUS} is kept as it is)")
            os.replace(tmp, target)

        return write_durably(path, torch_writer(state), rotate)

    def best(self, state: dict) -> Path | None:
        """Write ``best.pt`` (the weights at the best student test accuracy so far); a failure is a warning (once)."""
        if self.folder is None:
            return None
        path = self.folder / BEST
        log = self.log if BEST not in self._warned else (lambda *a: None)
        if write_optional(path, lambda: atomic_save(state, path), log):
            return path
        self._warned.add(BEST)
        return None

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
