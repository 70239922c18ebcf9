"""spacedkd_fast: Spaced Knowledge Distillation, fast.

Public API:
    kd_loss, KDLoss          fused (1−α)·CE + α·T²·KL loss (Triton on CUDA, C++ on CPU, torch reference)
    kd_loss_reference        the pure-torch spec of that loss
    kd_loss_from_hidden, FusedLinearKDLoss
                             the same loss from hidden states and the heads' weights, chunked: the N × V logits
                             never exist (LLM distillation)
    kd_loss_topk, KDLossTopK the same loss against a sparse (top-k) teacher; kd_loss_topk_reference its spec
    SpacedReplay             Spaced KD in your own training loop: schedule, replay window, teacher snapshots

Optional parts (Triton, the C++ extension, DALI, CUDA) are probed lazily by :mod:`spacedkd_fast.backends`;
``python -m spacedkd_fast.info`` shows what this machine uses.
"""

import logging

from spacedkd_fast.loss import (
    FusedLinearKDLoss,
    KDLoss,
    KDLossTopK,
    kd_loss,
    kd_loss_from_hidden,
    kd_loss_reference,
    kd_loss_topk,
    kd_loss_topk_reference,
)

__version__ = "0.1.0"
__all__ = ["FusedLinearKDLoss", "KDLoss", "KDLossTopK", "SpacedReplay", "kd_loss", "kd_loss_from_hidden",
           "kd_loss_reference", "kd_loss_topk", "kd_loss_topk_reference", "__version__"]


def __getattr__(name: str):
    # Imported on first use: the engine pulls in the data stack, which a loss-only user does not need.
    if name == "SpacedReplay":
        from spacedkd_fast.engine.replay import SpacedReplay

        return SpacedReplay
    raise AttributeError(f"module 'spacedkd_fast' has no attribute {name!r}")

logging.getLogger("spacedkd_fast").addHandler(logging.NullHandler())
