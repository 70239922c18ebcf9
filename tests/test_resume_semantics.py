"""Resuming from Python works as on the command line: the saved config wins, the keywords given override only
what may change on a resume (more epochs extend the run), anything else is refused naming the keyword."""

from __future__ import annotations

import pytest
import torch
from test_engine import assert_bit_identical, tiny

from spacedkd_fast.engine import Trainer, TrainingInterrupted


def _stopped(out, **settings):
    trainer = Trainer(tiny(out=str(out), **settings), log=lambda *a: None)
    original = trainer._after_action  # a stop requested inside the second epoch

    def after_action():
        original()
        if trainer.actions == 20:
            trainer.request_stop("test")

    trainer._after_action = after_action
    with pytest.raises(TrainingInterrupted):
        trainer.fit()


def _weights(folder):
    state = torch.load(folder / "last.pt", weights_only=True)
    return {f"{r}.{k}": v for r, role in state["roles"].items() for k, v in role["model"].items()}, state


def test_keywords_resume_the_saved_run_and_say_nothing_of_the_rest(tmp_path):
    """``Trainer(resume=DIR)`` with none of the run's settings: its 3 epochs, its space, its batch size (the
    defaults, 8 epochs among them, used to win and extend the run silently)."""
    full = tmp_path / "full"
    Trainer(tiny(out=str(full), space=0.75, epochs=3), log=lambda *a: None).fit()
    out = tmp_path / "run"
    _stopped(out, space=0.75, epochs=3)
    resumed = Trainer(resume=str(out), log_every=7, log=lambda *a: None)  # a mutable setting changes freely
    assert resumed.cfg.epochs == 3 and resumed.cfg.space == 0.75 and resumed.cfg.log_every == 7
    resumed.fit()
    a, state = _weights(full)
    b, _ = _weights(out)
    assert_bit_identical(a, b)


def test_more_epochs_extend_and_other_changes_are_refused_by_keyword(tmp_path):
    out = tmp_path / "run"
    _stopped(out, space=0.75, epochs=2)
    with pytest.raises(ValueError, match=r"space: last.pt was saved with 0.75, space= asks for 1.0; "
                                         r"batch_size: last.pt was saved with 32, batch_size= asks for 16"):
        Trainer(resume=str(out), space=1.0, batch_size=16, log=lambda *a: None)
    extended = Trainer(resume=str(out), epochs=3, log=lambda *a: None)
    assert extended.cfg.epochs == 3 and extended.schedule.boundaries == (2,)
    extended.fit()
    assert [r["epoch"] for r in extended.history] == [1, 2, 3]
