"""Image folders streamed from disk: file lists, random-resized-crop parameters, and the torch (PIL) renderer.

ImageNet-scale folders do not fit in memory decoded, so a :class:`FileDataset` holds only file paths and labels,
and every batch is decoded when it is needed. As for the in-memory datasets, a batch is a pure function of
``(files, parameters)``: the engine draws the parameters on a CPU ``torch.Generator`` seeded per batch
(:func:`sample_crop_params`) and a *renderer* turns files + parameters into a ``uint8 (b, 3, S, S)`` batch on the
training device. Two renderers implement the semantics below: :class:`TorchFileRenderer` here (PIL decoding in a
thread pool, torch resize) and :class:`spacedkd_fast.data.dali.DaliFileRenderer` (DALI on GPU or CPU).

Random resized crop (training). A deliberate, documented variant of torchvision's ``RandomResizedCrop``: the
parameters are *relative* to the image (fractions of its height and width), so they can be drawn before the image
(and its size) is read, on the CPU, in a fixed order. Per sample, from five uniforms ``u1..u5`` drawn in this order
(each a ``(B,)`` ``torch.rand`` call on the generator, every batch, whatever the spec enables):

1. area fraction ``a = lo + (hi − lo)·u1`` with ``(lo, hi) = scale``;
2. log aspect ratio ``log r = log r_lo + (log r_hi − log r_lo)·u2`` with ``(r_lo, r_hi) = ratio``;
3. ``w = min(sqrt(a·r), 1)``, ``h = min(sqrt(a/r), 1)`` (fractions of the image width / height; ``r`` is the
   aspect ratio of the crop *in relative units*, which equals the pixel aspect ratio only for square images);
4. ``x0 = u3·(1 − w)``, ``y0 = u4·(1 − h)``;
5. ``flip = u5 < 0.5`` (False for every sample when the spec disables flipping).

torchvision draws the box in pixels and retries up to 10 times when it does not fit (then falls back to a centre
crop); clipping ``w, h`` to 1 instead keeps one draw per sample. A clipped box spans the full width (or height) and
its area is below ``a``; with the default ``scale`` and ``ratio`` this happens to about 14% of the draws (those with
``a > exp(−|log r|)``), which torchvision would have redrawn. Arithmetic is float64 on the float32 uniforms; the
parameters are stored as float32.

Pixel box (:func:`crop_boxes`, the single definition every renderer follows). For an image of ``H×W`` pixels,
in float64 from the float32 parameters, with ``rnd(v) = floor(v + 0.5)`` (round half up)::

    left   = min(rnd(x0·W), W − 1)                   top    = min(rnd(y0·H), H − 1)
    right  = min(max(rnd((x0 + w)·W), left + 1), W)  bottom = min(max(rnd((y0 + h)·H), top + 1), H)

and the crop is ``image[top:bottom, left:right]`` (never empty, never outside the image). It is resized to
``S×S`` with linear interpolation and antialiasing (a triangle filter widened by the downscale factor, as PIL's
and DALI's), then flipped horizontally when ``flip``.

Evaluation (:func:`eval_geometry`): resize so the shorter side is ``S`` (longer side ``rnd(L·S/short)``, exact
integer arithmetic, same filter), then take the centre ``S×S`` window at ``((new_h − S)//2, (new_w − S)//2)``.

Renderers agree exactly on the geometry; pixel values differ slightly between them where the resize kernels (and,
on GPU, the JPEG decoders: nvJPEG vs libjpeg-turbo) differ. A given renderer is deterministic: the same files and
parameters give the same bytes, which is what regenerating a batch later relies on.

Images are decoded to RGB whatever their mode (grayscale, palette, CMYK, RGBA), and EXIF orientation is ignored,
as PIL and torchvision's ``ImageFolder`` do.

Broken files. A renderer that cannot read or decode some files of a batch raises :class:`BrokenFilesError` naming
every one of them (path → one-line reason). The streamed source (``FileBatchSource`` in
:mod:`spacedkd_fast.data.pipeline`) then drops those samples from the batch and renders the rest, each with its own
parameters, so a broken file changes no other sample's bytes; :class:`BrokenFiles` warns once per file
(:class:`BrokenImageWarning`) or, with ``strict_data``, stops instead.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from spacedkd_fast.data.datasets import (
    IMAGEFOLDER_LAYOUT,
    TINY_IMAGENET_LAYOUT,
    canonical_dataset_name,
    scan_imagefolder,
    scan_tiny_imagenet,
)

__all__ = ["FILE_DATASET_NAMES", "IMAGENET_MEAN", "IMAGENET_STD", "BrokenFiles", "BrokenFilesError",
           "BrokenImageWarning", "CropParams", "FileDataset", "ResizedCropSpec", "TorchFileRenderer",
           "broken_files_error", "crop_boxes", "eval_geometry", "sample_crop_params", "scan_folder_dataset"]

FILE_DATASET_NAMES: tuple[str, ...] = ("tiny-imagenet", "imagefolder")
# The usual ImageNet statistics (torchvision's), in [0, 1] pixel units. Streaming never passes over the whole
# train split, so file datasets use these constants rather than measured ones (Tiny-ImageNet included).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


# ---- crop parameters ---------------------------------------------------------------------------------------------

def _is_pair(value, low: float) -> bool:
    return (isinstance(value, (tuple, list)) and len(value) == 2
            and all(not isinstance(v, bool) and isinstance(v, (int, float, np.number)) and math.isfinite(v)
                    for v in value)
            and low < value[0] <= value[1])


@dataclass(frozen=True)
class ResizedCropSpec:
    """The training augmentation of a file dataset: random resized crop (module docstring) and flip.

    Attributes:
        size: output side S (the batch is ``(b, 3, S, S)``); also the evaluation size.
        scale: ``(lo, hi)``, ``0 < lo <= hi``: range of the crop area as a fraction of the image area.
        ratio: ``(lo, hi)``, ``0 < lo <= hi``: range of the crop aspect ratio ``w/h`` in relative units, drawn
            log-uniformly.
        flip: horizontal flip with probability 0.5.
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) or self.size < 1:
            raise ValueError(f"ResizedCropSpec: size must be a positive int, got {self.size!r}")
        if not _is_pair(self.scale, 0.0):
            raise ValueError(f"ResizedCropSpec: scale must be (lo, hi) with 0 < lo <= hi, got {self.scale!r}")
        if not _is_pair(self.ratio, 0.0):
            raise ValueError(f"ResizedCropSpec: ratio must be (lo, hi) with 0 < lo <= hi, got {self.ratio!r}")
        if not isinstance(self.flip, (bool, np.bool_)):
            raise ValueError(f"ResizedCropSpec: flip must be a bool, got {self.flip!r}")
        # Normalize lists to tuples so equal specs compare (and hash) equal.
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
        object.__setattr__(self, "ratio", tuple(float(v) for v in self.ratio))


