"""DALI renderers: the array augmenter against the numpy spec, the file renderer against the torch one.

Everything runs on DALI's CPU twin (``device_id=None``); the ``@pytest.mark.gpu`` tests run the same checks on
the GPU graph. The module itself must import (and fail clearly) without DALI: that is checked in a subprocess.
"""

import math
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch
from test_files import HAS_DALI, exact_params, save_image, smooth_image

from spacedkd_fast.data.augment import AugmentParams, apply_augment, augment_reference_numpy, sample_params
from spacedkd_fast.data.datasets import AugmentSpec
from spacedkd_fast.data.files import ResizedCropSpec, TorchFileRenderer, crop_boxes, sample_crop_params

needs_dali = pytest.mark.skipif(not HAS_DALI, reason="nvidia.dali is not installed")
DEVICES = [pytest.param("cpu", marks=needs_dali), pytest.param("cuda", marks=[needs_dali, pytest.mark.gpu])]
# DaliArrayAugmenter's graphs: the stock one on the CPU (the GPU graph's twin) and on the GPU, and the fused CPU
# operator (compiled from csrc/dali on first use; the [dev] extra installs what it needs, so it must build here).
ARRAY_GRAPHS = [pytest.param("cpu", "stock", marks=needs_dali, id="cpu-stock"),
                pytest.param("cpu", "fused", marks=needs_dali, id="cpu-fused"),
                pytest.param("cuda", "stock", marks=[needs_dali, pytest.mark.gpu], id="cuda-stock")]
# px: a rotation source coordinate this close to a rounding boundary (k + ½) may round either way. The float32
# evaluations (DALI's M·(x + ½, y + ½) + t, the spec's separate multiply/subtract/add) are within ~1e-5 px of the
# exact value for these image sizes, so 1e-4 leaves a 10x margin; a band of ±1e-4 per axis covers ~4e-4 of the
# pixels of a generic rotation.
TIE = 1e-4


