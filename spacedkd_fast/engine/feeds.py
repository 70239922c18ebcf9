"""Data feeds: where the engine's fresh batches come from, and how a kept batch becomes model inputs again.

Every feed follows :class:`Feed`: the engine asks for the fresh :class:`Batch` of a data iteration, the block
driver keeps ``batch.stored`` in the replay window (:mod:`spacedkd_fast.data.window`) when the schedule says so,
and a replayed ``stored`` is turned back into inputs by :meth:`Feed.inputs`, byte-identical. Two feeds:

* :class:`SourceFeed`: the package's data sources (in-memory datasets, streamed folders; torch or DALI). Batches are
  uint8 images augmented on the device from a *plan* (sample indices + a seed); the window keeps uint8 in rings
  (device, pinned host) or only the plan, and inputs are normalized when used.
* :class:`LoaderFeed`: the user's own map-style ``Dataset`` or ``DataLoader``. Batches are kept *as produced* by the
  user's transforms and collate function (any tensor, or tuple/list/dict of tensors), on the device or in pinned
  host memory within the budgets; beyond both they are fetched again when replayed (their plan is the data
  iteration). Every sample is drawn with a seed of its own (``derive_seed(seed, "sample", iteration, k)``, set for
  ``torch`` and ``random`` around the dataset's ``__getitem__``), so a batch is a pure function of its data
  iteration: random transforms replay, resume and regenerate exactly, with or without worker processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor
from torch.utils import _pytree as pytree
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler, default_collate

from spacedkd_fast.data import load_dataset
from spacedkd_fast.data.augment import normalize
from spacedkd_fast.data.datasets import ImageDataset, canonical_dataset_name
from spacedkd_fast.data.files import FILE_DATASET_NAMES, FileDataset, scan_folder_dataset
from spacedkd_fast.data.pipeline import BatchPlan, derive_seed, make_source, shard_chunks
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
        raise ValueError(f"--stream applies to folder datasets ({', '.join(FILE_DATASET_NAMES)}), not "
                         f"{cfg.dataset!r}")
    split = dict(val_fraction=cfg.val_fraction, split_seed=cfg.split_seed)
    if stream:
        default_size = 64 if name == "tiny-imagenet" else 224
        return scan_folder_dataset(cfg.dataset, cfg.data_dir, image_size=cfg.image_size or default_size, **split)
    return load_dataset(cfg.dataset, cfg.data_dir, image_size=cfg.image_size, **split)


def subset_dataset(dataset, n: int):
    """The first ``n`` training images (and ``n // 4`` test images) of a fixed shuffle, the same for every seed."""
    if n > len(dataset.train_labels):
        raise ValueError(f"--subset {n} is larger than the training set ({len(dataset.train_labels)} images)")
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


class _SeededSamples(Dataset):
    """``dataset[i]`` under a seed of its own: indexed by ``(i, seed)``."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        generator = torch.default_generator  # (torch.manual_seed would also reach for every accelerator: 100x slower)
        if torch.utils.data.get_worker_info() is not None:  # a worker's random streams are its own
            generator.manual_seed(seed)
            random.seed(seed)
            return self.dataset[index]
        saved = generator.get_state(), random.getstate()  # the main process's streams are the roles': restore them
        generator.manual_seed(seed)
        random.seed(seed)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(saved[0])
            random.setstate(saved[1])


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


class LoaderFeed:
    """The user's own data: a map-style ``Dataset`` or a ``DataLoader`` over one, for training and evaluation.

    A ``DataLoader`` contributes its dataset, ``batch_size``, ``collate_fn``, ``num_workers``, ``drop_last`` and
    whether it shuffles; the order itself is drawn here (seeded per epoch, the same on every rank) so that resume
    is exact. A bare ``Dataset`` is read with ``batch_size`` in the main process, shuffled.

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

    # ---- order ----------------------------------------------------------------------------------------------------
    def _order(self, epoch: int) -> Tensor:
        if not self.train.shuffle:
            return torch.arange(self.num_train)
        return torch.randperm(self.num_train, generator=torch.Generator().manual_seed(derive_seed(self.seed, "order",
                                                                                                   epoch)))

    def _keys(self, data_iteration: int, order: Tensor) -> list[tuple[int, int]]:
        """This rank's ``(index, sample seed)`` pairs of a data iteration."""
        b = self.train.batch_size
        start = (data_iteration % self.iters_per_epoch) * b
        indices = order[start:start + b][self.rank::self.world].tolist()
        return [(i, derive_seed(self.seed, "sample", data_iteration, self.rank, k)) for k, i in enumerate(indices)]

    def _loader(self, first: int, stop: int) -> Iterator:
        epoch = first // self.iters_per_epoch
        order = self._order(epoch)
        batches = [self._keys(i, order) for i in range(first, stop)]
        return iter(DataLoader(_SeededSamples(self.train.dataset), batch_sampler=batches,
                               collate_fn=self.train.collate_fn, num_workers=self.train.num_workers,
                               pin_memory=self.device.type == "cuda"))

    def _fetch(self, data_iteration: int, sequential: bool = True):
        """The collated host batch of a data iteration (the loader runs ahead within the epoch)."""
        if not sequential:
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
        leaves, spec = pytree.tree_flatten(batch)
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
        moved = [t.to(self.device, non_blocking=True) for t in leaves]
        return pytree.tree_unflatten(moved, spec)

    def _check_labels(self, x, y, data_iteration: int, what: str) -> None:
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError(f"{what}: batch {data_iteration}'s inputs and labels must be tensors, got "
                            f"{type(x).__name__} and {type(y).__name__}")
        if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool or y.shape[0] != x.shape[0]:
            raise ValueError(f"{what}: batch {data_iteration}'s labels must be integer class indices of shape "
                             f"({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
        if self.num_classes is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"{what}: batch {data_iteration} has labels in [{int(y.min())}, {int(y.max())}]; the "
                             f"models have {self.num_classes} classes (labels must be in [0, {self.num_classes}))")

    def inputs(self, stored) -> tuple[Tensor, Tensor]:
        x, y = self.unpack(stored)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def probe_input(self) -> Tensor:
        """The inputs of the first two training samples, on the device: the model-output check's input."""
        keys = [(i, derive_seed(self.seed, "probe", i)) for i in range(min(2, self.num_train))]
        samples = _SeededSamples(self.train.dataset)
        batch = self._to_device(self.train.collate_fn([samples[k] for k in keys]), -1, "train_data (first samples)")
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
        """This rank's contiguous shard of ``eval_data``, in order, on the device."""
        if self.eval is None:
            return
        n = len(self.eval.dataset)
        chunks = [list(range(c.start, c.stop)) for c in shard_chunks(n, self.eval.batch_size, self.rank, self.world)]
        loader = DataLoader(self.eval.dataset, batch_sampler=chunks, collate_fn=self.eval.collate_fn,
                            num_workers=self.eval.num_workers, pin_memory=self.device.type == "cuda")
        for k, batch in enumerate(loader):
            yield self.inputs(self._to_device(batch, k, "eval_data"))

    def close(self) -> None:
        self._iterator = None


def is_package_dataset(data) -> bool:
    return isinstance(data, (ImageDataset, FileDataset))
