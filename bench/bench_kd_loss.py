"""Fused KD + CE loss throughput: eager reference, torch.compile(reference), C++ (CPU), Triton (GPU), Liger (GPU).

    pytest bench/bench_kd_loss.py            # results table at the end, JSON in bench/results/

GB/s count the bytes a two-pass kernel moves (see bench/conftest.py); speedups are against the eager reference
measured in the same run; "copy" is the device's own copy bandwidth, the ceiling.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from shapes import KD_DTYPES, KD_SHAPES, MODES, ON_CUDA

from spacedkd_fast import backends, kd_loss, kd_loss_reference

DEVICE = "cuda" if ON_CUDA else "cpu"
OPTIONS = dict(temperature=2.0, alpha=0.5, label_smoothing=0.0)
HAS_LIGER = ON_CUDA and importlib.util.find_spec("liger_kernel") is not None

_compiled_reference = None


def _compiled(*args, **kwargs):
    global _compiled_reference
    if _compiled_reference is None:
        _compiled_reference = torch.compile(kd_loss_reference, dynamic=False)
    return _compiled_reference(*args, **kwargs)


def _liger(student, teacher, target, temperature, alpha, **_):
    """The Liger composition of the same objective: KL on log-probs, then CE on a copy (Liger CE is in place)."""
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss

    log_q = torch.log_softmax(student.float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher.float() / temperature, dim=-1)
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)(log_q, log_p) * temperature**2
    ce = LigerCrossEntropyLoss()(student.clone(), target)
    return (1 - alpha) * ce + alpha * kl


PROVIDERS = {
    "eager": lambda s, t, y, **o: kd_loss_reference(s, t, y, **o),
    "compiled": _compiled,
    "cpp": lambda s, t, y, **o: kd_loss(s, t, y, backend="cpp", **o),
    "triton": lambda s, t, y, **o: kd_loss(s, t, y, backend="triton", **o),
    "liger": _liger,
}


# On a GPU each static-shape torch.compile of the reference (forward + backward) costs tens of seconds: it is
# measured at one classification and one LLM shape, where it is the baseline to beat.
COMPILED_SHAPES_CUDA = {(1024, 1000), (8192, 32000)}


def _available(provider: str, shape=None) -> str | None:
    """None when the provider runs here, else why not."""
    if provider == "compiled" and ON_CUDA and shape not in COMPILED_SHAPES_CUDA:
        return f"torch.compile is measured at {sorted(COMPILED_SHAPES_CUDA)} on a GPU (compile time)"
    if provider == "cpp" and (ON_CUDA or not backends.cpp_extension().available):
        return "C++ kernel: CPU only, and needs the extension"
    if provider == "triton" and not ON_CUDA:
        return "Triton benchmarks need a GPU (the interpreter is a correctness tool)"
    if provider == "liger" and not HAS_LIGER:
        return "liger_kernel is not installed (or no GPU)"
    return None


def _bytes(n, v, dtype, mode):
    e = torch.finfo(dtype).bits // 8
    return n * v * (2 * e if mode == "fwd" else 5 * e)


def _floor_bytes(n, v, dtype, mode):
    """The bytes the op cannot avoid moving: read s and t (and write the gradient): 12 B/element fwd+bwd fp32."""
    e = torch.finfo(dtype).bits // 8
    return n * v * (2 * e if mode == "fwd" else 3 * e)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", KD_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", KD_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_kd_loss(measure, provider, shape, dtype, mode):
    why_not = _available(provider, shape)
    if why_not:
        pytest.skip(why_not)
    n, v = shape
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    s = torch.randn(n, v, device=DEVICE, generator=gen, dtype=torch.float32).mul_(3).to(dtype)
    t = torch.randn(n, v, device=DEVICE, generator=gen, dtype=torch.float32).mul_(3).to(dtype)
    y = torch.randint(0, v, (n,), device=DEVICE, generator=gen)
    fn = PROVIDERS[provider]
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(s, t, y, **OPTIONS)
    else:
        s.requires_grad_(True)

        def step():
            s.grad = None
            fn(s, t, y, **OPTIONS).backward()

    measure(step, group=f"kd_loss {mode} {n}x{v} {str(dtype).removeprefix('torch.')}", provider=provider,
            baseline="eager", bytes_moved=_bytes(n, v, dtype, mode), items=n, items_unit="rows",
            info=dict(N=n, V=v, dtype=str(dtype), mode=mode, floor_bytes=_floor_bytes(n, v, dtype, mode)))


def test_copy_bandwidth(measure):
    """The device's copy bandwidth (bytes read + written), the ceiling for a memory-bound kernel."""
    numel = (1 << 28) if ON_CUDA else (1 << 24)
    src = torch.empty(numel, dtype=torch.float32, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    measure(lambda: dst.copy_(src), group="copy", provider="copy", bytes_moved=2 * src.numel() * 4)
