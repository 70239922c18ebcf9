"""Deterministic training batches: a *plan* per batch, rendered by a backend.

``BatchSource.plan(i)`` says what global iteration ``i`` of this rank is made of: its sample indices (from the
epoch's permutation, seeded by ``(seed, epoch)``) and its augmentation seed (``(seed, i, rank)``). A renderer turns
a plan into the augmented uint8 batch on the training device; the augmentation parameters are drawn from the plan's
seed on a CPU generator, so every backend (torch on CPU or CUDA, DALI on CPU or GPU) gets the same parameters.
Nothing carries over from one batch to the next, so

* teacher and student can be fed in any interleaving, and a resumed run continues mid-epoch from the iteration
  counter alone (no data-loader state to save);
* a batch can be regenerated exactly from its plan (the replay window's regenerate tier stores only plans and
  calls :meth:`BatchSource.regenerate`; :meth:`BatchSource.render` is for fresh batches, which a streamed DALI
  source reads with DALI's file reader).

Backends (``--data-backend``): ``torch`` (the gather in :mod:`spacedkd_fast.data.augment`, on the training device)
and ``dali`` (the same crop/flip/rotate graph in DALI, GPU or CPU; see :mod:`spacedkd_fast.data.dali`). ``auto``
picks DALI on a GPU when it is installed, torch otherwise.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from spacedkd_fast import backends
from spacedkd_fast.config import setting_name
from spacedkd_fast.data.augment import apply_augment, sample_params
from spacedkd_fast.data.datasets import ImageDataset
from spacedkd_fast.data.files import BrokenFiles, BrokenFilesError, FileDataset, sample_crop_params

DATA_BACKENDS = ("auto", "torch", "dali")


_SEED_MASK = (1 << 63) - 1


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings (stable across processes and platforms)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


def derive_seeds(*prefix: int | str, count: int) -> list[int]:
    """``[derive_seed(*prefix, k) for k in range(count)]``, the same values without a Python call per seed: the
    text of the shared prefix (``repr`` of the tuple up to its last item) is built once, and the C++ extension
    hashes the ``count`` texts (~0.2 µs a seed, against ~0.6 µs for ``hashlib`` here, which runs where the
    extension is not built). The per-sample seeds of a user's batch are derived this way on every fetch."""
    if not prefix:
        raise ValueError("derive_seeds needs at least one prefix part (repr of a 1-tuple has its own form)")
    head = "(" + ", ".join(map(repr, prefix)) + ", "
    native = _native_derive_seeds()
    if native is not None:
        return native(head, count)
    head_bytes, blake2b, from_bytes = head.encode(), hashlib.blake2b, int.from_bytes
    return [from_bytes(blake2b(head_bytes + b"%d)" % k, digest_size=8).digest(), "little") & _SEED_MASK
            for k in range(count)]


@functools.cache
def _native_derive_seeds():
    """The C++ extension's ``derive_seeds(head, count)``, or None (not built, or built before it had one)."""
    if not backends.cpp_extension().available:
        return None
    from spacedkd_fast import _C

    return getattr(_C, "derive_seeds", None)


@dataclass(frozen=True)
class BatchPlan:
    """Everything a batch is made of: ``indices`` (int64 (b,), CPU) into the training set and the seed of its
    augmentation parameters."""

    iteration: int
    indices: Tensor
    seed: int

    @property
    def nbytes(self) -> int:
        """Bytes to keep the plan as int32 indices plus the seed (the regenerate tier's cost)."""
        return 4 * self.indices.numel() + 8


def select_data_backend(requested: str, device: torch.device) -> str:
    """Resolve ``--data-backend``: ``auto`` prefers DALI on a GPU; an explicit ``dali`` needs DALI installed."""
    if requested not in DATA_BACKENDS:
        raise ValueError(f"{setting_name('data_backend')} must be one of {', '.join(DATA_BACKENDS)}, got {requested!r}")
    if requested == "auto":
        if device.type == "cuda" and backends.dali().available:
            return "dali"
        if device.type == "cuda":
            backends.warn_once("dali", f"DALI unavailable ({backends.dali().detail}); augmenting with torch on the "
                                       "GPU (pip install nvidia-dali-cuda130 for the DALI pipeline)")
        return "torch"
    if requested == "dali" and not backends.dali().available:
        raise ValueError(f"{setting_name('data_backend')} dali: DALI is not installed ({backends.dali().detail}); "
                         f"pip install nvidia-dali-cuda130")
    return requested