def test_module_imports_and_fails_clearly_without_dali():
    code = textwrap.dedent("""
        import sys

        class HideDali:  # an import hook: nvidia.dali behaves as if it were not installed
            def find_spec(self, name, path=None, target=None):
                if name == "nvidia.dali" or name.startswith("nvidia.dali."):
                    raise ImportError(f"No module named {name!r} (hidden by the test)")
                return None

        sys.meta_path.insert(0, HideDali())
        import torch
        import spacedkd_fast.data.dali as dali_mod
        import spacedkd_fast.data.files  # noqa: F401
        assert not dali_mod.dali_available()
        for make in (lambda: dali_mod.DaliArrayAugmenter((3, 8, 8), 4, torch.device("cpu")),
                     lambda: dali_mod.DaliFileRenderer(spacedkd_fast.data.files.ResizedCropSpec(8), "cpu")):
            try:
                make()
            except ModuleNotFoundError as exc:
                print("ERROR:", exc)
            else:
                raise SystemExit("no error without DALI")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("ERROR:")]
    assert len(lines) == 2
    assert "DaliArrayAugmenter needs NVIDIA DALI" in lines[0] and "DaliFileRenderer needs NVIDIA DALI" in lines[1]
    assert all("pip install nvidia-dali-cuda130" in line for line in lines)


# ---- DaliArrayAugmenter ------------------------------------------------------------------------------------------

def _images(b, c, h, w, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8).to(device)


def _fixed_params(batch, dy=0, dx=0, flip=False, cos=1.0, sin=0.0):
    full = lambda v, dt: torch.full((batch,), v, dtype=dt)  # noqa: E731
    return AugmentParams(dy=full(dy, torch.int64), dx=full(dx, torch.int64), flip=full(flip, torch.bool),
                         cos=full(cos, torch.float32), sin=full(sin, torch.float32))


def _tie_mask(params, height, width):
    """``bool (B, H, W)``: output pixels whose rotation source (float64) is within TIE of a rounding boundary."""
    p = params.to_numpy()
    cos = p["cos"].astype(np.float64)[:, None, None]
    sin = p["sin"].astype(np.float64)[:, None, None]
    cy, cx = (height - 1) / 2, (width - 1) / 2
    v = np.arange(height, dtype=np.float64)[None, :, None] - cy
    u = np.arange(width, dtype=np.float64)[None, None, :] - cx
    near = lambda s: np.abs((s + 0.5) - np.round(s + 0.5)) < TIE  # noqa: E731
    return near(cos * u - sin * v + cx) | near(sin * u + cos * v + cy)


def _assert_matches(out, expected, params, *, graph="stock", max_tie_fraction=5e-3):
    """Byte equality except at rounding ties of the rotation (which must be rare); everywhere for the fused graph,
    which evaluates the spec's own float32 expressions."""
    out = out.cpu().numpy()
    assert out.shape == expected.shape and out.dtype == expected.dtype
    if graph == "fused":
        assert np.array_equal(out, expected), f"{int((out != expected).sum())} bytes differ from the reference"
    ties = _tie_mask(params, out.shape[2], out.shape[3])
    differ = (out != expected).any(axis=1)  # (B, H, W)
    assert not (differ & ~ties).any(), f"{int((differ & ~ties).sum())} pixels differ away from rounding ties"
    assert ties.mean() <= max_tie_fraction, f"tie fraction {ties.mean():.2e}"
    return ties


@pytest.mark.parametrize("device, graph", ARRAY_GRAPHS)
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 32, 32), (3, 20, 27), (1, 17, 23)])
def test_array_augmenter_matches_reference(device, graph, shape):
    from spacedkd_fast.data.dali import DaliArrayAugmenter

    c, h, w = shape
    aug = DaliArrayAugmenter(shape, 24, torch.device(device), graph=graph)
    tie_count = pixel_count = 0
    for step, (b, spec) in enumerate([(24, AugmentSpec(pad=4, flip=True, rotate_degrees=0)),
                                      (24, AugmentSpec(pad=4, flip=True, rotate_degrees=15)),
                                      (7, AugmentSpec(pad=6, flip=True, rotate_degrees=180)),
                                      (1, AugmentSpec(pad=4, flip=True, rotate_degrees=45)),
                                      (24, AugmentSpec(pad=2, flip=False, rotate_degrees=30))]):
        images = _images(b, c, h, w, seed=step, device=device)
        params = sample_params(spec, b, torch.Generator().manual_seed(step), "cpu")
        out = aug(images, params)
        assert out.shape == (b, c, h, w) and out.dtype == torch.uint8 and out.is_contiguous()
        assert out.device == images.device
        assert aug.graph == graph
        ties = _assert_matches(out, augment_reference_numpy(images.cpu().numpy(), params.to_numpy()), params,
                               graph=graph)
        if spec.rotate_degrees == 0:
            assert not ties.any()  # crop and flip alone: byte-exact everywhere
        tie_count, pixel_count = tie_count + int(ties.sum()), pixel_count + ties.size
    assert tie_count / pixel_count < 1e-3  # only a tiny fraction of the pixels was exempt


@pytest.mark.parametrize("device, graph", ARRAY_GRAPHS)
def test_array_augmenter_crop_and_flip_are_exact(device, graph):
    from spacedkd_fast.data.dali import DaliArrayAugmenter

    b, c, h, w = 48, 3, 9, 14
    images = _images(b, c, h, w, device=device)
    g = torch.Generator().manual_seed(1)
    # Offsets up to (and beyond) the image size: windows partly or entirely outside the image.
    params = AugmentParams(dy=torch.randint(-12, 13, (b,), generator=g), dx=torch.randint(-16, 17, (b,), generator=g),
                           flip=torch.rand(b, generator=g) < 0.5, cos=torch.ones(b), sin=torch.zeros(b))
    out = DaliArrayAugmenter((c, h, w), b, torch.device(device), graph=graph)(images, params)
    assert np.array_equal(out.cpu().numpy(), augment_reference_numpy(images.cpu().numpy(), params.to_numpy()))


@pytest.mark.parametrize("device, graph", ARRAY_GRAPHS)
def test_array_augmenter_identity_and_quarter_turns(device, graph):
    from spacedkd_fast.data.dali import DaliArrayAugmenter

    images = _images(5, 3, 16, 16, device=device)
    aug = DaliArrayAugmenter((3, 16, 16), 8, torch.device(device), graph=graph)
    assert torch.equal(aug(images, _fixed_params(5)), images)  # cos = 1, sin = 0: the warp is the identity
    # Exact quarter turns (cos, sin ∈ {0, ±1}): on an even square image every source coordinate is an integer.
    expected = {(0.0, 1.0): 1, (-1.0, 0.0): 2, (0.0, -1.0): 3}
    for (cos, sin), k in expected.items():
        out = aug(images, _fixed_params(5, cos=cos, sin=sin)).cpu()
        assert torch.equal(out, torch.rot90(images.cpu(), k, dims=(2, 3))), (cos, sin)


