"""Data-path throughput: DALI vs torch, for in-memory CIFAR-shaped arrays and JPEG folders at 64 and 224 px, and
end-to-end training images/s with each backend.

    pytest bench/bench_data.py

Providers:
- ``torch``: this package's torch renderer (arrays: one gather on the training device; files: PIL decoding in a
  thread pool + torch crop/resize/flip);
- ``dali``: the same augmentation in DALI: the stock graph on the GPU when there is one, else on the CPU the fused
  operator of ``csrc/dali`` (``DaliArrayAugmenter(graph="auto")``); ``dali-stock``: the CPU twin of the GPU graph
  (three stock operators), on CPU runs only;
- ``dataloader``: the classic baseline, a torch DataLoader with as many workers as cores running torchvision's
  per-sample transforms (RandomCrop(pad 4) + flip + RandomRotation(15); RandomResizedCrop + flip for files).

images/s count augmented uint8 images delivered on the training device (training benchmarks: training images
consumed per second of ``fit``, evaluation included). The JPEG folders are generated (random smooth images,
quality 90) in a temporary directory; sizes are in the group names.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from shapes import ON_CUDA, fit_recording_data_wait

from spacedkd_fast import backends
from spacedkd_fast.config import TrainConfig
from spacedkd_fast.data import dali_ops
from spacedkd_fast.data.augment import apply_augment, sample_params
from spacedkd_fast.data.datasets import AugmentSpec
from spacedkd_fast.data.files import ResizedCropSpec, sample_crop_params
from spacedkd_fast.engine import Trainer

DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
CORES = os.cpu_count() or 1
SPEC = AugmentSpec(pad=4, flip=True, rotate_degrees=15)
ARRAY_IMAGES = 50_000 if ON_CUDA else 8192
ARRAY_BATCH = 256
HAS_DALI = backends.dali().available


def _need_dali():
    if not HAS_DALI:
        pytest.skip("DALI is not installed (pip install nvidia-dali-cuda130)")


# ---- CIFAR-shaped arrays -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def arrays():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (ARRAY_IMAGES, 3, 32, 32), generator=g, dtype=torch.uint8)


def _array_epoch_torch(images_dev):
    for start in range(0, ARRAY_IMAGES, ARRAY_BATCH):
        batch = images_dev[start:start + ARRAY_BATCH]
        params = sample_params(SPEC, batch.shape[0], torch.Generator().manual_seed(start), "cpu")
        apply_augment(batch, params.to(DEVICE))


def _array_epoch_dali(augmenter, images_dev):  # images_dev: channels-last, as BatchSource stores it for DALI
    for start in range(0, ARRAY_IMAGES, ARRAY_BATCH):
        batch = images_dev[start:start + ARRAY_BATCH]
        augmenter(batch, sample_params(SPEC, batch.shape[0], torch.Generator().manual_seed(start), "cpu"))


class _ArrayDataset(torch.utils.data.Dataset):
    def __init__(self, images):
        import torchvision.transforms.v2 as T

        self.images = images
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.RandomRotation(15)])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i])


def _dataloader_epoch(loader):
    for batch in loader:
        batch.to(DEVICE, non_blocking=True)


@pytest.mark.parametrize("provider", ["torch", "dali", "dataloader"] + ([] if ON_CUDA else ["dali-stock"]))
def test_array_augmentation(measure, arrays, provider):
    images_dev = arrays.to(DEVICE)
    if provider == "torch":
        fn = lambda: _array_epoch_torch(images_dev)  # noqa: E731
    elif provider in ("dali", "dali-stock"):
        _need_dali()
        from spacedkd_fast.data.dali import DaliArrayAugmenter

        augmenter = DaliArrayAugmenter((3, 32, 32), ARRAY_BATCH, DEVICE,
                                       graph="stock" if provider == "dali-stock" else "auto")
        channels_last = images_dev.contiguous(memory_format=torch.channels_last)
        fn = lambda: _array_epoch_dali(augmenter, channels_last)  # noqa: E731
    else:
        loader = torch.utils.data.DataLoader(_ArrayDataset(arrays), batch_size=ARRAY_BATCH, num_workers=CORES,
                                             persistent_workers=True, pin_memory=ON_CUDA)
        fn = lambda: _dataloader_epoch(loader)  # noqa: E731
    measure(fn, group=f"augment CIFAR-shaped arrays ({DEVICE.type}, {ARRAY_IMAGES} images, batch {ARRAY_BATCH})",
            provider=provider, baseline=("torch", "dataloader"), items=ARRAY_IMAGES, items_unit="images", warmup=1,
            rounds=7)


def _dali_graph(graph: str):
    """A DALI pipeline running one piece of DaliArrayAugmenter's graph (or none), fed like the augmenter."""
    import nvidia.dali as dali
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    @dali.pipeline_def(batch_size=ARRAY_BATCH, num_threads=2, device_id=0 if ON_CUDA else None,
                       prefetch_queue_depth=1)
    def pipeline():
        images = fn.external_source(name="images", device="gpu" if ON_CUDA else "cpu", layout="HWC",
                                    dtype=types.UINT8, ndim=3, no_copy=True)
        anchor = fn.external_source(name="anchor", dtype=types.INT32, ndim=1)
        matrix = fn.external_source(name="matrix", dtype=types.FLOAT, ndim=2)
        params = fn.external_source(name="params", dtype=types.FLOAT, ndim=1)
        out = {"passthrough": lambda: images,
               "slice": lambda: fn.slice(images, start=anchor, shape=[32, 32], axes=[0, 1],
                                         out_of_bounds_policy="pad", fill_values=0),
               "warp_affine": lambda: fn.warp_affine(images, matrix=matrix, size=[32, 32], fill_value=0,
                                                     interp_type=types.INTERP_NN, inverse_map=True),
               "transpose": lambda: fn.transpose(images, perm=[2, 0, 1]),
               "fused": lambda: getattr(fn, dali_ops.FUSED_AUGMENT_OP)(images, params)}[graph]()
        return out, anchor, matrix, params  # every input is consumed, whatever the graph

    pipe = pipeline()
    pipe.build()
    return pipe


