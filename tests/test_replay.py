"""SpacedReplay, the loop-level API: the replays a plain loop gets back, byte-identical and in the teacher's order,
each with the snapshot of the teacher at its block's end; s = 0; the tail; structures; spilling; checkpoints."""

from __future__ import annotations

import hashlib
import io

import pytest
import torch
from torch import nn

from spacedkd_fast import SpacedReplay


class Counter(nn.Module):
    """A "teacher" whose single parameter counts its updates and whose output is that count, so a snapshot tells
    when it was taken."""

    def __init__(self):
        super().__init__()
        self.updates = nn.Parameter(torch.zeros(()))
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x):
        return self.updates.detach().clone()


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(n)]


def digest(batch) -> str:
    x, y = batch
    return hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()


def drive(replay: SpacedReplay, teacher: Counter, fresh: list, start: int = 0):
    """A plain loop: teacher forward and step (one update), then the replays due (s = 0 ones get the forward's
    outputs). Returns [(fresh index, replayed digest, the update count of the teacher answering the student)]."""
    log = []
    for i, batch in enumerate(fresh[start:], start):
        outputs = teacher(batch[0])  # the teacher's training forward, before its update
        with torch.no_grad():
            teacher.updates += 1
        for replayed, answering in replay.step(batch, teacher_outputs=outputs):
            log.append((i, digest(replayed), int(answering(replayed[0]).item())))
    return log


@pytest.mark.parametrize("replay_tail", [True, False])
def test_blocks_come_back_byte_identical_with_their_snapshot(replay_tail):
    teacher = Counter()
    replay = SpacedReplay(teacher, space=0.75, iters_per_epoch=8, epochs=2, replay_tail=replay_tail)
    assert replay.block_length == 6  # floor(0.75 · 8); blocks [0, 6), [6, 12), tail [12, 16)
    fresh = batches(16)
    log = drive(replay, teacher, fresh)
    replayed = 16 if replay_tail else 12
    assert [d for _, d, _ in log] == [digest(b) for b in fresh[:replayed]], "the teacher's batches, in order"
    # Handed back at the block's last fresh batch, each against the teacher as it stood then.
    expected_at = [5] * 6 + [11] * 6 + [15] * 4
    assert [i for i, _, _ in log] == expected_at[:replayed]
    assert [u for _, _, u in log] == [i + 1 for i in expected_at[:replayed]]
    assert len(replay.window) == 0


def test_snapshot_is_frozen_and_follows_teacher_bn():
    teacher = Counter()
    for bn in ("train", "eval"):
        replay = SpacedReplay(teacher, space=0.5, iters_per_epoch=4, epochs=1, teacher_bn=bn)
        snapshots = [s for b in batches(4) for _, s in replay.step(b)]
        assert snapshots and all(s is not teacher for s in snapshots)
        assert all(s.training == (bn == "train") for s in snapshots)
        assert not any(p.requires_grad for p in snapshots[0].parameters())


def test_space_zero_hands_each_batch_back_with_the_teachers_pre_update_outputs():
    """s = 0 is the engine's and the official code's online KD: the student distils from the teacher's outputs of
    the batch from before the teacher's update, answered like a snapshot (``teacher(x)``)."""
    teacher = Counter()
    replay = SpacedReplay(teacher, space=0, iters_per_epoch=3, epochs=2)
    log = drive(replay, teacher, batches(6))
    assert [(i, u) for i, _, u in log] == [(i, i) for i in range(6)]  # batch i: the teacher of i updates
    assert len(replay.window) == 0
    with pytest.raises(ValueError, match=r"s = 0 \(online KD\) iteration.*teacher_outputs="):
        SpacedReplay(teacher, space=0, iters_per_epoch=3, epochs=1).step(batches(1)[0])


def test_online_epochs_then_spacing():
    teacher = Counter()
    replay = SpacedReplay(teacher, space=0.5, iters_per_epoch=4, epochs=2, start_epoch=1)
    log = drive(replay, teacher, batches(8))
    assert [i for i, _, _ in log] == [0, 1, 2, 3, 5, 5, 7, 7]  # epoch 0 online, then blocks of 2
    assert [u for _, _, u in log] == [0, 1, 2, 3, 6, 6, 8, 8]  # pre-update outputs, then block-end snapshots


def test_any_tensor_structure_and_short_batches():
    teacher = Counter()
    replay = SpacedReplay(teacher, space=1.0, iters_per_epoch=3, epochs=1)
    fresh = [{"image": torch.rand(4, 2), "label": torch.arange(4), "meta": [torch.ones(1)]},
             {"image": torch.rand(4, 2), "label": torch.arange(4), "meta": [torch.ones(1)]},
             {"image": torch.rand(1, 2), "label": torch.arange(1), "meta": [torch.ones(1)]}]  # the short last one
    out = [b for batch in fresh for b, _ in replay.step(batch)]
    assert len(out) == 3
    for got, want in zip(out, fresh):
        assert got.keys() == want.keys() and torch.equal(got["image"], want["image"])
        assert torch.equal(got["meta"][0], want["meta"][0])


