"""The replay window: one tier policy over every storage, ring and copy storage, regeneration from plans,
checkpoint round trips (including the layouts of earlier versions), memory."""

import math

import pytest
import torch

from spacedkd_fast.data.pipeline import BatchPlan
from spacedkd_fast.data.window import (
    BlockingHostStorage,
    CopyStorage,
    ReplayWindow,
    RingStorage,
    TierBudget,
)

SHAPE = (3, 8, 8)
SLOT = 4 * (math.prod(SHAPE) + 8)  # a ring slot of 4 images


def _batch(seed, b=4, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, *shape), generator=g, dtype=torch.uint8), torch.randint(0, 10, (b,), generator=g)


def _ring_window(capacity, device_slots, host_slots=0, regenerate=None):
    budget = TierBudget(device_slots * SLOT, host_slots * SLOT)
    rings = RingStorage.for_budget(capacity, SHAPE, 4, "cpu", budget)
    return ReplayWindow(rings, capacity=capacity, budget=budget, regenerate=regenerate,
                        plan_to_state=lambda p: (p.indices, p.seed),
                        plan_from_state=lambda i, s: BatchPlan(i, *s))


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_tier_policy_fills_device_then_host_then_regenerates():
    budget = TierBudget(device=350, host=420)
    used, tiers = {"device": 0, "host": 0}, []
    for _ in range(10):
        tier = budget.choose(100, used)
        tiers.append(tier)
        if tier != "regenerate":
            used[tier] += 100
    assert tiers == ["device"] * 3 + ["host"] * 4 + ["regenerate"] * 3
    rings = RingStorage.for_budget(10, (92,), 1, "cpu", budget)  # 100-byte slots: the same split
    assert len(rings._rings["device"][0]) == 3 and len(rings._rings["host"][0]) == 4


def test_ring_put_get_release_and_capacity():
    w = _ring_window(3, device_slots=3)
    batches = {i: _batch(i, b=4 if i != 2 else 3) for i in range(5)}
    for i in range(3):
        assert w.put(i, batches[i]) == "device"
    assert w.pending() == [0, 1, 2] and len(w) == 3 and not w.is_free()
    with pytest.raises(RuntimeError, match="the replay window is full"):
        w.put(3, batches[3])
    images, labels = w.get(2)
    assert _equal((images, labels), batches[2]) and images.shape[0] == 3  # a short batch keeps its size
    w.release(0)
    w.put(3, batches[3])
    assert w.pending() == [1, 2, 3] and _equal(w.get(3), batches[3])
    with pytest.raises(KeyError, match="iteration 0 is not in the replay window"):
        w.get(0)
    with pytest.raises(RuntimeError, match="already in the replay window"):
        w.put(3, batches[3])


def test_tiers_mix_and_every_tier_returns_the_same_bytes():
    rendered = []

    def regenerate(plan):
        rendered.append(plan.iteration)
        return _batch(plan.iteration)

    w = _ring_window(6, device_slots=2, host_slots=2, regenerate=regenerate)
    tiers = [w.put(i, _batch(i), BatchPlan(i, torch.arange(4), i)) for i in range(6)]
    assert tiers == ["device", "device", "host", "host", "regenerate", "regenerate"]
    assert w.nbytes("device") == 2 * SLOT and w.nbytes("host") == 2 * SLOT
    w.prefetch(4)  # a side-stream render (inline on a CPU)
    for i in range(6):
        assert _equal(w.get(i), _batch(i)), i
    assert rendered == [4, 5]
    w.release(0)
    assert w.nbytes("device") == SLOT and w.put(6, _batch(6), BatchPlan(6, torch.arange(4), 6)) == "device"


def test_beyond_both_budgets_without_a_plan_or_a_way_to_regenerate_is_refused():
    w = _ring_window(2, device_slots=0)
    with pytest.raises(RuntimeError, match="fits neither the device budget .* raise window_budget or host_budget"):
        w.put(0, _batch(0))
    copies = ReplayWindow(CopyStorage("cpu"), capacity=2, budget=TierBudget(0, 0))
    with pytest.raises(RuntimeError, match="fits neither"):
        copies.put(0, {"x": torch.ones(3)})


