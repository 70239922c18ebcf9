"""Batch augmentation on the training device: random crop, horizontal flip and rotation in one gather.

Semantics (the spec; :func:`augment_reference_numpy` implements it literally, step by step). For one image
``img`` of shape ``(C, H, W)`` and its parameters ``dy, dx, flip, cos, sin`` (every channel moves alike):

1. crop: ``out1[y, x] = img[y + dy, x + dx]`` when that pixel is inside the image, else 0. This is a zero-pad by
   ``pad`` followed by an H×W window at offset ``(dy, dx) ∈ [-pad, pad]²`` (dy = dx = 0 keeps the image).
2. flip: ``out2[y, x] = out1[y, W-1-x]`` when ``flip``, else ``out1[y, x]``.
3. rotate about the centre ``(cy, cx) = ((H-1)/2, (W-1)/2)``: for output pixel ``(y, x)``, in float32,
   ``u = x - cx``, ``v = y - cy``, then ``sx = cos·u - sin·v + cx`` and ``sy = sin·u + cos·v + cy``, each a
   separate float32 operation in exactly this order (multiply, multiply, subtract, add; no fused multiply-add);
   nearest neighbour ``(ry, rx) = (floor(sy + 0.5), floor(sx + 0.5))``; ``out3[y, x] = out2[ry, rx]`` when
   ``0 <= rx < W`` and ``0 <= ry < H``, else 0. With y pointing down, a positive angle turns the content
   counter-clockwise as displayed (as ``torchvision.transforms.functional.rotate``); 90° is ``np.rot90``.

Every step uses plain IEEE float32 or integer operations, so torch (CPU, or CUDA with its separate elementwise
kernels) and numpy produce identical source indices: the tests demand byte equality with the reference.

Random parameters (:func:`sample_params`). The rule: every batch draws all four quantities from the generator,
always, in the order ``dy, dx, flip, angle``, each ``(B,)`` long, whatever the :class:`AugmentSpec` says; a
disabled step then gets its identity value (``flip = False``, ``angle = 0``, and ``pad = 0`` draws 0 offsets).
So the generator advances by the same amount for every spec: switching flip or rotation off changes no other
parameter, of this batch or of any later one, and replaying a run with another spec keeps its crops.

:func:`normalize` then turns the uint8 batch into the model's input, ``(x/255 − mean)/std``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from spacedkd_fast.data.datasets import AugmentSpec

__all__ = ["AugmentParams", "apply_augment", "augment_batch", "augment_reference_numpy", "normalize",
           "sample_params"]


@dataclass(frozen=True, eq=False)
class AugmentParams:
    """Per-sample parameters of one batch, tensors on the batch's device.

    Attributes:
        dy: ``int64 (B,)`` in ``[-pad, pad]``: crop window offset (rows).
        dx: ``int64 (B,)`` in ``[-pad, pad]``: crop window offset (cols).
        flip: ``bool (B,)``: flip horizontally.
        cos: ``float32 (B,)``: cosine of the rotation angle.
        sin: ``float32 (B,)``: sine of the rotation angle.
    """

    dy: Tensor
    dx: Tensor
    flip: Tensor
    cos: Tensor
    sin: Tensor

    def to_numpy(self) -> dict[str, np.ndarray]:
        """The parameters as numpy arrays on the host, the input of :func:`augment_reference_numpy`."""
        return {k: getattr(self, k).cpu().numpy() for k in ("dy", "dx", "flip", "cos", "sin")}

    def to(self, device) -> AugmentParams:
        """The same parameters on ``device`` (parameters are drawn on the CPU so every backend gets the same)."""
        return AugmentParams(**{k: getattr(self, k).to(device, non_blocking=True)
                                for k in ("dy", "dx", "flip", "cos", "sin")})


def sample_params(spec: AugmentSpec, batch: int, generator: torch.Generator, device) -> AugmentParams:
    """Draw the augmentation parameters of a batch.

    Draws, in this order: ``dy`` and ``dx`` with ``torch.randint(-pad, pad + 1)``, ``flip = rand < 0.5``, the
    angle ``(rand·2 − 1)·rotate_degrees`` in float32 degrees; cos/sin of it (radians) in float32 by torch. All four
    are drawn whatever ``spec`` enables (see the module docstring), so a disabled step costs one tiny kernel.

    Args:
        spec: the augmentation recipe.
        batch: B >= 0.
        generator: a ``torch.Generator`` on ``device``; the only source of randomness.
        device: where the parameters are drawn and live (the batch's device).

    Returns:
        :class:`AugmentParams` with ``(B,)`` tensors on ``device``. With ``pad=0``, ``flip=False`` and
        ``rotate_degrees=0`` they are the identity: ``dy = dx = 0``, no flip, ``cos = 1``, ``sin = 0``.
    """
    if not isinstance(spec, AugmentSpec):
        raise TypeError(f"sample_params: spec must be an AugmentSpec, got {type(spec).__name__}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"sample_params: batch must be an int >= 0, got {batch!r}")
    device = torch.device(device)
    if not isinstance(generator, torch.Generator) or generator.device.type != device.type:
        where = generator.device if isinstance(generator, torch.Generator) else type(generator).__name__
        raise ValueError(f"sample_params: generator must be a torch.Generator on {device}, got {where}")
    shape = (batch,)
    dy = torch.randint(-spec.pad, spec.pad + 1, shape, generator=generator, device=device)
    dx = torch.randint(-spec.pad, spec.pad + 1, shape, generator=generator, device=device)
    flip = torch.rand(shape, generator=generator, device=device) < 0.5
    unit = torch.rand(shape, generator=generator, device=device)
    if not spec.flip:
        flip = torch.zeros_like(flip)
    if spec.rotate_degrees > 0:
        degrees = (unit * 2 - 1) * float(spec.rotate_degrees)
        radians = degrees * (math.pi / 180.0)
        cos, sin = torch.cos(radians), torch.sin(radians)
    else:  # exact identity (not cos(±0.0) of a -0.0 angle)
        cos, sin = torch.ones_like(unit), torch.zeros_like(unit)
    return AugmentParams(dy=dy, dx=dx, flip=flip, cos=cos, sin=sin)


def _check_params(images: Tensor, params: AugmentParams) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4:
        what = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"apply_augment: images must be a (B, C, H, W) tensor, got {what}")
    if not isinstance(params, AugmentParams):
        raise TypeError(f"apply_augment: params must be AugmentParams, got {type(params).__name__}")
    batch = images.shape[0]
    for key, kinds in (("dy", "int"), ("dx", "int"), ("flip", "bool"), ("cos", "float32"), ("sin", "float32")):
        t = getattr(params, key)
        ok_dtype = {"int": not t.dtype.is_floating_point and t.dtype != torch.bool, "bool": t.dtype == torch.bool,
                    "float32": t.dtype == torch.float32}[kinds]
        if t.shape != (batch,) or not ok_dtype or t.device != images.device:
            raise ValueError(f"apply_augment: params.{key} must be {kinds} of shape ({batch},) on {images.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")


def apply_augment(images: Tensor, params: AugmentParams) -> Tensor:
    """Crop, flip and rotate a batch (the module docstring's semantics), one ``torch.gather`` for all three.

    The three steps compose into one source pixel per output pixel, computed for the whole batch with
    ``(B, H, W)`` elementwise ops (no loop over samples): rotation gives ``(ry, rx)`` in the flipped image, the
    flip maps ``rx`` to ``W-1-rx``, the crop adds ``(dy, dx)``; a pixel whose source falls outside the image at
    the rotation or the crop step is 0.

    Args:
        images: ``(B, C, H, W)``, normally uint8 (any dtype works: pixels are only moved); any C, H, W, strides.
        params: from :func:`sample_params`, ``(B,)`` tensors on ``images.device``.

    Returns:
        A new contiguous tensor of the same shape, dtype and device.
    """
    _check_params(images, params)
    batch, channels, height, width = images.shape
    device = images.device
    cy, cx = (height - 1) / 2, (width - 1) / 2  # half-integers: exact in float32
    v = torch.arange(height, device=device, dtype=torch.float32).view(1, height, 1) - cy  # (1, H, 1)
    u = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, width) - cx  # (1, 1, W)
    cos = params.cos.view(batch, 1, 1)
    sin = params.sin.view(batch, 1, 1)
    # Separate float32 ops in the documented order (mul, mul, sub, add): no FMA, so the reference matches bitwise.
    sx = cos * u - sin * v + cx  # (B, H, W)
    sy = sin * u + cos * v + cy
    # Integer steps in int32 (half the memory traffic of int64; |index| < 2^31 for any image that fits a batch):
    # gather wants int64, so only the final index is widened.
    rx = torch.floor(sx + 0.5).to(torch.int32)
    ry = torch.floor(sy + 0.5).to(torch.int32)
    valid = (rx >= 0) & (rx < width) & (ry >= 0) & (ry < height)
    fx = torch.where(params.flip.view(batch, 1, 1), (width - 1) - rx, rx)
    src_y = ry + params.dy.to(torch.int32).view(batch, 1, 1)
    src_x = fx + params.dx.to(torch.int32).view(batch, 1, 1)
    valid &= (src_x >= 0) & (src_x < width) & (src_y >= 0) & (src_y < height)
    index = torch.where(valid, src_y * width + src_x, 0).to(torch.int64).view(batch, 1, height * width)
    flat = images.reshape(batch, channels, height * width)
    out = torch.gather(flat, 2, index.expand(batch, channels, height * width))
    out.masked_fill_(~valid.view(batch, 1, height * width), 0)
    return out.view(batch, channels, height, width)


def augment_batch(images: Tensor, spec: AugmentSpec, generator: torch.Generator) -> tuple[Tensor, AugmentParams]:
    """Sample parameters on ``images.device`` and apply them.

    Args:
        images: ``uint8 (B, C, H, W)``.
        spec: the augmentation recipe.
        generator: a ``torch.Generator`` on ``images.device``.

    Returns:
        ``(augmented, params)``: a new ``uint8 (B, C, H, W)`` tensor on the same device, and the parameters used
        (a copy of ``images`` when ``spec`` changes nothing; the generator advances all the same).
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"augment_batch: images must be a (B, C, H, W) tensor, got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    params = sample_params(spec, images.shape[0], generator, images.device)
    if spec.is_identity:  # the gather would copy every pixel to its own place
        return images.clone(memory_format=torch.contiguous_format), params
    return apply_augment(images, params), params


def augment_reference_numpy(images: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
    """The documented semantics in numpy, literally: crop, then flip, then rotate, one sample at a time.

    Args:
        images: ``(B, C, H, W)`` array (uint8 in practice).
        params: ``{"dy", "dx", "flip", "cos", "sin"}`` → ``(B,)`` arrays (:meth:`AugmentParams.to_numpy`);
            cos/sin are used as float32.

    Returns:
        A new array of the same shape and dtype.
    """
    batch, _, height, width = images.shape
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")  # (H, W) int
    out = np.zeros_like(images)
    for b in range(batch):
        img = images[b]
        # (1) crop: out1[y, x] = img[y + dy, x + dx] inside the image, else 0
        sy, sx = ys + int(params["dy"][b]), xs + int(params["dx"][b])
        inside = (sy >= 0) & (sy < height) & (sx >= 0) & (sx < width)
        out1 = np.zeros_like(img)
        out1[:, inside] = img[:, sy[inside], sx[inside]]
        # (2) flip: out2[y, x] = out1[y, W-1-x]
        out2 = out1[:, :, ::-1] if bool(params["flip"][b]) else out1
        # (3) rotate: float32, one operation at a time, nearest neighbour floor(s + 0.5)
        cos, sin = np.float32(params["cos"][b]), np.float32(params["sin"][b])
        cy, cx = np.float32((height - 1) / 2), np.float32((width - 1) / 2)
        u = xs.astype(np.float32) - cx
        v = ys.astype(np.float32) - cy
        cos_u, sin_v = cos * u, sin * v
        rot_x = (cos_u - sin_v) + cx
        sin_u, cos_v = sin * u, cos * v
        rot_y = (sin_u + cos_v) + cy
        rx = np.floor(rot_x + np.float32(0.5)).astype(np.int64)
        ry = np.floor(rot_y + np.float32(0.5)).astype(np.int64)
        inside = (rx >= 0) & (rx < width) & (ry >= 0) & (ry < height)
        out[b][:, inside] = out2[:, ry[inside], rx[inside]]
    return out


@lru_cache(maxsize=32)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    # Cached per (mean, std, device): building them every step would be a host-to-device copy per batch.
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32, device=device)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32, device=device)
    return scale.view(-1, 1, 1), shift.view(-1, 1, 1)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float], *, dtype: torch.dtype = torch.float32,
              channels_last: bool = False) -> Tensor:
    """``(x/255 − mean)/std`` per channel, computed as ``x.to(float32) · scale + shift`` then cast to ``dtype``.

    ``scale = 1/(255·std)`` and ``shift = −mean/std`` are formed in float64 and rounded to float32 once; the
    result is within a few float32 ulps of the float64 formula.

    Args:
        images: ``uint8 (B, C, H, W)`` (or ``(C, H, W)``), any device.
        mean, std: C values each, in [0, 1] pixel units (``ImageDataset.mean``/``std``); std > 0.
        dtype: floating output dtype (float32, bfloat16, float16...).
        channels_last: return ``torch.channels_last`` memory format (4-D input only).

    Returns:
        A ``dtype`` tensor of the input's shape on its device.
    """
    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        what = images.dtype if isinstance(images, Tensor) else type(images).__name__
        raise TypeError(f"normalize: images must be a uint8 tensor (normalize once, after augmenting), got {what}")
    if images.dim() not in (3, 4):
        raise ValueError(f"normalize: images must be (B, C, H, W) or (C, H, W), got shape {tuple(images.shape)}")
    if channels_last and images.dim() != 4:
        raise ValueError(f"normalize: channels_last needs a 4-D (B, C, H, W) batch, got shape {tuple(images.shape)}")
    if not dtype.is_floating_point:
        raise TypeError(f"normalize: dtype must be a floating dtype, got {dtype}")
    mean = tuple(float(m) for m in mean)
    std = tuple(float(s) for s in std)
    channels = images.shape[-3]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"normalize: mean and std need {channels} values (one per channel), "
                         f"got {len(mean)} and {len(std)}")
    if not all(s > 0 and math.isfinite(s) for s in std) or not all(math.isfinite(m) for m in mean):
        raise ValueError(f"normalize: std must be finite and > 0 and mean finite, got mean={mean}, std={std}")
    scale, shift = _affine(mean, std, images.device)
    # Reorder the 1-byte pixels rather than the 4-byte floats; the float ops below keep the memory format.
    images = images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    out = images.to(torch.float32)
    out.mul_(scale).add_(shift)
    return out if dtype == torch.float32 else out.to(dtype)
