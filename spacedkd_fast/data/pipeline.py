"""Deterministic training batches for the torch data path.

``BatchSource.batch(i)`` returns the augmented uint8 batch of global iteration ``i`` and its labels, on the
training device. It is a pure function of ``(seed, i, rank)``: the epoch's sample order comes from a generator
seeded by ``(seed, epoch)`` and the batch's augmentation from one seeded by ``(seed, i, rank)``. Nothing carries
over from one batch to the next, so

* the teacher and the student can be fed in any interleaving, and a resumed run continues mid-epoch from the
  iteration counter alone (no data-loader state to save);
* a batch can be regenerated exactly from its iteration number (the window cache's regenerate tier).

The dataset's uint8 images live on the training device; cropping, flipping and rotating run there too.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from spacedkd_fast.data.augment import augment_batch
from spacedkd_fast.data.datasets import ImageDataset


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings (stable across processes and platforms)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class BatchSource:
    """Training batches of an in-memory dataset, sharded over DDP ranks.

    Args:
        dataset: the dataset (its uint8 train images are copied to ``device`` once).
        batch_size: global batch size; rank ``r`` of ``world`` gets every ``world``-th sample of each batch.
        seed: run seed.
        device: training device.
        rank, world: DDP position.

    The epoch is ``ceil(N / batch_size)`` batches (the last one smaller, as the official loader's
    ``drop_last=False``), unless that last batch would leave a rank fewer than 2 samples (BatchNorm cannot train on
    one), in which case it is dropped.
    """

    def __init__(self, dataset: ImageDataset, *, batch_size: int, seed: int, device: torch.device, rank: int = 0,
                 world: int = 1) -> None:
        n = dataset.train_images.shape[0]
        if batch_size > n:
            raise ValueError(f"--batch-size {batch_size} is larger than the training set ({n} images of "
                             f"{dataset.name!r})")
        if batch_size % world:
            raise ValueError(f"--batch-size {batch_size} must be divisible by the number of DDP ranks ({world})")
        if batch_size // world < 2:
            raise ValueError(f"--batch-size {batch_size} leaves {batch_size // world} sample(s) per rank; "
                             f"BatchNorm needs at least 2")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.device = torch.device(device)
        self.rank, self.world = rank, world
        self.num_samples = n
        tail = n % batch_size
        self.iters_per_epoch = n // batch_size + (1 if tail and tail // world >= 2 else 0)
        self.images = dataset.train_images.to(self.device)
        self.labels = dataset.train_labels.to(self.device)
        self._perm_epoch = -1
        self._perm: Tensor | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

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

    def batch(self, iteration: int) -> tuple[Tensor, Tensor]:
        """Augmented uint8 images ``(b, C, H, W)`` and int64 labels ``(b,)`` of this rank, on the device."""
        index = self.indices(iteration).to(self.device, non_blocking=True)
        generator = torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, "augment", iteration,
                                                                                self.rank))
        images, _ = augment_batch(self.images.index_select(0, index), self.dataset.augment, generator)
        return images, self.labels.index_select(0, index)

    def local_batch_size(self, iteration: int) -> int:
        epoch, position = divmod(iteration, self.iters_per_epoch)
        size = min(self.batch_size, self.num_samples - position * self.batch_size)
        return len(range(self.rank, size, self.world))

    def epochs_for(self, iterations: int) -> float:
        return iterations / self.iters_per_epoch


def evaluation_batches(images: Tensor, labels: Tensor, batch_size: int, rank: int = 0, world: int = 1):
    """This rank's shard of a test set in fixed-size chunks: yields ``(uint8 images, labels)`` CPU slices."""
    n = images.shape[0]
    shard = range(rank * math.ceil(n / world), min(n, (rank + 1) * math.ceil(n / world)))
    for start in range(shard.start, shard.stop, batch_size):
        stop = min(start + batch_size, shard.stop)
        yield images[start:stop], labels[start:stop]
