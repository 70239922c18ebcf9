"""NVIDIA DALI renderers: the same batches as the torch data path, on the GPU (or on the CPU with the same graph).

Every training batch is a pure function of (sample indices, parameters): the engine draws the augmentation
parameters on a CPU ``torch.Generator`` and a renderer turns them into a uint8 batch. The parameters enter the DALI
graphs as per-sample *argument inputs* (``fn.external_source``), never from DALI's own random operators, so any
batch can be regenerated exactly later and the tests can feed the same parameters to the numpy references.

* :class:`DaliArrayAugmenter`: crop → flip → rotate of in-memory uint8 batches (CIFAR, the embedded digits), the
  semantics of :mod:`spacedkd_fast.data.augment` (:class:`~spacedkd_fast.data.augment.AugmentParams`).
* :class:`DaliFileRenderer`: JPEG/PNG folders, the semantics of :mod:`spacedkd_fast.data.files`
  (:class:`~spacedkd_fast.data.files.CropParams`): read bytes → decode → crop box → resize to S×S → flip → CHW.

Each graph runs on ``device="gpu"`` / ``"mixed"`` (decoding) when the renderer's device is CUDA, and its CPU twin
(``device_id=None``, CPU operators only) otherwise. On the CPU the array augmenter runs by default one fused
operator of this package instead of the three stock ones (:mod:`spacedkd_fast.data.dali_ops`): same bytes, ~3x
faster.

DALI is optional: this module imports without it, and constructing a renderer without it raises
``ModuleNotFoundError`` naming ``pip install nvidia-dali-cuda130``. ``nvidia.dali`` is imported inside the
functions that build graphs.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor

from spacedkd_fast.data.augment import AugmentParams
from spacedkd_fast.data.dali_ops import FUSED_AUGMENT_OP
from spacedkd_fast.data.files import (
    BrokenFilesError,
    CropParams,
    LazyThreadPool,
    ResizedCropSpec,
    check_crop_params,
    check_files,
    decode_rgb,
    one_line,
)

__all__ = ["DaliArrayAugmenter", "DaliFileRenderer", "crop_anchors", "dali_available", "fused_params",
           "warp_matrices"]

INSTALL_HINT = ("pip install nvidia-dali-cuda130 (the CUDA 13 build, matching torch +cu130; "
                "nvidia-dali-cuda120 for CUDA 12 builds of torch)")


def _import_dali(what: str) -> SimpleNamespace:
    """The DALI modules, imported on first use; a clear error naming ``what`` and the install command otherwise."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.math as dmath
        import nvidia.dali.types as types
        from nvidia.dali import backend
    except ImportError as exc:
        raise ModuleNotFoundError(f"{what} needs NVIDIA DALI, which is not importable ({type(exc).__name__}: "
                                  f"{exc}); install it: {INSTALL_HINT}") from exc
    return SimpleNamespace(dali=dali, fn=fn, math=dmath, types=types, backend=backend)


