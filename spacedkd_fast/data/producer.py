"""Render the teacher's upcoming batches ahead of the training loop.

A background thread walks the teacher's iterations in order, renders each batch (on its own CUDA stream when the
device is a GPU) and hands it over through a bounded queue with an event, so the teacher's step finds its batch
ready whenever rendering is faster than training. Batches are pure functions of their plans, so prefetching
changes no result. Errors in the thread are re-raised in the training loop.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable

import torch


class Prefetcher:
    """Iterates ``(iteration, plan, images, labels)`` over ``iterations``, rendered ``depth`` batches ahead.

    Args:
        iterations: the iterations to render, in consumption order.
        make: ``iteration -> (plan, images, labels)`` (runs in the worker thread, on its stream).
        depth: batches rendered ahead (≥ 1).
        device: where batches land; on CUDA the worker uses a stream of its own.
    """

    def __init__(self, iterations: Iterable[int], make: Callable, depth: int, device: torch.device) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.device = torch.device(device)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if self._stream is not None:  # the batches read tensors the main stream created
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        self._thread = threading.Thread(target=self._work, args=(iter(iterations), make), daemon=True,
                                        name="spacedkd-prefetch")
        self._thread.start()

    def _work(self, iterations, make) -> None:
        try:
            if self._stream is not None:
                torch.cuda.set_device(self.device)
            for iteration in iterations:
                if self._stop.is_set():
                    return
                with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
                    plan, images, labels = make(iteration)
                    event = None
                    if self._stream is not None:
                        event = torch.cuda.Event()
                        event.record(self._stream)
                self._put((iteration, plan, images, labels, event, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put((None, None, None, None, None, exc))
            return
        self._put(None)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self, expected: int):
        """The next batch, which must be ``expected``; the current stream waits for its rendering."""
        item = self._queue.get()
        if item is None:
            raise RuntimeError(f"prefetcher ran out of batches before iteration {expected}")
        iteration, plan, images, labels, event, error = item
        if error is not None:
            raise RuntimeError(f"rendering a batch in the prefetch thread failed: {error}") from error
        if iteration != expected:
            raise RuntimeError(f"prefetcher delivered iteration {iteration}, the loop expected {expected}")
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            images.record_stream(stream)
            labels.record_stream(stream)
        return plan, images, labels

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a worker waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)