class BatchSource:
    """Training batches of an in-memory dataset, sharded over DDP ranks.

    Args:
        dataset: the dataset (its uint8 train images are copied to ``device`` once).
        batch_size: global batch size; rank ``r`` of ``world`` gets every ``world``-th sample of each batch.
        seed: run seed.
        device: training device.
        rank, world: DDP position.
        backend: "torch" or "dali" (already resolved, see :func:`select_data_backend`).

    The epoch is ``ceil(N / batch_size)`` batches (the last one smaller, as the official loader's
    ``drop_last=False``), unless that last batch would leave a rank fewer than 2 samples (BatchNorm cannot train on
    one), in which case it is dropped.
    """

    def __init__(self, dataset: ImageDataset | FileDataset, *, batch_size: int, seed: int, device: torch.device,
                 rank: int = 0, world: int = 1, backend: str = "torch") -> None:
        n = len(dataset.train_labels)
        if batch_size > n:
            raise ValueError(f"{setting_name('batch_size')} {batch_size} is larger than the training set "
                             f"({n} images of {dataset.name!r})")
        if batch_size % world:
            raise ValueError(f"{setting_name('batch_size')} {batch_size} must be divisible by the number of DDP "
                             f"ranks ({world})")
        if batch_size // world < 2:
            raise ValueError(f"{setting_name('batch_size')} {batch_size} leaves {batch_size // world} sample(s) "
                             f"per rank; BatchNorm needs at least 2")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.device = torch.device(device)
        self.rank, self.world = rank, world
        self.num_samples = n
        tail = n % batch_size
        self.iters_per_epoch = n // batch_size + (1 if tail and tail // world >= 2 else 0)
        self.labels = dataset.train_labels.to(self.device)
        self.backend = backend
        self._perm_epoch = -1
        self._perm: Tensor | None = None
        self._setup_storage()

    def _setup_storage(self) -> None:
        self.images = self.dataset.train_images.to(self.device)
        self.test_images = self.dataset.test_images.to(self.device)
        self.test_labels = self.dataset.test_labels.to(self.device)
        self._dali = None
        if self.backend == "dali":
            from spacedkd_fast.data.dali import DaliArrayAugmenter

            self._dali = DaliArrayAugmenter(self.image_shape, self.local_batch_size(0), self.device)
            # Channels-last storage: a gathered batch is then already the HWC layout DALI's operators read, so
            # no per-batch permute copy (worth ~20% of the CPU pipeline's throughput on CIFAR shapes).
            self.images = self.images.contiguous(memory_format=torch.channels_last)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.dataset.train_images.shape[1:])

    def permutation(self, epoch: int) -> Tensor:
        """Sample order of ``epoch`` (CPU int64), the same on every rank and device."""
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
            self._perm = torch.randperm(self.num_samples, generator=gen)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, iteration: int) -> Tensor:
        """This rank's sample indices for global iteration ``iteration`` (CPU int64)."""
        epoch, position = divmod(iteration, self.iters_per_epoch)
        start = position * self.batch_size
        global_batch = self.permutation(epoch)[start:start + self.batch_size]
        return global_batch[self.rank::self.world]

    def plan(self, iteration: int) -> BatchPlan:
        return BatchPlan(iteration, self.indices(iteration), derive_seed(self.seed, "augment", iteration, self.rank))

    def render(self, plan: BatchPlan) -> tuple[Tensor, Tensor]:
        """Augmented uint8 images ``(b, C, H, W)`` and int64 labels ``(b,)`` of a plan, on the device (current
        stream)."""
        index = plan.indices.to(self.device, non_blocking=True)
        params = sample_params(self.dataset.augment, plan.indices.numel(),
                               torch.Generator().manual_seed(plan.seed), "cpu")
        if self._dali is not None:
            images = self._dali(self.images[index], params)  # indexing (unlike index_select) keeps channels-last
        else:
            images = self.images.index_select(0, index)
            if not self.dataset.augment.is_identity:
                images = apply_augment(images, params.to(self.device))
        return images, self.labels.index_select(0, index)

    def regenerate(self, plan: BatchPlan) -> tuple[Tensor, Tensor]:
        """Render an earlier plan again for the replay window, byte-identical to its first :meth:`render`."""
        return self.render(plan)

    def batch(self, iteration: int) -> tuple[Tensor, Tensor]:
        """``render(plan(iteration))``."""
        return self.render(self.plan(iteration))

    def local_batch_size(self, iteration: int) -> int:
        epoch, position = divmod(iteration, self.iters_per_epoch)
        size = min(self.batch_size, self.num_samples - position * self.batch_size)
        return len(range(self.rank, size, self.world))

    def test_batches(self, batch_size: int):
        """This rank's shard of the test set: ``(uint8 images, labels)`` on the device, un-augmented."""
        yield from evaluation_batches(self.test_images, self.test_labels, batch_size, self.rank, self.world)

    @property
    def num_test(self) -> int:
        return len(self.dataset.test_labels)

    def close(self) -> None:
        pass


