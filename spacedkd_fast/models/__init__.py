"""Model zoo: every network the engine trains, behind one registry and two output contracts.

Public API:
    MODEL_NAMES          sorted tuple of registered names
    build_model(name, *, num_classes, in_channels=3, image_size=32) -> nn.Module
    is_multi_exit(name)  True for the BYOT self-distillation models
    is_distilled(name)   True for the ViTs with DeiT's distillation token (*_distilled)

Families:
    resnet8, resnet20                      small CIFAR ResNets (He et al. 2016, widths 16/32/64), CPU-trainable
    resnet18/34/50/101                     CIFAR-style ResNets (3×3 stem, no max-pool), any image_size ≥ 8
    byot_resnet10/18/34/50/101             BYOT multi-exit ResNets on the same backbones (10: widths 16..128)
    imagenet_resnet18/34/50/101            torchvision ImageNet ResNets, untrained, image_size ≥ 64
    deit_tiny, vit_tiny_32, vit_micro_32   DeiT-style ViTs (patch 16 / 4 / 4; dim 192 / 192 / 64; depth 12 / 12 / 4),
                                           each with a *_distilled twin; image_size a multiple of the patch, and
                                           the model then takes exactly that size (position embeddings)
    timm:NAME, torchvision:NAME            any classifier of those packages, untrained (spacedkd_fast.models.ecosystem)

Single-exit contract (resnet*, imagenet_resnet*, deit_tiny, vit_tiny_32, vit_micro_32):
    forward(x) -> logits (B, num_classes)
    forward_features(x) -> (logits (B, num_classes), features (B, feature_dim)), model.fc(features) == logits
    attributes feature_dim, num_exits = 1, num_classes (ViTs: distilled = False; features are the class token)

Distilled contract (*_distilled ViTs: a class token with ``head`` and a distillation token with ``head_dist``):
    training mode: forward(x) -> logits (2, B, num_classes), stacked [class head, distillation head]
    eval mode:     forward(x) -> logits (B, num_classes), the mean of the two heads (DeiT's inference rule)
    forward_features(x) -> (logits shaped as forward, features (B, feature_dim) = the class token),
        model.fc(features) == the class head's logits (logits[0] in training mode)
    attributes feature_dim, num_exits = 1, num_classes, distilled = True

Multi-exit contract (byot_*), exits stacked deepest first (exit 0 is the teacher, exit 3 the shallowest):
    forward(x) -> logits (4, B, num_classes)
    forward_features(x) -> (logits (4, B, num_classes), features (4, B, feature_dim)),
        model.fcs[e](features[e]) == logits[e]
    attributes feature_dim, num_exits = 4, num_classes

x is ``(B, in_channels, H, W)`` float (any memory format; autocast works). Weights are Kaiming-normal (fan_out)
for convs and 1/0 for BN (ViTs: DeiT's truncated normal, std 0.02), drawn from the global torch RNG: the same
``torch.manual_seed`` builds the same model. No model has dropout, so training is as reproducible as its kernels;
the ViTs' stochastic depth (deit_tiny, vit_tiny_32: 0.1) draws from the global RNG, which the engine keeps per role.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral

from torch import nn

from spacedkd_fast.models.byot import BYOT_LAYOUTS, ByotResNet, byot_resnet
from spacedkd_fast.models.ecosystem import build_ecosystem_model, is_ecosystem
from spacedkd_fast.models.imagenet import TORCHVISION_ARCHS, ImageNetResNet, imagenet_resnet
from spacedkd_fast.models.resnet_cifar import RESNET_LAYOUTS, CifarResNet, cifar_resnet
from spacedkd_fast.models.vit import VIT_LAYOUTS, VisionTransformer, vit

__all__ = ["MODEL_NAMES", "ByotResNet", "CifarResNet", "ImageNetResNet", "VisionTransformer", "build_model",
           "is_distilled", "is_multi_exit"]


@dataclass(frozen=True)
class _Entry:
    build: Callable[..., nn.Module]  # (name, *, num_classes, in_channels[, image_size]) -> model
    min_image_size: int
    why: str  # the reason for min_image_size, for the error message
    multi_exit: bool
    distilled: bool = False  # DeiT distillation token: training-mode logits are (2, B, num_classes)
    sized: bool = False  # the builder takes image_size (the ViTs' position embeddings depend on it)


# CIFAR-style nets work at any size thanks to adaptive pooling; 8 px is where the 4-stage ones reach 1×1 at
# layer4, below that the stride-2 stages only see padding. The ImageNet stem + stages downsample 32×.
_CIFAR_MIN = 8
_CIFAR_WHY = "CIFAR-style stages downsample 8x"
_IMAGENET_MIN = 64
_IMAGENET_WHY = "the ImageNet stem and stages downsample 32x; use the CIFAR-style resnet* for small images"

_REGISTRY: dict[str, _Entry] = {
    **{name: _Entry(cifar_resnet, _CIFAR_MIN, _CIFAR_WHY, False) for name in RESNET_LAYOUTS},
    **{name: _Entry(byot_resnet, _CIFAR_MIN, _CIFAR_WHY, True) for name in BYOT_LAYOUTS},
    **{name: _Entry(imagenet_resnet, _IMAGENET_MIN, _IMAGENET_WHY, False) for name in TORCHVISION_ARCHS},
    # A ViT needs at least one patch; the builder also checks that image_size is a multiple of the patch.
    **{name: _Entry(vit, layout.patch_size, f"one {layout.patch_size}x{layout.patch_size} patch", False,
                    distilled=layout.distilled, sized=True) for name, layout in VIT_LAYOUTS.items()},
}

MODEL_NAMES: tuple[str, ...] = tuple(sorted(_REGISTRY))


def _entry(caller: str, name) -> _Entry:
    entry = _REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None and is_ecosystem(name):
        return _ECOSYSTEM
    if entry is None:
        raise ValueError(f"{caller}: unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}; or "
                         f"timm:NAME / torchvision:NAME")
    return entry


_ECOSYSTEM = _Entry(lambda name, *, num_classes, in_channels: build_ecosystem_model(
    name, num_classes=num_classes, in_channels=in_channels), 1, "", False)


def _check_int(name: str, value, low: int, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"build_model: {name} must be an integer, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"build_model: {name} must be >= {low}{why}, got {value}")
    return int(value)


def build_model(name: str, *, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build a registered model, freshly initialized from the global torch RNG (nothing is downloaded).

    Args:
        name: one of :data:`MODEL_NAMES`, or ``timm:NAME`` / ``torchvision:NAME`` (an untrained model of that
            package behind the single-exit contract; the package must be installed).
        num_classes: size of the logits, ≥ 2.
        in_channels: channels of the input images, ≥ 1 (1 for grayscale).
        image_size: side of the (square) training images, checked against what the model can take: ≥ 8 for the
            CIFAR-style and BYOT models, ≥ 64 for the ImageNet ones; these accept any size ≥ that. The ViTs need
            a multiple of their patch size (16 for deit_tiny*, 4 for the *_32 ones), and their position
            embeddings are sized for it: they take exactly ``image_size`` px images.

    Returns:
        An ``nn.Module`` in training mode, float32, on the CPU, following the single-exit, the multi-exit (when
        :func:`is_multi_exit`) or the distilled (when :func:`is_distilled`) contract described in
        :mod:`spacedkd_fast.models`.

    Raises:
        ValueError: unknown ``name`` (the message lists the choices), an argument out of range (the message
            names it and the range), or, for a ViT, an ``image_size`` that is not a multiple of its patch size
            (the message names both).
        TypeError: a non-integer ``num_classes``, ``in_channels`` or ``image_size``.
    """
    entry = _entry("build_model", name)
    num_classes = _check_int("num_classes", num_classes, 2)
    in_channels = _check_int("in_channels", in_channels, 1)
    image_size = _check_int("image_size", image_size, entry.min_image_size, f" for {name!r} ({entry.why})")
    sized = {"image_size": image_size} if entry.sized else {}
    return entry.build(name, num_classes=num_classes, in_channels=in_channels, **sized)


def is_multi_exit(name: str) -> bool:
    """True when ``name`` follows the multi-exit contract (logits ``(E, B, num_classes)``), i.e. the BYOT models.

    Raises:
        ValueError: unknown ``name`` (the message lists the choices).
    """
    return _entry("is_multi_exit", name).multi_exit


def is_distilled(name: str) -> bool:
    """True when ``name`` has DeiT's distillation token (the ``*_distilled`` ViTs): its training-mode logits are
    ``(2, B, num_classes)`` stacked ``[class head, distillation head]``, its eval-mode logits their mean.

    Raises:
        ValueError: unknown ``name`` (the message lists the choices).
    """
    return _entry("is_distilled", name).distilled
