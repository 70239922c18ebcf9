"""Training throughput of the engine: images/s of base, online KD (s = 0), spaced KD without and with overlap,
and an original-style baseline (sequential, replay window in host memory with a blocking copy each way).

    pytest bench/bench_train.py

CPU: resnet8 on 2,048 embedded digits, batch 64, two timed fits after a warm-up fit. GPU: ResNet-18 on
CIFAR-shaped synthetic data (3x32x32, the first 12,800 of its 50,000 images: 100 iterations, so the five cases fit
the GPU acceptance run's time), batch 128, bf16 autocast, channels-last, one timed fit after a warm-up fit.
images/s counts fresh training images per second of ``Trainer.fit`` (one epoch, including its epoch-end evaluation
on a small test set); each KD case trains a teacher and a student on them. Speedups are against online KD (s = 0)
and the original-style baseline of the same run. ``test_default_run`` times the no-argument run of the README's
quick start (CPU).
"""

from __future__ import annotations

import pytest
import torch
from shapes import ON_CUDA, fit_recording_data_wait

from spacedkd_fast.config import TrainConfig
from spacedkd_fast.engine import Trainer

if ON_CUDA:
    COMMON = dict(dataset="synthetic", subset=12_800, model="resnet18", batch_size=128, epochs=1, precision="bf16",
                  channels_last=True, eval_batch_size=1000, progress=False)
    SPACE = 0.25  # 25 iterations per block: 4 blocks per epoch, so the overlap reaches a steady state
    ROUNDS = 1  # one timed fit after the warm-up fit (cuDNN autotuning, allocator): the acceptance run's budget
else:
    COMMON = dict(dataset="embedded", subset=2048, model="resnet8", batch_size=64, epochs=1, eval_batch_size=512,
                  progress=False)
    SPACE = 0.25
    ROUNDS = 2

CASES = {
    "online_s0": dict(mode="online", space=0.0),
    "spaced_sequential": dict(mode="online", space=SPACE, overlap=False),
    "spaced_overlap": dict(mode="online", space=SPACE, overlap=True),
    "base": dict(mode="base"),
    "original_style": dict(mode="online", space=SPACE, overlap=False, window_storage="host"),
}
# What the GPU acceptance run measures first (``-m headline``): spaced KD overlapped vs sequential vs online s = 0.
HEADLINE = ("online_s0", "spaced_sequential", "spaced_overlap")


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.headline) if c in HEADLINE else c
                                  for c in CASES])
def test_train_throughput(measure, case):
    cfg = TrainConfig(**(COMMON | CASES[case]))
    images = COMMON["subset"] * cfg.epochs  # fresh training images of one fit (the subset is the training set)
    info = dict(config={k: v for k, v in (COMMON | CASES[case]).items() if k != "progress"},
                device=str(torch.device("cuda" if ON_CUDA else "cpu")))
    measure(fit_recording_data_wait(info), setup=lambda: (Trainer(cfg, log=lambda *a: None),), rounds=ROUNDS,
            warmup=1, group=f"train {COMMON['model']} b{COMMON['batch_size']} ({'cuda' if ON_CUDA else 'cpu'})",
            provider=case, baseline=("online_s0", "original_style"), items=images, items_unit="images", info=info)


@pytest.mark.skipif(ON_CUDA, reason="the default run's figure is the CPU one the README quotes")
def test_default_run(measure):
    """``python -m spacedkd_fast.train`` with no arguments (spaced online KD, resnet8, the embedded digits, 8
    epochs): the wall time and accuracy the README's quick start quotes."""
    info: dict = {}

    def fit(trainer):
        summary = trainer.fit()
        info.update(wall_s=summary.wall_s, student_acc=summary.student_acc, teacher_acc=summary.teacher_acc)

    cfg = TrainConfig(progress=False)
    measure(fit, setup=lambda: (Trainer(cfg, log=lambda *a: None),), rounds=1, warmup=0, group="default run (cpu)",
            provider="default", items=4000 * cfg.epochs, items_unit="images", info=info)
