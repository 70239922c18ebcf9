"""The process a run lives in: its device, CUDA numerics, and the memory the replay window may use."""

from __future__ import annotations

import os

import torch

from spacedkd_fast.config import TrainConfig, setting_name


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; validates explicit names. A CUDA device always comes back with
    its index (``cuda`` → the current device), which streams, threads and generators need."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"{setting_name('device')} must be auto, cpu, cuda or cuda:N, got {name!r}") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{setting_name('device')} must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{setting_name('device')} {name}: CUDA is not available on this machine "
                             f"(use cpu or auto)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise ValueError(f"{setting_name('device')} {name}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return device


def bind_device(device: torch.device) -> None:
    """Make ``device`` the current CUDA device of this process: Triton launches, ``torch.cuda.*`` calls without a
    device argument and new threads' defaults all follow the current device, not the one tensors live on."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def configure_math(cfg: TrainConfig, device: torch.device) -> None:
    """CUDA numerics of a run.

    * TF32 for fp32 matrix multiplies and convolutions (``--tf32``, default on): Ampere and later run them on tensor
      cores at ~8x the fp32 rate, with a 10-bit mantissa in the products and fp32 accumulation.
    * ``--deterministic``: deterministic kernels where PyTorch has them (cuDNN's fastest convolution algorithms and
      atomics-based reductions vary between runs in the last bits), so overlap, reruns and resumes are
      bit-identical. Ops with no deterministic CUDA kernel warn once and run as they are (``warn_only``): the
      bilinear upsampling of BYOT's attention gates is one (its backward adds with atomics).
    """
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    if cfg.deterministic:
        # cuBLAS reads this when it creates its handles, i.e. at the first matrix multiply of the process.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def _available_host_memory() -> int:
    """Bytes of available host memory (MemAvailable), or 8 GiB where /proc/meminfo is missing."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def default_window_budgets(device: torch.device, local_world: int = 1) -> tuple[float, float]:
    """Default bytes for the device and host tiers of one process's replay window: 25 % of free device memory
    (each rank has a GPU of its own) and, with CUDA, 25 % of available host memory shared by the ``local_world``
    processes of this machine; on a CPU the "device" tier is host memory already, and there is no host tier."""
    host_share = 0.25 * _available_host_memory() / max(local_world, 1)
    if device.type == "cuda":
        return 0.25 * torch.cuda.mem_get_info(device)[0], host_share
    return host_share, 0.0


def window_budgets(cfg: TrainConfig, device: torch.device, local_world: int = 1) -> tuple[float, float]:
    """Bytes for the device and host tiers of the replay window of this process: ``--window-budget`` /
    ``--host-budget`` (GB, per process) where given, else :func:`default_window_budgets`."""
    default_device, default_host = default_window_budgets(device, local_world)
    device_budget = cfg.window_budget * 1e9 if cfg.window_budget is not None else default_device
    host_budget = cfg.host_budget * 1e9 if cfg.host_budget is not None else default_host
    return device_budget, host_budget
