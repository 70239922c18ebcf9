"""The spaced-KD training engine: schedule walker, roles, replay, overlap, checkpoints (see trainer.py); and
:class:`SpacedReplay`, the schedule/window/snapshot machinery for a training loop of your own (replay.py)."""

from spacedkd_fast.engine.replay import SpacedReplay
from spacedkd_fast.engine.trainer import Summary, Trainer, TrainingInterrupted

__all__ = ["SpacedReplay", "Summary", "Trainer", "TrainingInterrupted"]
