"""Replay-window bandwidth per tier: filling it (teacher side) and replaying it (student side).

    pytest bench/bench_window.py

CIFAR-shaped batches (128 × 3 × 32 × 32 uint8). "fill" stores rendered batches (the teacher side); "replay" hands the
student its normalized float batch (``window.get``): a view plus normalization for the device tier, a host→device
copy first for the host tier, rendering the batch again from its plan (sample indices + seed) for the regenerate
tier. GB/s count the uint8 pixels and int64 labels of the batches.
"""

from __future__ import annotations

import pytest
import torch
from shapes import ON_CUDA

from spacedkd_fast.data.augment import normalize
from spacedkd_fast.data.datasets import AugmentSpec, ImageDataset
from spacedkd_fast.data.pipeline import BatchSource
from spacedkd_fast.data.window import ReplayWindow, RingStorage, TierBudget

DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
BATCH, SLOTS = 128, 64
SHAPE = (3, 32, 32)
BATCH_BYTES = BATCH * (3 * 32 * 32 + 8)


def _source() -> BatchSource:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (BATCH * SLOTS, *SHAPE), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (BATCH * SLOTS,), generator=g)
    dataset = ImageDataset(name="bench", train_images=images, train_labels=labels, test_images=images[:10].clone(),
                           test_labels=labels[:10].clone(), num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3,
                           augment=AugmentSpec(pad=4, flip=True, rotate_degrees=15),
                           classes=tuple(map(str, range(10))))
    return BatchSource(dataset, batch_size=BATCH, seed=0, device=DEVICE)


@pytest.fixture(scope="module")
def batches():
    source = _source()
    plans = [source.plan(i) for i in range(SLOTS)]
    return source, plans, [source.render(p) for p in plans]


@pytest.mark.parametrize("phase", ["fill", "replay"])
@pytest.mark.parametrize("tier", ["device", "host", "regenerate"])
def test_window_bandwidth(measure, batches, tier, phase):
    source, plans, rendered = batches
    slot = BATCH_BYTES
    budget = {"device": TierBudget(SLOTS * slot, 0), "host": TierBudget(0, SLOTS * slot),
              "regenerate": TierBudget(0, 0)}[tier]
    window = ReplayWindow(RingStorage.for_budget(SLOTS, SHAPE, BATCH, DEVICE, budget), capacity=SLOTS,
                          budget=budget, regenerate=source.regenerate)
    mean, std = (0.5,) * 3, (0.25,) * 3

    def fill():
        for i, (plan, (images, labels)) in enumerate(zip(plans, rendered)):
            if i in window:
                window.release(i)
            window.put(i, (images, labels), plan)

    def replay():
        for i in range(SLOTS):
            images, _ = window.get(i)
            normalize(images, mean, std)  # what the student's step does with it

    fill()
    measure(fill if phase == "fill" else replay, group=f"window {phase} ({DEVICE.type})", provider=tier,
            baseline="device", bytes_moved=SLOTS * BATCH_BYTES, items=SLOTS * BATCH, items_unit="images")