@dataclass(frozen=True, eq=False)
class CropParams:
    """Per-sample crop parameters of one batch, CPU tensors, relative to each image (module docstring).

    Attributes:
        y0, x0: ``float32 (B,)`` in ``[0, 1)``: top-left corner, as fractions of the image height / width.
        h, w: ``float32 (B,)`` in ``(0, 1]``: crop extent, as fractions of the image height / width.
        flip: ``bool (B,)``: flip horizontally (after the resize).
    """

    y0: Tensor
    x0: Tensor
    h: Tensor
    w: Tensor
    flip: Tensor

    def __len__(self) -> int:
        return self.y0.shape[0]

    def to_numpy(self) -> dict[str, np.ndarray]:
        """``{"y0", "x0", "h", "w"}`` → float32 ``(B,)`` arrays and ``"flip"`` → bool ``(B,)``."""
        return {k: getattr(self, k).cpu().numpy() for k in ("y0", "x0", "h", "w", "flip")}

    def take(self, index) -> CropParams:
        """The parameters of the samples ``index`` (anything that indexes a ``(B,)`` tensor)."""
        return CropParams(**{k: getattr(self, k)[index] for k in ("y0", "x0", "h", "w", "flip")})

    def pad_with_last(self, size: int) -> CropParams:
        """``size`` samples: these, then copies of the last one (as DALI's reader pads a short batch's files)."""
        n = len(self)
        return self.take(torch.cat([torch.arange(n), torch.full((size - n,), n - 1)])) if size > n else self


