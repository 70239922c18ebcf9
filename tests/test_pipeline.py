"""Training batches are a pure function of (seed, iteration, rank): order, sharding, determinism."""

import pytest
import torch

from spacedkd_fast import backends
from spacedkd_fast.data.datasets import AugmentSpec, ImageDataset
from spacedkd_fast.data.pipeline import BatchSource, derive_seed


def _dataset(n=50, classes=5):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % classes
    return ImageDataset(name="toy", train_images=images, train_labels=labels, test_images=images[:10].clone(),
                        test_labels=labels[:10].clone(), num_classes=classes, mean=(0.5,) * 3, std=(0.25,) * 3,
                        augment=AugmentSpec(pad=2, flip=True, rotate_degrees=10),
                        classes=tuple(str(c) for c in range(classes)))


def test_epoch_covers_every_sample_once_and_orders_differ():
    src = BatchSource(_dataset(), batch_size=16, seed=3, device="cpu")
    assert src.iters_per_epoch == 4  # 16, 16, 16, 2 (drop_last=False; 2 samples is enough for BatchNorm)
    for epoch in range(2):
        seen = torch.cat([src.indices(epoch * 4 + i) for i in range(4)])
        assert sorted(seen.tolist()) == list(range(50))
    assert not torch.equal(src.permutation(0), src.permutation(1))


def test_batches_are_reproducible_and_independent_of_call_order():
    a = BatchSource(_dataset(), batch_size=16, seed=3, device="cpu")
    b = BatchSource(_dataset(), batch_size=16, seed=3, device="cpu")
    forward = [a.batch(i) for i in range(8)]
    backward = [b.batch(i) for i in reversed(range(8))][::-1]
    for (x1, y1), (x2, y2) in zip(forward, backward):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other_seed = BatchSource(_dataset(), batch_size=16, seed=4, device="cpu")
    assert not torch.equal(other_seed.batch(0)[0], forward[0][0])


def test_ranks_split_the_global_batch():
    one = BatchSource(_dataset(), batch_size=16, seed=1, device="cpu")
    ranks = [BatchSource(_dataset(), batch_size=16, seed=1, device="cpu", rank=r, world=2) for r in range(2)]
    assert ranks[0].iters_per_epoch == 3  # the 2-sample last batch would leave each rank 1 sample: dropped
    for i in range(3):
        shards = [r.indices(i) for r in ranks]
        assert sorted(torch.cat(shards).tolist()) == sorted(one.indices(i).tolist())
        assert not set(shards[0].tolist()) & set(shards[1].tolist())


def test_a_too_small_last_batch_is_dropped():
    # 50 samples, batch 24, 2 ranks: the last batch (2 samples) would leave each rank 1 sample.
    src = BatchSource(_dataset(), batch_size=24, seed=1, device="cpu", rank=0, world=2)
    assert src.iters_per_epoch == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=64), "larger than the training set"),
    (dict(batch_size=15, world=2), "divisible by the number of DDP ranks"),
    (dict(batch_size=2, world=2), "BatchNorm needs at least 2"),
])
def test_bad_batch_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BatchSource(_dataset(), seed=0, device="cpu", **kwargs)


def test_derive_seed_is_stable():
    assert derive_seed(1, "augment", 5, 0) == derive_seed(1, "augment", 5, 0)
    assert derive_seed(1, "augment", 5, 0) != derive_seed(1, "augment", 5, 1)
    assert 0 <= derive_seed("x") < 2**63


# ---- streamed folders: DALI's file reader for fresh batches, reads by name for regeneration ----------------------

@pytest.fixture(scope="module")
def jpeg_dataset(tmp_path_factory):
    from test_files import save_image, smooth_image

    from spacedkd_fast.data.files import scan_folder_dataset

    root = tmp_path_factory.mktemp("folder")
    for split, count in (("train", 11), ("val", 2)):
        for c in range(2):
            for i in range(count):
                save_image(root / split / f"c{c}" / f"{i}.jpg", smooth_image(20 + 3 * i, 26 + c, seed=i + 30 * c))
    return scan_folder_dataset("imagefolder", root, image_size=12)


@pytest.mark.skipif(not backends.dali().available, reason="nvidia.dali is not installed")
@pytest.mark.parametrize("rank, world", [(0, 1), (1, 2)])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_dali_reader_batches_equal_reads_by_name(jpeg_dataset, rank, world, device):
    """22 files, batch 8: iterations of 8, 8, 6 (per rank: 4, 4, 3). In-order renders come from one reader per
    epoch; a jump opens another; every batch equals its regeneration (external_source by name) byte for byte (on a
    GPU too, where the short last batch is padded like the reader's so the decoders get the same batch)."""
    from spacedkd_fast.data.pipeline import FileBatchSource

    src = FileBatchSource(jpeg_dataset, batch_size=8, seed=5, device=device, backend="dali", rank=rank, world=world)
    assert src.iters_per_epoch == 3
    opened = []
    original = src._open_reader
    src._open_reader = lambda i: (opened.append(i), original(i))[1]
    # Two epochs in order, a jump back, a resume mid-epoch, a reader opened at a short last batch.
    iterations = [0, 1, 2, 3, 4, 1, 2, 7, 8, 5]
    rendered = {i: src.render(src.plan(i)) for i in iterations}
    assert opened == [0, 3, 1, 7, 5]  # in-order calls reuse the open reader
    for i in iterations:
        images, labels = rendered[i]
        again, again_labels = src.regenerate(src.plan(i))
        assert images.shape == (len(range(rank, 8 if i % 3 < 2 else 6, world)), 3, 12, 12)
        assert torch.equal(images, again), f"iteration {i}"
        assert torch.equal(labels, again_labels)
        assert labels.cpu().tolist() == jpeg_dataset.train_labels[src.plan(i).indices].tolist()
    src.close()
    assert src._reader is None


def test_closing_while_another_thread_is_inside_the_reader(jpeg_dataset):
    """close() after the prefetch thread outlived its join timeout, mid-batch: no "generator already executing"."""
    import threading

    from spacedkd_fast.data.pipeline import FileBatchSource, _EpochReader

    src = FileBatchSource(jpeg_dataset, batch_size=8, seed=5, device="cpu", backend="torch")
    inside, release = threading.Event(), threading.Event()

    def batches():
        inside.set()
        release.wait(30)
        yield None

    reader = batches()
    worker = threading.Thread(target=next, args=(reader,))
    worker.start()
    assert inside.wait(30)
    src._reader = _EpochReader(0, 3, reader)
    src.close()
    assert src._reader is None
    release.set()
    worker.join(30)
