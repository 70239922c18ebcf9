"""Fail before work starts: before any optimizer step, the first batch goes through every step the mode will take
(the teacher's, the s = 0 student's, the replay's), so a bad loss, batch or model stops the run in seconds, not after
the teacher's first block — and the check itself changes nothing (the weights equal a run without it)."""

from __future__ import annotations

import pytest
import torch
from test_engine import assert_bit_identical, run, tiny, weights
from test_engine_api import NoisyBlobs, mlp

from spacedkd_fast.engine import Trainer


def _user(loss, **settings):
    return Trainer(teacher=mlp(16, 1), student=mlp(16, 2), train_data=NoisyBlobs(128), loss=loss, epochs=2,
                   batch_size=32, progress=False, device="cpu", log=lambda *a: None, **settings)


@pytest.mark.parametrize("space", [1.0, 0.0], ids=["spaced", "online"])
def test_a_student_loss_that_fails_stops_before_the_teachers_first_step(tmp_path, space):
    calls = []

    def loss(student_logits, teacher_logits, labels):
        calls.append(1)
        return torch.nn.functional.cross_entropy(student_logits, labels, reduction="none")  # not a scalar

    trainer = _user(loss, space=space, out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"the student's distill_step fails on the first batch \(data iteration 0\), "
                                         r"before any training: ValueError: loss returned Tensor\(32,\)"):
        trainer.fit()
    assert calls and trainer.teacher.steps == 0 and trainer.student.steps == 0
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_non_finite_loss_on_the_first_batch_is_named(tmp_path):
    def loss(student_logits, teacher_logits, labels):
        return (student_logits * float("nan")).sum()

    with pytest.raises(ValueError, match=r"the student's distill_step fails .*the loss is nan"):
        _user(loss, space=1.0).fit()


def test_the_check_changes_nothing(tmp_path, monkeypatch):
    """BatchNorm statistics, random streams, lr schedulers: the weights are those of a run without the check."""
    checked = weights(run(tiny(space=0.5, epochs=1)))
    monkeypatch.setattr("spacedkd_fast.engine.trainer.check_first_batch", lambda trainer: None)
    unchecked = weights(run(tiny(space=0.5, epochs=1)))
    assert_bit_identical(checked, unchecked)
