"""Model zoo: registry and errors, both output contracts, BYOT exit order, parameter counts, memory formats,
autocast, determinism, and gradient reach. Everything runs on the CPU at tiny batch and resolution."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import ResNet

from spacedkd_fast.models import MODEL_NAMES, build_model, is_multi_exit
from spacedkd_fast.models.resnet_cifar import Bottleneck, CifarResNet
from spacedkd_fast.models.vit import VIT_LAYOUTS

EXPECTED_NAMES = (
    "byot_resnet10", "byot_resnet101", "byot_resnet18", "byot_resnet34", "byot_resnet50",
    "deit_tiny", "deit_tiny_distilled",
    "imagenet_resnet101", "imagenet_resnet18", "imagenet_resnet34", "imagenet_resnet50",
    "resnet101", "resnet18", "resnet20", "resnet34", "resnet50", "resnet8",
    "vit_micro_32", "vit_micro_32_distilled", "vit_tiny_32", "vit_tiny_32_distilled",
)
CNN_NAMES = tuple(name for name in MODEL_NAMES if name not in VIT_LAYOUTS)  # the ViTs are tested in test_vit.py
# Feature size of each family's last stage.
FEATURE_DIM = {
    "resnet8": 64, "resnet20": 64, "resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048,
    "byot_resnet10": 128, "byot_resnet18": 512, "byot_resnet34": 512, "byot_resnet50": 2048, "byot_resnet101": 2048,
    "imagenet_resnet18": 512, "imagenet_resnet34": 512, "imagenet_resnet50": 2048, "imagenet_resnet101": 2048,
}
SMALL = ("resnet8", "byot_resnet10", "imagenet_resnet18")  # one cheap model per family


def _side(name: str) -> int:
    """Smallest cheap input side for a model: 64 px for ImageNet nets, 16 px for the CIFAR-style ones."""
    return 64 if name.startswith("imagenet_") else 16


def _images(name: str, batch: int = 2, channels: int = 3, side: int | None = None) -> torch.Tensor:
    side = side or _side(name)
    return torch.randn(batch, channels, side, side)


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CE of single-exit ``(B, K)`` logits, or the sum of every exit's CE for multi-exit ``(E, B, K)`` logits."""
    if logits.dim() == 3:
        return sum(F.cross_entropy(exit_logits, target) for exit_logits in logits)
    return F.cross_entropy(logits, target)


def _expected_shape(name: str, batch: int, num_classes: int) -> tuple[int, ...]:
    return (4, batch, num_classes) if is_multi_exit(name) else (batch, num_classes)


# ---- registry and errors ---------------------------------------------------------------------------------------

def test_model_names_are_sorted_and_complete():
    assert MODEL_NAMES == EXPECTED_NAMES
    assert [n for n in MODEL_NAMES if is_multi_exit(n)] == [n for n in EXPECTED_NAMES if n.startswith("byot_")]


def test_unknown_name_lists_every_choice():
    for fn, kwargs in ((build_model, dict(num_classes=10)), (is_multi_exit, {})):
        with pytest.raises(ValueError, match=r"unknown model 'resnet19'; choose one of: byot_resnet10, ") as info:
            fn("resnet19", **kwargs)
        message = str(info.value)
        assert message.startswith(f"{fn.__name__}:")
        listed, ecosystem = message.split("choose one of: ")[1].split("; or ")
        assert tuple(listed.split(", ")) == MODEL_NAMES and ecosystem == "timm:NAME / torchvision:NAME"


