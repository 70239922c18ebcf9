"""Settings shared by the benchmarks: the loss shape sweep, and a training run that records its data wait."""

import torch

ON_CUDA = torch.cuda.is_available()

# (N, V): classification shapes run everywhere (128 × 10 / 128 × 100: CIFAR-10/100 at the paper's batch, where host
# overhead decides); N = 4096, V = 1000 is the CPU target shape of the C++ kernel; LLM-scale shapes only on a GPU.
CLASSIFICATION = [(128, 10), (128, 100), (128, 1000), (1024, 100), (1024, 1000)]
CPU_TARGET = [(4096, 1000)]
LLM = [(8192, 32000), (8192, 128256)]

MODES = ["fwd", "fwd+bwd"]

def headline_kd(on_cuda: bool = ON_CUDA) -> list[tuple[tuple[int, int], torch.dtype]]:
    """The kd_loss figures the GPU acceptance run exists for, measured first (``-m headline``, with the copy
    bandwidth): fwd+bwd of the native kernel against the eager reference at the paper's classification shapes
    (fp32) and, on a GPU, at LLM shapes (bf16). The rest of the sweep is ``-m "not headline and not
    compile_heavy"``."""
    return [((128, 10), torch.float32), ((128, 100), torch.float32), ((1024, 1000), torch.float32)] + (
        [((8192, 32000), torch.bfloat16), ((8192, 128256), torch.bfloat16)] if on_cuda else [])


def kd_shapes(on_cuda: bool = ON_CUDA) -> list[tuple[int, int]]:
    return CLASSIFICATION + (LLM if on_cuda else CPU_TARGET)


def kd_dtypes(on_cuda: bool = ON_CUDA) -> list[torch.dtype]:
    return [torch.bfloat16, torch.float32] if on_cuda else [torch.float32]


# Fused-linear KD, ((N, Hs, Ht, V), dtype): the CPU target (N·V = 2^25, fp32) and, on a GPU, Liger's headline shape
# (8192 × 4096 → 128256, bf16) with the teacher's head for the student too, and with a smaller student (Hs = 2048).
FUSED_LINEAR_CPU = [((2048, 256, 256, 16384), torch.float32)]
FUSED_LINEAR_GPU = [((8192, 4096, 4096, 128256), torch.bfloat16), ((8192, 2048, 4096, 128256), torch.bfloat16)]

HEADLINE_KD = headline_kd()
KD_SHAPES = kd_shapes()
KD_DTYPES = kd_dtypes()


def fit_recording_data_wait(info: dict):
    """``trainer -> None`` running ``trainer.fit()`` and storing the share of the run spent waiting for data in
    ``info["data_wait_fraction"]`` (pass the same dict as ``measure(info=...)``: it is read after the rounds)."""
    def fit(trainer):
        summary = trainer.fit()
        info["data_wait_fraction"] = summary.data_wait_s / max(summary.session_s, 1e-9)
    return fit