@pytest.mark.parametrize("device, graph", ARRAY_GRAPHS)
def test_array_augmenter_matches_apply_augment(device, graph):
    from spacedkd_fast.data.dali import DaliArrayAugmenter

    images = _images(64, 3, 32, 32, seed=4, device=device)
    params = sample_params(AugmentSpec(pad=4, flip=True, rotate_degrees=15), 64, torch.Generator().manual_seed(4),
                           "cpu")
    out = DaliArrayAugmenter((3, 32, 32), 64, torch.device(device), graph=graph)(images, params)
    _assert_matches(out, apply_augment(images, params.to(device)).cpu().numpy(), params, graph=graph)


@pytest.mark.parametrize("device, graph", ARRAY_GRAPHS)
def test_array_augmenter_determinism_and_fresh_outputs(device, graph):
    from spacedkd_fast.data.dali import DaliArrayAugmenter

    aug = DaliArrayAugmenter((3, 32, 32), 16, torch.device(device), graph=graph)
    spec = AugmentSpec(pad=4, flip=True, rotate_degrees=15)
    images = _images(16, 3, 32, 32, device=device)
    params = sample_params(spec, 16, torch.Generator().manual_seed(0), "cpu")
    first = aug(images, params)
    kept = first.clone()
    other = aug(_images(9, 3, 32, 32, seed=1, device=device), sample_params(spec, 9, torch.Generator(), "cpu"))
    assert torch.equal(first, kept)  # the second run did not overwrite the first result
    assert other.shape[0] == 9
    assert torch.equal(aug(images, params), first)
    # A non-contiguous batch (every other image of a larger one) gives the same as its contiguous copy.
    big = _images(32, 3, 32, 32, seed=2, device=device)
    assert torch.equal(aug(big[::2], params), aug(big[::2].contiguous(), params))
    channels_last = images.contiguous(memory_format=torch.channels_last)  # the layout BatchSource stores for DALI
    assert torch.equal(aug(channels_last, params), first) and aug(channels_last, params).is_contiguous()
    assert aug(images[:0], sample_params(spec, 0, torch.Generator(), "cpu")).shape == (0, 3, 32, 32)


@needs_dali
def test_array_augmenter_errors():
    from spacedkd_fast.data.dali import DaliArrayAugmenter

    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"image_shape must be \(C, H, W\)"):
        DaliArrayAugmenter((32, 32), 4, cpu)
    with pytest.raises(ValueError, match="max_batch must be a positive int"):
        DaliArrayAugmenter((3, 8, 8), 0, cpu)
    with pytest.raises(ValueError, match="prefetch must be 1"):
        DaliArrayAugmenter((3, 8, 8), 4, cpu, prefetch=2)
    aug = DaliArrayAugmenter((3, 8, 8), 4, cpu)
    params = _fixed_params(4)
    with pytest.raises(ValueError, match=r"images must be \(b, 3, 8, 8\)"):
        aug(_images(4, 1, 8, 8), params)
    with pytest.raises(ValueError, match="images must be a uint8"):
        aug(_images(4, 3, 8, 8).float(), params)
    with pytest.raises(ValueError, match="batch of 5 exceeds max_batch=4"):
        aug(_images(5, 3, 8, 8), _fixed_params(5))
    with pytest.raises(ValueError, match=r"params.dy must be a CPU int tensor of shape \(3,\)"):
        aug(_images(3, 3, 8, 8), params)
    with pytest.raises(TypeError, match="params must be AugmentParams"):
        aug(_images(4, 3, 8, 8), params.to_numpy())


# ---- the crop box inside the DALI graph --------------------------------------------------------------------------

