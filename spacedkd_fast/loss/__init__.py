"""Fused KD + CE loss: reference (the spec) → kernels → custom op with autograd → public API."""

from spacedkd_fast.loss.api import KDLoss, KDLossTopK, kd_loss, kd_loss_topk
from spacedkd_fast.loss.fused_linear import FusedLinearKDLoss, kd_loss_from_hidden
from spacedkd_fast.loss.reference import kd_loss_reference
from spacedkd_fast.loss.sparse import kd_loss_topk_reference

__all__ = ["FusedLinearKDLoss", "KDLoss", "KDLossTopK", "kd_loss", "kd_loss_from_hidden", "kd_loss_reference",
           "kd_loss_topk", "kd_loss_topk_reference"]
