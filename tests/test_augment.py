"""Batch augmentation: byte equality with the numpy spec, hand-checked semantics, the random stream, normalize."""

import math

import numpy as np
import pytest
import torch

from spacedkd_fast.data import (
    AugmentParams,
    AugmentSpec,
    apply_augment,
    augment_batch,
    augment_reference_numpy,
    normalize,
    sample_params,
)


def _images(b, c, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)


def _params(dy=0, dx=0, flip=False, degrees=None, cos=1.0, sin=0.0, batch=1):
    if degrees is not None:
        rad = torch.tensor(degrees, dtype=torch.float32) * (math.pi / 180)
        cos, sin = float(torch.cos(rad)), float(torch.sin(rad))
    full = lambda v, dt: torch.full((batch,), v, dtype=dt)  # noqa: E731
    return AugmentParams(dy=full(dy, torch.int64), dx=full(dx, torch.int64), flip=full(flip, torch.bool),
                         cos=full(cos, torch.float32), sin=full(sin, torch.float32))


def _assert_matches_reference(images, params):
    out = apply_augment(images, params)
    expected = augment_reference_numpy(images.numpy(), params.to_numpy())
    assert out.dtype == images.dtype and out.shape == images.shape and out.is_contiguous()
    mismatch = np.flatnonzero((out.numpy() != expected).reshape(-1))
    assert mismatch.size == 0, f"{mismatch.size} bytes differ from the numpy reference, first at flat {mismatch[:5]}"
    return out


# ---- byte equality with the numpy reference ----------------------------------------------------------------------