def test_copy_storage_keeps_copies_of_any_structure_and_refuses_a_new_one():
    w = ReplayWindow(CopyStorage("cpu"), capacity=4, budget=TierBudget(1e9, 0))
    x = torch.ones(2, 3)
    w.put(0, {"image": x, "label": torch.tensor([1, 2])})
    x.add_(1)  # the caller reuses its buffer
    assert torch.equal(w.get(0)["image"], torch.ones(2, 3))
    w.put(1, {"image": torch.zeros(1, 3), "label": torch.tensor([3])})  # a short batch: shapes may vary
    with pytest.raises(ValueError, match=r"batch 2 is \{'image': float32\}; the earlier batches were"):
        w.put(2, {"image": torch.zeros(1, 3)})
    with pytest.raises(TypeError, match="a batch must be a tensor or a tuple/list/dict of tensors"):
        w.put(3, ["not a tensor"])


@pytest.mark.parametrize("kind", ["ring", "copy", "blocking-host"])
def test_state_dict_round_trip(kind):
    def make():
        if kind == "ring":
            return _ring_window(4, device_slots=2, regenerate=lambda plan: _batch(plan.iteration))
        storage = CopyStorage("cpu") if kind == "copy" else BlockingHostStorage("cpu")
        return ReplayWindow(storage, capacity=4, budget=TierBudget(2 * SLOT, 0), regenerate=lambda i: _batch(i))

    plan = (lambda i: BatchPlan(i, torch.arange(4), i)) if kind == "ring" else (lambda i: i)
    w = make()
    for i in (5, 6, 7, 8):
        w.put(i, _batch(i), plan(i))
    w.release(5)
    resumed = make()
    resumed.load_state_dict(w.state_dict())
    assert resumed.pending() == [6, 7, 8]
    for i in (6, 7, 8):
        assert _equal(resumed.get(i), _batch(i)), i


def test_the_window_layouts_of_earlier_checkpoints_load():
    """Format-2 checkpoints hold the uint8 ring's own layout, or the user window's with its fetched-again set."""
    ring_state = {"storage": "device", "entries": [(3, *_batch(3), (torch.arange(4), 3)),
                                                   (4, None, None, (torch.arange(4), 4))]}
    w = _ring_window(4, device_slots=4, regenerate=lambda plan: _batch(plan.iteration))
    w.load_state_dict(ring_state)
    assert w.pending() == [3, 4] and _equal(w.get(3), _batch(3)) and _equal(w.get(4), _batch(4))

    leaves = list(_batch(7))
    from torch.utils import _pytree as pytree

    spec = pytree.treespec_dumps(pytree.tree_flatten(_batch(7))[1])
    user_state = {"window": {"entries": [(7, leaves)], "spec": spec}, "regenerate": [8]}
    copies = ReplayWindow(CopyStorage("cpu"), capacity=4, budget=TierBudget(1e9, 0), regenerate=lambda i: _batch(i))
    copies.load_state_dict(user_state)
    assert copies.pending() == [7, 8] and _equal(copies.get(7), _batch(7)) and _equal(copies.get(8), _batch(8))


def test_cifar_window_at_s_1_5_fits_a_quarter_gigabyte():
    """Target: a CIFAR-size window (50,000 images, batch 128, s = 1.5) with overlap slack stays <= 0.25 GB."""
    from spacedkd_fast.engine.build import OVERLAP_SLACK
    from spacedkd_fast.schedule import SpacingSchedule

    n = SpacingSchedule(1.5, -(-50_000 // 128), 80).block_length
    rings = RingStorage.for_budget(n + OVERLAP_SLACK, (3, 32, 32), 128, "meta", TierBudget(math.inf, 0))
    assert n == 586
    assert rings.device_nbytes <= 0.25e9, rings.device_nbytes


def test_regenerate_tier_keeps_only_plans():
    """An ImageNet-shaped window with no budget: no pixels held, only plans (indices and a seed)."""
    rendered = []
    budget = TierBudget(0, 0)
    rings = RingStorage.for_budget(4, (3, 224, 224), 256, "cpu", budget)
    w = ReplayWindow(rings, capacity=4, budget=budget,
                     regenerate=lambda plan: (rendered.append(plan.iteration), _batch(0, b=2))[1])
    for i in range(4):
        w.put(i, (torch.empty(0, 3, 224, 224, dtype=torch.uint8), torch.empty(0)), BatchPlan(i, torch.arange(256), i))
    assert rings.device_nbytes == 0 and w.nbytes("device") == w.nbytes("host") == 0
    w.get(2)
    assert rendered == [2]
