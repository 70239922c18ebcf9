"""BYOT ("Be Your Own Teacher", Zhang et al. 2019) multi-exit ResNets for self-distillation.

The backbone is a 4-stage CIFAR-style ResNet (:mod:`spacedkd_fast.models.resnet_cifar`). Each of stages 1–3
gets a side exit that the deepest exit teaches, as in the official Spaced-KD self-KD code:

    stage_i output ──► attention gate ──► mask · stage_i ──► SepConv ×(4 − i), stride 2 each ──► avg-pool ──► fc
         │
         └──► stage_{i+1} (the backbone continues on the *ungated* output; the gate only feeds its exit)

The SepConv chain of exit i doubles the channels at every block while halving the resolution, so every exit
ends on the last stage's channel count and (at 32 px) its 4×4 resolution: all exits have ``feature_dim``-sized
features and can be compared to the deepest one directly (feature-level self-KD).

Exit order everywhere is **deepest first**: exit 0 is the classifier on stage 4 (the teacher), exits 1, 2, 3 sit
on stages 3, 2, 1 (3 is the shallowest).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spacedkd_fast.models.resnet_cifar import BasicBlock, Block, Bottleneck, add_backbone, init_weights

__all__ = ["AttentionGate", "ByotResNet", "SepConv", "byot_resnet"]


class SepConv(nn.Sequential):
    """Two depthwise-separable convs, each followed by BN → ReLU: ``(B, in, H, W) -> (B, out, H/s, W/s)``.

    depthwise 3×3 (stride ``stride``) → pointwise in→in → BN → ReLU → depthwise 3×3 → pointwise in→out → BN → ReLU.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, in_channels, 1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, in_channels, 3, stride=1, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class AttentionGate(nn.Module):
    """Spatial-channel attention of a BYOT exit: ``x -> sigmoid(up(ReLU(BN(SepConv_s2(x))))) · x``, same shape as x.

    The mask is computed at half resolution and upsampled bilinearly to exactly ``x``'s size (not ×2, so odd
    sizes work). It passes a ReLU before the sigmoid, as in BYOT, so it lies in [0.5, 1): the gate re-weights
    the stage output but never blocks it.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = SepConv(channels, channels, stride=2)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        mask = self.relu(self.bn(self.conv(x)))
        mask = F.interpolate(mask, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(mask) * x


class ByotResNet(nn.Module):
    """Multi-exit CIFAR-style ResNet with BYOT attention-gated side exits on stages 1–3.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        num_blocks: blocks in each of the 4 stages.
        widths: ``planes`` of each stage; each must be twice the previous one (the exits' SepConv chains double
            the channels at each step to reach the last stage's count).
        num_classes: size of each exit's logits.
        in_channels: channels of the input image.

    Attributes:
        num_exits: 4.
        feature_dim: the last stage's output channels (``widths[3] · block.expansion``), shared by every exit.
        num_classes: as given.
        fcs: the 4 exit classifiers, ``nn.Linear(feature_dim, num_classes)``, in exit order (deepest first):
            ``fcs[e](features[e]) == logits[e]``.
        gates, branches: attention gates and SepConv chains of the side exits, in *stage* order (index 0 on
            stage 1, which is exit 3).
    """

    num_exits = 4

    def __init__(
        self,
        block: Block,
        num_blocks: Sequence[int],
        widths: Sequence[int],
        *,
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(num_blocks) != 4 or len(widths) != 4:
            raise ValueError(f"ByotResNet: num_blocks and widths must have 4 entries (one per stage), got "
                             f"{len(num_blocks)} and {len(widths)}")
        if any(b != 2 * a for a, b in zip(widths, widths[1:])):
            raise ValueError(f"ByotResNet: widths must double from stage to stage, got {tuple(widths)}")
        self.num_classes = num_classes
        stage_channels = add_backbone(self, block, num_blocks, widths, (1, 2, 2, 2), in_channels)
        self.stage_channels = stage_channels
        self.feature_dim = stage_channels[-1]

        self.gates = nn.ModuleList(AttentionGate(c) for c in stage_channels[:3])
        branches = []
        for c in stage_channels[:3]:
            steps = []
            while c < self.feature_dim:  # stage 1: c → 2c → 4c → 8c; stage 3: c → 2c
                steps.append(SepConv(c, 2 * c, stride=2))
                c *= 2
            branches.append(nn.Sequential(*steps, nn.AdaptiveAvgPool2d(1), nn.Flatten(1)))
        self.branches = nn.ModuleList(branches)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fcs = nn.ModuleList(nn.Linear(self.feature_dim, num_classes) for _ in range(self.num_exits))
        init_weights(self)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Every exit's logits and pooled features, deepest exit first.

        Args:
            x: ``(B, in_channels, H, W)`` float images, any memory format.

        Returns:
            ``(logits, features)``: ``(4, B, num_classes)`` and ``(4, B, feature_dim)``, float32 (bfloat16 under
            autocast); ``self.fcs[e](features[e])`` is ``logits[e]``.
        """
        x = self.relu(self.bn1(self.conv1(x)))
        side = []  # pooled features of the exits on stages 1..3, shallowest first
        for i, (gate, branch) in enumerate(zip(self.gates, self.branches)):
            x = getattr(self, f"layer{i + 1}")(x)
            side.append(branch(gate(x)))
        x = self.layer4(x)
        features = [torch.flatten(self.avgpool(x), 1), *reversed(side)]
        logits = [fc(f) for fc, f in zip(self.fcs, features)]
        return torch.stack(logits), torch.stack(features)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W)`` float images → ``(4, B, num_classes)`` logits, deepest exit first."""
        return self.forward_features(x)[0]


# (block, blocks per stage, widths); strides are 1/2/2/2 for all.
BYOT_LAYOUTS: dict[str, tuple[Block, tuple[int, ...], tuple[int, ...]]] = {
    "byot_resnet10": (BasicBlock, (1, 1, 1, 1), (16, 32, 64, 128)),
    "byot_resnet18": (BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512)),
    "byot_resnet34": (BasicBlock, (3, 4, 6, 3), (64, 128, 256, 512)),
    "byot_resnet50": (Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512)),
    "byot_resnet101": (Bottleneck, (3, 4, 23, 3), (64, 128, 256, 512)),
}


def byot_resnet(arch: str, *, num_classes: int, in_channels: int = 3) -> ByotResNet:
    """Build the BYOT model ``arch`` (a key of :data:`BYOT_LAYOUTS`); arguments are checked by the caller."""
    block, num_blocks, widths = BYOT_LAYOUTS[arch]
    return ByotResNet(block, num_blocks, widths, num_classes=num_classes, in_channels=in_channels)
