"""torch.distributed setup for ``torchrun --nproc_per_node=K -m spacedkd_fast.train``.

nccl on GPUs, gloo on CPU.

* **One communicator for both roles.** Teacher and student gradient all-reduces (DDP) and evaluation counts go
  through the same process group. With overlap they are issued from two CUDA streams, and NCCL does not promise
  progress for two communicators whose kernels share the GPU in different orders on different ranks (a known
  deadlock); one communicator serializes them in the order the host issued them, which is the same on every rank
  (the schedule is deterministic).
* **A CPU control group** (gloo) for decisions every rank must take together, such as stopping on a signal:
  :func:`any_rank` costs a host round trip on loopback, never a GPU sync.
* **Liveness.** Every collective waits at most ``dist_timeout`` seconds (``--dist-timeout``) for the other ranks.
  A rank whose peer stopped answering (hung, stopped, killed, its machine gone) raises :class:`PeerLost` (from the
  collectives of this module) or the backend's own error (DDP's gradient all-reduce and buffer broadcast);
  :func:`peer_lost` recognises both, and the command line turns them into one line and exit code
  :data:`EXIT_PEER_LOST`. The checkpoints are never written from such a state: a failed collective raises before
  the code after it runs, and checkpoints are written atomically, so ``last.pt`` (else ``previous.pt``) stays the
  last state every rank agreed on. The collectives here also tell :mod:`spacedkd_fast.engine.stopping` which one
  the main thread is waiting in, so that a stop signal can end a wait that will never complete.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from spacedkd_fast.config import setting_name
from spacedkd_fast.engine.outputs import CHECKPOINT, PREVIOUS

# Exit status of a rank that gave up on its peers (a collective timed out or failed, or a stop signal ended a wait
# that could not complete). 75 is EX_TEMPFAIL of sysexits.h: a temporary failure, retrying (resuming) makes sense.
EXIT_PEER_LOST = 75


class PeerLost(RuntimeError):
    """A collective that this rank cannot complete: a peer stopped answering (``timed_out``) or its connection
    broke. ``collective`` names the wait (``"stop agreement"``, ``"barrier in Trainer._checkpoint"``, ...)."""

    def __init__(self, rank: int, world: int, collective: str, detail: str, timed_out: bool = False) -> None:
        super().__init__(f"rank {rank} of {world}: {collective}: {detail}")
        self.rank, self.world, self.collective, self.detail, self.timed_out = rank, world, collective, detail, timed_out

    def line(self, folder: str | os.PathLike | None) -> str:
        """The one line a rank prints before it exits with :data:`EXIT_PEER_LOST`."""
        return peer_lost_line(self.rank, self.world, self.collective, self.detail, folder)


def peer_lost_line(rank: int, world: int, collective: str, detail: str, folder: str | os.PathLike | None) -> str:
    """What happened (which rank, which wait, why) and what to do (the checkpoints are intact: resume)."""
    if folder is None:
        after = "no output folder, so nothing to resume from"
    elif not any((Path(folder) / name).exists() for name in (CHECKPOINT, PREVIOUS)):
        after = f"no checkpoint in {folder} yet: start the run again"
    else:
        after = (f"the checkpoints in {folder} are intact (last.pt, else previous.pt); once every rank has exited, "
                 f"resume with: torchrun --nproc_per_node={world} -m spacedkd_fast.train --resume {folder}")
    return (f"spacedkd_fast: rank {rank} of {world}: a peer stopped answering during {collective}: {detail}; "
            f"this rank exits with code {EXIT_PEER_LOST}; {after}")


# Substrings of the backends' errors for a peer that is gone or silent (gloo's transport, NCCL's watchdog, the
# c10d store): an error from a collective that carries none of them (a wrong shape, a bug) is not reported as a
# lost peer, it keeps its traceback.
_PEER_ERRORS = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer",
                "Broken pipe", "Socket Timeout", "NCCL communicator was aborted", "Watchdog caught collective",
                "Application timeout caused pair closure")  # (gloo, a collective after a timed-out one on the pair)


def _describe(exc: BaseException, timeout: float | None = None) -> tuple[str, bool] | None:
    """``(detail, timed_out)`` when ``exc`` says that a peer is gone or silent, else None. ``timeout``: the
    collectives' timeout (seconds), named in the detail of a timed-out wait."""
    if isinstance(exc, PeerLost):
        return exc.detail, exc.timed_out
    text = str(exc).strip()
    dist_error = getattr(torch.distributed, "DistError", ())
    if not ((dist_error and isinstance(exc, dist_error)) or any(marker in text for marker in _PEER_ERRORS)):
        return None
    if "timed out" in text.lower() or "timeout" in text.lower():
        within = f" within {timeout:g} s" if timeout is not None else ""
        return f"no answer{within} ({setting_name('dist_timeout')} sets how long a rank waits)", True
    first = text.splitlines()[0] if text else type(exc).__name__
    if first.startswith("[") and "] " in first:  # gloo prefixes its source location: "[.../pair.cc:534] Read error"
        first = first.split("] ", 1)[1]
    return first.split(". ")[0][:200], False  # gloo's first sentence names the failure; the rest is advice


