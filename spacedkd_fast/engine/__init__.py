"""The spaced-KD training engine: schedule walker, roles, replay, overlap, checkpoints (see trainer.py)."""

from spacedkd_fast.engine.trainer import Summary, Trainer, TrainingInterrupted

__all__ = ["Summary", "Trainer", "TrainingInterrupted"]
