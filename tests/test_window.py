"""The replay window: ring semantics, normalization at use, host storage, checkpoint round trip, memory."""

import pytest
import torch

from spacedkd_fast.data.window import WindowCache


def _batch(seed, b=4, shape=(3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, *shape), generator=g, dtype=torch.uint8), torch.randint(0, 10, (b,), generator=g)


NORMALIZE = lambda u8: u8.float() / 255.0  # noqa: E731


@pytest.mark.parametrize("storage", ["device", "host"])
def test_put_get_release(storage):
    w = WindowCache(3, (3, 8, 8), 4, "cpu", NORMALIZE, storage=storage)
    batches = {i: _batch(i, b=4 if i != 2 else 3) for i in range(5)}
    for i in range(3):
        w.put(i, *batches[i])
    assert w.pending() == [0, 1, 2] and len(w) == 3 and not w.is_free(3)
    with pytest.raises(RuntimeError, match="still holds iteration 0"):
        w.put(3, *batches[3])
    x, y = w.get(2)
    assert torch.equal(x, NORMALIZE(batches[2][0])) and torch.equal(y, batches[2][1]) and x.shape[0] == 3
    images, labels = w.raw(1)
    assert torch.equal(images, batches[1][0]) and torch.equal(labels, batches[1][1])
    w.release(0)
    w.put(3, *batches[3])
    assert w.pending() == [1, 2, 3]
    with pytest.raises(KeyError, match="iteration 0 is not in the replay window"):
        w.get(0)


@pytest.mark.parametrize("storage", ["device", "host"])
def test_state_dict_round_trip(storage):
    w = WindowCache(4, (3, 8, 8), 4, "cpu", NORMALIZE, storage=storage)
    for i in (5, 6, 7):
        w.put(i, *_batch(i))
    w.release(5)
    state = w.state_dict()
    fresh = WindowCache(4, (3, 8, 8), 4, "cpu", NORMALIZE, storage=storage)
    fresh.load_state_dict(state)
    assert fresh.pending() == [6, 7]
    for i in (6, 7):
        assert all(torch.equal(a, b) for a, b in zip(fresh.raw(i), _batch(i)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="capacity"):
        WindowCache(0, (3, 8, 8), 4, "cpu", NORMALIZE)
    with pytest.raises(ValueError, match="storage"):
        WindowCache(2, (3, 8, 8), 4, "cpu", NORMALIZE, storage="disk")


def test_cifar_window_at_s_1_5_fits_a_quarter_gigabyte():
    """Target: a CIFAR-size window (50,000 images, batch 128, s = 1.5) with overlap slack stays <= 0.25 GB."""
    from spacedkd_fast.engine.trainer import OVERLAP_SLACK
    from spacedkd_fast.schedule import SpacingSchedule

    n = SpacingSchedule(1.5, -(-50_000 // 128), 80).block_length
    w = WindowCache(n + OVERLAP_SLACK, (3, 32, 32), 128, "meta", NORMALIZE)  # meta: sizes without memory
    assert n == 586
    assert w.nbytes <= 0.25e9, w.nbytes


def test_tier_plan_splits_by_budget():
    from spacedkd_fast.data.window import TierPlan

    assert TierPlan.for_budget(10, 100, 350, 420) == TierPlan(3, 4, 3)
    assert TierPlan.for_budget(10, 100, 1e9, 0) == TierPlan(10, 0, 0)
    assert TierPlan.for_budget(10, 100, 0, 0) == TierPlan(0, 0, 10)
    plan = TierPlan(3, 4, 3)
    assert [plan.tier_of(s) for s in (0, 2, 3, 6, 7, 9)] == ["device", "device", "host", "host", "regenerate",
                                                             "regenerate"]


def test_regenerate_tier_keeps_only_plans_and_renders_on_replay():
    """An ImageNet-shaped window in the regenerate tier: no pixels held, ≤ 64 bytes per sample."""
    from spacedkd_fast.data.pipeline import BatchPlan
    from spacedkd_fast.data.window import TierPlan

    rendered = []

    def regenerate(plan):
        rendered.append(plan.iteration)
        return _batch(plan.iteration, b=plan.indices.numel())

    w = WindowCache(4, (3, 224, 224), 256, "cpu", NORMALIZE, tiers=TierPlan(0, 0, 4), regenerate=regenerate)
    for i in range(4):
        w.put(i, torch.empty(0), torch.empty(0), plan=BatchPlan(i, torch.arange(256), 1000 + i))
    assert w.nbytes == 0
    assert w.host_nbytes / (4 * 256) <= 64, w.host_nbytes
    images, labels = w.raw(2)
    assert rendered == [2] and torch.equal(images, _batch(2, b=256)[0])
    with pytest.raises(ValueError, match="no plan was given"):
        w.release(0)
        w.put(4, *_batch(4))
