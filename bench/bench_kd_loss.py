"""Fused KD + CE loss throughput: eager reference, torch.compile(reference), C++ (CPU), Triton (GPU), Liger (GPU).

    pytest bench/bench_kd_loss.py            # results table at the end, JSON in bench/results/
    pytest bench/bench_kd_loss.py -m headline   # the copy bandwidth and native-vs-eager fwd+bwd, first

GB/s count the bytes a two-pass kernel moves (see bench/conftest.py); speedups are against the eager reference
measured in the same run; "copy" is the device's own copy bandwidth, the ceiling. Three tiers, in this order (the
GPU acceptance run runs them as separate steps, so a cut never loses the first): ``headline`` (copy bandwidth, then
per shape the eager reference and the native kernel), the rest of the sweep, and ``compile_heavy``
(``torch.compile`` of the reference, which costs tens of seconds per shape; each result records how many graphs
were compiled for it, so a silent fallback to eager is visible).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from shapes import HEADLINE_KD, KD_DTYPES, KD_SHAPES, MODES, ON_CUDA

from spacedkd_fast import backends, kd_loss, kd_loss_reference

DEVICE = "cuda" if ON_CUDA else "cpu"
OPTIONS = dict(temperature=2.0, alpha=0.5, label_smoothing=0.0)
HAS_LIGER = ON_CUDA and importlib.util.find_spec("liger_kernel") is not None
NATIVE = "triton" if ON_CUDA else "cpp"

_compiled_reference = None


def _compiled(*args, **kwargs):
    global _compiled_reference
    if _compiled_reference is None:
        import torch._dynamo

        # One code object compiled per (shape, dtype, grad mode): past dynamo's recompile limit (8) it would run
        # eager while labelled "compiled". The limit is raised, and every result records its graph count.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
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


def _two_line(student, teacher, target, temperature, alpha, **_):
    """The objective as a user writes it with torch's own ops (what kd_loss is compared with first): CE plus
    T²-scaled KL of log-softmaxes, batch mean."""
    kl = F.kl_div(F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
                  log_target=True, reduction="batchmean")
    return (1 - alpha) * F.cross_entropy(student, target) + alpha * temperature**2 * kl


PROVIDERS = {
    "eager": lambda s, t, y, **o: kd_loss_reference(s, t, y, **o),
    "two_line": _two_line,
    "compiled": _compiled,
    "cpp": lambda s, t, y, **o: kd_loss(s, t, y, backend="cpp", **o),
    "triton": lambda s, t, y, **o: kd_loss(s, t, y, backend="triton", **o),
    "liger": _liger,
}

# On a GPU each static-shape torch.compile of the reference (forward + backward) costs tens of seconds: it is
# measured at one LLM and one classification shape, fwd+bwd, where it is the baseline to beat (the LLM one first:
# the GPU acceptance run's time may allow only one).
COMPILED_CUDA = [((8192, 32000), torch.bfloat16, "fwd+bwd"), ((1024, 1000), torch.float32, "fwd+bwd")]
COMPILED = COMPILED_CUDA if ON_CUDA else [(shape, dtype, mode) for shape in KD_SHAPES for dtype in KD_DTYPES
                                          for mode in MODES]


def _available(provider: str) -> str | None:
    """None when the provider runs here, else why not."""
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


def _dtype_id(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _mode_id(mode) -> str:
    return mode.replace("+", "_")  # usable in -k expressions: -k fwd_bwd


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _bench_kd(measure, provider, shape, dtype, mode):
    why_not = _available(provider)
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

    after = None
    if provider == "compiled":
        before = _graphs_compiled()
        # >= 1: this item ran a graph compiled for it; 0: it reused one, or fell back to eager.
        after = lambda: {"graphs_compiled": _graphs_compiled() - before}  # noqa: E731
    measure(step, group=f"kd_loss {mode} {n}x{v} {_dtype_id(dtype)}", provider=provider,
            baseline=("eager", "two_line"),
            bytes_moved=_bytes(n, v, dtype, mode), items=n, items_unit="rows", after=after,
            info=dict(N=n, V=v, dtype=str(dtype), mode=mode, floor_bytes=_floor_bytes(n, v, dtype, mode)))


# ---- headline: first, and each shape's pair together so a cut keeps complete pairs --------------------------------
@pytest.mark.headline
def test_copy_bandwidth(measure):
    """The device's copy bandwidth (bytes read + written), the ceiling for a memory-bound kernel."""
    numel = (1 << 28) if ON_CUDA else (1 << 24)
    src = torch.empty(numel, dtype=torch.float32, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    measure(lambda: dst.copy_(src), group="copy", provider="copy", bytes_moved=2 * src.numel() * 4)


# The two-line torch formula is the CPU's comparison at the paper's shapes (host overhead decides there); on a GPU
# the acceptance run's budget goes to the native kernel against the reference (its plan counts these items).
BASELINES = ["eager"] if ON_CUDA else ["eager", "two_line"]


@pytest.mark.headline
@pytest.mark.parametrize("provider", [*BASELINES, NATIVE])
@pytest.mark.parametrize("shape, dtype", HEADLINE_KD, ids=[f"{n}x{v}-{_dtype_id(d)}" for (n, v), d in HEADLINE_KD])
def test_kd_loss_headline(measure, shape, dtype, provider):
    _bench_kd(measure, provider, shape, dtype, "fwd+bwd")


# ---- the rest of the sweep -----------------------------------------------------------------------------------------
SWEEP = [(provider, shape, dtype, mode) for provider in (*BASELINES, "cpp", "triton", "liger") for shape in KD_SHAPES
         for dtype in KD_DTYPES for mode in MODES
         if not (mode == "fwd+bwd" and provider in (*BASELINES, NATIVE) and (shape, dtype) in HEADLINE_KD)]


@pytest.mark.parametrize("provider, shape, dtype, mode", SWEEP,
                         ids=[f"{p}-{n}x{v}-{_dtype_id(d)}-{_mode_id(m)}" for p, (n, v), d, m in SWEEP])
def test_kd_loss(measure, provider, shape, dtype, mode):
    _bench_kd(measure, provider, shape, dtype, mode)


# ---- compile-heavy: last ----------------------------------------------------------------------------------------
@pytest.mark.compile_heavy
@pytest.mark.parametrize("provider", ["eager", "compiled"])
@pytest.mark.parametrize("shape, dtype, mode", COMPILED,
                         ids=[f"{n}x{v}-{_dtype_id(d)}-{_mode_id(m)}" for (n, v), d, m in COMPILED])
def test_kd_loss_compiled(measure, shape, dtype, mode, provider):
    """torch.compile of the reference against eager at the same shape, measured side by side."""
    _bench_kd(measure, provider, shape, dtype, mode)
