"""Training throughput of the engine: images/s of base, online KD (s = 0), spaced KD without and with overlap,
and an original-style baseline (sequential, replay window in host memory with a blocking copy each way).

    pytest bench/bench_train.py

CPU: resnet8 on 2,048 embedded digits, batch 64. GPU: ResNet-18 on CIFAR-shaped synthetic data (3x32x32, the
first 25,600 of its 50,000 images: 200 iterations, so the five cases fit the GPU acceptance run's time), batch 128,
bf16 autocast, channels-last. images/s counts fresh training images per second of
``Trainer.fit`` (one epoch, including its epoch-end evaluation on a small test set); each KD case trains a teacher
and a student on them. Speedups are against online KD (s = 0) and the original-style baseline of the same run.
"""

from __future__ import annotations

import pytest
import torch
from shapes import ON_CUDA, fit_recording_data_wait

from spacedkd_fast.config import TrainConfig
from spacedkd_fast.engine import Trainer

if ON_CUDA:
    COMMON = dict(dataset="synthetic", subset=25_600, model="resnet18", batch_size=128, epochs=1, precision="bf16",
                  channels_last=True, eval_batch_size=1000, progress=False)
    SPACE = 0.25  # 50 iterations per block: 4 blocks per epoch, so the overlap reaches a steady state
else:
    COMMON = dict(dataset="embedded", subset=2048, model="resnet8", batch_size=64, epochs=1, eval_batch_size=512,
                  progress=False)
    SPACE = 0.25

CASES = {
    "base": dict(mode="base"),
    "online_s0": dict(mode="online", space=0.0),
    "spaced_sequential": dict(mode="online", space=SPACE, overlap=False),
    "spaced_overlap": dict(mode="online", space=SPACE, overlap=True),
    "original_style": dict(mode="online", space=SPACE, overlap=False, window_storage="host"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_throughput(measure, case):
    cfg = TrainConfig(**(COMMON | CASES[case]))
    probe = Trainer(cfg, log=lambda *a: None)  # for the image count; also warms the dataset cache
    images = probe.iters_per_epoch and len(probe.source.labels) * cfg.epochs
    del probe
    info = dict(config={k: v for k, v in (COMMON | CASES[case]).items() if k != "progress"},
                device=str(torch.device("cuda" if ON_CUDA else "cpu")))
    measure(fit_recording_data_wait(info), setup=lambda: (Trainer(cfg, log=lambda *a: None),), rounds=2,
            warmup=1, group=f"train {COMMON['model']} b{COMMON['batch_size']} ({'cuda' if ON_CUDA else 'cpu'})",
            provider=case, baseline=("online_s0", "original_style"), items=images, items_unit="images", info=info)
