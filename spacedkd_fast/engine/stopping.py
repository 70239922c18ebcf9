"""Stopping a run on SIGINT/SIGTERM, also when this rank's main thread is blocked waiting for a peer.

:func:`install_stop_signals` is what ``Trainer.fit`` calls; the :class:`StopSignals` it returns puts the previous
handlers back (``restore``).

**The normal path.** A signal records a stop request (``on_request(reason)``: the trainer's ``request_stop``). At its
next agreement (every ``STOP_CHECK_EVERY`` steps, over the gloo control group) every rank learns of it, they stop at
the same step, write ``last.pt`` and ``fit`` raises ``TrainingInterrupted``.

**Why a thread as well.** CPython runs a Python signal handler only in the main thread, between two bytecodes. A
rank whose main thread waits inside a C++ collective for a peer that stopped answering never gets there before the
collective's timeout: the SIGTERM seems to do nothing. What does run at once is the C-level handler CPython installs
for the Python one, in whichever thread the kernel picked: it writes the signal number to the wakeup fd
(:func:`signal.set_wakeup_fd`). A thread of ours blocked on the other end of that socket pair therefore wakes up
whatever the main thread is doing, records the request, and watches the main thread until the run stops.

**The blocked path.** If after a request the main thread has been inside one collective for ``grace`` seconds, the
watchdog ends the process (:func:`~spacedkd_fast.engine.distributed.exit_now`: one line, exit code
:data:`~spacedkd_fast.engine.distributed.EXIT_PEER_LOST`). "Inside a collective" is either

* one of :mod:`~spacedkd_fast.engine.distributed`'s (the stop agreement, barriers, evaluation counts, broadcasts),
  which record their label and entry time: exact; or
* a wait inside torch's DDP / autograd / distributed code (DDP waits for its gradient all-reduce at the end of
  ``backward()``, for its buffer broadcast in ``forward()``): the same Python frame for ``grace`` seconds, during
  which the main thread used almost no CPU (a backward that computes uses CPU; one that waits for a peer sleeps).

A healthy stop reaches its agreement long before (a few steps), so only a wait that a peer does not answer is cut
short; once an agreement to stop has returned (every rank answered it), the watchdog stands down and lets the
checkpoint's barriers wait for rank 0's write, bounded by the collectives' own timeout. A healthy wait longer than
the grace before the agreement (rank 0 writing an epoch's large checkpoint to a slow disk while this rank waits at
the barrier) costs nothing but the clean stop: this rank exits with the peer-lost code, the checkpoints stay
intact. The grace is well under the 30 s that schedulers (Slurm's KillWait, Kubernetes) and torchrun leave between
SIGTERM and SIGKILL, so the one line gets out.

**Why the process ends instead of the wait.** gloo's waits ignore ``ProcessGroup.abort()`` and ``shutdown()`` (tried:
both return, the wait goes on until its timeout), and no Python exception can be raised in a thread blocked in C++.
Ending the process from the watchdog is safe for the run folder: nothing is written on this path, and every
checkpoint file is written atomically (a temporary file, then a rename; rank files before the ``last.pt`` that names
them), so ``last.pt`` (else ``previous.pt``) is whole and is the last state every rank agreed on.

**Why not ``pthread_sigmask`` + ``sigwait``.** The signals would have to be blocked in every thread, but gloo's, NCCL's
and torch's worker threads exist already (started with the process group) with them unblocked; a SIGTERM the kernel
delivers to one of those would run the default action and kill the process without a checkpoint. With the Python
handler installed, delivery to any thread is harmless.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from spacedkd_fast.engine.distributed import EXIT_PEER_LOST, WAITS, DistInfo, exit_now, peer_lost_line

STOP_GRACE_S = 10.0  # a collective the main thread is still in this long after a stop request is taken as hung
POLL_S = 0.25  # how often the watchdog looks at the main thread once a stop is requested
IDLE_CPU_SHARE = 0.05  # main-thread CPU time / wall time below which a torch wait is "waiting", not computing
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# Where DDP and torch.distributed wait, as path fragments of torch's own files.
_TORCH_WAITS = {"/torch/autograd/": "DDP's gradient all-reduce, in backward",
                "/torch/nn/parallel/": "DDP's buffer broadcast, in forward",
                "/torch/distributed/": "a torch.distributed collective"}


class TrainingInterrupted(Exception):
    """Raised by ``fit`` after SIGINT/SIGTERM (or ``request_stop``), once ``last.pt`` is written."""


class StopSignals:
    """SIGINT/SIGTERM as stop requests while installed (see the module docstring); inert when created off the main
    thread, where Python cannot install signal handlers (``request_stop`` still works there)."""

    def __init__(self, on_request: Callable[[str], None], info: DistInfo | None = None,
                 folder: str | os.PathLike | None = None, grace: float = STOP_GRACE_S) -> None:
        self.on_request, self.info, self.grace = on_request, info or DistInfo(), grace
        self.folder = Path(folder) if folder is not None else None
        self.requested: str | None = None  # the first stop request's reason ("SIGTERM")
        self.installed = False
        self._previous: dict[int, object] = {}
        self._previous_fd = -1
        self._pair: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._main_ident = threading.main_thread().ident
        self._clock = _thread_cpu_clock(self._main_ident)
        self._seen = None  # (frame, since, cpu seconds then): the torch wait being timed

    # ---- install / restore ----------------------------------------------------------------------------------------
    def install(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal.signal and set_wakeup_fd are main-thread only: leave signals alone
        WAITS.agreed = False  # a new fit: no agreement yet
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        if self.info.enabled:  # one process has no collective to be stuck in: the handler is enough
            reader, writer = socket.socketpair()
            writer.setblocking(False)  # set_wakeup_fd requires it: a signal handler must never block
            self._pair = (reader, writer)
            self._previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            self._thread = threading.Thread(target=self._watch, name="spacedkd-stop-watchdog", daemon=True)
            self._thread.start()
        self.installed = True
        return self

    def restore(self) -> None:
        """Put the previous handlers and wakeup fd back and end the watchdog (main thread; idempotent)."""
        if not self.installed:
            return
        self.installed = False
        if self._pair is not None:
            signal.set_wakeup_fd(self._previous_fd)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._thread is not None:
            self._closing = True
            try:
                self._pair[1].send(b"\0")  # not a signal number: wakes the watchdog to see _closing
            except OSError:
                pass
            self._thread.join(timeout=5.0)
        if self._pair is not None:
            for end in self._pair:
                end.close()
            self._pair = None
        self._seen = None

    # ---- requests -------------------------------------------------------------------------------------------------
    def _handler(self, signum, frame) -> None:  # the main thread, when it gets to run Python again
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        """Record a stop request (any thread): the first reason wins; ``on_request`` hears every one. No lock: the
        handler may interrupt the main thread anywhere, even inside this method, and a plain assignment is atomic."""
        if self.requested is None:
            self.requested = reason
        self.on_request(reason)  # the trainer's request_stop sets one attribute: safe from this thread

    # ---- the watchdog ---------------------------------------------------------------------------------------------
    def _watch(self) -> None:
        reader = self._pair[0]
        while not self._closing:
            # A socket timeout waits with poll(), which, unlike select(), takes descriptors numbered past 1024.
            reader.settimeout(POLL_S if self.requested is not None else None)
            try:
                data = reader.recv(64)
                if not data:
                    return  # the other end is closed: restore() ran
            except TimeoutError:
                data = b""
            except OSError:
                return
            if data:
                self._forward(data)
                for signum in data:
                    if signum in STOP_SIGNALS:
                        self.request(signal.Signals(signum).name)
            if self._closing:
                return
            if self.requested is not None:
                blocked = self.blocked_in()
                if blocked is not None:
                    collective, waited = blocked
                    detail = (f"{self.requested} arrived while this rank had waited {waited:.0f} s for an answer; "
                              f"no checkpoint is written at this stop")
                    exit_now(EXIT_PEER_LOST, peer_lost_line(self.info.rank, self.info.world, collective, detail,
                                                            self.folder))

    def _forward(self, data: bytes) -> None:
        """Pass the signal numbers on to a wakeup fd that was set before ours (an event loop's, say)."""
        data = data.replace(b"\0", b"")
        if self._previous_fd >= 0 and data:
            try:
                os.write(self._previous_fd, data)
            except OSError:
                pass

    def blocked_in(self) -> tuple[str, float] | None:
        """``(collective, seconds waited)`` when the main thread has been stuck in one for ``grace`` seconds."""
        if WAITS.agreed:  # every rank answered the agreement: the clean stop is under way, let it finish
            return None
        now = time.monotonic()
        current = WAITS.current
        if current is not None and now - current[1] >= self.grace:
            return current[0], now - current[1]
        frame = sys._current_frames().get(self._main_ident)
        where = _torch_wait(frame)
        if where is None:
            self._seen = None
            return None
        cpu = _cpu_seconds(self._clock)
        if self._seen is None or self._seen[0] is not frame:  # a new wait (holding the frame keeps its identity)
            self._seen = (frame, now, cpu)
            return None
        since, cpu_then = self._seen[1], self._seen[2]
        waited = now - since
        idle = cpu is None or cpu_then is None or (cpu - cpu_then) < IDLE_CPU_SHARE * waited
        return (where, waited) if waited >= self.grace and idle else None


def install_stop_signals(on_request: Callable[[str], None], info: DistInfo | None = None,
                         folder: str | os.PathLike | None = None, grace: float = STOP_GRACE_S) -> StopSignals:
    """SIGINT/SIGTERM → ``on_request(signal name)`` until ``restore()``; under DDP also the watchdog that ends a
    wait for a peer that does not answer (the module docstring says when, and why it is safe)."""
    return StopSignals(on_request, info, folder, grace).install()


def _torch_wait(frame) -> str | None:
    """What the main thread's innermost Python frame says it waits in, if it is one of torch's waits."""
    if frame is None:
        return None
    path = frame.f_code.co_filename.replace(os.sep, "/")
    return next((what for part, what in _TORCH_WAITS.items() if part in path), None)


def _thread_cpu_clock(ident: int | None):
    """The CPU-time clock of a thread (Linux and most Unixes), or None where Python has none."""
    try:
        return time.pthread_getcpuclockid(ident) if ident is not None else None
    except (AttributeError, OSError):
        return None


def _cpu_seconds(clock) -> float | None:
    if clock is None:
        return None
    try:
        return time.clock_gettime(clock)
    except OSError:
        return None
