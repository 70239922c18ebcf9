"""torchvision's ImageNet ResNets (7×7 stride-2 stem + max-pool, 32× downsampling) behind the single-exit contract.

The torchvision model is built untrained (``weights=None``: nothing is ever downloaded) and its submodules are
adopted under their torchvision names, so ``state_dict()`` keys match ``torchvision.models.resnetXX`` exactly
and its checkpoints load as they are. torchvision is imported only when one of these models is built: the rest
of the package does not depend on it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from spacedkd_fast.models.resnet_cifar import init_weights

__all__ = ["ImageNetResNet", "TORCHVISION_ARCHS", "imagenet_resnet"]

# Registered name → torchvision constructor name.
TORCHVISION_ARCHS = {
    "imagenet_resnet18": "resnet18",
    "imagenet_resnet34": "resnet34",
    "imagenet_resnet50": "resnet50",
    "imagenet_resnet101": "resnet101",
}

# torchvision's ResNet.forward, in order (fc comes after the flatten).
_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")


class ImageNetResNet(nn.Module):
    """A torchvision ResNet with ``forward_features``.

    Args:
        arch: torchvision constructor name, e.g. ``"resnet50"``.
        num_classes: size of the logits.
        in_channels: channels of the input image; when not 3, ``conv1`` is replaced by a 7×7 stride-2 conv taking
            ``in_channels`` (Kaiming-initialized like the rest).

    Attributes:
        feature_dim: 512 (resnet18/34) or 2048 (resnet50/101), the input size of ``fc``.
        num_exits: 1.
        num_classes: as given.
    """

    num_exits = 1

    def __init__(self, arch: str, *, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        try:
            import torchvision
        except ImportError as exc:  # pragma: no cover - torchvision is a dev dependency
            raise ImportError(f"ImageNetResNet: the ImageNet ResNets need torchvision ({exc}); "
                              "pip install torchvision") from exc
        net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        if in_channels != 3:
            old = net.conv1
            net.conv1 = nn.Conv2d(in_channels, old.out_channels, kernel_size=old.kernel_size, stride=old.stride,
                                  padding=old.padding, bias=old.bias is not None)
            init_weights(net.conv1)
        for name in (*_TRUNK, "fc"):
            self.add_module(name, getattr(net, name))
        self.num_classes = num_classes
        self.feature_dim = self.fc.in_features

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and the pooled penultimate features.

        Args:
            x: ``(B, in_channels, H, W)`` float images, H and W ≥ 64 advised (layer4 is at 1/32 of the input).

        Returns:
            ``(logits, features)``: ``(B, num_classes)`` and ``(B, feature_dim)``, float32 (bfloat16 under
            autocast); ``self.fc(features)`` is ``logits``.
        """
        for name in _TRUNK:
            x = getattr(self, name)(x)
        features = torch.flatten(x, 1)
        return self.fc(features), features

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W)`` float images → ``(B, num_classes)`` logits."""
        return self.forward_features(x)[0]


def imagenet_resnet(name: str, *, num_classes: int, in_channels: int = 3) -> ImageNetResNet:
    """Build the registered ImageNet ResNet ``name`` (a key of :data:`TORCHVISION_ARCHS`)."""
    return ImageNetResNet(TORCHVISION_ARCHS[name], num_classes=num_classes, in_channels=in_channels)