def test_stored_batches_are_copies():
    teacher = Counter()
    replay = SpacedReplay(teacher, space=1.0, iters_per_epoch=2, epochs=1)
    buffer = torch.zeros(3)
    assert not list(replay.step(buffer))
    expected = buffer.clone()
    buffer += 7  # a loader reusing its buffer
    (first, _), (second, _) = list(replay.step(buffer))
    assert torch.equal(first, expected) and torch.equal(second, expected + 7)


def test_bad_batches_and_misuse_raise_clear_errors():
    teacher = Counter()
    replay = SpacedReplay(teacher, space=1.0, iters_per_epoch=4, epochs=1)
    with pytest.raises(TypeError, match="a batch must be a tensor or a tuple/list/dict of tensors; .* str"):
        replay.step(("image.png", torch.zeros(1)))
    assert replay.iteration == 0 and len(replay.window) == 0  # the bad batch changed nothing
    list(replay.step((torch.zeros(2), torch.zeros(2, dtype=torch.long))))
    with pytest.raises(ValueError, match=r"batch 1 is \(float32, float32\); the earlier batches were "
                                         r"\(float32, int64\)"):
        replay.step((torch.zeros(2), torch.zeros(2)))  # the label dtype changed
    with pytest.raises(TypeError, match="teacher must be an nn.Module"):
        SpacedReplay(lambda x: x, space=1.0, iters_per_epoch=4, epochs=1)
    with pytest.raises(ValueError, match="floor"):
        SpacedReplay(teacher, space=0.1, iters_per_epoch=4, epochs=1)  # a block of 0 batches
    with pytest.raises(ValueError, match="teacher_bn"):
        SpacedReplay(teacher, space=1.0, iters_per_epoch=4, epochs=1, teacher_bn="frozen")

    short = SpacedReplay(teacher, space=0.5, iters_per_epoch=2, epochs=1)
    list(short.step(torch.zeros(1)))
    pending = short.step(torch.zeros(1))  # a block's replays, not consumed
    with pytest.raises(RuntimeError, match="were not all consumed"):
        short.step(torch.zeros(1))
    list(pending)
    with pytest.raises(RuntimeError, match="the schedule has 2 iterations"):
        short.step(torch.zeros(1))


def test_spill_to_host_and_full_window():
    teacher = Counter()
    fresh = batches(6)
    size = sum(t.numel() * t.element_size() for t in fresh[0])
    replay = SpacedReplay(teacher, space=1.0, iters_per_epoch=6, epochs=1, window_budget=2 * size,
                          host_budget=10 * size)
    for batch in fresh[:-1]:
        list(replay.step(batch))
    assert replay.window.nbytes("device") == 2 * size and replay.window.nbytes("host") == 3 * size
    out = [digest(b) for b, _ in replay.step(fresh[-1])]
    assert out == [digest(b) for b in fresh]
    full = SpacedReplay(teacher, space=1.0, iters_per_epoch=6, epochs=1, window_budget=size, host_budget=size)
    list(full.step(fresh[0]))
    list(full.step(fresh[1]))
    with pytest.raises(RuntimeError, match="the replay window is full: batch 2"):
        full.step(fresh[2])


def test_flush_replays_the_open_block_of_a_loop_that_stops_early():
    teacher = Counter()
    replay = SpacedReplay(teacher, space=1.0, iters_per_epoch=8, epochs=1)
    fresh = batches(3)
    assert drive(replay, teacher, fresh) == []
    out = [(digest(b), int(s.updates.item())) for b, s in replay.flush()]
    assert out == [(digest(b), 3) for b in fresh]
    assert list(replay.flush()) == []


def test_checkpoint_mid_block_resumes_identically():
    fresh = batches(16, seed=3)
    teacher = Counter()
    reference = drive(SpacedReplay(teacher, space=0.75, iters_per_epoch=8, epochs=2), teacher, fresh)

    teacher = Counter()
    first = SpacedReplay(teacher, space=0.75, iters_per_epoch=8, epochs=2)
    head = drive(first, teacher, fresh[:9])  # inside the second block
    buffer = io.BytesIO()
    torch.save({"replay": first.state_dict(), "teacher": teacher.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    teacher = Counter()
    teacher.load_state_dict(saved["teacher"])
    resumed = SpacedReplay(teacher, space=0.75, iters_per_epoch=8, epochs=2)
    resumed.load_state_dict(saved["replay"])
    assert resumed.iteration == 9 and len(resumed.window) == 3
    assert head + drive(resumed, teacher, fresh, start=9) == reference
    other = SpacedReplay(Counter(), space=0.5, iters_per_epoch=8, epochs=2)
    with pytest.raises(ValueError, match="space: saved 0.75, here 0.5"):
        other.load_state_dict(saved["replay"])