def dali_available() -> bool:
    """True when ``nvidia.dali`` imports (the renderers can at least run on the CPU)."""
    try:
        _import_dali("dali_available")
    except ModuleNotFoundError:
        return False
    return True


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def _device_id(d: SimpleNamespace, device: torch.device, what: str) -> int | None:
    """DALI's ``device_id``: the CUDA ordinal for a CUDA device, None (the CPU-only pipeline) for the CPU."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        raise ValueError(f"{what}: device must be cpu or cuda, got {device}")
    if d.backend.GetCUDADeviceCount() == 0:
        raise RuntimeError(f"{what}: device {device} asked for, but DALI finds no CUDA device (driver missing?); "
                           "use device='cpu' for the CPU pipeline")
    return device.index if device.index is not None else torch.cuda.current_device()


def _resolve(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _copy_out(outputs, shape: tuple[int, ...], device: torch.device, stream) -> Tensor:
    """Copy a dense DALI ``TensorList`` into a new uint8 torch tensor of ``shape`` on ``device``.

    DALI outputs are only valid until the pipeline's next iteration, hence the copy. On CUDA it is queued on
    ``stream`` (the torch stream the pipeline's outputs were synchronised with), so it is ordered before any later
    use of the tensor on that stream.
    """
    if len(outputs) != shape[0] or not outputs.is_dense_tensor() or tuple(outputs[0].shape()) != shape[1:]:
        raise RuntimeError(f"DALI returned {len(outputs)} samples of shapes {outputs.shape()[:3]}..., expected "
                           f"{shape[0]} of {shape[1:]}")
    out = torch.empty(shape, dtype=torch.uint8, device=device)
    if device.type == "cuda":
        outputs.copy_to_external(ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(stream.cuda_stream),
                                 non_blocking=True)
    else:
        outputs.copy_to_external(ctypes.c_void_p(out.data_ptr()))
    return out


# ---- in-memory arrays --------------------------------------------------------------------------------------------

def warp_matrices(params: AugmentParams, height: int, width: int) -> np.ndarray:
    """DALI ``warp_affine`` matrices that apply the flip and rotation of :mod:`spacedkd_fast.data.augment`.

    DALI's convention (measured; ``inverse_map=True``): output pixel ``(x, y)`` reads the source point
    ``p = M · (x + ½, y + ½, 1)`` in corner-origin coordinates (pixel ``i`` covers ``[i, i + 1)``), nearest
    neighbour ``floor(p)``, ``fill_value`` outside. The spec reads ``out2[floor(sy + ½), floor(sx + ½)]`` with
    ``s = R·((x, y) − c) + c``, ``c = ((W − 1)/2, (H − 1)/2)``; so ``p = s + ½`` gives ``M = [R | m − R·m]`` with
    ``m = c + ½ = (W/2, H/2)``. cos = 1, sin = 0 gives the identity exactly (``p = x + ½``).

    The flip is folded into the same matrix: out2's column ``floor(sx + ½)`` is out1's column
    ``W − 1 − floor(sx + ½) = floor(W − (sx + ½))`` (equal except when ``sx + ½`` is an integer, a rounding tie),
    so a flipped sample's x row is ``W − (x row)``. Without rotation ``sx`` is an integer and the flip is exact.

    Args:
        params: ``(B,)`` parameters; cos/sin (float32) and flip are used.
        height, width: H, W.

    Returns:
        ``float32 (B, 2, 3)``; the translation is formed in float64 and rounded once.
    """
    cos = params.cos.detach().cpu().numpy().astype(np.float64)
    sin = params.sin.detach().cpu().numpy().astype(np.float64)
    flip = params.flip.detach().cpu().numpy().astype(bool)
    mx, my = width / 2.0, height / 2.0
    m = np.empty((cos.shape[0], 2, 3), dtype=np.float64)
    m[:, 0, 0], m[:, 0, 1], m[:, 0, 2] = cos, -sin, mx - cos * mx + sin * my
    m[:, 1, 0], m[:, 1, 1], m[:, 1, 2] = sin, cos, my - sin * mx - cos * my
    m[flip, 0, :] *= -1.0
    m[flip, 0, 2] += width
    return m.astype(np.float32)


def crop_anchors(params: AugmentParams) -> np.ndarray:
    """The stock graph's ``fn.slice`` starts: ``int32 (B, 2)``, ``(dy, dx)`` per sample."""
    return np.stack([params.dy.numpy(), params.dx.numpy()], axis=1).astype(np.int32)


def fused_params(params: AugmentParams) -> np.ndarray:
    """The fused operator's per-sample input: ``float32 (B, 5)``, ``(dy, dx, flip, cos, sin)`` (the offsets are
    small integers, exact in float32)."""
    return torch.stack([params.dy.float(), params.dx.float(), params.flip.float(), params.cos, params.sin],
                       dim=1).numpy()


class DaliArrayAugmenter:
    """Crop → flip → rotate of uint8 batches with DALI, driven by explicit per-sample parameters.

    Two graphs, the same semantics (:mod:`spacedkd_fast.data.augment`):

    * ``"stock"`` (the GPU graph, and its CPU twin): ``fn.external_source`` of the images (HWC; on CUDA the torch
      tensor itself, zero-copy, with ``device="gpu"``) → ``fn.slice(start=(dy, dx), shape=(H, W),
      out_of_bounds_policy="pad", fill_values=0)`` (the crop; ``fn.crop``'s relative ``crop_pos`` cannot express a
      pad-4 window) → ``fn.warp_affine`` (nearest neighbour, zero fill, the flip and the rotation in one matrix:
      :func:`warp_matrices`) → ``fn.transpose`` to CHW. Crop and flip are byte-identical to
      :func:`~spacedkd_fast.data.augment.augment_reference_numpy`; the rotation too, except for output pixels whose
      source coordinate lies at a rounding tie (DALI's float32 evaluation of the same real coordinate can land on
      the other side of ``k + ½``). Folding the flip into the warp rather than running ``fn.flip`` saves one
      operator per batch.
    * ``"fused"`` (CPU only): ``fn.external_source`` of the images (HWC) and of the parameters → this package's
      ``fn.spacedkd_crop_flip_rotate`` (:mod:`spacedkd_fast.data.dali_ops`, ``csrc/dali/``), one operator that
      computes the spec's float32 source coordinates and writes CHW: byte-identical to the reference everywhere,
      ties included. On the CPU, DALI's cost for small images is per sample and per operator, so one operator
      instead of three is about 3x faster.

    ``graph="auto"`` picks ``"fused"`` on the CPU when the operator builds and loads (it is compiled on first use;
    one log line says why when it cannot be), ``"stock"`` otherwise and always on CUDA (a GPU runs the three
    operators far faster than the data path needs).

    Args:
        image_shape: ``(C, H, W)`` of every image (any C, including 1).
        max_batch: the largest batch a call may pass (DALI's ``batch_size``); smaller batches are fine.
        device: CUDA (the GPU graph on that device) or CPU (the CPU twin).
        num_threads: DALI CPU worker threads.
        prefetch: DALI's ``prefetch_queue_depth``. A call feeds one batch and waits for it, so it must be 1 (the
            argument exists to make that explicit; deeper queues need batches fed ahead of time).
        graph: ``"auto"``, ``"stock"`` or ``"fused"`` (see above); the chosen one is in :attr:`graph`.
    """

    GRAPHS = ("auto", "stock", "fused")

    def __init__(self, image_shape: tuple[int, int, int], max_batch: int, device: torch.device, *,
                 num_threads: int = 2, prefetch: int = 1, graph: str = "auto") -> None:
        d = _import_dali("DaliArrayAugmenter")
        if not isinstance(image_shape, (tuple, list)) or len(image_shape) != 3:
            raise ValueError(f"DaliArrayAugmenter: image_shape must be (C, H, W), got {image_shape!r}")
        self.image_shape = tuple(_positive_int(v, f"DaliArrayAugmenter: image_shape {tuple(image_shape)}")
                                 for v in image_shape)
        self.max_batch = _positive_int(max_batch, "DaliArrayAugmenter: max_batch")
        self.num_threads = _positive_int(num_threads, "DaliArrayAugmenter: num_threads")
        if prefetch != 1:
            raise ValueError(f"DaliArrayAugmenter: prefetch must be 1 (each call feeds one batch and waits for its "
                             f"result), got {prefetch!r}")
        if graph not in self.GRAPHS:
            raise ValueError(f"DaliArrayAugmenter: graph must be one of {self.GRAPHS}, got {graph!r}")
        self.device = _resolve(device)
        self._device_id = _device_id(d, self.device, "DaliArrayAugmenter")
        self.graph = self._choose_graph(graph)
        self._pipe = self._build(d)
        self._keepalive = None  # the last fed image buffer (zero-copy input): alive until the next call
        # feed_input + run + copy must not interleave between threads (the prefetch thread renders fresh batches
        # while the training thread regenerates replayed ones): interleaved feeds pair one call's images with
        # another's parameters, or deadlock the pipeline.
        self._lock = threading.Lock()

    def _choose_graph(self, requested: str) -> str:
        from spacedkd_fast import backends

        if requested == "stock":
            return "stock"
        if self.device.type == "cuda":
            if requested == "fused":
                raise ValueError("DaliArrayAugmenter: graph='fused' is a CPU operator; on CUDA use 'stock' or 'auto'")
            return "stock"
        probe = backends.dali_fused_ops()
        if probe.available:
            return "fused"
        if requested == "fused":
            raise RuntimeError(f"DaliArrayAugmenter: graph='fused' asked for, but the fused DALI CPU operator is "
                               f"unavailable: {probe.detail}")
        backends.warn_once("dali_fused", f"fused DALI CPU operator unavailable ({probe.detail}); the CPU DALI "
                                         f"augmentation runs the stock three-operator graph (about 3x slower)")
        return "stock"

    def _build(self, d: SimpleNamespace):
        fn, types = d.fn, d.types
        _, height, width = self.image_shape
        on_gpu = self._device_id is not None

        # DALI's default (dynamic) executor: measured faster per batch than the simple one (exec_pipelined=False)
        # on 2 CPU threads. With a queue depth of 1, run() can take the inputs and returns this batch's outputs.
        # (The fused graph only runs on the CPU, where device_id is None.)
        pipeline_def = d.dali.pipeline_def(batch_size=self.max_batch, num_threads=self.num_threads,
                                           device_id=self._device_id, prefetch_queue_depth=1, exec_pipelined=True,
                                           exec_async=True)

        @pipeline_def
        def stock():
            images = fn.external_source(name="images", device="gpu" if on_gpu else "cpu", layout="HWC",
                                        dtype=types.UINT8, ndim=3, no_copy=True)
            anchor = fn.external_source(name="anchor", dtype=types.INT32, ndim=1)  # (dy, dx)
            matrix = fn.external_source(name="matrix", dtype=types.FLOAT, ndim=2)  # (2, 3)
            out = fn.slice(images, start=anchor, shape=[height, width], axes=[0, 1], out_of_bounds_policy="pad",
                           fill_values=0)
            out = fn.warp_affine(out, matrix=matrix, size=[height, width], interp_type=types.INTERP_NN,
                                 fill_value=0, inverse_map=True)
            return fn.transpose(out, perm=[2, 0, 1], output_layout="CHW")

        @pipeline_def
        def fused():
            images = fn.external_source(name="images", layout="HWC", dtype=types.UINT8, ndim=3, no_copy=True)
            params = fn.external_source(name="params", dtype=types.FLOAT, ndim=1)  # (dy, dx, flip, cos, sin)
            return getattr(fn, FUSED_AUGMENT_OP)(images, params)

        pipe = fused() if self.graph == "fused" else stock()
        pipe.build()
        return pipe

    def _check(self, images: Tensor, params: AugmentParams) -> None:
        if not isinstance(images, Tensor) or images.dim() != 4 or images.dtype != torch.uint8:
            what = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"DaliArrayAugmenter: images must be a uint8 (b, C, H, W) tensor, got {what}")
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"DaliArrayAugmenter: images must be (b, {', '.join(map(str, self.image_shape))}) "
                             f"(the image_shape it was built for), got {tuple(images.shape)}")
        if images.shape[0] > self.max_batch:
            raise ValueError(f"DaliArrayAugmenter: batch of {images.shape[0]} exceeds max_batch={self.max_batch}")
        if images.device != self.device:
            raise ValueError(f"DaliArrayAugmenter: images must be on {self.device}, got {images.device}")
        if not isinstance(params, AugmentParams):
            raise TypeError(f"DaliArrayAugmenter: params must be AugmentParams, got {type(params).__name__}")
        batch = images.shape[0]
        for key in ("dy", "dx", "flip", "cos", "sin"):
            t = getattr(params, key)
            kind = {"flip": "bool", "cos": "float32", "sin": "float32"}.get(key, "int")
            ok = {"int": not t.dtype.is_floating_point and t.dtype != torch.bool, "bool": t.dtype == torch.bool,
                  "float32": t.dtype == torch.float32}[kind]
            if t.shape != (batch,) or not ok or t.device.type != "cpu":
                raise ValueError(f"DaliArrayAugmenter: params.{key} must be a CPU {kind} tensor of shape "
                                 f"({batch},) (parameters are drawn on the CPU), got {t.dtype} {tuple(t.shape)} "
                                 f"on {t.device}")

    def __call__(self, images: Tensor, params: AugmentParams) -> Tensor:
        """Augment a batch.

        Args:
            images: ``uint8 (b, C, H, W)`` on the augmenter's device, ``b <= max_batch``, any strides; a
                channels-last tensor (``memory_format=torch.channels_last``) is fed without a copy.
            params: :class:`~spacedkd_fast.data.augment.AugmentParams` of ``(b,)`` CPU tensors.

        Returns:
            A new contiguous ``uint8 (b, C, H, W)`` tensor on the device.
        """
        self._check(images, params)
        batch, channels, height, width = images.shape
        if batch == 0:
            return torch.empty_like(images, memory_format=torch.contiguous_format)
        hwc = images.permute(0, 2, 3, 1).contiguous()  # DALI's image operators want channels last
        if self.graph == "fused":
            inputs = {"params": fused_params(params)}
        else:
            inputs = {"anchor": crop_anchors(params), "matrix": warp_matrices(params, height, width)}
        pipe = self._pipe
        with self._lock:
            if self.device.type == "cuda":
                stream = torch.cuda.current_stream(self.device)
                pipe.feed_input("images", hwc, cuda_stream=stream)  # DALI waits for `stream` before reading
            else:
                stream = None
                pipe.feed_input("images", hwc.numpy())
            for name, value in inputs.items():
                pipe.feed_input(name, value)
            self._keepalive = hwc
            (out,) = pipe.run(stream) if stream is not None else pipe.run()
            return _copy_out(out, (batch, channels, height, width), self.device, stream)


