"""Triton kernels of spacedkd_fast (this folder installs as ``spacedkd_fast.kernels``).

Importing it requires Triton; ``spacedkd_fast.backends`` imports it lazily and falls back when Triton is absent.
"""

from spacedkd_fast.kernels.kd_loss_launch import kd_loss_forward

__all__ = ["kd_loss_forward"]