class _EpochReader(NamedTuple):
    """DALI's file reader over iterations ``[next_iteration, stop)``, the rest of one epoch."""

    next_iteration: int
    stop: int
    batches: Iterator[tuple[Tensor, Tensor]]  # (uint8 images, sample indices) per iteration


class FileBatchSource(BatchSource):
    """Training batches of a folder streamed from disk (:class:`~spacedkd_fast.data.files.FileDataset`): each
    batch is decoded when rendered (random resized crop + flip; centre crop for the test set), by the torch/PIL
    renderer or DALI's ("mixed" JPEG decoding on a GPU). Plans, order and sharding are those of BatchSource.

    With DALI, fresh batches come from DALI's file reader (``fn.readers.file``, reading and decoding ahead in its
    own threads): :meth:`render` keeps one reader open over the rest of the current epoch, fed this rank's files in
    plan order, and takes the next batch from it while the requests arrive in order (the teacher's fresh
    batches); any other request opens a reader at that iteration. :meth:`regenerate` (the replay window's
    regenerate tier, resuming) reads files by name instead (``fn.external_source``), the same graph after the
    read, so the bytes are those of the first render. The reader is handed the sample indices as its labels and
    each batch's indices are checked against the plan.

    Broken files (unreadable, or undecodable by the renderer). By default a broken file's sample is *dropped* from
    its batch: the batch is rendered without it, the other samples with their own parameters (so their bytes are
    those they would have with the file intact), and labels follow; the first time a file is met, one
    :class:`~spacedkd_fast.data.files.BrokenImageWarning` names it. Dropping, not substituting another image, so
    that no sample is duplicated or shown under another's label, and a short batch is already what every epoch's
    last batch is. The kept samples are a pure function of the plan and the files' contents, so the teacher's
    fresh batch, its replay, its regeneration and the same batch after a resume are byte-identical:

    * torch renderer: PIL decodes whole files, so a file is broken or not whatever the batch. A broken file stays
      skipped for the rest of the session (even if it is repaired meanwhile: a replay must match the batch the
      teacher saw), and is met again, identically, after a resume.
    * DALI: its decoders name no file, and a truncated JPEG can fail for one crop window and not another (ROI
      decoding), so the decision is per batch: a batch DALI fails on is rendered again by name, and the files of it
      that PIL cannot decode are dropped (remembered per iteration, so its regeneration skips the failing attempt).
      A failure that PIL does not explain is raised as it is. The epoch's file reader stops at such a batch and is
      opened again after it.

    A batch left with fewer than 2 readable samples (BatchNorm needs 2) stops the run with a BrokenFilesError
    naming them; so does every broken file with ``strict_data`` (:attr:`strict_data`). Test images are dropped
    the same way (the accuracy is over the readable ones). :attr:`skipped_samples` counts the training samples
    dropped from fresh batches in this session, :attr:`skipped_files` the broken files met.
    """

    def _setup_storage(self) -> None:
        self._reader: _EpochReader | None = None  # DALI: the reader over the rest of the current epoch
        self.strict_data = False  # set by the trainer from --strict-data
        # Named now: this runs while the run is built (inside cli_names() on the command line), rendering later
        # runs on a prefetch thread, outside it.
        flag = setting_name("strict_data")
        self._broken = BrokenFiles(flag if flag.startswith("--") else flag + "True")
        self._drops: dict[tuple[str, int], tuple[int, ...]] = {}  # (split, iteration/chunk) -> dropped positions
        self._fresh_drops: dict[int, int] = {}  # iteration -> training samples dropped from its fresh batch
        if self.backend == "dali":
            from spacedkd_fast.data.dali import DaliFileRenderer

            self.renderer = DaliFileRenderer(self.dataset.crop, self.device,
                                             max_batch=max(self.local_batch_size(0), 1))
        else:
            from spacedkd_fast.data.files import TorchFileRenderer

            self.renderer = TorchFileRenderer(self.dataset.crop, self.device)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.dataset.image_shape

    def _crop_params(self, plan: BatchPlan):
        return sample_crop_params(self.dataset.crop, plan.indices.numel(), torch.Generator().manual_seed(plan.seed))

    def _labels(self, plan: BatchPlan) -> Tensor:
        return self.labels.index_select(0, plan.indices.to(self.device, non_blocking=True))

    @property
    def skipped_samples(self) -> int:
        """Training samples dropped from fresh batches (broken files) in this session."""
        return sum(self._fresh_drops.values())

    @property
    def skipped_files(self) -> tuple[str, ...]:
        """The broken files met in this session (training and test), in the order met."""
        return self._broken.paths

    def render(self, plan: BatchPlan) -> tuple[Tensor, Tensor]:
        if self.backend != "dali" or ("train", plan.iteration) in self._drops:
            return self._render_by_name(plan, fresh=True)  # (a batch known to hold broken files: DALI would fail)
        reader = self._reader
        if reader is None or reader.next_iteration != plan.iteration or plan.iteration == reader.stop:
            reader = self._open_reader(plan.iteration)
        try:
            images, indices = next(reader.batches)
        except RuntimeError:  # DALI names no file: read this batch by name, which finds and drops the broken ones
            self._close_reader()  # (the pipeline is done for; the next batch opens a reader there)
            return self._render_by_name(plan, fresh=True)
        self._reader = reader._replace(next_iteration=plan.iteration + 1)
        if not torch.equal(indices, plan.indices):  # (host tensors: no sync) cannot happen unless the order broke
            raise RuntimeError(f"DALI's file reader delivered samples {indices[:4].tolist()}... for iteration "
                               f"{plan.iteration}, whose plan holds {plan.indices[:4].tolist()}...")
        return images, self._labels(plan)

    def regenerate(self, plan: BatchPlan) -> tuple[Tensor, Tensor]:
        return self._render_by_name(plan, fresh=False)

    def _render_by_name(self, plan: BatchPlan, *, fresh: bool) -> tuple[Tensor, Tensor]:
        """The plan's batch read file by file, without its broken files' samples."""
        files = [self.dataset.train_files[i] for i in plan.indices.tolist()]
        params = self._crop_params(plan)
        keep, images = self._without_broken(
            ("train", plan.iteration), files, min(2, len(files)), f"training batch {plan.iteration}",
            lambda keep: self.renderer.train_batch([files[k] for k in keep],
                                                   params.take(torch.tensor(keep, dtype=torch.int64))))
        if len(keep) == len(files):
            return images, self._labels(plan)
        if fresh:
            self._fresh_drops[plan.iteration] = len(files) - len(keep)
        indices = plan.indices[torch.tensor(keep, dtype=torch.int64)]
        return images, self.labels.index_select(0, indices.to(self.device, non_blocking=True))

    def _without_broken(self, key: tuple[str, int], files: list[str], minimum: int, where: str,
                        render) -> tuple[list[int], Tensor | None]:
        """``(kept positions, render(kept positions))``: every position but the broken files' (see the class
        docstring), at most one failed attempt per newly met broken file set."""
        dropped = set(self._drops.get(key, ()))
        if self.backend != "dali":  # PIL: broken whatever the batch, so skip it without trying again
            dropped.update(k for k, path in enumerate(files) if path in self._broken)
        while True:
            keep = [k for k in range(len(files)) if k not in dropped]
            if len(keep) < minimum:
                raise BrokenFilesError({files[k]: "broken" for k in sorted(dropped)},
                                       f"{where}: {len(dropped)} of its {len(files)} files are broken "
                                       f"({', '.join(repr(files[k]) for k in sorted(dropped))}), which leaves "
                                       f"fewer than {minimum} samples (BatchNorm needs 2)")
            if not keep:  # (a test chunk of broken files only)
                return keep, None
            try:
                images = render(keep)
            except BrokenFilesError as exc:
                met = {k for k in keep if files[k] in exc.files}
                if not met:  # the renderer blamed files outside the batch: not something skipping can fix
                    raise
                self._broken.note(exc, strict=self.strict_data)  # warns once per file; strict: raises
                dropped |= met
                continue
            if dropped:
                self._drops[key] = tuple(sorted(dropped))
            return keep, images

    def _open_reader(self, iteration: int) -> _EpochReader:
        """A DALI file reader over this rank's files from ``iteration`` to the end of its epoch."""
        self._close_reader()
        stop = (iteration // self.iters_per_epoch + 1) * self.iters_per_epoch
        plans = [self.plan(i) for i in range(iteration, stop)]
        indices = torch.cat([p.indices for p in plans])
        files = [self.dataset.train_files[i] for i in indices.tolist()]
        # The full per-rank batch even when the reader starts at a short last batch: the reader then pads it to
        # that size, as train_batch pads a regenerated one on a GPU (same decoder split, same bytes).
        batches = self.renderer.epoch_batches(files, indices, self.batch_size // self.world,
                                              lambda i: self._crop_params(plans[i]), labels_device="cpu")
        self._reader = _EpochReader(iteration, stop, batches)
        return self._reader

    def _close_reader(self) -> None:
        if self._reader is not None:
            try:
                self._reader.batches.close()  # runs epoch_batches' cleanup: the pipeline and its threads go
            except ValueError:  # "generator already executing": a prefetch thread that outlived its join timeout
                pass  # is still inside it; the pipeline goes when that thread drops the generator
            self._reader = None

    def test_batches(self, batch_size: int):
        for chunk in shard_chunks(len(self.dataset.test_files), batch_size, self.rank, self.world):
            files = list(self.dataset.test_files[chunk])
            keep, images = self._without_broken(("test", chunk.start), files, 0, f"test images {chunk.start}..",
                                                lambda keep, files=files: self.renderer.eval_batch(
                                                    [files[k] for k in keep]))
            if keep:
                yield images, self.dataset.test_labels[chunk][torch.tensor(keep, dtype=torch.int64)].to(self.device)

    def close(self) -> None:
        self._close_reader()
        self.renderer.close()


def make_source(dataset, **kwargs) -> BatchSource:
    """The BatchSource for an in-memory dataset, the FileBatchSource for a streamed folder."""
    return (FileBatchSource if isinstance(dataset, FileDataset) else BatchSource)(dataset, **kwargs)


def shard_chunks(n: int, batch_size: int, rank: int = 0, world: int = 1):
    """Slices of this rank's contiguous shard of ``n`` test samples, ``batch_size`` at a time."""
    per_rank = math.ceil(n / world)
    stop = min(n, (rank + 1) * per_rank)
    for start in range(rank * per_rank, stop, batch_size):
        yield slice(start, min(start + batch_size, stop))


def evaluation_batches(images: Tensor, labels: Tensor, batch_size: int, rank: int = 0, world: int = 1):
    """This rank's shard of a test set in fixed-size chunks: yields ``(uint8 images, labels)`` slices."""
    for chunk in shard_chunks(images.shape[0], batch_size, rank, world):
        yield images[chunk], labels[chunk]
