"""The spacing schedule: block sizes, epoch spanning, the tail, s = 0, start epoch, evaluation points."""

import pytest

from spacedkd_fast.schedule import SpacingSchedule


def test_official_cifar_numbers():
    # CIFAR-100, batch 128: 391 iterations/epoch; s = 1.5 -> N = 586; 80 epochs -> 53 full blocks + 222 left over.
    s = SpacingSchedule(1.5, 391, 80)
    assert s.block_length == 586
    assert [b.length for b in s.blocks].count(586) == 53 and s.blocks[-1].length == 222
    assert s.student_iterations == 31280  # the tail is replayed by default
    dropped = SpacingSchedule(1.5, 391, 80, replay_tail=False)
    assert dropped.student_iterations == 53 * 586 == 31058
    assert not dropped.blocks[-1].replay and all(b.replay for b in dropped.blocks[:-1])


def test_blocks_cover_every_iteration_once_and_span_epochs():
    s = SpacingSchedule(1.5, 10, 7)
    covered = [i for b in s.blocks for i in range(b.start, b.stop)]
    assert covered == list(range(70))
    assert any(s.epoch_of(b.start) != s.epoch_of(b.stop - 1) for b in s.blocks), "a block spans an epoch boundary"
    assert all(not b.online for b in s.blocks)


def test_block_length_is_floor_and_robust_to_binary_rounding():
    assert SpacingSchedule(0.3, 10, 1).block_length == 3  # 0.3 * 10 = 2.9999999999999996 in binary
    assert SpacingSchedule(1.5, 390, 2).block_length == 585
    assert SpacingSchedule(0.26, 10, 1).block_length == 2


def test_space_zero_is_online_kd():
    s = SpacingSchedule(0, 5, 2)
    assert len(s.blocks) == 10 and all(b.online and b.length == 1 for b in s.blocks)
    assert s.student_iterations == 10


def test_start_epoch():
    s = SpacingSchedule(1.0, 4, 4, start_epoch=2)
    assert [(b.start, b.length, b.online) for b in s.blocks] == [
        (0, 1, True), (1, 1, True), (2, 1, True), (3, 1, True), (4, 1, True), (5, 1, True), (6, 1, True),
        (7, 1, True), (8, 4, False), (12, 4, False)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(space=-0.5), "space .* must be >= 0"),
    (dict(space=float("nan")), "finite"),
    (dict(space=0.01), r"floor\(s·iters_per_epoch\) = 0"),
    (dict(iters_per_epoch=0), "iters_per_epoch must be >= 1"),
    (dict(epochs=0), "epochs must be >= 1"),
    (dict(start_epoch=9), r"start_epoch must be in \[0, epochs=3\]"),
])
def test_bad_arguments(kwargs, message):
    args = dict(space=1.0, iters_per_epoch=10, epochs=3) | kwargs
    with pytest.raises(ValueError, match=message):
        SpacingSchedule(**args)


def test_student_evaluation_points():
    # Blocks end at iterations 20, 40, 50 (10 iterations/epoch, s = 2, 5 epochs).
    s = SpacingSchedule(2.0, 10, 5)
    assert [(b.start, b.stop) for b in s.blocks] == [(0, 20), (20, 40), (40, 50)]
    assert list(s.student_eval_epochs(None)) == [1]  # epoch 1 ends before any replay: the untrained student
    assert [list(s.student_eval_epochs(b)) for b in s.blocks] == [[2, 3], [4], [5]]
    # Every epoch is evaluated exactly once.
    epochs = list(s.student_eval_epochs(None)) + [e for b in s.blocks for e in s.student_eval_epochs(b)]
    assert epochs == [1, 2, 3, 4, 5]


def test_student_evaluation_points_with_a_dropped_tail():
    s = SpacingSchedule(2.0, 10, 5, replay_tail=False)
    replayed = [b for b in s.blocks if b.replay]
    assert [list(s.student_eval_epochs(b)) for b in replayed] == [[2, 3], [4, 5]]


def test_describe_mentions_block_size():
    assert "N = 586" in SpacingSchedule(1.5, 391, 80).describe()
    assert "dropped" in SpacingSchedule(1.5, 391, 80, replay_tail=False).describe()
    assert "online KD" in SpacingSchedule(0, 391, 80).describe()


def test_an_extended_run_keeps_its_blocks():
    """A 2-epoch run extended to 4 epochs: its blocks (tail included) stay, the new ones start at its old end."""
    short = SpacingSchedule(0.75, 8, 2)
    extended = SpacingSchedule(0.75, 8, 4, boundaries=(2,))
    assert extended.blocks[:len(short.blocks)] == short.blocks  # [0,6) [6,12) [12,16), the last a tail
    later = extended.blocks[len(short.blocks):]
    assert [(b.start, b.length) for b in later] == [(16, 6), (22, 6), (28, 4)]
    plain = SpacingSchedule(0.75, 8, 4)
    assert [(b.start, b.length) for b in plain.blocks][2] == (12, 6)  # without the boundary: no tail at 16
    dropped = SpacingSchedule(0.75, 8, 4, replay_tail=False, boundaries=(2,))
    assert [b.replay for b in dropped.blocks] == [True, True, False, True, True, False]
    with pytest.raises(ValueError, match="boundaries must be increasing epochs"):
        SpacingSchedule(0.75, 8, 4, boundaries=(4,))


def test_block_at_finds_the_block_of_every_iteration():
    schedule = SpacingSchedule(1.5, 10, 4, start_epoch=1, boundaries=(3,))
    for i in range(schedule.total_iterations):
        block = schedule.block_at(i)
        assert block.start <= i < block.stop and schedule.blocks[block.index] is block