def peer_lost(exc: BaseException, info: DistInfo) -> PeerLost | None:
    """``exc`` as a :class:`PeerLost` when it is the failure of a collective with a peer gone or silent (None
    otherwise, and always in a single process). DDP's own collectives raise the backend's error out of
    ``backward()`` (the gradient all-reduce) or ``forward()`` (the buffer broadcast); the traceback tells which."""
    if not info.enabled:
        return None
    if isinstance(exc, PeerLost):
        return exc
    described = _describe(exc, info.timeout)
    if described is None:
        return None
    detail, timed_out = described
    return PeerLost(info.rank, info.world, _where(exc.__traceback__), detail, timed_out)


def _where(tb) -> str:
    """The collective a backend error came from, read off the innermost torch frames of its traceback."""
    where = "a collective"
    while tb is not None:
        path = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
        if "/torch/autograd/" in path:
            where = "DDP's gradient all-reduce, in backward"
        elif "/torch/nn/parallel/" in path:
            where = "DDP's buffer broadcast, in forward"
        tb = tb.tb_next
    return where


class _Waits:
    """The collective the main thread is in (set and cleared by :func:`_collective`), for the stop watchdog.

    Written by the main thread, read by the watchdog thread: one tuple assignment, atomic under the GIL."""

    def __init__(self) -> None:
        self.current: tuple[str, float] | None = None  # (label, time.monotonic() at entry)
        # Set when an agreement returned True: every rank answered it, so the stop is under way on all of them and
        # the waits that follow (the checkpoint's barriers, behind rank 0 writing last.pt) are bounded by the
        # collectives' timeout, not cut short by the watchdog.
        self.agreed = False


WAITS = _Waits()


@contextmanager
def _collective(label: str, info: DistInfo):
    """Around one blocking collective: record it for the watchdog, and turn a lost peer into :class:`PeerLost`.

    The label names the caller (``"barrier in Trainer._checkpoint"``) so that the message says where the run was."""
    main = threading.current_thread() is threading.main_thread()
    if main:
        WAITS.current = (label, time.monotonic())
    try:
        yield
    except PeerLost:
        raise
    except Exception as exc:
        described = _describe(exc, info.timeout)
        if described is None:
            raise
        raise PeerLost(info.rank, info.world, label, *described) from exc
    finally:
        if main:
            WAITS.current = None