@pytest.mark.parametrize(
    "name, kwargs, error, pattern",
    [
        ("resnet8", dict(num_classes=1), ValueError, r"build_model: num_classes must be >= 2, got 1"),
        ("byot_resnet10", dict(num_classes=0), ValueError, r"num_classes must be >= 2, got 0"),
        ("resnet8", dict(num_classes=10.0), TypeError, r"num_classes must be an integer, got float"),
        ("resnet8", dict(num_classes=True), TypeError, r"num_classes must be an integer, got bool"),
        ("resnet8", dict(num_classes=10, in_channels=0), ValueError, r"in_channels must be >= 1, got 0"),
        ("resnet8", dict(num_classes=10, in_channels="3"), TypeError, r"in_channels must be an integer, got str"),
        ("imagenet_resnet18", dict(num_classes=10, image_size=32), ValueError,
         r"image_size must be >= 64 for 'imagenet_resnet18' \(.*32x.*\), got 32"),
        ("imagenet_resnet101", dict(num_classes=10, image_size=63), ValueError, r"image_size must be >= 64"),
        ("resnet18", dict(num_classes=10, image_size=4), ValueError, r"image_size must be >= 8 for 'resnet18'"),
        ("byot_resnet10", dict(num_classes=10, image_size=7), ValueError, r"image_size must be >= 8"),
        ("resnet8", dict(num_classes=10, image_size=32.0), TypeError, r"image_size must be an integer"),
        (None, dict(num_classes=10), ValueError, r"unknown model None"),
    ],
)
def test_bad_arguments_are_rejected_by_name(name, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        build_model(name, **kwargs)


def test_edge_values_are_accepted():
    assert build_model("resnet8", num_classes=2, in_channels=1, image_size=8).num_classes == 2
    # numpy integers (e.g. from a config array) are integers too
    assert build_model("resnet8", num_classes=np.int64(3), image_size=np.int32(8)).fc.out_features == 3


# ---- contracts: shapes, attributes, forward_features consistency (every registered CNN) -----------------------

@pytest.mark.parametrize("name", CNN_NAMES)
def test_contract(name):
    num_classes, batch = 7, 2
    model = build_model(name, num_classes=num_classes, image_size=_side(name)).eval()
    assert model.num_classes == num_classes
    assert model.feature_dim == FEATURE_DIM[name]
    assert not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()), "dropout breaks replay"
    x = _images(name, batch)
    with torch.no_grad():
        logits = model(x)
        logits2, features = model.forward_features(x)
    assert logits.dtype == features.dtype == torch.float32
    assert torch.isfinite(logits).all() and torch.isfinite(features).all()
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)
    if is_multi_exit(name):
        assert model.num_exits == 4 and len(model.fcs) == 4
        assert logits.shape == (4, batch, num_classes)
        assert features.shape == (4, batch, model.feature_dim)
        with torch.no_grad():
            for e in range(4):
                torch.testing.assert_close(model.fcs[e](features[e]), logits[e], rtol=1e-6, atol=1e-6)
        # distinct heads: the exits are not copies of one another
        assert all(not torch.equal(logits[0], logits[e]) for e in (1, 2, 3))
    else:
        assert model.num_exits == 1
        assert logits.shape == (batch, num_classes)
        assert features.shape == (batch, model.feature_dim)
        assert isinstance(model.fc, nn.Linear) and model.fc.in_features == model.feature_dim
        with torch.no_grad():
            torch.testing.assert_close(model.fc(features), logits, rtol=1e-6, atol=1e-6)
        # features are pooled post-ReLU activations
        assert (features >= 0).all()


def test_imagenet_forward_features_matches_torchvision_forward():
    model = build_model("imagenet_resnet18", num_classes=5, image_size=64).eval()
    x = _images("imagenet_resnet18")
    with torch.no_grad():
        # torchvision's own forward run over the adopted submodules
        expected = ResNet._forward_impl(model, x)
        torch.testing.assert_close(model.forward_features(x)[0], expected, rtol=0, atol=0)
    # same state_dict keys as torchvision's model, so its checkpoints load unchanged
    assert list(model.state_dict()) == list(torchvision.models.resnet18().state_dict())


@pytest.mark.parametrize("name, side", [("resnet18", 8), ("resnet20", 9), ("byot_resnet10", 8), ("byot_resnet10", 15),
                                        ("imagenet_resnet18", 67)])
def test_small_and_odd_image_sizes(name, side):
    model = build_model(name, num_classes=4, image_size=side)
    logits = model(_images(name, side=side))  # train mode: BN sees batch statistics, even at 1×1
    assert logits.shape == _expected_shape(name, 2, 4)
    assert torch.isfinite(logits).all()


