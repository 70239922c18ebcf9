"""CIFAR-style ResNets: a 3×3 stride-1 stem with no max-pool, so 32 px inputs keep their resolution into stage 1.

Two families share the code here:

* the 4-stage ResNets used as KD teachers and students on CIFAR (widths 64/128/256/512, strides 1/2/2/2):
  ``resnet18`` / ``resnet34`` (BasicBlock) and ``resnet50`` / ``resnet101`` (Bottleneck, expansion 4);
* the small 6n+2 ResNets of He et al. 2016 (widths 16/32/64, strides 1/2/2, BasicBlock): ``resnet8`` (n = 1)
  and ``resnet20`` (n = 3), cheap enough to train on a CPU.

A shortcut is a 1×1 conv (stride s) + BN whenever a block changes the shape, the identity otherwise, in both
families (He et al. used zero-padded identity shortcuts for the small ones; projections add 2.8k parameters to
``resnet20`` and keep one block definition).

Every model here follows the single-exit contract of :mod:`spacedkd_fast.models`: ``forward(x) -> logits`` and
``forward_features(x) -> (logits, features)`` with ``model.fc(features) == logits``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "Bottleneck", "CifarResNet", "init_weights", "make_stage"]


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3×3 conv with padding 1 and no bias (a BN always follows, which has its own shift)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


def init_weights(module: nn.Module) -> None:
    """The house initialization, in place: Kaiming-normal (fan_out, ReLU) for every conv, BN weight 1 / bias 0.

    Linear layers keep PyTorch's default init. Draws from the global torch RNG in module order, so a model built
    twice under the same ``torch.manual_seed`` has identical weights.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """Two 3×3 convs (the first with stride ``stride``) + shortcut: ``(B, in, H, W) -> (B, planes, H/s, W/s)``."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        # In-place is safe: each ReLU acts on a fresh BN output or sum, never on a tensor another branch reads.
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_channels, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 (stride ``stride``) → 1×1 expand ×4, + shortcut: ``(B, in, H, W) -> (B, 4·planes, H/s, W/s)``.

    The stride sits on the 3×3 conv (as in torchvision), not on the first 1×1, which would skip 3/4 of the input.
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


Block = type[BasicBlock] | type[Bottleneck]


def make_stage(block: Block, in_channels: int, planes: int, num_blocks: int, stride: int) -> tuple[nn.Sequential, int]:
    """``num_blocks`` blocks, the first with stride ``stride``; returns the stage and its output channel count."""
    blocks = []
    for i in range(num_blocks):
        blocks.append(block(in_channels, planes, stride if i == 0 else 1))
        in_channels = planes * block.expansion
    return nn.Sequential(*blocks), in_channels


def add_backbone(module: nn.Module, block: Block, num_blocks: Sequence[int], widths: Sequence[int],
                 strides: Sequence[int], in_channels: int) -> tuple[int, ...]:
    """Register the CIFAR stem (``conv1``, ``bn1``, ``relu``) and the stages ``layer1..layerN`` on ``module``, in
    that order (shared by :class:`CifarResNet` and the BYOT networks); returns each stage's output channels."""
    module.conv1 = conv3x3(in_channels, widths[0])
    module.bn1 = nn.BatchNorm2d(widths[0])
    module.relu = nn.ReLU(inplace=True)
    channels, stage_channels = widths[0], []
    for i, (n, planes, stride) in enumerate(zip(num_blocks, widths, strides)):
        stage, channels = make_stage(block, channels, planes, n, stride)
        module.add_module(f"layer{i + 1}", stage)
        stage_channels.append(channels)
    return tuple(stage_channels)


class CifarResNet(nn.Module):
    """A CIFAR-style ResNet: conv3×3 (stride 1) → BN → ReLU → stages ``layer1..layerN`` → global avg-pool → ``fc``.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        num_blocks: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        widths: ``planes`` of each stage (stage output channels are ``planes · block.expansion``); the stem has
            ``widths[0]`` channels.
        strides: stride of each stage's first block; stage 1 keeps the stem's resolution.
        num_classes: size of the logits.
        in_channels: channels of the input image.

    Attributes:
        feature_dim: ``widths[-1] · block.expansion``, the size of the pooled features (the input of ``fc``).
        stage_channels: output channels of each stage.
        num_exits: 1.
        num_classes: as given.
    """

    num_exits = 1

    def __init__(
        self,
        block: Block,
        num_blocks: Sequence[int],
        widths: Sequence[int],
        strides: Sequence[int],
        *,
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if not len(num_blocks) == len(widths) == len(strides):
            raise ValueError(f"CifarResNet: num_blocks, widths and strides must have one entry per stage, got "
                             f"{len(num_blocks)}, {len(widths)} and {len(strides)}")
        self.num_classes = num_classes
        self.stage_channels = add_backbone(self, block, num_blocks, widths, strides, in_channels)
        self._stage_names = tuple(f"layer{i + 1}" for i in range(len(widths)))
        self.feature_dim = self.stage_channels[-1]
        # Adaptive pooling: any input size works (the 4-stage nets reach 1×1 at 8 px, 4×4 at 32 px).
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.feature_dim, num_classes)
        init_weights(self)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Each stage's output: ``[(B, stage_channels[i], H_i, W_i) ...]``, shallowest first (for feature KD)."""
        x = self.relu(self.bn1(self.conv1(x)))
        outputs = []
        for name in self._stage_names:
            x = getattr(self, name)(x)
            outputs.append(x)
        return outputs

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and the pooled penultimate features.

        Args:
            x: ``(B, in_channels, H, W)`` float images, any memory format.

        Returns:
            ``(logits, features)``: ``(B, num_classes)`` and ``(B, feature_dim)``, float32 (bfloat16 under
            autocast); ``self.fc(features)`` is ``logits``.
        """
        x = self.forward_stages(x)[-1]
        # flatten, not view: the pooled tensor is (B, C, 1, 1) with channels_last strides when x is channels_last.
        features = torch.flatten(self.avgpool(x), 1)
        return self.fc(features), features

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W)`` float images → ``(B, num_classes)`` logits."""
        return self.forward_features(x)[0]


# Stage layouts: (block, blocks per stage, widths, strides).
RESNET_LAYOUTS: dict[str, tuple[Block, tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
    "resnet8": (BasicBlock, (1, 1, 1), (16, 32, 64), (1, 2, 2)),
    "resnet20": (BasicBlock, (3, 3, 3), (16, 32, 64), (1, 2, 2)),
    "resnet18": (BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), (1, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3), (64, 128, 256, 512), (1, 2, 2, 2)),
    "resnet50": (Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), (1, 2, 2, 2)),
    "resnet101": (Bottleneck, (3, 4, 23, 3), (64, 128, 256, 512), (1, 2, 2, 2)),
}


def cifar_resnet(arch: str, *, num_classes: int, in_channels: int = 3) -> CifarResNet:
    """Build the CIFAR ResNet ``arch`` (a key of :data:`RESNET_LAYOUTS`); arguments are checked by the caller."""
    block, num_blocks, widths, strides = RESNET_LAYOUTS[arch]
    return CifarResNet(block, num_blocks, widths, strides, num_classes=num_classes, in_channels=in_channels)