def _caller(kind: str) -> str:
    """``kind`` with the function that called the collective (two frames up: past the public wrapper)."""
    frame = sys._getframe(2)
    name = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
    return f"{kind} in {name}" if not name.startswith("<") else kind


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # processes on this machine (they share its host memory)
    group: object = None  # data collectives of both roles (None: the default group)
    control_group: object = None  # gloo, CPU tensors: agreements between ranks
    timeout: float | None = None  # seconds a collective waits for the other ranks (None: torch's default)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_type: str, timeout: float | None = None) -> DistInfo:
    """Join the process group that torchrun describes in the environment (single process: no-op).

    ``timeout`` (seconds; None: torch's default, 30 minutes) bounds the rendezvous and every collective of both
    groups: a rank waits that long for a silent peer, then the collective raises (gloo; NCCL's watchdog aborts the
    process instead, see the README)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    wait = datetime.timedelta(seconds=timeout) if timeout is not None else None
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", timeout=wait)
    rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    control = dist.new_group(backend="gloo", timeout=wait) if dist.get_backend() != "gloo" else dist.new_group(
        timeout=wait)
    return DistInfo(rank=rank, world=world, local_rank=local_rank, local_world=local_world, group=None,
                    control_group=control, timeout=timeout)


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo, group=None) -> torch.Tensor:
    if info.enabled:
        with _collective(_caller("all-reduce"), info):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group if group is not None else info.group)
    return tensor


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is True on any rank (a collective: every rank must call it, at the same
    point of its schedule)."""
    if not info.enabled:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    with _collective("the stop agreement", info):
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=info.control_group)
    agreed = bool(value.item())
    if agreed:
        WAITS.agreed = True
    return agreed


def broadcast_from_main(value, info: DistInfo):
    """Rank 0's ``value`` (any picklable object) on every rank (a collective)."""
    if not info.enabled:
        return value
    box = [value]
    with _collective(_caller("a broadcast from rank 0"), info):
        dist.broadcast_object_list(box, src=0, group=info.control_group)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        with _collective(_caller("a barrier"), info):
            dist.barrier(group=info.control_group)


def shutdown(info: DistInfo, peers_alive: bool = True) -> None:
    """Leave the process group cleanly (a barrier first, so no rank tears down gloo/nccl threads while another
    still talks to it; exiting without this can abort with "terminate called without an active exception").

    ``peers_alive=False`` (after :class:`PeerLost`): no barrier, which would only wait out the timeout again."""
    if info.enabled and dist.is_initialized():
        try:
            if peers_alive:
                with _collective("the final barrier", info):
                    dist.barrier(group=info.control_group)
        finally:
            dist.destroy_process_group()


_LAST_WORDS: list = []  # callables (code, line) that exit_now runs before the process ends


@contextmanager
def last_words(fn):
    """Within the block, :func:`exit_now` calls ``fn(code, line)`` before it ends the process (the command line
    records the run's state there); errors in ``fn`` are ignored, a slow ``fn`` is given up on."""
    _LAST_WORDS.append(fn)
    try:
        yield
    finally:
        _LAST_WORDS.remove(fn)


def exit_now(code: int, line: str | None = None) -> None:
    """Print ``line`` on stderr and end the process with ``code`` at once, from any thread, without unwinding the
    main thread (which may be blocked inside a collective that no abort can end: gloo's waits ignore
    ``ProcessGroup.abort()``). No checkpoint is written on this path; the ones in the folder were written atomically.
    The :func:`last_words` and the flush of stdout run on a helper thread with a deadline: a lock they need could be
    held by a thread that will never release it."""
    if line is not None:
        try:
            os.write(2, (line + "\n").encode(errors="replace"))
        except OSError:
            pass
    flusher = threading.Thread(target=_flush_stdio, args=(code, line), daemon=True)
    flusher.start()
    flusher.join(timeout=2.0)
    os._exit(code)


def _flush_stdio(code: int, line: str | None) -> None:
    for fn in list(_LAST_WORDS):
        try:
            fn(code, line)
        except Exception:  # noqa: BLE001 - last words must not keep the process alive
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or broken stream: nothing left to save
            pass

