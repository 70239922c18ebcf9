"""Streaming file datasets: crop parameters, pixel boxes, folder scanning, and the renderers (torch; DALI on CPU).

Renderer tests run on every available renderer: the torch one always, DALI's CPU twin when DALI is installed,
and their CUDA versions under ``@pytest.mark.gpu``. Images are generated with PIL in ``tmp_path``; PNGs decode
losslessly, so whenever the resize is the identity the expected bytes are known exactly.
"""

import math

import numpy as np
import pytest
import torch
from helpers import TINY_IMAGENET_LAYOUT_DAMAGE
from PIL import Image

from spacedkd_fast.data.files import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropParams,
    FileDataset,
    ResizedCropSpec,
    TorchFileRenderer,
    crop_boxes,
    eval_geometry,
    sample_crop_params,
    scan_folder_dataset,
)

try:
    import nvidia.dali  # noqa: F401

    HAS_DALI = True
except ImportError:
    HAS_DALI = False


# ---- helpers shared with test_dali.py ----------------------------------------------------------------------------

def save_image(path, array, fmt=None):
    """Write ``uint8 (H, W[, C])`` to ``path`` (format from the suffix unless given); returns str(path)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = fmt or {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP"}[path.suffix.lower()]
    Image.fromarray(array).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return str(path)


def smooth_image(height, width, seed=0):
    """A smooth RGB test pattern (gradients + mild noise): JPEG-friendly, and resizes without aliasing."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    planes = [128 + 100 * np.sin(xx / 9 + seed), 128 + 100 * np.cos(yy / 11), 128 + 60 * np.sin((xx + yy) / 15)]
    img = np.stack(planes, -1) + rng.normal(0, 3, (height, width, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def coded_image(height, width):
    """RGB pixels that encode their coordinates (R = row, G = column, B = row + column, mod 256)."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([yy % 256, xx % 256, (yy + xx) % 256], -1).astype(np.uint8)


def params_of(y0, x0, h, w, flip):
    """CropParams from python lists."""
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    return CropParams(y0=f32(y0), x0=f32(x0), h=f32(h), w=f32(w), flip=torch.tensor(flip, dtype=torch.bool))


def exact_params(boxes, sizes, flips):
    """CropParams whose pixel boxes are exactly ``boxes`` ((top, left, bottom, right) on (H, W) images).

    Edges at ``(k + 0.25) / extent`` round to k unambiguously, whatever the float32 rounding of the fraction.
    """
    y0, x0, h, w = [], [], [], []
    for (top, left, bottom, right), (height, width) in zip(boxes, sizes):
        y0.append((top + 0.25) / height)
        x0.append((left + 0.25) / width)
        h.append((bottom - top) / height)
        w.append((right - left) / width)
    params = params_of(y0, x0, h, w, flips)
    assert crop_boxes(params, [s[0] for s in sizes], [s[1] for s in sizes]).tolist() == [list(b) for b in boxes]
    return params


def renderer_kinds():
    kinds = [pytest.param(("torch", "cpu"), id="torch-cpu")]
    kinds.append(pytest.param(("dali", "cpu"), id="dali-cpu",
                              marks=pytest.mark.skipif(not HAS_DALI, reason="nvidia.dali is not installed")))
    kinds.append(pytest.param(("torch", "cuda"), id="torch-cuda", marks=pytest.mark.gpu))
    kinds.append(pytest.param(("dali", "cuda"), id="dali-cuda",
                              marks=[pytest.mark.gpu,
                                     pytest.mark.skipif(not HAS_DALI, reason="nvidia.dali is not installed")]))
    return kinds


def make_renderer(kind, spec, max_batch=8):
    name, device = kind
    if name == "torch":
        return TorchFileRenderer(spec, torch.device(device), num_threads=2)
    from spacedkd_fast.data.dali import DaliFileRenderer

    return DaliFileRenderer(spec, torch.device(device), max_batch=max_batch, num_threads=2)


# ---- ResizedCropSpec / sample_crop_params ------------------------------------------------------------------------

def test_spec_validation():
    assert ResizedCropSpec(size=8, scale=[0.5, 1], ratio=[1, 1]) == ResizedCropSpec(8, (0.5, 1.0), (1.0, 1.0))
    for kwargs, pattern in [(dict(size=0), "size must be a positive int"),
                            (dict(size=True), "size must be a positive int"),
                            (dict(size=8, scale=(0.0, 1.0)), r"scale must be \(lo, hi\) with 0 < lo <= hi"),
                            (dict(size=8, scale=(0.9, 0.5)), "scale must be"),
                            (dict(size=8, ratio=(1.0,)), "ratio must be"),
                            (dict(size=8, ratio=(1.0, math.inf)), "ratio must be"),
                            (dict(size=8, flip=1), "flip must be a bool")]:
        with pytest.raises(ValueError, match=pattern):
            ResizedCropSpec(**kwargs)


def test_sample_crop_params_follows_the_documented_draw_order():
    spec = ResizedCropSpec(size=16, scale=(0.1, 0.9), ratio=(0.5, 2.0))
    params = sample_crop_params(spec, 64, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    u_area, u_ratio, u_x, u_y, u_flip = (torch.rand(64, generator=g).double() for _ in range(5))
    area = 0.1 + 0.8 * u_area
    ratio = torch.exp(math.log(0.5) + (math.log(2.0) - math.log(0.5)) * u_ratio)
    w = torch.sqrt(area * ratio).clamp(max=1).float()
    h = torch.sqrt(area / ratio).clamp(max=1).float()
    assert torch.equal(params.w, w) and torch.equal(params.h, h)
    assert torch.equal(params.x0, (u_x * (1 - w.double())).float())
    assert torch.equal(params.y0, (u_y * (1 - h.double())).float())
    assert torch.equal(params.flip, u_flip < 0.5)
    assert all(getattr(params, k).dtype == torch.float32 for k in ("y0", "x0", "h", "w"))
    assert params.flip.dtype == torch.bool and len(params) == 64


def test_sample_crop_params_ranges_and_clipping():
    spec = ResizedCropSpec(size=16)
    p = sample_crop_params(spec, 20_000, torch.Generator().manual_seed(0))
    for key in ("h", "w"):
        v = getattr(p, key)
        assert v.min() > 0 and v.max() <= 1
    assert p.x0.min() >= 0 and p.y0.min() >= 0
    assert (p.x0.double() + p.w.double()).max() <= 1 + 1e-7 and (p.y0.double() + p.h.double()).max() <= 1 + 1e-7
    clipped = (p.w == 1) | (p.h == 1)
    # Clipped iff a > exp(-|log r|); with |log r| ~ U(0, t), t = log(4/3): P = (1 - (1 - e^-t)/t) / 0.92 ≈ 0.142.
    t = math.log(4 / 3)
    assert abs(clipped.float().mean().item() - (1 - (1 - math.exp(-t)) / t) / 0.92) < 0.01
    area, ratio = (p.w * p.h).double(), (p.w / p.h).double()
    free = ~clipped
    assert area[free].min() >= 0.08 - 1e-6 and area[free].max() <= 1 + 1e-6
    assert ratio[free].min() >= 3 / 4 - 1e-6 and ratio[free].max() <= 4 / 3 + 1e-6
    # Full-image spec: w = h = 1 always (clipping), x0 = y0 = 0.
    full = sample_crop_params(ResizedCropSpec(size=8, scale=(1, 1), ratio=(0.5, 2)), 500, torch.Generator())
    assert (full.w == 1).any() and (full.h == 1).any() and ((full.w == 1) | (full.h == 1)).all()
    assert (full.x0[full.w == 1] == 0).all() and (full.y0[full.h == 1] == 0).all()


def test_sample_crop_params_distribution():
    # ratio (1, 1) and scale <= 1: no clipping, w = h = sqrt(a); check the documented uniform laws.
    n = 40_000
    p = sample_crop_params(ResizedCropSpec(size=8, scale=(0.2, 0.6), ratio=(1, 1)), n, torch.Generator())
    area = (p.w.double() * p.h.double()).numpy()
    hist, _ = np.histogram(area, bins=8, range=(0.2, 0.6))
    assert np.abs(hist / n - 1 / 8).max() < 0.01, hist
    rel_x = (p.x0.double() / (1 - p.w.double())).numpy()
    hist, _ = np.histogram(rel_x, bins=8, range=(0, 1))
    assert np.abs(hist / n - 1 / 8).max() < 0.01, hist
    assert abs(p.flip.float().mean().item() - 0.5) < 0.01
    q = sample_crop_params(ResizedCropSpec(size=8, scale=(0.3, 0.3), ratio=(0.5, 2)), n, torch.Generator())
    log_ratio = torch.log(q.w.double() / q.h.double()).numpy()  # log-uniform on [log 0.5, log 2]
    hist, _ = np.histogram(log_ratio, bins=8, range=(math.log(0.5), math.log(2)))
    assert np.abs(hist / n - 1 / 8).max() < 0.01, hist


def test_sample_crop_params_determinism_and_flip_switch():
    spec = ResizedCropSpec(size=8)
    a = sample_crop_params(spec, 50, torch.Generator().manual_seed(7))
    b = sample_crop_params(spec, 50, torch.Generator().manual_seed(7))
    c = sample_crop_params(spec, 50, torch.Generator().manual_seed(8))
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("y0", "x0", "h", "w", "flip"))
    assert not torch.equal(a.x0, c.x0)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    no_flip = sample_crop_params(ResizedCropSpec(size=8, flip=False), 50, g1)
    sample_crop_params(spec, 50, g2)
    assert not no_flip.flip.any() and all(torch.equal(getattr(a, k), getattr(no_flip, k)) for k in "y0 x0 h w".split())
    assert torch.equal(g1.get_state(), g2.get_state())  # the generator advances alike with and without flipping
    assert len(sample_crop_params(spec, 0, torch.Generator())) == 0


def test_sample_crop_params_errors():
    with pytest.raises(TypeError, match="spec must be a ResizedCropSpec"):
        sample_crop_params((0.08, 1.0), 4, torch.Generator())
    with pytest.raises(ValueError, match="batch must be an int >= 0"):
        sample_crop_params(ResizedCropSpec(size=8), -1, torch.Generator())
    with pytest.raises(ValueError, match="generator must be a CPU torch.Generator"):
        sample_crop_params(ResizedCropSpec(size=8), 4, np.random.default_rng())


# ---- pixel geometry ----------------------------------------------------------------------------------------------

def test_crop_boxes_rule():
    p = params_of(y0=[0.1, 0.0, 0.999, 0.5, 0.25], x0=[0.2, 0.0, 0.999, 0.5, 0.125],
                  h=[0.5, 1.0, 0.001, 0.5, 0.5], w=[0.5, 1.0, 0.001, 0.5, 0.25], flip=[False] * 5)
    boxes = crop_boxes(p, [10, 7, 10, 3, 4], [20, 7, 10, 3, 8])
    assert boxes.dtype == np.int64
    assert boxes.tolist() == [
        [1, 4, 6, 14],  # 1.0 → 1, 4.0 → 4; (0.6)·10 = 6, (0.7)·20 = 14
        [0, 0, 7, 7],  # the whole image
        [9, 9, 10, 10],  # rnd(9.99) = 10 is clamped to H − 1; the box keeps one pixel
        [2, 2, 3, 3],  # 1.5 rounds half up to 2, 3 stays 3: one pixel
        [1, 1, 3, 3],  # 0.25·4 = 1, 0.125·8 = 1; (0.75)·4 = 3, (0.375)·8 = 3
    ]
    with pytest.raises(ValueError, match="heights and widths must be 5 ints >= 1"):
        crop_boxes(p, [10] * 5, [0] * 5)


def test_crop_boxes_are_never_empty_or_outside():
    spec = ResizedCropSpec(size=8, scale=(1e-6, 1.0), ratio=(0.05, 20))
    p = sample_crop_params(spec, 5000, torch.Generator().manual_seed(1))
    rng = np.random.default_rng(0)
    heights, widths = rng.integers(1, 600, 5000), rng.integers(1, 600, 5000)
    top, left, bottom, right = crop_boxes(p, heights, widths).T
    assert (top >= 0).all() and (left >= 0).all() and (bottom <= heights).all() and (right <= widths).all()
    assert (bottom > top).all() and (right > left).all()


def test_eval_geometry():
    assert eval_geometry(100, 100, 50) == (50, 50, 0, 0)
    assert eval_geometry(60, 90, 40) == (40, 60, 0, 10)
    assert eval_geometry(16, 25, 8) == (8, 13, 0, 2)  # 12.5 rounds half up; (13 − 8) // 2 = 2
    assert eval_geometry(192, 195, 224) == (224, 228, 0, 2)  # 227.5 → 228 (DALI's float32 resize_shorter: 227)
    assert eval_geometry(13, 9, 7) == (10, 7, 1, 0)


# ---- scan_folder_dataset -----------------------------------------------------------------------------------------

WNIDS = ["n02", "n01", "n03"]


def make_tiny(root, size=24):
    """A miniature tiny-imagenet-200/ (the official layout); returns {relative path: array}."""
    arrays = {}
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for k, wnid in enumerate(WNIDS):
        for i in range(2):
            rel = f"train/{wnid}/images/{wnid}_{i}.JPEG"
            arrays[rel] = smooth_image(size, size, seed=3 * k + i)
            save_image(root / rel, arrays[rel], "JPEG")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    lines = []
    for i, wnid in enumerate(["n03", "n01", "n02", "n01"]):
        rel = f"val/images/val_{i}.JPEG"
        arrays[rel] = np.full((size, size, 3), 40 * i, np.uint8)
        save_image(root / rel, arrays[rel], "JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t{size - 1}\t{size - 1}")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "test" / "images").mkdir(parents=True)
    return arrays


def make_imagefolder(root, test_name="val"):
    """``root/train/<class>/*`` and ``root/<test_name>/<class>/*`` with mixed formats and sizes."""
    files = {
        ("train", "dog", "b.PNG"): smooth_image(30, 30, 1),
        ("train", "dog", "a.png"): smooth_image(20, 36, 2),
        ("train", "cat", "x.bmp"): smooth_image(40, 24, 3),
        ("train", "cat", "sub", "y.png"): np.full((24, 24), 9, np.uint8),  # grayscale, in a subfolder
        ("train", "cat", "z.jpg"): smooth_image(48, 48, 4),
        (test_name, "cat", "c.Jpeg"): np.full((24, 24, 3), 50, np.uint8),
        (test_name, "dog", "d.png"): smooth_image(24, 30, 5),
    }
    for parts, array in files.items():
        save_image(root.joinpath(*parts), array, {"png": "PNG", "bmp": "BMP"}.get(parts[-1].lower()[-3:], "JPEG"))
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    (root / "train" / "dog" / "._a.png").write_bytes(b"macOS resource fork, not an image")
    return files


def test_scan_tiny_imagenet(tmp_path):
    make_tiny(tmp_path / "tiny-imagenet-200")
    d = scan_folder_dataset("tiny-imagenet", tmp_path, image_size=32)
    assert isinstance(d, FileDataset) and d.name == "tiny-imagenet"
    assert d.classes == ("n01", "n02", "n03") and d.num_classes == 3
    root = (tmp_path / "tiny-imagenet-200").absolute()
    assert d.train_files == tuple(str(root / f"train/{w}/images/{w}_{i}.JPEG") for w in ("n01", "n02", "n03")
                                  for i in range(2))
    assert d.train_labels.tolist() == [0, 0, 1, 1, 2, 2] and d.train_labels.dtype == torch.int64
    assert d.test_files == tuple(str(root / f"val/images/val_{i}.JPEG") for i in range(4))
    assert d.test_labels.tolist() == [2, 0, 1, 0]
    assert d.mean == IMAGENET_MEAN and d.std == IMAGENET_STD
    assert d.crop == ResizedCropSpec(size=32) and d.image_size == 32 and d.image_shape == (3, 32, 32)
    again = scan_folder_dataset("Tiny_ImageNet", root)
    assert again.train_files == d.train_files and again.image_size == 224


def test_scan_matches_load_dataset_order(tmp_path):
    from spacedkd_fast.data import load_dataset

    make_imagefolder(tmp_path)
    d = scan_folder_dataset("imagefolder", tmp_path, image_size=16)
    mem = load_dataset("imagefolder", tmp_path, image_size=16)
    assert d.train_labels.equal(mem.train_labels) and d.test_labels.equal(mem.test_labels)
    assert d.classes == mem.classes == ("cat", "dog")
    names = [f.split("/")[-1] for f in d.train_files]
    assert names == ["x.bmp", "z.jpg", "y.png", "a.png", "b.PNG"]  # cat/ files, then cat/sub/, then dog/
    assert [f.split("/")[-1] for f in d.test_files] == ["c.Jpeg", "d.png"]


@pytest.mark.parametrize("test_name", ["val", "test"])
def test_scan_imagefolder(tmp_path, test_name):
    make_imagefolder(tmp_path, test_name)
    d = scan_folder_dataset("imagefolder", tmp_path)
    assert d.name == "imagefolder" and d.image_size == 224 and len(d.train_files) == 5 and len(d.test_files) == 2
    assert all(f.startswith(str(tmp_path.absolute())) for f in d.train_files + d.test_files)
    assert d.mean == IMAGENET_MEAN and d.std == IMAGENET_STD
    assert "FileDataset('imagefolder', train=5, test=2, image_size=224" in repr(d)


@pytest.mark.parametrize("damage, error, pattern", TINY_IMAGENET_LAYOUT_DAMAGE)
def test_scan_tiny_imagenet_layout_errors(tmp_path, damage, error, pattern):
    root = tmp_path / "tiny-imagenet-200"
    make_tiny(root)
    damage(root)
    with pytest.raises(error, match=pattern):
        scan_folder_dataset("tiny-imagenet", tmp_path)


def test_scan_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"root/train/<class>/.*missing train/, val/ \(or test/\); found in "
                                                r".*nothing \(empty folder\)"):
        scan_folder_dataset("imagefolder", tmp_path)
    make_imagefolder(tmp_path)
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(ValueError, match=r"same class folders .*only in train: \[\], only in val: \['bird'\]"):
        scan_folder_dataset("imagefolder", tmp_path)
    (tmp_path / "val" / "bird").rmdir()
    (tmp_path / "train" / "emu").mkdir()
    (tmp_path / "val" / "emu").mkdir()
    with pytest.raises(FileNotFoundError, match=r"class folder .*emu.* has no .jpg/.jpeg/.png/.bmp files"):
        scan_folder_dataset("imagefolder", tmp_path)


def test_scan_argument_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar10'; choose one of tiny-imagenet, imagefolder"):
        scan_folder_dataset("cifar10", tmp_path)
    with pytest.raises(ValueError, match="needs data_dir"):
        scan_folder_dataset("imagefolder", None)
    with pytest.raises(FileNotFoundError, match=r"is not a directory; expected root/train/<class>/"):
        scan_folder_dataset("imagefolder", tmp_path / "missing")
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        scan_folder_dataset("imagefolder", tmp_path, image_size=0)


# ---- renderers ---------------------------------------------------------------------------------------------------

@pytest.fixture
def pngs(tmp_path):
    """Three coordinate-coded PNGs of different sizes, one grayscale PNG and one RGBA PNG."""
    arrays = [coded_image(40, 56), coded_image(33, 21), coded_image(64, 64)]
    files = [save_image(tmp_path / f"img{i}.png", a) for i, a in enumerate(arrays)]
    gray = np.arange(30 * 30, dtype=np.int64).reshape(30, 30) % 251
    files.append(save_image(tmp_path / "gray.png", gray.astype(np.uint8)))
    rgba = np.concatenate([coded_image(30, 30), np.full((30, 30, 1), 255, np.uint8)], -1)
    files.append(save_image(tmp_path / "rgba.png", rgba))
    arrays += [np.repeat(gray.astype(np.uint8)[..., None], 3, -1), rgba[..., :3]]
    return files, arrays


@pytest.mark.parametrize("kind", renderer_kinds())
def test_train_batch_exact_crop_and_flip(kind, pngs):
    """Boxes of exactly S×S pixels: the resize is the identity, so the output is the crop itself (flipped)."""
    files, arrays = pngs
    size = 12
    sizes = [a.shape[:2] for a in arrays]
    boxes = [(3, 7, 15, 19), (0, 9, 12, 21), (52, 0, 64, 12), (9, 9, 21, 21), (18, 5, 30, 17)]
    flips = [False, True, False, True, True]
    params = exact_params(boxes, sizes, flips)
    r = make_renderer(kind, ResizedCropSpec(size=size))
    out = r.train_batch(files, params)
    assert out.dtype == torch.uint8 and out.shape == (5, 3, size, size) and out.device.type == kind[1]
    for i, ((top, left, bottom, right), flip) in enumerate(zip(boxes, flips)):
        expected = arrays[i][top:bottom, left:right].transpose(2, 0, 1)
        if flip:
            expected = expected[:, :, ::-1]
        assert np.array_equal(out[i].cpu().numpy(), expected), f"sample {i}"


@pytest.mark.parametrize("kind", renderer_kinds())
def test_train_batch_box_on_a_rectangle(kind, tmp_path):
    """Resized crops of a grey image with a red rectangle: the rectangle lands where the box maps it."""
    img = np.full((90, 120, 3), 60, np.uint8)
    img[30:60, 40:100] = (220, 20, 20)
    file = save_image(tmp_path / "rect.png", img)
    size = 24
    boxes = [(20, 30, 80, 110), (0, 0, 90, 120), (25, 35, 55, 65)]
    params = exact_params(boxes, [img.shape[:2]] * 3, [False, True, False])
    out = make_renderer(kind, ResizedCropSpec(size=size)).train_batch([file] * 3, params).cpu().numpy()
    for i, (top, left, bottom, right) in enumerate(boxes):
        sy, sx = (bottom - top) / size, (right - left) / size
        # Output pixel centre (y + ½, x + ½) maps to source point top + (y + ½)·sy, left + (x + ½)·sx.
        ys = top + (np.arange(size) + 0.5) * sy
        xs = left + (np.arange(size) + 0.5) * sx
        if i == 1:
            xs = xs[::-1]  # flipped after the resize
        inside = ((ys[:, None] > 30 + 1.5 * sy) & (ys[:, None] < 60 - 1.5 * sy)
                  & (xs[None] > 40 + 1.5 * sx) & (xs[None] < 100 - 1.5 * sx))
        outside = ((ys[:, None] < 30 - 1.5 * sy) | (ys[:, None] > 60 + 1.5 * sy)
                   | (xs[None] < 40 - 1.5 * sx) | (xs[None] > 100 + 1.5 * sx))
        red = out[i, 0].astype(int)
        assert inside.any() and (np.abs(red[inside] - 220) <= 1).all(), f"sample {i}: rectangle interior"
        assert (np.abs(red[outside] - 60) <= 1).all(), f"sample {i}: background"


@pytest.mark.parametrize("kind", renderer_kinds())
def test_eval_batch_centre_crop(kind, pngs, tmp_path):
    files, arrays = pngs
    # Shorter side 12 = S: the resize is the identity and the centre crop is exact.
    wide, tall = coded_image(12, 19), coded_image(17, 12)
    extra = [save_image(tmp_path / "wide.png", wide), save_image(tmp_path / "tall.png", tall)]
    r = make_renderer(kind, ResizedCropSpec(size=12))
    out = r.eval_batch(extra).cpu().numpy()
    assert out.shape == (2, 3, 12, 12)
    assert np.array_equal(out[0], wide[:, 3:15].transpose(2, 0, 1))  # (19 − 12) // 2 = 3
    assert np.array_equal(out[1], tall[2:14].transpose(2, 0, 1))  # (17 − 12) // 2 = 2
    # A resized case: a flat image stays flat, and the batch has the right shape.
    flat = save_image(tmp_path / "flat.png", np.full((37, 50, 3), 77, np.uint8))
    out = r.eval_batch(files + [flat])
    assert out.shape == (6, 3, 12, 12) and out.dtype == torch.uint8
    assert (out[5] == 77).all()


@pytest.mark.parametrize("kind", renderer_kinds())
def test_renderer_is_deterministic(kind, pngs, tmp_path):
    files, _ = pngs
    files = files + [save_image(tmp_path / "s.jpg", smooth_image(50, 70))]
    spec = ResizedCropSpec(size=16)
    params = sample_crop_params(spec, len(files), torch.Generator().manual_seed(5))
    r = make_renderer(kind, spec)
    a = r.train_batch(files, params)
    r.eval_batch(files[:2])  # other work in between changes nothing
    b = r.train_batch(files, params)
    c = make_renderer(kind, spec).train_batch(files, params)  # a fresh renderer neither
    assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(r.eval_batch(files), r.eval_batch(files))
    # Each sample depends only on its own file and parameters, not on the rest of the batch.
    assert torch.equal(r.train_batch(files[2:4], params.take(slice(2, 4))), a[2:4])


@pytest.mark.parametrize("kind", renderer_kinds())
def test_renderer_edge_cases(kind, pngs, tmp_path):
    files, _ = pngs
    spec = ResizedCropSpec(size=8)
    r = make_renderer(kind, spec, max_batch=2)
    assert r.train_batch([], sample_crop_params(spec, 0, torch.Generator())).shape == (0, 3, 8, 8)
    assert r.eval_batch([]).shape == (0, 3, 8, 8)
    # More files than max_batch (DALI rebuilds its pipeline), and a 1-pixel box upscaled to 8×8.
    params = exact_params([(5, 6, 6, 7)] * 5, [(40, 56)] * 5, [False] * 5)
    out = r.train_batch([files[0]] * 5, params).cpu().numpy()
    assert out.shape == (5, 3, 8, 8) and (out == coded_image(40, 56)[5, 6][None, :, None, None]).all()
    with pytest.raises(ValueError, match=r"params.y0 must be a CPU torch.float32 tensor of shape \(2,\)"):
        r.train_batch(files[:2], params)
    with pytest.raises(TypeError, match="params must be CropParams"):
        r.train_batch(files[:2], None)
    with pytest.raises(TypeError, match="files must be a sequence of paths"):
        r.train_batch(files[0], params.take(slice(0, 1)))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"cannot decode image .*broken.png"):
        r.eval_batch([files[0], str(broken)])
    assert r.eval_batch(files[:1]).shape == (1, 3, 8, 8)  # still usable after the error
    with pytest.raises((FileNotFoundError, ValueError), match="missing.png"):
        r.eval_batch([str(tmp_path / "missing.png")])


def test_torch_renderer_threads_and_arguments(pngs):
    files, _ = pngs
    spec = ResizedCropSpec(size=10)
    params = sample_crop_params(spec, len(files), torch.Generator().manual_seed(2))
    one = TorchFileRenderer(spec, torch.device("cpu"), num_threads=1)
    many = TorchFileRenderer(spec, torch.device("cpu"), num_threads=4)
    with one, many:
        assert torch.equal(one.train_batch(files, params), many.train_batch(files, params))
    with pytest.raises(ValueError, match="num_threads must be a positive int"):
        TorchFileRenderer(spec, torch.device("cpu"), num_threads=0)
    with pytest.raises(TypeError, match="spec must be a ResizedCropSpec"):
        TorchFileRenderer(None, torch.device("cpu"))


def test_torch_renderer_resizes_on_its_pool(pngs, monkeypatch):
    """Cropping and resizing run one image per pool thread (not serially on the calling thread)."""
    import threading

    files, _ = pngs
    spec = ResizedCropSpec(size=10)
    params = sample_crop_params(spec, len(files), torch.Generator().manual_seed(2))
    r = TorchFileRenderer(spec, torch.device("cpu"), num_threads=3)
    threads = []
    real = TorchFileRenderer._resize

    def recording(self, hwc, height, width):
        threads.append(threading.current_thread().name)
        return real(self, hwc, height, width)

    with r:
        expected = r.train_batch(files, params)
        monkeypatch.setattr(TorchFileRenderer, "_resize", recording)
        assert torch.equal(r.train_batch(files, params), expected)
        r.eval_batch(files)
    assert len(threads) == 2 * len(files) and all(name.startswith("spacedkd-render") for name in threads), threads


def make_class_folders(root, per_class=(10, 7, 2, 1)):
    """torchvision's ``root/<class>/*``: classes c0, c1, ... with the given file counts (PNGs)."""
    for c, count in enumerate(per_class):
        for i in range(count):
            save_image(root / f"c{c}" / f"{i:02d}.png", smooth_image(12, 14, seed=10 * c + i), "PNG")


def test_class_folders_split_by_val_fraction(tmp_path):
    from spacedkd_fast.data import load_dataset

    make_class_folders(tmp_path)
    data = scan_folder_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.3, split_seed=1)
    test_counts = torch.bincount(data.test_labels, minlength=4).tolist()
    assert test_counts == [3, 2, 1, 0]  # round(0.3·n), at least one, never the whole class; a lone file trains
    assert sorted(data.train_files + data.test_files) == sorted(str(p) for p in tmp_path.rglob("*.png"))
    assert not set(data.train_files) & set(data.test_files) and data.classes == ("c0", "c1", "c2", "c3")
    again = scan_folder_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.3, split_seed=1)
    other = scan_folder_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.3, split_seed=2)
    assert again.test_files == data.test_files and other.test_files != data.test_files
    in_memory = load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.3, split_seed=1)
    assert torch.equal(in_memory.test_labels, data.test_labels) and len(in_memory.train_labels) == 14


def test_class_folders_split_errors(tmp_path):
    from spacedkd_fast.data import load_dataset

    make_class_folders(tmp_path / "flat")
    with pytest.raises(ValueError, match=r"holds class folders \(c0, c1, c2, c3\) but no train/ and val/ splits: "
                                         r"pass --val-fraction"):
        scan_folder_dataset("imagefolder", tmp_path / "flat")
    make_imagefolder(tmp_path / "split")
    with pytest.raises(ValueError, match="has its own train/ and val/ splits; --val-fraction"):
        load_dataset("imagefolder", tmp_path / "split", val_fraction=0.2)
    with pytest.raises(ValueError, match=r"--val-fraction must be a number in \(0, 1\), got 1.5"):
        scan_folder_dataset("imagefolder", tmp_path / "flat", val_fraction=1.5)
    with pytest.raises(ValueError, match="has its own test split"):
        load_dataset("embedded", val_fraction=0.1)


@pytest.mark.parametrize("kind", renderer_kinds())
def test_renderer_names_every_broken_file_of_a_batch(kind, pngs, tmp_path):
    """One error for the batch, naming each unreadable or undecodable file (path -> one-line reason), so that a
    caller who skips them renders the batch once more, not once per broken file."""
    from spacedkd_fast.data.files import BrokenFilesError

    files, _ = pngs
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG not really")
    truncated = tmp_path / "truncated.jpg"
    Image.fromarray(smooth_image(40, 48)).save(truncated, quality=90)
    truncated.write_bytes(truncated.read_bytes()[:300])  # PIL: "image file is truncated"
    missing = str(tmp_path / "missing.png")
    spec = ResizedCropSpec(size=8)
    r = make_renderer(kind, spec, max_batch=5)
    batch = [files[0], str(garbage), files[1], str(truncated), missing]
    params = sample_crop_params(spec, len(batch), torch.Generator().manual_seed(0))
    # DALI reads the bytes first: a missing file is named before any decoding.
    expected = {missing} if kind[0] == "dali" else {str(garbage), str(truncated), missing}
    for render in (lambda: r.train_batch(batch, params), lambda: r.eval_batch(batch)):
        with pytest.raises(BrokenFilesError) as info:
            render()
        assert set(info.value.files) == expected and all("\n" not in v for v in info.value.files.values())
        assert "\n" not in str(info.value)
    readable = [f for f in batch if f != missing]
    with pytest.raises(BrokenFilesError) as info:
        r.train_batch(readable, params.take(slice(0, 4)))
    assert set(info.value.files) == {str(garbage), str(truncated)}
    assert r.train_batch(files[:2], params.take(slice(0, 2))).shape == (2, 3, 8, 8)  # usable after the errors