# ---- image files -------------------------------------------------------------------------------------------------

def crop_window_nodes(d: SimpleNamespace, shape, origin, extent):
    """The crop box of :func:`spacedkd_fast.data.files.crop_boxes`, as DALI graph nodes (CPU arithmetic).

    Args:
        d: the DALI modules (:func:`_import_dali`).
        shape: int64 ``(≥2,)`` per sample, ``(H, W, ...)`` (``fn.peek_image_shape``).
        origin, extent: float64 ``(2,)`` per sample, ``(y0, x0)`` and ``(h, w)``.

    Returns:
        ``(start, end)``: int32 ``(2,)`` per sample, ``(top, left)`` and ``(bottom, right)``. Every step is one
        IEEE float64 operation on exact inputs (DALI evaluates an expression node by node), as in numpy.
    """
    fn, types, dmath = d.fn, d.types, d.math
    size = fn.cast(shape[0:2], dtype=types.FLOAT64)
    start = dmath.min(dmath.floor(origin * size + 0.5), size - 1.0)
    end = dmath.min(dmath.max(dmath.floor((origin + extent) * size + 0.5), start + 1.0), size)
    return fn.cast(start, dtype=types.INT32), fn.cast(end, dtype=types.INT32)


def _read_bytes(path: str) -> np.ndarray | BrokenFilesError:
    """The file's bytes, or the BrokenFilesError naming it (returned, so that one batch's read names every
    unreadable file at once)."""
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as exc:  # FileNotFoundError, PermissionError, IsADirectoryError...
        return BrokenFilesError({path: one_line(exc)}, f"cannot read image file {path!r}: {one_line(exc)}")