SHAPES = [(1, 8, 8), (3, 7, 10), (3, 32, 32), (1, 5, 12), (3, 13, 6), (1, 1, 1), (3, 2, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("degrees", [0.0, 15.0, 90.0, 179.0])
def test_random_batches_match_reference(shape, degrees):
    gen = torch.Generator().manual_seed(hash((shape, degrees)) % 2**31)
    for trial in range(6):
        spec = AugmentSpec(pad=trial % 5, flip=bool(trial % 2), rotate_degrees=degrees)
        images = _images(7, *shape, seed=trial)
        out, params = augment_batch(images, spec, gen)
        expected = augment_reference_numpy(images.numpy(), params.to_numpy())
        assert np.array_equal(out.numpy(), expected), f"spec {spec}, shape {shape}, trial {trial}"


def test_exhaustive_angles_match_reference():
    # Every whole and half degree in [-360, 360]: angles whose rotated sample points land near .5 boundaries,
    # where a fused multiply-add or another operation order would round differently.
    angles = torch.arange(-720, 721, dtype=torch.float32) / 2
    rad = angles * (math.pi / 180)
    b = angles.numel()
    zeros = torch.zeros(b, dtype=torch.int64)
    params = AugmentParams(dy=zeros, dx=zeros, flip=torch.zeros(b, dtype=torch.bool), cos=torch.cos(rad),
                           sin=torch.sin(rad))
    images = _images(1, 3, 9, 14).expand(b, 3, 9, 14)  # non-contiguous input too
    _assert_matches_reference(images, params)


def test_extreme_params_match_reference():
    # Offsets beyond the image (all zero), unnormalized cos/sin (a scaling), mixed per-sample values.
    images = _images(6, 3, 6, 9)
    params = AugmentParams(dy=torch.tensor([0, 7, -6, 3, -2, 1]), dx=torch.tensor([9, 0, -9, -4, 5, 0]),
                           flip=torch.tensor([True, False, True, False, True, True]),
                           cos=torch.tensor([1.0, 0.5, -1.0, 2.0, 0.7071068, -0.3]),
                           sin=torch.tensor([0.0, -0.5, 0.0, 0.25, 0.7071068, 1.1]))
    out = _assert_matches_reference(images, params)
    assert int(out[0].count_nonzero()) == 0 and int(out[1].count_nonzero()) == 0  # shifted entirely out


# ---- the semantics, checked by hand (independently of the reference) ---------------------------------------------

def test_identity_params_give_the_input_back():
    for shape in SHAPES:
        images = _images(4, *shape)
        assert torch.equal(apply_augment(images, _params(batch=4)), images)
        cl = images.contiguous(memory_format=torch.channels_last) if shape[1] > 1 else images
        assert torch.equal(apply_augment(cl, _params(batch=4)), images)


def test_crop_offsets():
    img = _images(1, 3, 6, 8)
    out = apply_augment(img, _params(dy=1, dx=-2))
    # out[y, x] = img[y + 1, x - 2]: content moves up one row and right two columns, zeros enter.
    assert torch.equal(out[..., :-1, 2:], img[..., 1:, :-2])
    assert int(out[..., -1, :].count_nonzero()) == 0 and int(out[..., :, :2].count_nonzero()) == 0


def test_flip_and_the_order_crop_then_flip():
    img = _images(1, 1, 5, 7)
    assert torch.equal(apply_augment(img, _params(flip=True)), img.flip(-1))
    # crop first: out[y, x] = out1[y, W-1-x] = img[y, W-1-x + dx]
    out = apply_augment(img, _params(dx=2, flip=True))
    assert torch.equal(out[..., 2:], img.flip(-1)[..., :-2]) and int(out[..., :2].count_nonzero()) == 0


@pytest.mark.parametrize("shape", [(1, 7, 7), (3, 8, 8)])
def test_rotation_by_90_is_rot90(shape):
    img = _images(1, *shape)
    rot90 = torch.from_numpy(np.ascontiguousarray(np.rot90(img.numpy(), k=1, axes=(2, 3))))
    assert torch.equal(apply_augment(img, _params(cos=0.0, sin=1.0)), rot90)
    assert torch.equal(apply_augment(img, _params(degrees=90.0)), rot90)  # cos(pi/2) is -4e-8 in float32
    assert torch.equal(apply_augment(img, _params(degrees=180.0)), img.flip(-1).flip(-2))


def test_rotation_is_nearest_with_zero_fill():
    img = torch.full((1, 1, 9, 9), 200, dtype=torch.uint8)
    out = apply_augment(img, _params(degrees=45.0))
    assert out[0, 0, 4, 4] == 200  # the centre stays
    assert set(out.unique().tolist()) == {0, 200}  # nearest neighbour: no new values
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 8, 8] == 0  # corners come from outside the image


# ---- the random parameters ---------------------------------------------------------------------------------------

def test_sample_params_types_and_ranges():
    spec = AugmentSpec(pad=3, flip=True, rotate_degrees=15.0)
    p = sample_params(spec, 5000, torch.Generator().manual_seed(0), "cpu")
    assert p.dy.dtype == p.dx.dtype == torch.int64 and p.flip.dtype == torch.bool
    assert p.cos.dtype == p.sin.dtype == torch.float32 and all(t.shape == (5000,) for t in vars(p).values())
    angles = torch.rad2deg(torch.atan2(p.sin.double(), p.cos.double()))
    assert angles.abs().max() <= 15.0 + 1e-4 and angles.min() < -14.5 and angles.max() > 14.5
    assert abs(float(angles.mean())) < 0.5
    assert 0.47 < p.flip.double().mean() < 0.53


def test_offsets_are_uniform():
    pad, n = 3, 70_000
    p = sample_params(AugmentSpec(pad=pad), n, torch.Generator().manual_seed(1), "cpu")
    for offsets in (p.dy, p.dx):
        assert int(offsets.min()) == -pad and int(offsets.max()) == pad
        counts = torch.bincount(offsets + pad, minlength=2 * pad + 1).double()
        expected = n / (2 * pad + 1)
        sigma = math.sqrt(expected * (1 - 1 / (2 * pad + 1)))
        assert ((counts - expected).abs() < 5 * sigma).all(), counts.tolist()
    assert abs(float(torch.corrcoef(torch.stack([p.dy, p.dx]).double())[0, 1])) < 0.02  # independent


def test_disabled_steps_are_the_identity():
    p = sample_params(AugmentSpec(pad=0, flip=False, rotate_degrees=0), 64, torch.Generator().manual_seed(2), "cpu")
    assert not p.dy.any() and not p.dx.any() and not p.flip.any()
    assert (p.cos == 1).all() and (p.sin == 0).all() and not torch.signbit(p.sin).any()
    images = _images(64, 3, 5, 6)
    out, _ = augment_batch(images, AugmentSpec(pad=0, flip=False, rotate_degrees=0), torch.Generator())
    assert torch.equal(out, images) and out.data_ptr() != images.data_ptr()


def test_same_seed_same_batch():
    images = _images(16, 3, 12, 12)
    spec = AugmentSpec()
    a_out, a = augment_batch(images, spec, torch.Generator().manual_seed(7))
    b_out, b = augment_batch(images, spec, torch.Generator().manual_seed(7))
    c_out, _ = augment_batch(images, spec, torch.Generator().manual_seed(8))
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("dy", "dx", "flip", "cos", "sin"))
    assert torch.equal(a_out, b_out) and not torch.equal(a_out, c_out)