@needs_dali
def test_crop_window_in_graph_equals_crop_boxes():
    from spacedkd_fast.data import dali as dali_mod

    d = dali_mod._import_dali("test")
    n = 3000
    rng = np.random.default_rng(0)
    heights, widths = rng.integers(1, 2000, n), rng.integers(1, 2000, n)
    params = sample_crop_params(ResizedCropSpec(size=8, scale=(1e-4, 1.0), ratio=(0.1, 10)), n,
                                torch.Generator().manual_seed(0))
    # Adversarial third: origins and ends at (or one float32 step from) exact .5 boundaries, and zero-size boxes.
    k = n // 3
    edge = (rng.integers(0, 50, k) + 0.5) / widths[:k]
    nudge = rng.choice([-1, 0, 1], k)
    x0 = np.nextafter(edge.astype(np.float32), np.where(nudge > 0, 2, -2).astype(np.float32))
    x0 = np.where(nudge == 0, edge.astype(np.float32), x0).astype(np.float32)
    params.x0[:k] = torch.from_numpy(np.clip(x0, 0, 1))
    params.w[:k] = torch.from_numpy(((rng.integers(0, 5, k)) / widths[:k]).astype(np.float32))
    params.y0[k:2 * k] = 1.0
    params.h[k:2 * k] = 0.0

    @d.dali.pipeline_def(batch_size=n, num_threads=1, device_id=None, prefetch_queue_depth=1, exec_pipelined=False,
                         exec_async=False)
    def graph():
        shape = d.fn.external_source(name="shape", dtype=d.types.INT64, ndim=1)
        origin = d.fn.external_source(name="origin", dtype=d.types.FLOAT64, ndim=1)
        extent = d.fn.external_source(name="extent", dtype=d.types.FLOAT64, ndim=1)
        return dali_mod.crop_window_nodes(d, shape, origin, extent)

    pipe = graph()
    inputs = dali_mod._crop_inputs(params)
    start, end = pipe.run(shape=np.stack([heights, widths, np.full(n, 3)], 1).astype(np.int64),
                          origin=inputs["origin"], extent=inputs["extent"])
    got = np.concatenate([np.asarray(start.as_tensor()), np.asarray(end.as_tensor())], axis=1)
    expected = crop_boxes(params, heights, widths)
    assert np.array_equal(got, expected), np.argwhere((got != expected).any(1))[:5]


# ---- DaliFileRenderer --------------------------------------------------------------------------------------------

@pytest.fixture
def jpeg_folder(tmp_path):
    """Eight smooth JPEGs of assorted sizes and two PNGs."""
    sizes = [(48, 64), (64, 48), (37, 53), (80, 80), (30, 90), (100, 70), (41, 41), (56, 72)]
    files = [save_image(tmp_path / f"{i}.jpg", smooth_image(h, w, seed=i)) for i, (h, w) in enumerate(sizes)]
    files += [save_image(tmp_path / f"p{i}.png", smooth_image(h, w, seed=10 + i))
              for i, (h, w) in enumerate([(45, 60), (70, 50)])]
    return files


@pytest.mark.parametrize("device", DEVICES)
def test_dali_and_torch_renderers_agree(device, jpeg_folder):
    from spacedkd_fast.data.dali import DaliFileRenderer

    spec = ResizedCropSpec(size=32)
    params = sample_crop_params(spec, len(jpeg_folder), torch.Generator().manual_seed(0))
    torch_r = TorchFileRenderer(spec, torch.device("cpu"))
    dali_r = DaliFileRenderer(spec, torch.device(device), max_batch=16)
    # Same geometry; pixels differ only by resize rounding (and on GPU, nvJPEG vs libjpeg-turbo decoding).
    tol_mean, tol_max = (0.5, 4) if device == "cpu" else (2.0, 24)
    for got, want in ((dali_r.train_batch(jpeg_folder, params), torch_r.train_batch(jpeg_folder, params)),
                      (dali_r.eval_batch(jpeg_folder), torch_r.eval_batch(jpeg_folder))):
        diff = (got.cpu().int() - want.int()).abs()
        assert got.shape == want.shape == (len(jpeg_folder), 3, 32, 32)
        assert diff.float().mean() < tol_mean and diff.max() <= tol_max, (diff.float().mean(), diff.max())
        png = diff[-2:]  # lossless files: resize rounding only
        assert png.max() <= (2 if device == "cpu" else tol_max)


