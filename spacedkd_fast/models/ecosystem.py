"""Models from the ecosystem behind the single-exit contract: ``timm:NAME`` and ``torchvision:NAME``.

Both are built untrained (``pretrained=False`` / ``weights=None``: nothing is ever downloaded; trained weights come
from a local file, see :mod:`spacedkd_fast.models.weights`). The wrapper adopts the model as ``self.model``, so a
plain ``timm`` / ``torchvision`` state_dict loads into ``wrapper.model`` as it is.

Features for the feature term (``--beta``) are the input of the model's final classifier:

* timm: ``forward_head(forward_features(x), pre_logits=True)`` (the pooled features), then ``get_classifier()``;
* torchvision: a forward hook on the last ``nn.Linear`` of the model (``fc`` for ResNets, ``classifier[-1]``,
  ``heads.head`` ...) records its input during the one forward pass.

timm is an optional extra (``pip install "spacedkd_fast[timm]"``); torchvision is a dependency.
"""

from __future__ import annotations

import importlib

from torch import Tensor, nn

PREFIXES = ("timm:", "torchvision:")


def is_ecosystem(name) -> bool:
    return isinstance(name, str) and name.startswith(PREFIXES)


class TimmModel(nn.Module):
    """A timm classifier with ``forward_features(x) -> (logits, pooled features)``."""

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.feature_dim = int(model.num_features)
        self.num_classes, self.num_exits = num_classes, 1

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return self.model.get_classifier()(features), features


class TorchvisionModel(nn.Module):
    """A torchvision classifier with ``forward_features(x) -> (logits, input of its last nn.Linear)``."""

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        super().__init__()
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to take features from")
        self.classifier_name, classifier = linears[-1]
        self.model = model
        self.feature_dim = classifier.in_features
        self.num_classes, self.num_exits = num_classes, 1
        self._captured: list[Tensor] = []
        # A bound method, not a closure: a deep copy (the teacher's snapshots) rebinds it to the copy.
        classifier.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple) -> None:
        self._captured.append(args[0])

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        self._captured.clear()
        return logits

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._captured.clear()
        logits = self.model(x)
        features = self._captured[-1].flatten(1)
        self._captured.clear()
        return logits, features


def _import(package: str, name: str):
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError as exc:
        extra = ' (pip install "spacedkd_fast[timm]")' if package == "timm" else ""
        raise ModuleNotFoundError(f"model {name!r} needs {package}, which is not installed: pip install "
                                  f"{package}{extra}") from exc


def _adapt_input_channels(model: nn.Module, in_channels: int, name: str) -> None:
    """Give the first 3-channel convolution ``in_channels`` inputs (grayscale data, say), freshly initialized."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                conv = nn.Conv2d(in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                                 child.dilation, child.groups, child.bias is not None, child.padding_mode)
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                setattr(parent, child_name, conv)
                return
    raise ValueError(f"model {name!r}: found no 3-channel nn.Conv2d to adapt to in_channels={in_channels}")


def build_ecosystem_model(name: str, *, num_classes: int, in_channels: int) -> nn.Module:
    """``timm:NAME`` or ``torchvision:NAME``, untrained, with ``num_classes`` outputs and ``in_channels`` inputs.

    Raises:
        ModuleNotFoundError: the package is not installed (the message says what to install).
        ValueError: the package has no such model (the message says how to list them).
    """
    package, _, model_name = name.partition(":")
    if not model_name:
        raise ValueError(f"model {name!r}: give the {package} model's name after the colon, e.g. {package}:resnet18")
    if package == "timm":
        timm = _import("timm", name)
        if not timm.is_model(model_name):
            raise ValueError(f"model {name!r}: timm has no model {model_name!r} (timm.list_models('*{model_name}*') "
                             f"lists the close ones)")
        model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
        return TimmModel(model, num_classes)
    torchvision = _import("torchvision", name)
    available = torchvision.models.list_models()
    if model_name not in available:
        raise ValueError(f"model {name!r}: torchvision has no model {model_name!r}; torchvision.models.list_models() "
                         f"lists {len(available)}, e.g. {', '.join(available[:6])}")
    model = torchvision.models.get_model(model_name, weights=None, num_classes=num_classes)
    if in_channels != 3:
        _adapt_input_channels(model, in_channels, name)
    return TorchvisionModel(model, num_classes)