@pytest.mark.parametrize("graph", ["passthrough", "slice", "warp_affine", "transpose"] + ([] if ON_CUDA else ["fused"]))
def test_dali_operator_costs(measure, arrays, graph):
    """Where the DALI array graph's time goes: feeding + copying out alone, each stock operator alone, and (CPU) the
    fused operator that replaces all three."""
    import ctypes

    from spacedkd_fast.data.dali import crop_anchors, fused_params, warp_matrices

    _need_dali()
    if graph == "fused":
        dali_ops.load()
    pipe = _dali_graph(graph)
    hwc = arrays.permute(0, 2, 3, 1).contiguous().to(DEVICE)
    batches = [(hwc[s:s + ARRAY_BATCH], sample_params(SPEC, ARRAY_BATCH, torch.Generator().manual_seed(s), "cpu"))
               for s in range(0, ARRAY_IMAGES, ARRAY_BATCH)]
    stream = torch.cuda.current_stream() if ON_CUDA else None

    def epoch():
        for images, params in batches:
            pipe.feed_input("images", images if ON_CUDA else images.numpy(), **({"cuda_stream": stream} if ON_CUDA
                                                                               else {}))
            pipe.feed_input("anchor", crop_anchors(params))
            pipe.feed_input("matrix", warp_matrices(params, 32, 32))
            pipe.feed_input("params", fused_params(params))
            out = (pipe.run(stream) if ON_CUDA else pipe.run())[0]
            dest = torch.empty(tuple(out.as_tensor().shape()), dtype=torch.uint8, device=DEVICE)
            args = (ctypes.c_void_p(stream.cuda_stream),) if ON_CUDA else ()
            out.as_tensor().copy_to_external(ctypes.c_void_p(dest.data_ptr()), *args)

    measure(epoch, group=f"DALI array graph, one piece at a time ({DEVICE.type}, {ARRAY_IMAGES} images, batch "
                         f"{ARRAY_BATCH})", provider=graph, baseline="passthrough", items=ARRAY_IMAGES,
            items_unit="images", warmup=1, rounds=5)


# ---- JPEG folders ------------------------------------------------------------------------------------------------

FOLDERS = {64: (96, 80, 512), 224: (320, 400, 256)}  # output size: (source height, width, images)


def _write_jpeg(path: Path, height: int, width: int, rng) -> str:
    """A random smooth image (it compresses like a photo), JPEG quality 90."""
    from PIL import Image

    small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(small).resize((width, height), Image.BILINEAR).save(path, quality=90)
    return str(path)


@pytest.fixture(scope="module")
def jpeg_folders():
    root = Path(tempfile.mkdtemp(prefix="spacedkd-bench-jpeg-"))
    rng = np.random.default_rng(0)
    return {size: [_write_jpeg(root / str(size) / f"c{i % 10}" / f"{i}.jpg", h, w, rng) for i in range(count)]
            for size, (h, w, count) in FOLDERS.items()}


