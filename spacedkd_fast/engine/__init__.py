"""The spaced-KD training engine.

* :class:`Trainer`: a whole run (schedule, roles, replay, overlap, DDP, checkpoints, metrics), from a
  :class:`~spacedkd_fast.config.TrainConfig` alone (the command line) or with your own modules, data, optimizers,
  schedulers and loss (``trainer.py``; the parts it builds for what you do not give: ``build.py``).
* :class:`SpacedReplay`: the schedule / window / snapshot machinery for a training loop of your own (``replay.py``).
* :class:`Callback`: hooks at step end, evaluation and epoch end (``callbacks.py``).
"""

from spacedkd_fast.engine.callbacks import Callback
from spacedkd_fast.engine.replay import SpacedReplay
from spacedkd_fast.engine.trainer import Summary, Trainer, TrainingInterrupted

__all__ = ["Callback", "SpacedReplay", "Summary", "Trainer", "TrainingInterrupted"]
