"""Data feeds: where the engine's fresh batches come from, and how a kept batch becomes model inputs again.

Every feed follows :class:`Feed`: the engine asks for the fresh :class:`Batch` of a data iteration, the block
driver keeps ``batch.stored`` in the replay window (:mod:`spacedkd_fast.data.window`) when the schedule says so,
and a replayed ``stored`` is turned back into inputs by :meth:`Feed.inputs`, byte-identical. Two feeds:

* :class:`SourceFeed`: the package's data sources (in-memory datasets, streamed folders; torch or DALI). Batches are
  uint8 images augmented on the device from a *plan* (sample indices + a seed); the window keeps uint8 in rings
  (device, pinned host) or only the plan, and inputs are normalized when used.
* :class:`LoaderFeed`: the user's own map-style ``Dataset`` or ``DataLoader``. Batches are kept *as produced* by the
  user's transforms and collate function (any tensor, or tuple/list/dict of tensors), on the device or in pinned
  host memory within the budgets; beyond both they are fetched again when replayed. Every sample is read with a
  seed of its own, ``derive_seed(seed, "sample", data_iteration, rank, k)``, set before the dataset's
  ``__getitem__`` for those of torch's default CPU generator, ``random`` and numpy's global RNG that the dataset
  draws from (:func:`seed_global_rngs`, :class:`_SeededSamples`), so a batch is a pure function of its data
  iteration: random transforms replay, resume and are fetched again exactly, with or without worker processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils import _pytree as pytree
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler, default_collate

from spacedkd_fast.config import setting_name
from spacedkd_fast.data import load_dataset
from spacedkd_fast.data.augment import normalize
from spacedkd_fast.data.datasets import ImageDataset, canonical_dataset_name
from spacedkd_fast.data.files import FILE_DATASET_NAMES, FileDataset, scan_folder_dataset
from spacedkd_fast.data.pipeline import BatchPlan, derive_seed, derive_seeds, make_source, shard_chunks
from spacedkd_fast.data.producer import Prefetcher
from spacedkd_fast.data.window import BlockingHostStorage, CopyStorage, ReplayWindow, RingStorage, TierBudget


class Batch(NamedTuple):
    """A fresh batch: ``stored`` (what the replay window keeps: uint8 images and labels for the package's
    sources, the collated batch as produced for a user's data), the model ``inputs`` and ``labels`` on the device,
    and its ``plan`` (how to produce it again: a :class:`~spacedkd_fast.data.pipeline.BatchPlan`, or the data
    iteration of a user batch)."""

    stored: Any
    inputs: Tensor
    labels: Tensor
    plan: Any


class Feed(Protocol):
    """What the engine needs from its data (:class:`SourceFeed`, :class:`LoaderFeed`)."""

    kind: str  # "package" | "user"
    name: str
    iters_per_epoch: int
    num_train: int
    num_test: int
    num_classes: int | None  # None until the models' outputs set it (a user's data)

    def probe_input(self) -> Tensor:
        """Model inputs of two training samples on the device (the model-output check)."""

    def start(self, first: int, end: int, depth: int) -> None:
        """Fresh batches ``first..end-1`` will be asked for in order; render up to ``depth`` ahead."""

    def fresh(self, data_iteration: int) -> Batch:
        """The fresh batch of a data iteration."""

    def peek(self, data_iteration: int) -> Batch:
        """The fresh batch of a data iteration, produced out of order (the first-batch check): byte-identical to
        :meth:`fresh`'s, without disturbing the in-order stream that :meth:`fresh` reads."""

    def inputs(self, stored) -> tuple[Tensor, Tensor]:
        """``(model inputs, labels)`` of a stored batch."""

    def make_window(self, capacity: int, budget: TierBudget, storage: str = "device") -> ReplayWindow:
        """A replay window for this feed's batches."""

    def digest(self, stored) -> str:
        """sha1 of a stored batch's bytes (``--trace-batches``)."""

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's evaluation batches: model inputs and labels on the device."""

    def close(self) -> None:
        ...


def batch_digest(*tensors: Tensor) -> str:
    """sha1 of a batch's bytes (host copy: only used with ``--trace-batches``)."""
    h = hashlib.sha1()
    for t in tensors:
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ================================================================================================ package sources
def load_training_data(cfg, data_backend: str):
    """The run's dataset: decoded into memory, or (folder datasets with ``--stream``, by default with DALI) a
    :class:`~spacedkd_fast.data.files.FileDataset` streamed from disk."""
    name = canonical_dataset_name(cfg.dataset)
    folder = name in FILE_DATASET_NAMES
    stream = cfg.stream if cfg.stream is not None else folder and data_backend == "dali"
    if stream and not folder:
        raise ValueError(f"{setting_name('stream')} applies to folder datasets ({', '.join(FILE_DATASET_NAMES)}), not "
                         f"{cfg.dataset!r}")
    split = dict(val_fraction=cfg.val_fraction, split_seed=cfg.split_seed)
    if stream:
        default_size = 64 if name == "tiny-imagenet" else 224
        return scan_folder_dataset(cfg.dataset, cfg.data_dir, image_size=cfg.image_size or default_size, **split)
    return load_dataset(cfg.dataset, cfg.data_dir, image_size=cfg.image_size, **split)


def subset_dataset(dataset, n: int):
    """The first ``n`` training images (and ``n // 4`` test images) of a fixed shuffle, the same for every seed."""
    if n > len(dataset.train_labels):
        raise ValueError(f"{setting_name('subset')} {n} is larger than the training set "
                         f"({len(dataset.train_labels)} images)")
    train = torch.randperm(len(dataset.train_labels), generator=torch.Generator().manual_seed(0))[:n]
    test = torch.randperm(len(dataset.test_labels), generator=torch.Generator().manual_seed(1))
    test = test[:max(n // 4, min(len(test), 16))]
    if isinstance(dataset, FileDataset):
        return dataclasses.replace(dataset, name=f"{dataset.name}[subset {n}]",
                                   train_files=tuple(dataset.train_files[i] for i in train.tolist()),
                                   train_labels=dataset.train_labels[train].contiguous(),
                                   test_files=tuple(dataset.test_files[i] for i in test.tolist()),
                                   test_labels=dataset.test_labels[test].contiguous())
    return dataclasses.replace(dataset, name=f"{dataset.name}[subset {n}]",
                               train_images=dataset.train_images[train].contiguous(),
                               train_labels=dataset.train_labels[train].contiguous(),
                               test_images=dataset.test_images[test].contiguous(),
                               test_labels=dataset.test_labels[test].contiguous())


class SourceFeed:
    """The package's datasets: uint8 batches augmented on the device, a tiered uint8 window.

    Args:
        dataset: an :class:`~spacedkd_fast.data.datasets.ImageDataset` or a streamed ``FileDataset``.
        batch_size: global batch size (each DDP rank gets its share).
        seed: the run seed (data order and augmentation).
        device, rank, world: where and which shard.
        backend: "torch" or "dali" (resolved).
        channels_last: normalized inputs in channels-last memory format.
    """

    kind = "package"

    def __init__(self, dataset, *, batch_size: int, seed: int, device: torch.device, rank: int = 0, world: int = 1,
                 backend: str = "torch", channels_last: bool = False) -> None:
        self.dataset = dataset
        self.backend = backend
        self.device = device
        self.source = make_source(dataset, batch_size=batch_size, seed=seed, device=device, rank=rank, world=world,
                                  backend=backend)
        self.iters_per_epoch = self.source.iters_per_epoch
        self.num_classes = dataset.num_classes
        self.name = dataset.name
        self.num_train, self.num_test = len(dataset.train_labels), len(dataset.test_labels)
        mean, std = dataset.mean, dataset.std
        self.normalize = lambda u8: normalize(u8, mean, std, channels_last=channels_last)
        self._prefetcher: Prefetcher | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.source.image_shape)

    def probe_input(self) -> Tensor:
        """Two blank normalized images: the model-output check's input."""
        return self.normalize(torch.zeros((2, *self.image_shape), dtype=torch.uint8, device=self.device))

    def make_window(self, capacity: int, budget: TierBudget, storage: str = "device") -> ReplayWindow:
        """uint8 rings within the budgets, plans beyond them (``storage="host"``: the official code's blocking host
        copies, a benchmark baseline)."""
        if storage == "host":
            return ReplayWindow(BlockingHostStorage(self.device), capacity=capacity, budget=budget)
        if storage != "device":
            raise ValueError(f"window storage must be 'device' or 'host', got {storage!r}")
        rings = RingStorage.for_budget(capacity, self.image_shape, self.source.local_batch_size(0), self.device,
                                       budget)
        return ReplayWindow(rings, capacity=capacity, budget=budget, regenerate=self.source.regenerate,
                            plan_to_state=lambda plan: (plan.indices, plan.seed),
                            plan_from_state=lambda iteration, state: BatchPlan(iteration, *state))

    # ---- fresh batches --------------------------------------------------------------------------------------------
    def start(self, first: int, end: int, depth: int) -> None:
        """Render data iterations ``first..end-1`` ``depth`` batches ahead on a thread (0: inline)."""
        self._prefetcher = Prefetcher(range(first, end), self._render, depth, self.device) if depth > 0 else None

    def _render(self, data_iteration: int):
        plan = self.source.plan(data_iteration)
        return (plan, *self.source.render(plan))

    def fresh(self, data_iteration: int) -> Batch:
        """A fresh batch: stored = ``(uint8 images, labels)``, inputs normalized."""
        if self._prefetcher is not None:
            plan, images, labels = self._prefetcher.next(data_iteration)
        else:
            plan, images, labels = self._render(data_iteration)
        return Batch((images, labels), self.normalize(images), labels, plan)

    def peek(self, data_iteration: int) -> Batch:
        plan = self.source.plan(data_iteration)
        images, labels = self.source.regenerate(plan)  # not the epoch reader a streamed DALI source keeps open
        return Batch((images, labels), self.normalize(images), labels, plan)

    def inputs(self, stored) -> tuple[Tensor, Tensor]:
        images, labels = stored
        return self.normalize(images), labels

    def digest(self, stored) -> str:
        images, labels = stored
        return batch_digest(images.to(torch.uint8), labels.to(torch.int64))

    # ---- evaluation -----------------------------------------------------------------------------------------------
    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's shard of the test set: normalized inputs and labels on the device."""
        for images, labels in self.source.test_batches(batch_size):
            yield (self.normalize(images.to(self.device, non_blocking=True)),
                   labels.to(self.device, non_blocking=True))

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
        self.source.close()


# ================================================================================================== user datasets
def default_unpack(batch) -> tuple[Any, Any]:
    """``(inputs, labels)`` of a collated batch: a ``(x, y, ...)`` tuple/list, or a dict with ``image``/``input``/
    ``x`` and ``label``/``labels``/``target``/``y``."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        x = next((batch[k] for k in ("image", "input", "inputs", "x") if k in batch), None)
        y = next((batch[k] for k in ("label", "labels", "target", "y") if k in batch), None)
        if x is not None and y is not None:
            return x, y
        raise ValueError(f"a dict batch needs an input key (image/input/inputs/x) and a label key "
                         f"(label/labels/target/y); got keys {sorted(batch)} (pass unpack= to say which)")
    raise ValueError(f"a batch must be (inputs, labels, ...) or a dict, got {type(batch).__name__} (pass unpack= "
                     f"to say how to split it)")


NUMPY_SEED_BITS = 0xFFFF_FFFF  # numpy's legacy global RNG takes 32-bit seeds: a sample's seed is cut to its low bits
STREAMS = ("torch", "random", "numpy")  # the global random streams a Dataset.__getitem__ may draw from
ALWAYS_SEEDED = frozenset({"torch"})  # ... seeded whether or not it draws from them (torch.initial_seed() is a read)


def seed_global_rngs(seed: int, streams=STREAMS) -> None:
    """Seed the global random streams a ``Dataset.__getitem__`` may draw from, as the engine does before reading
    each sample (for those of them the dataset draws from, :class:`_SeededSamples`): torch's default CPU generator,
    Python's ``random`` and numpy's legacy global RNG (``np.random.*``; ``seed & 0xFFFFFFFF``). Each is seeded as
    its own ``seed`` function does, so cached values go too (``random``'s and numpy's second Gaussian of a pair,
    torch's cached normal). ``torch.manual_seed`` would also seed every accelerator's generator, 100x slower; a
    transform drawing from a CUDA generator or from its own generator object (``np.random.default_rng()``) is not
    seeded."""
    if "torch" in streams:
        torch.default_generator.manual_seed(seed)
    if "random" in streams:
        random.seed(seed)
    if "numpy" in streams:
        np.random.seed(seed & NUMPY_SEED_BITS)


class SavedStreams(NamedTuple):
    torch: Tensor
    random: tuple
    numpy: tuple  # numpy's get_state(), key as a list (set_state is 15x faster with a list)
    numpy_raw: bytes | None  # ... and its raw bytes, where they can be read
    random_raw: tuple | None = None  # random's raw state and cached Gaussian, where they can be read


class _Streams:
    """This process's global random streams: saved before a batch's samples are read, compared and restored after
    them. In the main process the default torch generator holds a role's stream (its dropout) while a batch is
    read, and the user's own code may draw from ``random`` or numpy between batches: neither may see that samples
    were read. In every process, a stream that moved while no seed had been set for it tells that the dataset
    draws from it (:class:`_SeededSamples`).

    Reading a state is what a batch's save costs: numpy's ``get_state()`` ~40 µs (it copies its 624 words one by
    one), ``random.getstate()`` ~10 µs (a tuple of 625 ints), twice a batch with the comparison after it. Both are
    skipped when the stream's raw words and position are, byte for byte (read through ctypes, ~0.5 µs), those of
    the state read last time: every draw moves them, so between two batches that nothing drew from a stream (the
    usual case) its state is known. A cached second Gaussian of a pair is not in those bytes: numpy's shortcut
    needs none cached in the state it reuses (the one change it cannot see: ``np.random.set_state`` to the very
    same words with a Gaussian cached), ``random``'s compares ``gauss_next`` too. The bytes' layout is checked once
    against ``get_state()`` / ``getstate()``; where it does not match, the full read always runs.
    """

    def __init__(self) -> None:
        self._numpy: tuple | None = None  # the state get_state() returned last
        self._numpy_raw: bytes | None = None  # ... and its raw bytes
        self._random: tuple | None = None  # the state random.getstate() returned last
        self._random_raw: tuple | None = None  # ... and its raw bytes with gauss_next

    def save(self) -> SavedStreams:
        numpy_raw = _numpy_raw_state()
        if numpy_raw is None or numpy_raw != self._numpy_raw or self._numpy[3]:
            name, key, pos, has_gauss, gauss = np.random.get_state()
            self._numpy, self._numpy_raw = (name, key.tolist(), pos, has_gauss, gauss), numpy_raw
        random_raw = _random_raw_state()
        if random_raw is None or random_raw != self._random_raw:
            self._random, self._random_raw = random.getstate(), random_raw
        return SavedStreams(torch.default_generator.get_state(), self._random, self._numpy, numpy_raw, random_raw)

    def restore(self, saved: SavedStreams, streams=STREAMS) -> None:
        """Back to the ``streams`` of a :meth:`save` (its own states: saves may nest)."""
        if "torch" in streams:
            torch.default_generator.set_state(saved.torch)
        if "random" in streams:
            random.setstate(saved.random)
            self._random, self._random_raw = saved.random, saved.random_raw
        if "numpy" in streams:
            np.random.set_state(saved.numpy)

    def moved(self, saved: SavedStreams, streams) -> frozenset[str]:
        """Those of ``streams`` (``random``, ``numpy``: torch's is always seeded, ``ALWAYS_SEEDED``) whose state is
        no longer the saved one (something drew from them)."""
        moved = set()
        if "random" in streams:
            raw = _random_raw_state() if saved.random_raw is not None else None
            if (raw != saved.random_raw) if raw is not None else (random.getstate() != saved.random):
                moved.add("random")
        if "numpy" in streams:
            raw = _numpy_raw_state() if saved.numpy_raw is not None and not saved.numpy[3] else None
            if raw is not None:  # no Gaussian was cached: any draw moved the words or the position
                changed = raw != saved.numpy_raw
            else:
                name, key, pos, has_gauss, gauss = np.random.get_state()
                changed = (pos, has_gauss, gauss) != saved.numpy[2:] or key.tolist() != saved.numpy[1]
            if changed:
                moved.add("numpy")
        return frozenset(moved)


def _random_raw_reader():
    """``() -> (bytes, gauss_next)`` of the global ``random`` generator: its MT19937 position and words, read from
    the object's memory (CPython's ``RandomObject``: the object header, ``int index``, ``uint32_t state[624]``),
    and its cached Gaussian; or None where that memory does not hold what ``getstate()`` reports (another
    interpreter or layout): then the caller always asks ``getstate()``."""
    import ctypes
    import struct

    try:
        generator = random._inst
        address = id(generator) + object.__basicsize__  # past the header: refcount and type
        size = 4 + 624 * 4
        saved = random.getstate()
        try:
            random.seed(12345)
            random.random()  # the position moves off 624
            words = random.getstate()[1]  # (state[0..623], index)
            expected = struct.pack("<i624I", words[-1], *words[:-1])
            if ctypes.string_at(address, size) != expected:
                return None
        finally:
            random.setstate(saved)
    except Exception:  # noqa: BLE001 - any interpreter without this layout: the slow path is always correct
        return None
    return lambda: (ctypes.string_at(address, size), generator.gauss_next)


def _numpy_raw_reader():
    """``() -> bytes`` of numpy's global MT19937 words and position, or None where that memory does not hold the
    state ``get_state()`` reports (a numpy whose struct differs): then the caller always asks ``get_state()``."""
    import ctypes

    try:
        bit_generator = np.random.mtrand._rand._bit_generator
        address = bit_generator.ctypes.state_address
        size = 624 * 4 + 4  # uint32 key[624]; int pos (numpy's mt19937_state_t)
        saved = np.random.get_state()
        try:
            np.random.seed(12345)
            np.random.random_sample(7)  # the position moves off 624
            _, key, pos, *_ = np.random.get_state()
            expected = key.astype("<u4").tobytes() + int(pos).to_bytes(4, "little", signed=True)
            if ctypes.string_at(address, size) != expected:
                return None
        finally:
            np.random.set_state(saved)
    except Exception:  # noqa: BLE001 - any numpy without this interface: the slow path is always correct
        return None
    return lambda: ctypes.string_at(address, size)


_numpy_raw_state = _numpy_raw_reader() or (lambda: None)
_random_raw_state = _random_raw_reader() or (lambda: None)
_STREAMS = _Streams()  # the streams are the process's: one remembered numpy state for every feed


def _random_seeder():
    """``random.seed(s)`` for an int ``s`` without its Python wrapper (~1 µs of its ~4.5): the C generator's own
    seed, then the cached Gaussian dropped, which is all ``Random.seed`` does with an int. ``random.seed`` itself
    where the module's functions are not bound to a C ``_random.Random`` (another interpreter)."""
    import _random

    generator = random._inst
    if not isinstance(generator, _random.Random) or getattr(random.seed, "__self__", None) is not generator:
        return random.seed
    c_seed = _random.Random.seed

    def seed(value: int) -> None:
        c_seed(generator, value)
        generator.gauss_next = None

    return seed


_seed_random = _random_seeder()


class SampleKeys(NamedTuple):
    """The samples of one batch: dataset ``indices``, the k-th read with the seed ``derive_seed(*seed_prefix, k)``
    (derived by the process that reads the batch)."""
    indices: list[int]
    seed_prefix: tuple


class _SeededSamples(Dataset):
    """``dataset[i]`` under a seed of its own: ``__getitems__`` reads a :class:`SampleKeys` batch (the DataLoader's
    fetcher calls it in worker processes, the feed in the main process).

    Each sample is read with the global streams it draws from seeded by :func:`seed_global_rngs` with its own
    seed, in every process, so a sample is the same whichever process reads it. torch's default generator is
    always seeded (a sample may read its seed, ``torch.initial_seed()``, to seed a generator of its own, without
    drawing; seeding it costs ~1 µs). Whether a dataset draws from ``random`` and numpy is observed, not assumed:
    the streams in ``drawn`` are seeded before every sample; the others are left alone and compared after the
    batch, and one that moved joins ``drawn`` and the batch is read again (so each process reads at most two
    batches twice). A sample drawing only from seeded streams is the same as under all three seeds, so a dataset
    that does not use ``random`` or numpy does not pay for seeding them (``random.seed`` alone is ~4 µs). In the
    main process the streams are saved before the batch and restored after it (once a batch: saving them around
    each sample cost 70-180 µs a sample); a worker's streams are its own. The premise, as for exact replay
    itself: ``dataset[i]`` depends on nothing but ``i`` and the global streams.
    """

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self.drawn = ALWAYS_SEEDED  # the streams seeded before each sample: + those the dataset was seen drawing from

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        raise TypeError("_SeededSamples reads whole batches: __getitems__(SampleKeys)")

    def __getitems__(self, keys: SampleKeys) -> list:
        in_worker = torch.utils.data.get_worker_info() is not None
        if in_worker and len(self.drawn) == len(STREAMS):
            return self._read(keys)  # nothing left to watch, nothing to restore
        saved = _STREAMS.save()
        try:
            while True:
                samples = self._read(keys)
                unseeded = [name for name in STREAMS if name not in self.drawn]
                moved = _STREAMS.moved(saved, unseeded) if unseeded else frozenset()
                if not moved:
                    return samples
                self.drawn |= moved  # read the batch again, these streams seeded too (restored below)
        finally:
            if not in_worker:
                _STREAMS.restore(saved, self.drawn)

    def _read(self, keys: SampleKeys) -> list:
        dataset, drawn = self.dataset, self.drawn
        seeds = derive_seeds(*keys.seed_prefix, count=len(keys.indices))
        # seed_global_rngs inlined, the seed functions looked up once a batch (each lookup + call is ~2 µs)
        seed_torch = torch.default_generator.manual_seed if "torch" in drawn else None
        seed_random = _seed_random if "random" in drawn else None
        seed_numpy = np.random.seed if "numpy" in drawn else None
        samples = []
        for index, seed in zip(keys.indices, seeds):
            if seed_torch is not None:
                seed_torch(seed)
            if seed_random is not None:
                seed_random(seed)
            if seed_numpy is not None:
                seed_numpy(seed & NUMPY_SEED_BITS)
            samples.append(dataset[index])
        return samples


@dataclasses.dataclass
class LoaderSettings:
    """How a user's data is read (a DataLoader's own settings, or defaults for a bare Dataset)."""

    dataset: Any
    batch_size: int
    shuffle: bool = True
    collate_fn: Callable = default_collate
    num_workers: int = 0
    drop_last: bool = False

    @staticmethod
    def of(data, batch_size: int, what: str) -> LoaderSettings:
        if isinstance(data, DataLoader):
            if isinstance(data.dataset, IterableDataset):
                raise TypeError(f"{what}: the DataLoader's dataset is an IterableDataset; exact replay and resume need "
                                f"a map-style Dataset (__getitem__ and __len__)")
            if data.batch_size is None:
                raise ValueError(f"{what}: a DataLoader with a batch_sampler is not supported; give it batch_size= "
                                 f"(the engine draws the order itself, seeded, to make resume exact)")
            return LoaderSettings(data.dataset, data.batch_size, not isinstance(data.sampler, SequentialSampler),
                                  data.collate_fn, data.num_workers, data.drop_last)
        if isinstance(data, IterableDataset) or not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
            raise TypeError(f"{what} must be a map-style torch Dataset (__getitem__ and __len__) or a DataLoader over "
                            f"one, got {type(data).__name__}")
        return LoaderSettings(data, batch_size)


_ORDERS_KEPT = 4  # epoch orders LoaderFeed keeps (a replay reaches back ceil(space) + 1 epochs at most)


class LoaderFeed:
    """The user's own data: a map-style ``Dataset`` or a ``DataLoader`` over one, for training and evaluation.

    A ``DataLoader`` contributes its dataset, ``batch_size``, ``collate_fn``, ``num_workers``, ``drop_last`` and
    whether it shuffles; the order itself is drawn here (seeded per epoch, the same on every rank) so that resume
    is exact. A bare ``Dataset`` is read with ``batch_size`` in the main process, shuffled. Without workers the
    samples are read here directly (no DataLoader); with workers, by a DataLoader per epoch (and one per batch
    fetched again), each batch by one worker. Either way each sample is seeded on its own (:class:`_SeededSamples`).

    Args:
        train, eval_data: the data (``eval_data`` may be None: no evaluation).
        batch_size: global batch size for a bare Dataset (each DDP rank gets every world-th sample of a batch).
        eval_batch_size: for a bare evaluation Dataset.
        seed: the run seed.
        device, rank, world: where and which shard.
        unpack: ``batch -> (inputs, labels)`` (default :func:`default_unpack`).
        channels_last: 4-D inputs in channels-last memory format.
    """

    kind = "user"

    def __init__(self, train, eval_data=None, *, batch_size: int, eval_batch_size: int, seed: int,
                 device: torch.device, rank: int = 0, world: int = 1, unpack: Callable | None = None,
                 channels_last: bool = False) -> None:
        self.train = LoaderSettings.of(train, batch_size, "train_data")
        self.eval = LoaderSettings.of(eval_data, eval_batch_size, "eval_data") if eval_data is not None else None
        self.seed, self.device, self.rank, self.world = seed, torch.device(device), rank, world
        self.unpack = unpack or default_unpack
        self.channels_last = channels_last
        n, b = len(self.train.dataset), self.train.batch_size
        if n < 2:
            raise ValueError(f"train_data has {n} sample(s); training needs at least 2")
        if b > n:
            raise ValueError(f"batch_size {b} is larger than train_data ({n} samples)")
        if b % world or b // world < 1:
            raise ValueError(f"batch_size {b} must be divisible by the number of DDP ranks ({world})")
        tail = n % b
        keep_tail = tail and not self.train.drop_last and tail // world >= 2
        self.iters_per_epoch = n // b + (1 if keep_tail else 0)
        self.num_train = n
        self.num_test = len(self.eval.dataset) if self.eval is not None else 0
        self.name = type(self.train.dataset).__name__
        self.num_classes: int | None = None  # set by the engine from the models' outputs
        self._iterator: Iterator | None = None
        self._next = -1
        self._sample_shapes: tuple | None = None  # the first batch's per-sample shapes (batches may not change)
        self._samples = _SeededSamples(self.train.dataset)
        self._orders: dict[int, Tensor] = {}  # epoch -> order, least recently used first

    # ---- order ----------------------------------------------------------------------------------------------------
    def _order(self, epoch: int) -> Tensor:
        """The sample order of an epoch (CPU int64), the same on every rank. The orders of the last few epochs
        asked for are kept: a student fetching the batches of an earlier epoch again alternates with the teacher
        reading the current one (8 bytes a sample each, so even a large dataset's are cheap to keep)."""
        order = self._orders.pop(epoch, None)
        if order is None:
            if not self.train.shuffle:
                order = torch.arange(self.num_train)
            else:
                generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
                order = torch.randperm(self.num_train, generator=generator)
        self._orders[epoch] = order  # now the most recent
        while len(self._orders) > _ORDERS_KEPT:
            del self._orders[next(iter(self._orders))]
        return order

    def _keys(self, data_iteration: int) -> SampleKeys:
        """This rank's samples of a data iteration: the k-th sample's seed is
        ``derive_seed(seed, "sample", data_iteration, rank, k)``."""
        b = self.train.batch_size
        start = (data_iteration % self.iters_per_epoch) * b
        indices = self._order(data_iteration // self.iters_per_epoch)[start:start + b][self.rank::self.world].tolist()
        return SampleKeys(indices, (self.seed, "sample", data_iteration, self.rank))

    def _read(self, data_iteration: int):
        """The collated host batch of a data iteration, read in this process (pinned for a CUDA device)."""
        batch = self.train.collate_fn(self._samples.__getitems__(self._keys(data_iteration)))
        return _pinned(batch) if self.device.type == "cuda" else batch

    def _loader(self, first: int, stop: int) -> Iterator:
        """Worker processes reading data iterations ``first..stop-1``. The loader gets a generator of its own: its
        iterator draws a base seed for the workers, which from the default generator would be a draw from a
        role's stream (the fetch runs inside the role's RNG context), taken where a loader happens to be started
        (not where a resumed run starts one). Every sample is seeded anyway, so the base seed is never used."""
        return iter(DataLoader(self._samples, batch_sampler=[self._keys(i) for i in range(first, stop)],
                               collate_fn=self.train.collate_fn, num_workers=self.train.num_workers,
                               pin_memory=self.device.type == "cuda", generator=torch.Generator()))

    def _fetch(self, data_iteration: int, sequential: bool = True):
        """The collated host batch of a data iteration: read here without workers (no DataLoader: it would only
        add its per-epoch set-up), else from worker processes running ahead within the epoch."""
        if self.train.num_workers == 0:
            return self._read(data_iteration)
        if not sequential:  # the same workers' count as the fresh batch: same threads, same bytes
            return next(self._loader(data_iteration, data_iteration + 1))
        if self._iterator is None or data_iteration != self._next:
            epoch_end = (data_iteration // self.iters_per_epoch + 1) * self.iters_per_epoch
            self._iterator = self._loader(data_iteration, epoch_end)
        batch = next(self._iterator)
        self._next = data_iteration + 1
        if self._next % self.iters_per_epoch == 0:
            self._iterator = None  # the next epoch has another order
        return batch

    # ---- batches --------------------------------------------------------------------------------------------------
    def _to_device(self, batch, data_iteration: int, what: str = "train_data"):
        flat = type(batch) in (tuple, list) and all(type(t) is Tensor for t in batch)  # (inputs, labels): no pytree
        leaves, spec = (list(batch), None) if flat else pytree.tree_flatten(batch)
        bad = sorted({type(x).__name__ for x in leaves if not isinstance(x, Tensor)})
        if bad:
            raise TypeError(f"{what}: batch {data_iteration} holds {', '.join(bad)}, not only tensors; give the "
                            f"dataset a transform that returns tensors (torchvision.transforms.v2.ToImage + ToDtype, "
                            f"or ToTensor)")
        shapes = tuple(tuple(x.shape[1:]) for x in leaves)
        if what == "train_data":
            if self._sample_shapes is None:
                self._sample_shapes = shapes
            elif shapes != self._sample_shapes:
                raise ValueError(f"train_data: batch {data_iteration} has per-sample shapes {list(shapes)}, the first "
                                 f"batch had {list(self._sample_shapes)}; the replay window needs samples of one shape "
                                 f"(resize or crop in the transform)")
        x, y = self.unpack(batch)
        self._check_labels(x, y, data_iteration, what)
        if all(t.device == self.device for t in leaves):
            return batch  # (training on the CPU) nothing to move, nothing to rebuild
        moved = [t.to(self.device, non_blocking=True) for t in leaves]
        return type(batch)(moved) if flat else pytree.tree_unflatten(moved, spec)

    def _check_labels(self, x, y, data_iteration: int, what: str) -> None:
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError(f"{what}: batch {data_iteration}'s inputs and labels must be tensors, got "
                            f"{type(x).__name__} and {type(y).__name__}")
        if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool or y.shape[0] != x.shape[0]:
            raise ValueError(f"{what}: batch {data_iteration}'s labels must be integer class indices of shape "
                             f"({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
        if self.num_classes is None or not y.numel():
            return
        # One reduction for both ends (labels on the host, as a Dataset gives them: no device sync).
        low, high = (int(end) for end in torch.aminmax(y))
        if low < 0 or high >= self.num_classes:
            raise ValueError(f"{what}: batch {data_iteration} has labels in [{low}, {high}]; the models have "
                             f"{self.num_classes} classes (labels must be in [0, {self.num_classes}))")

    def inputs(self, stored) -> tuple[Tensor, Tensor]:
        x, y = self.unpack(stored)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def probe_input(self) -> Tensor:
        """The inputs of the first two training samples, on the device: the model-output check's input."""
        keys = SampleKeys(list(range(min(2, self.num_train))), (self.seed, "probe"))
        batch = self._to_device(self.train.collate_fn(self._samples.__getitems__(keys)), -1,
                                "train_data (first samples)")
        return self.inputs(batch)[0]

    def start(self, first: int, end: int, depth: int) -> None:
        self._iterator, self._next = None, -1

    def fresh(self, data_iteration: int) -> Batch:
        stored = self._to_device(self._fetch(data_iteration), data_iteration)
        return Batch(stored, *self.inputs(stored), data_iteration)

    def peek(self, data_iteration: int) -> Batch:
        stored = self.refetch(data_iteration)
        return Batch(stored, *self.inputs(stored), data_iteration)

    def refetch(self, data_iteration: int):
        """A batch fetched again (the window's regenerate tier): the same samples under the same seeds."""
        return self._to_device(self._fetch(data_iteration, sequential=False), data_iteration)

    # ---- the window -----------------------------------------------------------------------------------------------
    def make_window(self, capacity: int, budget: TierBudget, storage: str = "device") -> ReplayWindow:
        """Batches as produced within the budgets; beyond them, fetched again (their plan is the iteration)."""
        if storage != "device":
            raise ValueError(f"window_storage {storage!r} applies to the package's data sources only")
        return ReplayWindow(CopyStorage(self.device), capacity=capacity, budget=budget, regenerate=self.refetch)

    def digest(self, stored) -> str:
        return batch_digest(*pytree.tree_leaves(stored))

    # ---- evaluation -----------------------------------------------------------------------------------------------
    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's contiguous shard of ``eval_data``, in order, on the device.

        Evaluation samples are not seeded (an evaluation reads its data as a plain loop would), but the main
        process's random streams are restored once the evaluation is over: it runs inside the role's RNG context,
        so a random evaluation transform would otherwise draw from the role's stream, and the loader's worker base
        seed would be one draw more (it gets a generator of its own); training would then depend on the
        evaluation data."""
        if self.eval is None:
            return
        n = len(self.eval.dataset)
        chunks = [list(range(c.start, c.stop)) for c in shard_chunks(n, self.eval.batch_size, self.rank, self.world)]
        loader = DataLoader(self.eval.dataset, batch_sampler=chunks, collate_fn=self.eval.collate_fn,
                            num_workers=self.eval.num_workers, pin_memory=self.device.type == "cuda",
                            generator=torch.Generator())
        saved = _STREAMS.save()
        try:
            for k, batch in enumerate(loader):
                yield self.inputs(self._to_device(batch, k, "eval_data"))
        finally:
            _STREAMS.restore(saved)

    def close(self) -> None:
        self._iterator = None


def _pinned(batch):
    """The batch with its tensors in pinned host memory (what ``DataLoader(pin_memory=True)`` does)."""
    return pytree.tree_map_only(Tensor, lambda t: t.pin_memory(), batch)


def is_package_dataset(data) -> bool:
    return isinstance(data, (ImageDataset, FileDataset))
