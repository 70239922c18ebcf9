"""``python -m spacedkd_fast.info``: versions, optional parts, and the backend each op uses on this machine."""

from __future__ import annotations

import platform
import sys

import torch

import spacedkd_fast
from spacedkd_fast import backends


def collect() -> dict[str, str]:
    """Everything the report prints, as strings (also recorded with benchmark results)."""
    info = {
        "spacedkd_fast": spacedkd_fast.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cpu threads": str(torch.get_num_threads()),
        "CUDA": str(backends.cuda()),
        "Triton": str(backends.triton()),
        "C++ extension (spacedkd_fast._C)": str(backends.cpp_extension()),
        "DALI": str(backends.dali()),
        "DALI fused CPU operator": str(backends.dali_fused_ops()),
    }
    for device in ("cpu", "cuda"):
        for dtype in (torch.float32, torch.bfloat16):
            try:
                chosen = backends.select_loss_backend("auto", torch.device(device), dtype)
            except Exception as exc:  # noqa: BLE001 - report, never fail
                chosen = f"unavailable ({exc})"
            if device == "cuda" and not backends.cuda().available:
                chosen += " (no CUDA device here)"
            info[f"kd_loss backend, {device} {str(dtype).removeprefix('torch.')}"] = chosen
    return info


def main() -> None:
    info = collect()
    width = max(map(len, info))
    print("spacedkd_fast environment")
    for key, value in info.items():
        print(f"  {key:<{width}}  {value}")


if __name__ == "__main__":
    main()
