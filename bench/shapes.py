"""Settings shared by the benchmarks: the loss shape sweep, and a training run that records its data wait."""

import torch

ON_CUDA = torch.cuda.is_available()

# (N, V): classification shapes run everywhere (128 × 10 / 128 × 100: CIFAR-10/100 at the paper's batch, where host
# overhead decides); N = 4096, V = 1000 is the CPU target shape of the C++ kernel; LLM-scale shapes only on a GPU.
CLASSIFICATION = [(128, 10), (128, 100), (128, 1000), (1024, 100), (1024, 1000)]
CPU_TARGET = [(4096, 1000)]
LLM = [(8192, 32000), (8192, 128256)]

KD_SHAPES = CLASSIFICATION + (LLM if ON_CUDA else CPU_TARGET)
KD_DTYPES = [torch.bfloat16, torch.float32] if ON_CUDA else [torch.float32]
MODES = ["fwd", "fwd+bwd"]


def fit_recording_data_wait(info: dict):
    """``trainer -> None`` running ``trainer.fit()`` and storing the share of the run spent waiting for data in
    ``info["data_wait_fraction"]`` (pass the same dict as ``measure(info=...)``: it is read after the rounds)."""
    def fit(trainer):
        summary = trainer.fit()
        info["data_wait_fraction"] = summary.data_wait_s / max(summary.session_s, 1e-9)
    return fit