def test_stream_does_not_depend_on_the_spec():
    # The rule: dy, dx, flip and the angle are always drawn, so the generator advances alike for every spec.
    specs = [AugmentSpec(), AugmentSpec(pad=0, flip=False, rotate_degrees=0), AugmentSpec(pad=4, flip=False),
             AugmentSpec(pad=4, flip=True, rotate_degrees=0), AugmentSpec(pad=1, rotate_degrees=90)]
    states, offsets = [], []
    for spec in specs:
        g = torch.Generator().manual_seed(3)
        p = sample_params(spec, 33, g, "cpu")
        states.append(g.get_state())
        offsets.append((spec.pad, p.dy, p.dx))
    assert all(torch.equal(s, states[0]) for s in states)
    pad4 = [(dy, dx) for pad, dy, dx in offsets if pad == 4]
    assert torch.equal(pad4[0][0], pad4[1][0]) and torch.equal(pad4[0][1], pad4[1][1])  # flip/rotation change no crop


# ---- argument errors ---------------------------------------------------------------------------------------------

def test_errors_name_the_argument():
    images = _images(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"images must be a \(B, C, H, W\) tensor, got \(3, 4, 4\)"):
        apply_augment(images[0], _params(batch=2))
    with pytest.raises(ValueError, match=r"params.dy must be int of shape \(2,\)"):
        apply_augment(images, _params(batch=3))
    bad = _params(batch=2)
    with pytest.raises(ValueError, match=r"params.cos must be float32"):
        apply_augment(images, AugmentParams(bad.dy, bad.dx, bad.flip, bad.cos.double(), bad.sin))
    with pytest.raises(ValueError, match="generator must be a torch.Generator on cpu"):
        sample_params(AugmentSpec(), 2, None, "cpu")
    with pytest.raises(TypeError, match="spec must be an AugmentSpec"):
        sample_params({"pad": 4}, 2, torch.Generator(), "cpu")
    with pytest.raises(ValueError, match="batch must be an int >= 0"):
        sample_params(AugmentSpec(), -1, torch.Generator(), "cpu")


# ---- normalize ---------------------------------------------------------------------------------------------------

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def test_normalize_matches_the_float64_formula():
    x = _images(4, 3, 5, 6)
    expected = (x.double() / 255 - torch.tensor(MEAN, dtype=torch.float64).view(3, 1, 1)) \
        / torch.tensor(STD, dtype=torch.float64).view(3, 1, 1)
    out = normalize(x, MEAN, STD)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)
    torch.testing.assert_close(normalize(x[0], MEAN, STD).double(), expected[0], rtol=0, atol=2e-6)
    gray = normalize(x[:, :1], (0.1307,), (0.3081,))
    torch.testing.assert_close(gray.double(), (x[:, :1].double() / 255 - 0.1307) / 0.3081, rtol=0, atol=2e-6)


def test_normalize_dtype_and_channels_last():
    x = _images(2, 3, 7, 5)
    out = normalize(x, MEAN, STD, dtype=torch.bfloat16, channels_last=True)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.float(), normalize(x, MEAN, STD), rtol=1e-2, atol=1e-2)
    assert normalize(x, MEAN, STD).is_contiguous()


def test_normalize_errors():
    x = _images(2, 3, 4, 4)
    with pytest.raises(TypeError, match="images must be a uint8 tensor"):
        normalize(x.float(), MEAN, STD)
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        normalize(x, MEAN[:2], STD)
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        normalize(x, MEAN, (0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="channels_last needs a 4-D"):
        normalize(x[0], MEAN, STD, channels_last=True)