# ---- BYOT exit order ------------------------------------------------------------------------------------------

def test_byot_deepest_exit_is_first():
    """Exit 0 is the avg-pooled layer4, exit e > 0 depends only on stages 1..(4 − e)."""
    model = build_model("byot_resnet10", num_classes=10).eval()
    x = _images("byot_resnet10", side=32)
    with torch.no_grad():
        logits, features = model.forward_features(x)
        h = model.relu(model.bn1(model.conv1(x)))
        stages = []
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            h = layer(h)
            stages.append(h)
        torch.testing.assert_close(features[0], stages[-1].mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
        # exit 3 (shallowest) is gate + branch on layer1, exit 1 on layer3
        torch.testing.assert_close(features[3], model.branches[0](model.gates[0](stages[0])), rtol=0, atol=0)
        torch.testing.assert_close(features[1], model.branches[2](model.gates[2](stages[2])), rtol=0, atol=0)

        # Perturbing stage k changes exits 0..(4 − k) and leaves the shallower ones bit-identical.
        for k, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4), start=1):
            saved = [p.clone() for p in layer.parameters()]
            for p in layer.parameters():
                p.add_(0.5)
            changed = [not torch.equal(a, b) for a, b in zip(model(x), logits)]
            for p, s in zip(layer.parameters(), saved):
                p.copy_(s)
            assert changed == [e <= 4 - k for e in range(4)], f"perturbing layer{k}: exits changed {changed}"


def test_byot_exit_heads_reach_last_stage_channels():
    for name, c1 in (("byot_resnet10", 16), ("byot_resnet18", 64), ("byot_resnet50", 256)):
        model = build_model(name, num_classes=10)
        # exit on stage i has 4 − i SepConv blocks, doubling channels to feature_dim
        n_sepconv = [sum(type(m).__name__ == "SepConv" for m in b.modules()) for b in model.branches]
        assert n_sepconv == [3, 2, 1]
        assert model.stage_channels[0] == c1 and model.feature_dim == 8 * c1


# ---- parameter counts -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name, num_classes, expected",
    [
        ("resnet18", 10, 11_173_962),  # the usual CIFAR ResNet-18 figure (11.17M)
        ("resnet50", 100, 23_705_252),
        ("resnet20", 10, 272_474),  # 0.27M (He et al.'s 0.27M uses zero-padding shortcuts: 269,722)
        ("resnet8", 10, 78_042),
        ("imagenet_resnet18", 1000, 11_689_512),  # torchvision's documented count
    ],
)
def test_parameter_counts(name, num_classes, expected):
    model = build_model(name, num_classes=num_classes, image_size=_side(name))
    assert sum(p.numel() for p in model.parameters()) == expected


def test_byot_adds_only_exit_parameters():
    backbone = sum(p.numel() for p in build_model("resnet18", num_classes=10).parameters())
    byot = build_model("byot_resnet18", num_classes=10)
    extra = sum(p.numel() for m in (*byot.gates, *byot.branches, *byot.fcs[1:]) for p in m.parameters())
    assert sum(p.numel() for p in byot.parameters()) == backbone + extra


# ---- input channels, memory format, autocast ------------------------------------------------------------------

@pytest.mark.parametrize("name", SMALL)
def test_in_channels_one(name):
    model = build_model(name, num_classes=3, in_channels=1, image_size=_side(name))
    assert model.conv1.in_channels == 1
    logits = model(_images(name, channels=1))
    assert logits.shape == _expected_shape(name, 2, 3)
    with pytest.raises(RuntimeError):
        model(_images(name, channels=3))


