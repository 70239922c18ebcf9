"""Fused-linear KD, forward + backward from hidden states: ``kd_loss_from_hidden`` against the materialized torch
path and Liger's chunked loss, with time, peak memory and achieved GFLOP/s.

    pytest bench/bench_fused_linear.py                 # CPU: N = 2048, H = 256, V = 16384 fp32 (N·V = 2^25)
    pytest bench/bench_fused_linear.py -m headline     # GPU: 8192 × 4096 → 128256 bf16, and a 2048 student head

Providers, on the same inputs (the teacher as hidden states + its head, labels without ignored rows and ε = 0, so
the two-line formula below is exactly our objective):

* ``fused``: :func:`spacedkd_fast.kd_loss_from_hidden` (C++ kernel + torch matmul on CPU, Triton + cuBLAS on CUDA);
* ``eager`` (the baseline): the materialized path a user writes, ``s = h·Wᵀ``, ``t = g·W_tᵀ`` (no grad), then
  ``(1−α)·F.cross_entropy(s, y) + α·T²·F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True,
  reduction="batchmean")``;
* ``kd_loss``: the same materialized logits through our fused ``kd_loss``;
* ``liger``: ``LigerFusedLinearJSDLoss`` (``beta=0``: forward KL, weights 1−α / α, its default
  ``torch.compile`` of the chunk step, chunk 1024) when ``liger_kernel`` is importable; it has no T², so its loss
  differs by that factor, its work does not.

Peak memory (``peak_mem_bytes``) is measured on one extra call after the timed rounds, from the state before the
call: on CUDA ``torch.cuda.max_memory_allocated()`` above ``memory_allocated()``; on CPU the peak resident set
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``) above the resident set before the call, after
returning freed memory to the OS (``malloc_trim``) and emptying the C++ kernel's buffer pool, so every byte the call
touches counts. ``peak_above_grads_bytes`` subtracts the gradients the call leaves (dH, dW), which every provider
produces: the issue's "peak memory above the inputs and weight gradient". GFLOP/s count the four matmuls
(``2·N·V·(3·Hs + Ht)``: both logits, dH, dW).
"""

from __future__ import annotations

import ctypes
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from shapes import FUSED_LINEAR_CPU, FUSED_LINEAR_GPU, ON_CUDA

from spacedkd_fast import backends, kd_loss, kd_loss_from_hidden

DEVICE = "cuda" if ON_CUDA else "cpu"
TEMPERATURE, ALPHA = 2.0, 0.5
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
PROVIDERS = ["fused", "eager", "kd_loss", "liger"]

_liger_losses: dict = {}


def _liger(h, w, g, wt, y):
    if "fn" not in _liger_losses:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        _liger_losses["fn"] = LigerFusedLinearJSDLoss(weight_hard_loss=1 - ALPHA, weight_soft_loss=ALPHA, beta=0.0,
                                                      temperature=TEMPERATURE)
    return _liger_losses["fn"](h, w, g, wt, y)


def _eager(h, w, g, wt, y):
    s = h @ w.T
    with torch.no_grad():
        t = g @ wt.T
    ce = F.cross_entropy(s.float(), y)
    kl = F.kl_div(F.log_softmax(s.float() / TEMPERATURE, dim=-1), F.log_softmax(t.float() / TEMPERATURE, dim=-1),
                  log_target=True, reduction="batchmean")
    return (1 - ALPHA) * ce + ALPHA * TEMPERATURE**2 * kl


def _kd_loss(h, w, g, wt, y):
    s = h @ w.T
    with torch.no_grad():
        t = g @ wt.T
    return kd_loss(s, t, y, temperature=TEMPERATURE, alpha=ALPHA)


LOSSES = {
    "fused": lambda h, w, g, wt, y: kd_loss_from_hidden(h, w, g, wt, y, temperature=TEMPERATURE, alpha=ALPHA),
    "eager": _eager,
    "kd_loss": _kd_loss,
    "liger": _liger,
}


def _why_not(provider: str) -> str | None:
    if provider == "liger" and not HAS_LIGER:
        return "liger_kernel is not installed"
    if provider in ("fused", "kd_loss") and not ON_CUDA and not backends.cpp_extension().available:
        return "the C++ extension is not built (the CPU kernel)"
    return None


def _resident(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_bytes(step) -> tuple[int, str]:
    """Bytes one call of ``step`` needs above what is allocated before it, and how that was measured."""
    if ON_CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start, "torch.cuda.max_memory_allocated above the start"
    if backends.cpp_extension().available:
        from spacedkd_fast import _C

        _C.release_cached_buffers()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident set restarts from the current one
    start = _resident("VmRSS:")
    step()
    return _resident("VmHWM:") - start, "peak RSS (VmHWM, reset) above RSS before the call, after malloc_trim"


def _cases():
    cases = [(shape, dtype, False) for shape, dtype in FUSED_LINEAR_CPU]
    cases += [(shape, dtype, True) for shape, dtype in FUSED_LINEAR_GPU]
    return [pytest.param(p, shape, dtype, marks=[pytest.mark.headline] if gpu else [],
                         id=f"{p}-{shape[0]}x{shape[1]}-{shape[2]}to{shape[3]}-{str(dtype).removeprefix('torch.')}")
            for shape, dtype, gpu in cases for p in PROVIDERS]


@pytest.mark.parametrize("provider, shape, dtype", _cases())
def test_fused_linear(measure, provider, shape, dtype):
    gpu_shape = (shape, dtype) in FUSED_LINEAR_GPU
    if gpu_shape != ON_CUDA:
        pytest.skip("a GPU shape (LLM scale)" if gpu_shape else "the CPU target shape")
    why_not = _why_not(provider)
    if why_not:
        pytest.skip(why_not)
    n, hs, ht, v = shape
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, device=DEVICE, generator=gen) * scale).to(dtype)

    h = randn(n, hs).requires_grad_(True)
    w = randn(v, hs, scale=hs**-0.5).requires_grad_(True)
    g, wt = randn(n, ht), randn(v, ht, scale=ht**-0.5)
    y = torch.randint(0, v, (n,), device=DEVICE, generator=gen)
    loss_fn = LOSSES[provider]

    def step():
        h.grad = w.grad = None
        loss_fn(h, w, g, wt, y).backward()

    def memory():
        h.grad = w.grad = None
        peak, how = _peak_bytes(step)
        grads = sum(x.grad.numel() * x.grad.element_size() for x in (h, w))
        return {"peak_mem_bytes": peak, "peak_mem_method": how, "grad_bytes": grads,
                "peak_above_grads_bytes": peak - grads}

    flops = 2 * n * v * (3 * hs + ht)
    # Rounds are seconds long on a CPU (and the GPU acceptance run has a budget): a few, after one warm-up.
    measure(step, group=f"fused-linear fwd+bwd {n}x{hs}->{v} teacher {ht} {str(dtype).removeprefix('torch.')}",
            provider=provider, baseline="eager", items=flops / 1e9, items_unit="GFLOP", warmup=1,
            rounds=3, after=memory, info=dict(N=n, Hs=hs, Ht=ht, V=v, dtype=str(dtype), mode="fwd+bwd",
                                             flops=flops, logits_bytes=n * v * torch.finfo(dtype).bits // 8))