class DaliFileRenderer:
    """Renders file batches with DALI: the semantics of :class:`spacedkd_fast.data.files.TorchFileRenderer`.

    Training (:meth:`train_batch`): the encoded bytes (read by a small thread pool) enter through
    ``fn.external_source``, the crop parameters as per-sample argument inputs; ``fn.peek_image_shape`` gives the
    image size and the crop box is computed in the graph exactly as :func:`~spacedkd_fast.data.files.crop_boxes`
    does; ``fn.decoders.image_slice`` decodes only that region (``"mixed"``: nvJPEG on the GPU; ``"cpu"``:
    libjpeg-turbo, the same library as PIL, so CPU decodes equal PIL's), ``fn.resize(size=[S, S],
    antialias=True)`` (linear), then ``fn.crop_mirror_normalize`` flips and transposes to CHW uint8 in one pass.
    Evaluation (:meth:`eval_batch`): decode, ``fn.resize`` to the size of
    :func:`~spacedkd_fast.data.files.eval_geometry` (computed in the graph with the same integer formula: DALI's
    own ``resize_shorter`` rounds exact halves inconsistently in float32), centre ``fn.slice``.

    The geometry (boxes, sizes, offsets, flips) is identical to the torch renderer's; pixels differ slightly where
    the resize kernels (and on GPU the JPEG decoders) differ. For a fixed renderer, the same files and
    parameters give the same bytes.

    Args:
        spec: the training crop; ``spec.size`` is S for training and evaluation.
        device: CUDA (GPU graph, ``"mixed"`` decoding) or CPU (the CPU twin).
        max_batch: DALI's ``batch_size`` for :meth:`train_batch` and (at first) :meth:`eval_batch`. Each has a
            pipeline of its own: a larger evaluation batch rebuilds only the evaluation pipeline at that size, so
            training (and regenerated) batches keep their size and composition.
        num_threads: DALI CPU threads, also the file-reading threads (default: all cores).
        prefetch: ``prefetch_queue_depth`` of the :meth:`epoch_batches` pipeline (the two others run one batch
            per call).
        hw_decoder_load: share of JPEGs sent to the hardware decoder on GPUs that have one (A100, H100); DALI's
            default.
        pad_batches: pad a :meth:`train_batch` shorter than ``max_batch`` with copies of its last file (outputs
            dropped), as :meth:`epoch_batches`' reader pads an epoch's last batch. On a GPU the mixed decoder
            shares a batch between the hardware and the CUDA decoders, which need not give identical pixels, so a
            batch regenerated for replay must have exactly the composition it first had. Default: on CUDA only
            (CPU decoding is per image).
    """

    def __init__(self, spec: ResizedCropSpec, device: torch.device, *, max_batch: int = 256,
                 num_threads: int | None = None, prefetch: int = 2, hw_decoder_load: float = 0.65,
                 pad_batches: bool | None = None) -> None:
        self._d = _import_dali("DaliFileRenderer")
        if not isinstance(spec, ResizedCropSpec):
            raise TypeError(f"DaliFileRenderer: spec must be a ResizedCropSpec, got {type(spec).__name__}")
        self.spec = spec
        self.size = spec.size
        self.device = _resolve(device)
        self._device_id = _device_id(self._d, self.device, "DaliFileRenderer")
        self.max_batch = _positive_int(max_batch, "DaliFileRenderer: max_batch")
        self.num_threads = _positive_int(num_threads if num_threads is not None else (os.cpu_count() or 1),
                                         "DaliFileRenderer: num_threads")
        self.prefetch = _positive_int(prefetch, "DaliFileRenderer: prefetch")
        if not 0.0 <= float(hw_decoder_load) <= 1.0:
            raise ValueError(f"DaliFileRenderer: hw_decoder_load must be in [0, 1], got {hw_decoder_load!r}")
        self.hw_decoder_load = float(hw_decoder_load)
        self.pad_batches = self.device.type == "cuda" if pad_batches is None else bool(pad_batches)
        self._pipes: dict[str, object] = {}
        self._batch_sizes = {"train": self.max_batch, "eval": self.max_batch}  # DALI batch_size of each pipeline
        self._pool = LazyThreadPool(self.num_threads, "spacedkd-dali-read")
        self._keepalive = None
        self._lock = threading.Lock()  # one feed + run + copy at a time (see DaliArrayAugmenter)

    # -- graphs --

    def _pipeline_def(self, batch_size: int, prefetch: int):
        # DALI's default (dynamic) executor; prefetch 1 for the pipelines that take one batch per call.
        return self._d.dali.pipeline_def(batch_size=batch_size, num_threads=self.num_threads,
                                         device_id=self._device_id, prefetch_queue_depth=prefetch,
                                         exec_pipelined=True, exec_async=True)

    def _decoder_args(self) -> dict:
        types = self._d.types
        args = dict(device="cpu", output_type=types.RGB, adjust_orientation=False)  # PIL ignores EXIF too
        if self._device_id is not None:
            args.update(device="mixed", hw_decoder_load=self.hw_decoder_load)
        return args

    def _train_graph(self, encoded, origin, extent, flip):
        fn, types = self._d.fn, self._d.types
        shape = fn.peek_image_shape(encoded, adjust_orientation=False)
        start, end = crop_window_nodes(self._d, shape, origin, extent)
        image = fn.decoders.image_slice(encoded, start=start, end=end, axes=[0, 1], **self._decoder_args())
        image = fn.resize(image, size=[self.size, self.size], interp_type=types.INTERP_LINEAR, antialias=True)
        return fn.crop_mirror_normalize(image, mirror=flip, dtype=types.UINT8, output_layout="CHW")

    def _train_inputs(self):
        fn, types = self._d.fn, self._d.types
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, no_copy=True)
        origin = fn.external_source(name="origin", dtype=types.FLOAT64, ndim=1)  # (y0, x0)
        extent = fn.external_source(name="extent", dtype=types.FLOAT64, ndim=1)  # (h, w)
        flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
        return encoded, origin, extent, flip

    def _eval_graph(self, encoded):
        fn, types, dmath = self._d.fn, self._d.types, self._d.math
        size = self.size
        shape = fn.peek_image_shape(encoded, adjust_orientation=False)  # int64 (H, W, C)
        short = dmath.min(shape[0], shape[1])
        new_hw = (shape[0:2] * (2 * size) + short) // (2 * short)  # eval_geometry's exact round-half-up
        image = fn.decoders.image(encoded, **self._decoder_args())
        image = fn.resize(image, size=fn.cast(new_hw, dtype=types.FLOAT), interp_type=types.INTERP_LINEAR,
                          antialias=True)
        start = fn.cast((new_hw - size) // 2, dtype=types.INT32)
        image = fn.slice(image, start=start, shape=[size, size], axes=[0, 1])
        return fn.transpose(image, perm=[2, 0, 1], output_layout="CHW")

    def batch_size(self, kind: str) -> int:
        """DALI's batch size of the ``"train"`` or ``"eval"`` pipeline."""
        return self._batch_sizes[kind]

    def _pipeline(self, kind: str, batch: int):
        if batch > self._batch_sizes[kind]:
            self._pipes.pop(kind, None)  # only this kind's pipeline grows; the other keeps its batch size
            self._batch_sizes[kind] = batch
        pipe = self._pipes.get(kind)
        if pipe is None:
            d = self._d

            @self._pipeline_def(self._batch_sizes[kind], 1)
            def graph():
                if kind == "train":
                    return self._train_graph(*self._train_inputs())
                return self._eval_graph(d.fn.external_source(name="encoded", dtype=d.types.UINT8, ndim=1,
                                                             no_copy=True))

            pipe = graph()
            pipe.build()
            self._pipes[kind] = pipe
        return pipe

    # -- running --

    def _run(self, kind: str, files: list[str], inputs: dict[str, np.ndarray]) -> Tensor:
        batch = len(files)
        if batch == 0:
            return torch.empty((0, 3, self.size, self.size), dtype=torch.uint8, device=self.device)
        encoded = self._pool.map(_read_bytes, files)  # outside the lock: another batch may decode meanwhile
        unreadable = [e for e in encoded if isinstance(e, BrokenFilesError)]
        if unreadable:
            raise unreadable[0] if len(unreadable) == 1 else BrokenFilesError(
                {path: reason for e in unreadable for path, reason in e.files.items()})
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        with self._lock:
            self._keepalive = encoded  # fed zero-copy: kept until the next call, after DALI is done with it
            pipe = self._pipeline(kind, batch)
            try:
                pipe.feed_input("encoded", encoded)
                for name, value in inputs.items():
                    pipe.feed_input(name, value)
                (out,) = pipe.run(stream) if stream is not None else pipe.run()
            except RuntimeError as exc:
                self._pipes.pop(kind, None)  # do not reuse a pipeline that failed mid-iteration
                error = exc
            else:
                return _copy_out(out, (batch, 3, self.size, self.size), self.device, stream)
        _raise_decode_error(files, error)

    def train_batch(self, files: Sequence[str], params: CropParams) -> Tensor:
        """Decode ``files``, crop each to its box, resize to S×S, flip: ``uint8 (b, 3, S, S)`` on the device.

        Args:
            files: b image paths.
            params: :class:`~spacedkd_fast.data.files.CropParams` of b samples (CPU).
        """
        files = check_files(files, "DaliFileRenderer.train_batch")
        check_crop_params(params, len(files), "DaliFileRenderer.train_batch")
        batch, size = len(files), self._batch_sizes["train"]
        if self.pad_batches and 0 < batch < size:
            files = files + [files[-1]] * (size - batch)
            return self._run("train", files, _crop_inputs(params.pad_with_last(size)))[:batch]
        return self._run("train", files, _crop_inputs(params))

    def eval_batch(self, files: Sequence[str]) -> Tensor:
        """Decode ``files``, resize the shorter side to S, keep the centre S×S: ``uint8 (b, 3, S, S)``."""
        files = check_files(files, "DaliFileRenderer.eval_batch")
        return self._run("eval", files, {})

    def epoch_batches(self, files_in_order: Sequence[str], labels, batch_size: int,
                      params_for_batch: Callable[[int], CropParams], *,
                      labels_device: torch.device | str | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of training batches read by DALI's own file reader, with prefetching.

        ``fn.readers.file(files=files_in_order, labels=labels, random_shuffle=False, pad_last_batch=True)`` reads
        the files in the caller's order; the crop parameters of batch ``i`` come from ``params_for_batch(i)``
        through an ``external_source`` callback (``batch_info=True``). The graph after the reader is
        :meth:`train_batch`'s, so batch ``i`` equals::

            (train_batch(files_in_order[i*bs:(i+1)*bs], params_for_batch(i)), labels[i*bs:(i+1)*bs])

        byte for byte. DALI may call ``params_for_batch`` up to ``prefetch`` batches ahead of the consumer (and
        for a few indices past the end, whose outputs are discarded), so it must be a pure function of ``i``.

        Args:
            files_in_order: the N files of the epoch, in order.
            labels: N integer labels (a sequence or a tensor).
            batch_size: bs; the last batch has ``N - (ceil(N/bs) - 1)·bs`` samples (the reader pads it with
                copies of the last file, which are dropped here).
            params_for_batch: ``i -> CropParams`` of batch i's size.
            labels_device: where the labels are returned (default: the renderer's device). ``"cpu"`` hands them
                over without a device round trip (the reader produces them on the host).

        Yields:
            ``(images, labels)``: ``uint8 (b, 3, S, S)`` on the device and ``int64 (b,)`` on ``labels_device``,
            ceil(N/bs) times.
        """
        files = check_files(files_in_order, "DaliFileRenderer.epoch_batches")
        label_device = self.device if labels_device is None else torch.device(labels_device)
        batch_size = _positive_int(batch_size, "DaliFileRenderer.epoch_batches: batch_size")
        labels = [int(v) for v in (labels.tolist() if isinstance(labels, Tensor) else labels)]
        if len(labels) != len(files):
            raise ValueError(f"DaliFileRenderer.epoch_batches: {len(files)} files but {len(labels)} labels")
        if not callable(params_for_batch):
            raise TypeError("DaliFileRenderer.epoch_batches: params_for_batch must be callable: i -> CropParams")
        if not files:
            return
        n_batches = math.ceil(len(files) / batch_size)
        sizes = [min(batch_size, len(files) - i * batch_size) for i in range(n_batches)]

        def source(info):
            # Past the end (DALI prefetching the next epoch): any valid parameters do, the outputs are dropped.
            i = min(info.iteration, n_batches - 1)
            params = params_for_batch(i)
            check_crop_params(params, sizes[i], f"DaliFileRenderer.epoch_batches: params_for_batch({i})")
            inputs = _crop_inputs(params.pad_with_last(batch_size))  # the reader repeats the last file too
            return inputs["origin"], inputs["extent"], inputs["flip"]

        d = self._d
        fn, types = d.fn, d.types

        @self._pipeline_def(batch_size, self.prefetch)
        def graph():
            encoded, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, pad_last_batch=True,
                                             name="files")
            origin, extent, flip = fn.external_source(source=source, num_outputs=3, batch=True, batch_info=True,
                                                      dtype=[types.FLOAT64, types.FLOAT64, types.INT32],
                                                      ndim=[1, 1, 0])
            return self._train_graph(encoded, origin, extent, flip), label

        pipe = graph()
        pipe.build()
        try:
            for i in range(n_batches):
                stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
                images, label = pipe.run(stream) if stream is not None else pipe.run()
                out = _copy_out(images, (batch_size, 3, self.size, self.size), self.device, stream)
                lab = torch.from_numpy(np.asarray(label.as_tensor()).reshape(-1).astype(np.int64))
                yield out[:sizes[i]], lab[:sizes[i]].to(label_device)
        finally:
            del pipe  # frees DALI's buffers and threads even when the consumer stops early

    def close(self) -> None:
        """Release the pipelines and the reading threads (a later call builds them again)."""
        with self._lock:
            self._pipes.clear()
        self._pool.close()

    def __enter__(self) -> DaliFileRenderer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _crop_inputs(params: CropParams) -> dict[str, np.ndarray]:
    """CropParams → the train graph's argument inputs (float32 values widened exactly to float64)."""
    p = params.to_numpy()
    return {"origin": np.stack([p["y0"], p["x0"]], axis=1).astype(np.float64),
            "extent": np.stack([p["h"], p["w"]], axis=1).astype(np.float64),
            "flip": p["flip"].astype(np.int32)}


def _raise_decode_error(files: list[str], exc: Exception):
    """Re-raise a DALI failure as a BrokenFilesError naming every file of the batch that PIL cannot decode either
    (DALI's message names none); the DALI error itself when PIL reads them all."""
    broken = {}
    for path in dict.fromkeys(files):  # a padded batch repeats its last file
        try:
            decode_rgb(path)
        except BrokenFilesError as err:
            broken.update(err.files)
    if broken:
        raise BrokenFilesError(broken, f"{BrokenFilesError(broken)} (DALI: {_dali_reason(exc)})") from exc
    raise exc


def _dali_reason(exc: Exception) -> str:
    """One line of a DALI pipeline error: the failing operator and what it encountered (the message's first line
    is only "Critical error in pipeline:")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    operator = next((line.rstrip(",") for line in lines if line.startswith("Error in ")), None)
    after = lines[lines.index("encountered:") + 1:] if "encountered:" in lines else []
    if operator is None or not after:
        return one_line(exc)
    return f"{operator}: {after[0]}"