@pytest.mark.parametrize("name", SMALL)
def test_channels_last_matches_contiguous(name):
    model = build_model(name, num_classes=5, image_size=_side(name))
    x = _images(name, batch=4)
    y = torch.randint(0, 5, (4,))
    reference = copy.deepcopy(model).double()
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert model_cl.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    # fp32 forward: same math, different summation order in the conv kernels.
    ref_logits, ref_features = model.forward_features(x)
    logits, features = model_cl.forward_features(x_cl)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(features, ref_features, rtol=1e-4, atol=1e-4)

    # Gradients are compared in float64: in fp32 a ~1e-7 rounding difference can flip one ReLU at a value near 0,
    # and train-mode BN over a 4-image batch spreads that flip over a whole channel's gradient (seen: 20%).
    def gradients(net, images):
        _cross_entropy(net(images), y).backward()
        return [p.grad for p in net.parameters()]

    grads_ref = gradients(reference, x.double())
    model_cl = model_cl.double()
    assert model_cl.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    grads_cl = gradients(model_cl, x_cl.double())
    for (param_name, _), g, g_ref in zip(model.named_parameters(), grads_cl, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12, msg=lambda m, n=param_name: f"{n}: {m}")


@pytest.mark.parametrize("name", SMALL)
def test_bf16_autocast(name):
    model = build_model(name, num_classes=5, image_size=_side(name))
    x = _images(name)
    with torch.no_grad():
        ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, features = model.forward_features(x.contiguous(memory_format=torch.channels_last))
    assert logits.dtype == torch.bfloat16
    assert logits.shape == _expected_shape(name, 2, 5)
    assert features.shape[-1] == model.feature_dim
    assert torch.isfinite(logits).all()
    # bf16 keeps ~3 significant digits; a handful of layers costs a few percent of the logit scale
    scale = ref.abs().max()
    assert (logits.float() - ref).abs().max() <= 0.1 * scale, "bf16 logits far from fp32"
    logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---- determinism ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", (*SMALL, "resnet50"))
def test_construction_is_deterministic(name):
    torch.manual_seed(123)
    a = build_model(name, num_classes=10, image_size=_side(name))
    torch.manual_seed(123)
    b = build_model(name, num_classes=10, image_size=_side(name))
    torch.manual_seed(124)
    c = build_model(name, num_classes=10, image_size=_side(name))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    x = _images(name)
    assert torch.equal(a(x), b(x))  # train mode; no dropout, so the outputs are identical too


def test_kaiming_init_and_bn_defaults():
    model = build_model("byot_resnet10", num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert convs and bns
    for conv in convs:
        fan_out = conv.out_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
        std = (2.0 / fan_out) ** 0.5
        if conv.weight.numel() >= 1000:  # enough samples for a sample std to be meaningful
            assert abs(conv.weight.std().item() / std - 1) < 0.15, conv
    for bn in bns:
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))


# ---- gradients reach every parameter ------------------------------------------------------------------------

def _assert_every_parameter_gets_gradient(model: nn.Module):
    missing = [n for n, p in model.named_parameters() if p.grad is None or not (p.grad != 0).any()]
    assert not missing, f"no gradient for: {missing}"


@pytest.mark.parametrize("name", SMALL)
def test_backward_reaches_every_parameter(name):
    model = build_model(name, num_classes=6, image_size=_side(name))
    x = _images(name, batch=4)
    y = torch.randint(0, 6, (4,))
    _cross_entropy(model(x), y).backward()  # BYOT: summed over exits, so every head and gate has a gradient
    _assert_every_parameter_gets_gradient(model)


def test_backward_reaches_every_parameter_bottleneck():
    # A tiny Bottleneck net (not registered) exercises the projection shortcut of the 4× expansion.
    model = CifarResNet(Bottleneck, (1, 2), (4, 8), (1, 2), num_classes=3)
    F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 0])).backward()
    _assert_every_parameter_gets_gradient(model)
    assert model.feature_dim == 32


def test_byot_exits_train_separately():
    """The shallowest exit's loss reaches its own head, gate and stage 1, and nothing deeper."""
    model = build_model("byot_resnet10", num_classes=6)
    model(_images("byot_resnet10"))[3].sum().backward()

    def reached(module: nn.Module) -> bool:
        return any(p.grad is not None and (p.grad != 0).any() for p in module.parameters())

    assert reached(model.fcs[3]) and reached(model.gates[0]) and reached(model.branches[0]) and reached(model.layer1)
    assert not any(reached(m) for m in (model.fcs[0], model.fcs[1], model.fcs[2], model.layer2, model.layer3,
                                        model.layer4, model.gates[1], model.branches[1]))