@pytest.mark.parametrize("device", DEVICES)
def test_epoch_batches_equal_train_batch(device, jpeg_folder):
    from spacedkd_fast.data.dali import DaliFileRenderer

    spec = ResizedCropSpec(size=16)
    files = jpeg_folder[::-1] + jpeg_folder[:3]  # the caller's order, with repeats; 13 files
    labels = torch.arange(len(files)) * 7 % 5
    bs = 4
    calls = []

    def params_for_batch(i):
        calls.append(i)
        size = min(bs, len(files) - i * bs)
        return sample_crop_params(spec, size, torch.Generator().manual_seed(100 + i))

    r = DaliFileRenderer(spec, torch.device(device), max_batch=bs, prefetch=2)
    batches = list(r.epoch_batches(files, labels, bs, params_for_batch))
    assert [b[0].shape[0] for b in batches] == [4, 4, 4, 1]
    for i, (images, labs) in enumerate(batches):
        chunk = files[i * bs:(i + 1) * bs]
        assert torch.equal(images, r.train_batch(chunk, params_for_batch(i))), f"batch {i}"
        assert labs.dtype == torch.int64 and labs.device == images.device
        assert labs.cpu().tolist() == labels[i * bs:(i + 1) * bs].tolist()
    assert set(range(4)) <= set(calls)
    # Padding a short batch to max_batch with its last file (the GPU default, so a regenerated batch has the
    # reader's composition) changes none of its bytes.
    padded = DaliFileRenderer(spec, torch.device(device), max_batch=bs, pad_batches=True)
    assert padded.pad_batches and r.pad_batches == (device == "cuda")
    assert torch.equal(padded.train_batch(files[12:], params_for_batch(3)), batches[3][0])
    assert torch.equal(padded.train_batch(files[:4], params_for_batch(0)), batches[0][0])
    # Stopping early is fine, and a second epoch with another order works.
    pairs = lambda i: sample_crop_params(spec, min(2, 5 - 2 * i), torch.Generator().manual_seed(i))  # noqa: E731
    first = next(iter(r.epoch_batches(files[:5], labels[:5].tolist(), 2, pairs, labels_device="cpu")))
    assert first[0].shape == (2, 3, 16, 16) and first[1].device.type == "cpu"
    assert first[1].tolist() == labels[:2].tolist()


@needs_dali
def test_eval_batches_leave_the_training_pipeline_alone(jpeg_folder):
    """An evaluation batch larger than max_batch grows the evaluation pipeline only: training batches (and the
    regenerated replays of them) keep their padded size and their bytes."""
    from spacedkd_fast.data.dali import DaliFileRenderer

    spec = ResizedCropSpec(size=16)
    params = sample_crop_params(spec, 3, torch.Generator().manual_seed(3))
    r = DaliFileRenderer(spec, torch.device("cpu"), max_batch=4, pad_batches=True)
    before = r.train_batch(jpeg_folder[:3], params)
    train_pipe = r._pipes["train"]
    assert r.eval_batch(jpeg_folder).shape == (10, 3, 16, 16)
    assert (r.batch_size("eval"), r.batch_size("train")) == (10, 4)
    assert r._pipes["train"] is train_pipe, "the training pipeline was rebuilt"
    fed = []
    real_run = r._run
    monkey = lambda kind, files, inputs: fed.append((kind, len(files))) or real_run(kind, files, inputs)  # noqa: E731
    r._run = monkey
    after = r.train_batch(jpeg_folder[:3], params)
    assert fed == [("train", 4)], fed  # padded to the training size, not to the evaluation's 10
    assert torch.equal(before, after)


@needs_dali
def test_epoch_batches_errors(jpeg_folder):
    from spacedkd_fast.data.dali import DaliFileRenderer

    spec = ResizedCropSpec(size=8)
    r = DaliFileRenderer(spec, torch.device("cpu"), max_batch=4)
    with pytest.raises(ValueError, match="10 files but 3 labels"):
        next(r.epoch_batches(jpeg_folder, [0, 1, 2], 4, lambda i: None))
    wrong = lambda i: sample_crop_params(spec, 4, torch.Generator())  # noqa: E731 - batch 2 holds 2 files
    with pytest.raises(ValueError, match=r"params_for_batch\(2\): params.y0 must be .* shape \(2,\)"):
        list(r.epoch_batches(jpeg_folder, list(range(10)), 4, wrong))
    assert list(r.epoch_batches([], [], 4, wrong)) == []
    with pytest.raises(ValueError, match="hw_decoder_load must be in"):
        DaliFileRenderer(spec, torch.device("cpu"), hw_decoder_load=2)
    with pytest.raises(TypeError, match="spec must be a ResizedCropSpec"):
        DaliFileRenderer(8, torch.device("cpu"))