class LazyThreadPool:
    """A thread pool started on the first :meth:`map` and stopped by :meth:`close` (a later map starts it again);
    safe to share between threads (the prefetch and training threads may both render)."""

    def __init__(self, num_threads: int, name: str) -> None:
        self.num_threads, self.name = num_threads, name
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def map(self, fn, items) -> list:
        """``[fn(x) for x in items]`` on the pool; re-raises the first failure in item order."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.num_threads, thread_name_prefix=self.name)
            pool = self._pool
        return list(pool.map(fn, items))

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


def check_crop_params(params: CropParams, batch: int, where: str) -> None:
    """Raise naming ``where`` unless ``params`` holds ``batch`` samples of the documented dtypes on the CPU."""
    if not isinstance(params, CropParams):
        raise TypeError(f"{where}: params must be CropParams, got {type(params).__name__}")
    for key in ("y0", "x0", "h", "w", "flip"):
        t = getattr(params, key)
        dtype = torch.bool if key == "flip" else torch.float32
        if not isinstance(t, Tensor) or t.shape != (batch,) or t.dtype != dtype or t.device.type != "cpu":
            got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{where}: params.{key} must be a CPU {dtype} tensor of shape ({batch},) (one per "
                             f"file), got {got}")


def sample_crop_params(spec: ResizedCropSpec, batch: int, generator: torch.Generator) -> CropParams:
    """Draw the crop parameters of a batch (the module docstring's draw order and formulas).

    Args:
        spec: the augmentation recipe.
        batch: B >= 0.
        generator: a CPU ``torch.Generator``, the only source of randomness; it advances by five ``(B,)``
            float32 draws whatever ``spec`` says.

    Returns:
        :class:`CropParams` of ``(B,)`` CPU tensors.
    """
    if not isinstance(spec, ResizedCropSpec):
        raise TypeError(f"sample_crop_params: spec must be a ResizedCropSpec, got {type(spec).__name__}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"sample_crop_params: batch must be an int >= 0, got {batch!r}")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        where = generator.device if isinstance(generator, torch.Generator) else type(generator).__name__
        raise ValueError(f"sample_crop_params: generator must be a CPU torch.Generator, got {where}")
    u_area, u_ratio, u_x, u_y, u_flip = (torch.rand((batch,), generator=generator, dtype=torch.float32)
                                         for _ in range(5))
    lo, hi = spec.scale
    area = lo + (hi - lo) * u_area.double()
    log_lo, log_hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u_ratio.double())
    w = torch.sqrt(area * ratio).clamp_(max=1.0).float()
    h = torch.sqrt(area / ratio).clamp_(max=1.0).float()
    # x0 from the float32 w, so that x0 + w <= 1 up to one rounding of x0 (crop_boxes clamps the rest).
    x0 = (u_x.double() * (1.0 - w.double())).float()
    y0 = (u_y.double() * (1.0 - h.double())).float()
    flip = u_flip < 0.5 if spec.flip else torch.zeros((batch,), dtype=torch.bool)
    return CropParams(y0=y0, x0=x0, h=h, w=w, flip=flip)


def _round_half_up(v: np.ndarray) -> np.ndarray:
    return np.floor(v + 0.5)


def crop_boxes(params: CropParams, heights, widths) -> np.ndarray:
    """Pixel crop boxes of a batch (the module docstring's rule; DALI computes the same in its graph).

    Args:
        params: :class:`CropParams` of B samples.
        heights, widths: ``(B,)`` image sizes in pixels (ints >= 1).

    Returns:
        ``int64 (B, 4)``: ``(top, left, bottom, right)``, the crop being ``image[top:bottom, left:right]``.
    """
    p = params.to_numpy()
    size = np.stack([np.asarray(heights, dtype=np.int64), np.asarray(widths, dtype=np.int64)], axis=1)
    if size.shape != (len(params), 2) or (size < 1).any():
        raise ValueError(f"crop_boxes: heights and widths must be {len(params)} ints >= 1 (one per sample), "
                         f"got {size.tolist()}")
    extent = size.astype(np.float64)
    origin = np.stack([p["y0"], p["x0"]], axis=1).astype(np.float64)
    span = np.stack([p["h"], p["w"]], axis=1).astype(np.float64)
    start = np.minimum(_round_half_up(origin * extent), extent - 1)
    end = np.minimum(np.maximum(_round_half_up((origin + span) * extent), start + 1), extent)
    return np.concatenate([start, end], axis=1).astype(np.int64)


def eval_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """Evaluation resize + centre crop: ``(new_h, new_w, top, left)``.

    The image is resized to ``new_h × new_w`` (shorter side ``size``, longer side ``L·size/short`` rounded half
    up, in exact integer arithmetic) and the ``size × size`` window at ``(top, left)`` is kept.
    """
    short = min(height, width)
    new_h = (2 * height * size + short) // (2 * short)
    new_w = (2 * width * size + short) // (2 * short)
    return new_h, new_w, (new_h - size) // 2, (new_w - size) // 2


# ---- file datasets -----------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False, repr=False)
class FileDataset:
    """A folder dataset streamed from disk: file paths and labels, nothing decoded up front.

    Attributes:
        name: ``"tiny-imagenet"`` or ``"imagefolder"``.
        train_files / test_files: absolute paths, in the order of :func:`spacedkd_fast.data.load_dataset`
            (classes sorted, files sorted within each class; Tiny-ImageNet's val split sorted by file name).
        train_labels / test_labels: ``int64 (N,)`` CPU, in ``[0, num_classes)``.
        num_classes, classes: class count and names (folder names / wnids, sorted: torchvision's indices).
        mean / std: :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` for both datasets (no pass over the data).
        crop: the training augmentation (random resized crop to ``image_size`` + flip).
        image_size: S, the side of training and evaluation batches.
    """

    name: str
    train_files: tuple[str, ...]
    train_labels: Tensor
    test_files: tuple[str, ...]
    test_labels: Tensor
    num_classes: int
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop: ResizedCropSpec
    image_size: int

    def __post_init__(self):
        for split in ("train", "test"):
            files, labels = getattr(self, f"{split}_files"), getattr(self, f"{split}_labels")
            if labels.dtype != torch.int64 or labels.shape != (len(files),) or labels.device.type != "cpu":
                raise ValueError(f"FileDataset {self.name}: {split}_labels must be a CPU int64 tensor of shape "
                                 f"({len(files)},), got {labels.dtype} {tuple(labels.shape)} on {labels.device}")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(f"FileDataset {self.name}: {split}_labels outside [0, {self.num_classes})")
        if len(self.classes) != self.num_classes:
            raise ValueError(f"FileDataset {self.name}: {self.num_classes} classes but {len(self.classes)} names")
        if self.crop.size != self.image_size:
            raise ValueError(f"FileDataset {self.name}: crop.size {self.crop.size} != image_size {self.image_size}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(3, S, S)`` of every rendered image."""
        return (3, self.image_size, self.image_size)

    def __repr__(self) -> str:
        return (f"FileDataset({self.name!r}, train={len(self.train_files)}, test={len(self.test_files)}, "
                f"image_size={self.image_size}, num_classes={self.num_classes}, crop={self.crop})")


def scan_folder_dataset(name: str, data_dir: str | os.PathLike, *, image_size: int = 224,
                        val_fraction: float | None = None, split_seed: int = 0) -> FileDataset:
    """List the files of a folder dataset (no decoding): the streaming counterpart of ``load_dataset``.

    Args:
        name: ``"tiny-imagenet"`` (the official ``tiny-imagenet-200/`` folder; val is the test split) or
            ``"imagefolder"`` (``root/train/<class>/*`` and ``root/val/<class>/*`` or ``test/``); case-insensitive,
            ``_`` and ``-`` interchangeable.
        data_dir: the dataset folder or its parent.
        image_size: S, the side of the rendered batches (training crops and evaluation).
        val_fraction / split_seed: as :func:`~spacedkd_fast.data.datasets.load_dataset` (a ``root/<class>/*``
            imagefolder split into train and test; the same split as the in-memory loader).

    Returns:
        A :class:`FileDataset` with the same files, order and labels as ``load_dataset(name, data_dir)``.

    Raises:
        ValueError: unknown ``name``, bad ``image_size``, inconsistent annotation files.
        FileNotFoundError: ``data_dir`` lacks the expected layout (the message lists it and what was found).
    """
    if not isinstance(name, str):
        raise TypeError(f"scan_folder_dataset: name must be a str, one of {', '.join(FILE_DATASET_NAMES)}; "
                        f"got {name!r}")
    canonical = canonical_dataset_name(name)
    if canonical not in FILE_DATASET_NAMES:
        raise ValueError(f"scan_folder_dataset: unknown dataset {name!r}; choose one of "
                         f"{', '.join(FILE_DATASET_NAMES)} (the others load into memory with load_dataset)")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"scan_folder_dataset: image_size must be a positive int, got {image_size!r}")
    layout = TINY_IMAGENET_LAYOUT if canonical == "tiny-imagenet" else IMAGEFOLDER_LAYOUT
    if data_dir is None:
        raise ValueError(f"scan_folder_dataset: dataset {canonical!r} needs data_dir (the --data-dir flag): the "
                         f"folder holding {layout}, or its parent")
    root = Path(data_dir).expanduser().absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"scan_folder_dataset: data_dir {str(root)!r} for {canonical!r} is not a "
                                f"directory; expected {layout}")
    where = f"scan_folder_dataset({canonical!r})"
    if canonical == "tiny-imagenet":
        if val_fraction is not None:
            raise ValueError(f"{where}: --val-fraction splits an imagefolder root/<class>/ folder; tiny-imagenet has "
                             f"its own val split")
        scanned = scan_tiny_imagenet(root, where)
    else:
        scanned = scan_imagefolder(root, where, val_fraction, split_seed)
    classes, (train_paths, train_labels), (test_paths, test_labels) = scanned
    return FileDataset(name=canonical, train_files=tuple(str(p) for p in train_paths),
                       train_labels=torch.tensor(train_labels, dtype=torch.int64),
                       test_files=tuple(str(p) for p in test_paths),
                       test_labels=torch.tensor(test_labels, dtype=torch.int64), num_classes=len(classes),
                       classes=tuple(classes), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       crop=ResizedCropSpec(size=image_size), image_size=image_size)


# ---- broken files ------------------------------------------------------------------------------------------------

def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (PIL's and DALI's messages can run over several lines)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class BrokenFilesError(ValueError):
    """Image files that cannot be read or decoded.

    Attributes:
        files: ``{path: reason}``, every broken file of the batch (the reason is one line).
    """

    def __init__(self, files: Mapping[str, str], message: str | None = None) -> None:
        self.files = dict(files)
        if message is None:
            if len(self.files) == 1:
                ((path, reason),) = self.files.items()
                message = f"cannot decode image {path!r}: {reason}"
            else:
                message = "cannot decode images " + ", ".join(f"{p!r} ({r})" for p, r in self.files.items())
        super().__init__(message)

    def __reduce__(self):  # keep files when pickled (the default would pass only the message to __init__)
        return type(self), (self.files, str(self))


class BrokenImageWarning(UserWarning):
    """A streamed image file was skipped: it cannot be read or decoded."""


def broken_files_error(exc: BaseException) -> BrokenFilesError | None:
    """The :class:`BrokenFilesError` behind ``exc``: itself, or the cause of the error a prefetch thread re-raises
    in the training loop; None for any other error."""
    while exc is not None and not isinstance(exc, BrokenFilesError):
        exc = exc.__cause__
    return exc


class BrokenFiles:
    """The broken files a streamed source has met: each is warned about once (:class:`BrokenImageWarning`, naming
    the file), or, ``strict``, stops the run. Thread-safe (the prefetch and training threads both render).

    Args:
        flag: how messages name the strict setting (``--strict-data`` on the command line), resolved by the caller
            while it can: a prefetch thread renders outside :func:`spacedkd_fast.config.cli_names`.
    """

    def __init__(self, flag: str = "strict_data=True") -> None:
        self.flag = flag
        self._reasons: dict[str, str] = {}
        self._lock = threading.Lock()

    def __contains__(self, path: str) -> bool:
        return path in self._reasons

    def __len__(self) -> int:
        return len(self._reasons)

    @property
    def paths(self) -> tuple[str, ...]:
        """Every broken file met so far, in the order they were met."""
        with self._lock:
            return tuple(self._reasons)

    def note(self, error: BrokenFilesError, *, strict: bool) -> None:
        """Record the files of ``error``: warn once for each new one, or (``strict``) raise naming them."""
        if strict:
            raise BrokenFilesError(error.files, f"{error}; stopped because {self.flag} is set: replace the file "
                                                f"with a readable image and resume (deleting it would renumber the "
                                                f"dataset, which a resume cannot follow), or run without {self.flag} "
                                                f"to skip broken files") from error
        with self._lock:
            new = {path: reason for path, reason in error.files.items() if path not in self._reasons}
            self._reasons.update(new)
        for path, reason in new.items():
            warnings.warn(f"skipping unreadable image {path!r} ({reason}): the batches that hold it go on without "
                          f"it (the summary counts the skipped samples; {self.flag} stops the run instead)",
                          BrokenImageWarning, stacklevel=3)


# ---- the torch renderer ------------------------------------------------------------------------------------------

def check_files(files: Sequence, where: str) -> list[str]:
    """``files`` as a list of str paths (raises naming ``where`` for anything else)."""
    if isinstance(files, (str, bytes, os.PathLike)) or not isinstance(files, Sequence):
        raise TypeError(f"{where}: files must be a sequence of paths, got {type(files).__name__}")
    out = []
    for f in files:
        if not isinstance(f, (str, os.PathLike)):
            raise TypeError(f"{where}: files must be paths (str or os.PathLike), got {type(f).__name__} {f!r}")
        out.append(os.fspath(f))
    return out


def decode_rgb(path: str) -> np.ndarray:
    """Decode an image file to ``uint8 (H, W, 3)`` RGB with PIL (any mode; EXIF orientation ignored).

    Raises:
        BrokenFilesError (a ValueError) naming the file when it cannot be read or decoded completely (a truncated
        file is broken: PIL's LOAD_TRUNCATED_IMAGES is left off, so no sample is silently part grey).
    """
    from PIL import Image  # deferred: only the file-based datasets need Pillow

    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))  # a writable copy: torch.from_numpy warns on read-only arrays
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...) for broken files
        raise BrokenFilesError({path: one_line(exc)}) from exc


def _decode_or_error(path: str) -> np.ndarray | BrokenFilesError:
    try:
        return decode_rgb(path)
    except BrokenFilesError as exc:
        return exc


class TorchFileRenderer:
    """Renders file batches with PIL (decoding) and torch (crop, resize, flip) on the CPU, one image per thread of
    a pool, into a pinned buffer copied to a GPU asynchronously.

    The fallback when DALI is missing, and the reference the DALI renderer is compared with. Everything is
    computed on the CPU and the finished batch is copied to ``device``, so the bytes do not depend on the device.

    Args:
        spec: the training crop (its ``size`` is S for training and evaluation).
        device: where the batches are returned.
        num_threads: decoding threads (PIL releases the GIL while decoding).
    """

    def __init__(self, spec: ResizedCropSpec, device: torch.device, *, num_threads: int | None = None) -> None:
        if not isinstance(spec, ResizedCropSpec):
            raise TypeError(f"TorchFileRenderer: spec must be a ResizedCropSpec, got {type(spec).__name__}")
        num_threads = (os.cpu_count() or 1) if num_threads is None else num_threads
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"TorchFileRenderer: num_threads must be a positive int, got {num_threads!r}")
        self.spec = spec
        self.size = spec.size
        self.device = torch.device(device)
        self.num_threads = num_threads
        self._pool = LazyThreadPool(num_threads, "spacedkd-render")

    def close(self) -> None:
        """Stop the decoding threads (a later call starts them again)."""
        self._pool.close()

    def __enter__(self) -> TorchFileRenderer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _decode_all(self, files: list[str]) -> list[np.ndarray]:
        """Every file decoded; else one BrokenFilesError naming all the broken ones (so that a caller who skips
        them renders the batch again once, not once per broken file)."""
        images = self._pool.map(_decode_or_error, files)
        broken = {path: reason for image in images if isinstance(image, BrokenFilesError)
                  for path, reason in image.files.items()}
        if broken:
            raise BrokenFilesError(broken)
        return images

    def _resize(self, hwc: np.ndarray, height: int, width: int) -> Tensor:
        """``uint8 (H, W, 3)`` → ``uint8 (3, height, width)``, linear with antialiasing (torch's uint8 kernel)."""
        chw = torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1).unsqueeze(0)
        if chw.shape[2:] == (height, width):
            return chw[0]
        return torch.nn.functional.interpolate(chw, size=(height, width), mode="bilinear", align_corners=False,
                                               antialias=True)[0]

    def train_batch(self, files: Sequence[str], params: CropParams) -> Tensor:
        """Decode ``files``, crop each to its box (:func:`crop_boxes`), resize to S×S, flip.

        Args:
            files: b image paths.
            params: :class:`CropParams` of b samples (CPU).

        Returns:
            ``uint8 (b, 3, S, S)`` on the renderer's device.
        """
        files = check_files(files, "TorchFileRenderer.train_batch")
        check_crop_params(params, len(files), "TorchFileRenderer.train_batch")
        out = self._host_batch(len(files))
        images = self._decode_all(files)
        boxes = crop_boxes(params, [a.shape[0] for a in images], [a.shape[1] for a in images]).tolist()

        def crop_resize(i: int) -> None:
            top, left, bottom, right = boxes[i]
            out[i] = self._resize(images[i][top:bottom, left:right], self.size, self.size)

        self._pool.map(crop_resize, range(len(files)))  # torch's resize releases the GIL: one image per thread
        flip = params.flip
        if bool(flip.any()):
            out[flip] = out[flip].flip(-1)
        return self._to_device(out)

    def eval_batch(self, files: Sequence[str]) -> Tensor:
        """Decode ``files``, resize the shorter side to S and keep the centre S×S (:func:`eval_geometry`).

        Returns:
            ``uint8 (b, 3, S, S)`` on the renderer's device.
        """
        files = check_files(files, "TorchFileRenderer.eval_batch")
        out = self._host_batch(len(files))
        images = self._decode_all(files)

        def resize_crop(i: int) -> None:
            new_h, new_w, top, left = eval_geometry(images[i].shape[0], images[i].shape[1], self.size)
            out[i] = self._resize(images[i], new_h, new_w)[:, top:top + self.size, left:left + self.size]

        self._pool.map(resize_crop, range(len(files)))
        return self._to_device(out)

    def _host_batch(self, batch: int) -> Tensor:
        """The host buffer a batch is assembled in: pinned when it goes to a GPU, so the copy is asynchronous."""
        return torch.empty((batch, 3, self.size, self.size), dtype=torch.uint8,
                           pin_memory=self.device.type == "cuda")

    def _to_device(self, batch: Tensor) -> Tensor:
        # Asynchronous on the current stream (the prefetch thread's own, when it renders); the pinned buffer stays
        # reserved until the copy is done (torch's host allocator records the stream).
        return batch.to(self.device, non_blocking=True) if self.device.type == "cuda" else batch