class _FileDataset(torch.utils.data.Dataset):
    def __init__(self, files, size):
        import torchvision.transforms.v2 as T

        self.files = files
        self.transform = T.Compose([T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip()])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from torchvision.io import decode_image, read_file

        return self.transform(decode_image(read_file(self.files[i]), mode=torchvision_rgb()))


def torchvision_rgb():
    from torchvision.io import ImageReadMode

    return ImageReadMode.RGB


@pytest.mark.parametrize("size", sorted(FOLDERS))
@pytest.mark.parametrize("provider", ["torch", "dali", "dataloader"])
def test_jpeg_decode_and_augment(measure, jpeg_folders, provider, size):
    files = jpeg_folders[size]
    batch = 64
    spec = ResizedCropSpec(size=size)
    if provider == "dataloader":
        loader = torch.utils.data.DataLoader(_FileDataset(files, size), batch_size=batch, num_workers=CORES,
                                             persistent_workers=True, pin_memory=ON_CUDA)
        fn = lambda: _dataloader_epoch(loader)  # noqa: E731
    else:
        if provider == "dali":
            _need_dali()
            from spacedkd_fast.data.dali import DaliFileRenderer

            renderer = DaliFileRenderer(spec, DEVICE, max_batch=batch)
        else:
            from spacedkd_fast.data.files import TorchFileRenderer

            renderer = TorchFileRenderer(spec, DEVICE)

        def fn():
            for start in range(0, len(files), batch):
                chunk = files[start:start + batch]
                renderer.train_batch(chunk, sample_crop_params(spec, len(chunk),
                                                               torch.Generator().manual_seed(start)))
    h, w, count = FOLDERS[size]
    measure(fn, group=f"decode+augment JPEG {w}x{h} -> {size} px ({DEVICE.type}, {count} files)", provider=provider,
            baseline=("torch", "dataloader"), items=count, items_unit="images", warmup=1, rounds=3)


# ---- end to end ----------------------------------------------------------------------------------------------------

E2E = (dict(dataset="synthetic", model="resnet18", batch_size=128, precision="bf16", channels_last=True)
       if ON_CUDA else dict(dataset="embedded", subset=2048, model="resnet8", batch_size=64))


@pytest.mark.parametrize("provider", ["torch", "dali"])
def test_training_with_each_backend(measure, provider):
    if provider == "dali":
        _need_dali()
    cfg = TrainConfig(**E2E, epochs=1, space=0.25, data_backend=provider, progress=False, eval_batch_size=500)
    images = Trainer(cfg, log=lambda *a: None).source.num_samples
    info = {}
    measure(fit_recording_data_wait(info), setup=lambda: (Trainer(cfg, log=lambda *a: None),), rounds=2, warmup=1,
            group=f"train spaced s=0.25 {E2E['model']} ({DEVICE.type})", provider=provider, baseline="torch",
            items=images, items_unit="images", info=info)


# Streamed from disk: an ImageFolder of JPEGs decoded per batch (DALI: its file reader + "mixed" decoding on a GPU).
STREAM = (dict(model="resnet18", batch_size=128, precision="bf16", channels_last=True, images=4096)
          if ON_CUDA else dict(model="resnet8", batch_size=64, images=1024))


@pytest.fixture(scope="module")
def jpeg_imagefolder():
    root = Path(tempfile.mkdtemp(prefix="spacedkd-bench-folder-"))
    rng = np.random.default_rng(1)
    for split, count in (("train", STREAM["images"]), ("val", 200)):
        for i in range(count):
            _write_jpeg(root / split / f"c{i % 10}" / f"{i}.jpg", 96, 80, rng)
    return root


@pytest.mark.parametrize("provider", ["torch", "dali"])
def test_streamed_training_with_each_backend(measure, jpeg_imagefolder, provider):
    if provider == "dali":
        _need_dali()
    settings = {k: v for k, v in STREAM.items() if k != "images"}
    cfg = TrainConfig(dataset="imagefolder", data_dir=str(jpeg_imagefolder), stream=True, image_size=64,
                      epochs=1, space=0.25, data_backend=provider, progress=False, eval_batch_size=200, **settings)
    info = {}
    measure(fit_recording_data_wait(info), setup=lambda: (Trainer(cfg, log=lambda *a: None),), rounds=2, warmup=1,
            group=f"train spaced s=0.25 {STREAM['model']}, streamed JPEG 96x80 -> 64 px ({DEVICE.type})",
            provider=provider, baseline="torch", items=STREAM["images"], items_unit="images", info=info)