@needs_dali
def test_dali_renderer_exact_boxes_on_many_images(tmp_path):
    """Random images and boxes: S×S boxes of lossless PNGs come out exactly (the in-graph box is crop_boxes')."""
    rng = np.random.default_rng(3)
    size, n = 6, 24
    arrays = [rng.integers(0, 256, (rng.integers(size, 40), rng.integers(size, 40), 3), dtype=np.uint8)
              for _ in range(n)]
    files = [save_image(tmp_path / f"{i}.png", a) for i, a in enumerate(arrays)]
    boxes = []
    for a in arrays:
        top, left = rng.integers(0, a.shape[0] - size + 1), rng.integers(0, a.shape[1] - size + 1)
        boxes.append((top, left, top + size, left + size))
    flips = list(rng.random(n) < 0.5)
    params = exact_params(boxes, [a.shape[:2] for a in arrays], flips)
    from spacedkd_fast.data.dali import DaliFileRenderer

    out = DaliFileRenderer(ResizedCropSpec(size=size), torch.device("cpu"), max_batch=n).train_batch(files, params)
    for i, ((top, left, bottom, right), flip) in enumerate(zip(boxes, flips)):
        expected = arrays[i][top:bottom, left:right].transpose(2, 0, 1)
        assert np.array_equal(out[i].numpy(), expected[:, :, ::-1] if flip else expected), i


@pytest.mark.gpu
@needs_dali
def test_gpu_renderers_match_cpu_twins(jpeg_folder):
    """GPU graph vs its CPU twin: arrays identical away from ties; files close (nvJPEG vs libjpeg-turbo)."""
    from spacedkd_fast.data.dali import DaliArrayAugmenter, DaliFileRenderer

    images = _images(32, 3, 32, 32)
    params = sample_params(AugmentSpec(pad=4, flip=True, rotate_degrees=15), 32, torch.Generator(), "cpu")
    cpu = DaliArrayAugmenter((3, 32, 32), 32, torch.device("cpu"))(images, params)
    gpu = DaliArrayAugmenter((3, 32, 32), 32, torch.device("cuda"))(images.cuda(), params)
    _assert_matches(gpu, cpu.numpy(), params)
    spec = ResizedCropSpec(size=24)
    crop = sample_crop_params(spec, len(jpeg_folder), torch.Generator())
    on_cpu = DaliFileRenderer(spec, torch.device("cpu")).train_batch(jpeg_folder, crop)
    on_gpu = DaliFileRenderer(spec, torch.device("cuda")).train_batch(jpeg_folder, crop)
    assert (on_gpu.cpu().int() - on_cpu.int()).abs().float().mean() < 2.0
    assert math.isfinite(float(on_gpu.float().mean()))


def _run_in_threads(jobs, timeout=60):
    """Run each ``job() -> list`` in its own thread at once; their results, or a failure naming a hang/error."""
    results, errors = [None] * len(jobs), []

    def work(k):
        try:
            results[k] = jobs[k]()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a rendering thread hung (interleaved DALI feeds)"
    assert not errors, errors
    return results


@needs_dali
def test_renderers_are_safe_to_share_between_threads(jpeg_folder):
    """The prefetch thread renders fresh batches while the training thread regenerates replayed ones, on one
    renderer: calls from two threads must neither mix their inputs nor deadlock (they did, before the lock)."""
    from spacedkd_fast.data.dali import DaliArrayAugmenter, DaliFileRenderer

    spec = AugmentSpec(pad=4, flip=True, rotate_degrees=15)
    aug = DaliArrayAugmenter((3, 32, 32), 4, torch.device("cpu"))
    calls = [[(_images(4, 3, 32, 32, seed=k), sample_params(spec, 4, torch.Generator().manual_seed(100 * k + i),
                                                            "cpu")) for i in range(150)] for k in range(2)]
    want = [[aug(images, params) for images, params in job] for job in calls]
    got = _run_in_threads([lambda job=job: [aug(images, params) for images, params in job] for job in calls])
    assert all(torch.equal(g, w) for k in range(2) for g, w in zip(got[k], want[k]))

    crop = ResizedCropSpec(size=8)
    renderer = DaliFileRenderer(crop, torch.device("cpu"), max_batch=3)
    file_calls = [[(jpeg_folder[i % 7:i % 7 + 3], sample_crop_params(crop, 3, torch.Generator().manual_seed(i + k)))
                   for i in range(30)] for k in range(2)]
    want = [[renderer.train_batch(files, params) for files, params in job] for job in file_calls]
    got = _run_in_threads([lambda job=job: [renderer.train_batch(f, p) for f, p in job] for job in file_calls])
    assert all(torch.equal(g, w) for k in range(2) for g, w in zip(got[k], want[k]))
