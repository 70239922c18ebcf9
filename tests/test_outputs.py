"""Never lose work: rotated checkpoints (last, previous, best), a torn checkpoint falling back to the previous one,
a run folder that is not overwritten by accident, a default output folder, and extending a finished run."""

from __future__ import annotations

import json
import re

import pytest
import torch
from test_engine import assert_bit_identical, run, tiny, weights

from spacedkd_fast.engine import TrainingInterrupted
from spacedkd_fast.engine.outputs import check_run_folder
from spacedkd_fast.train import config_from_args


def _load(path):
    return torch.load(path, weights_only=True)


def test_checkpoints_rotate_and_best_keeps_the_best_student(tmp_path):
    trainer = run(tiny(epochs=3, space=0.5, out=str(tmp_path)))
    last, previous, best = (_load(tmp_path / name) for name in ("last.pt", "previous.pt", "best.pt"))
    assert previous["position"]["actions"] < last["position"]["actions"]  # the checkpoint before the last one
    accuracies = [r["student_acc"] for r in trainer.history]
    assert best["student_acc"] == max(accuracies) == trainer.best_acc
    assert best["epoch"] == 1 + accuracies.index(max(accuracies))
    net = trainer.student.net
    net.load_state_dict(best["roles"]["student"]["model"])  # loads into the student's network
    assert set(best) >= {"format", "config", "roles"}  # what `python -m spacedkd_fast.hessian` reads


def test_a_torn_checkpoint_falls_back_to_the_previous_one(tmp_path):
    uninterrupted = run(tiny(space=0.75))
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        run(tiny(space=0.75, out=str(out)), stop_after=20)  # after epoch 1's checkpoint
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])  # truncated, as by a full disk
    lines = []
    resumed = Trainer_with_log(tiny(space=0.75, out=str(out), resume=str(out)), lines)
    resumed.fit()
    assert any(re.search(r"last.pt: unreadable .*; resuming from previous.pt instead", line) for line in lines), lines
    assert_bit_identical(weights(uninterrupted), weights(resumed))

    (out / "last.pt").write_text("garbage")
    (out / "previous.pt").write_text("garbage")
    with pytest.raises(ValueError, match=r"no readable checkpoint: last.pt: unreadable .*; previous.pt: unreadable"):
        Trainer_with_log(tiny(space=0.75, resume=str(out)), [])


def Trainer_with_log(cfg, lines):  # noqa: N802 - reads as the constructor it wraps
    from spacedkd_fast.engine import Trainer

    return Trainer(cfg, log=lines.append)


def test_a_run_folder_is_not_overwritten_by_accident(tmp_path):
    run(tiny(epochs=1, out=str(tmp_path)))
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match=r"out=.* holds another run \(config.json, metrics.jsonl, last.pt.*"
                                              r"continue it with resume=.*, or pass overwrite=True to replace it"):
        run(tiny(epochs=1, out=str(tmp_path)))
    assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing was touched
    (tmp_path / "notes.txt").write_text("mine")
    run(tiny(epochs=1, space=0.5, out=str(tmp_path), overwrite=True))
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "previous.pt").exists()
    assert json.loads((tmp_path / "config.json").read_text())["space"] == 0.5
    check_run_folder(tmp_path / "new", resume=False, overwrite=False)  # an empty or missing folder is fine


def test_the_command_line_gives_every_run_a_folder():
    cfg = config_from_args(["--mode", "self", "--model", "byot_resnet10"])
    assert re.fullmatch(r"runs/self-\d{8}-\d{6}", cfg.out), cfg.out
    assert config_from_args(["--out", "mine"]).out == "mine"


def test_a_finished_run_extends_with_more_epochs(tmp_path):
    """2 epochs, then --epochs 3: the old blocks (and their tail) stay; extending survives an interruption."""
    base = tmp_path / "base"
    run(tiny(space=0.75, out=str(base), trace_batches=True))
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for f in base.iterdir():
            if f.is_file():
                (tmp_path / name / f.name).write_bytes(f.read_bytes())
    extended = run(tiny(space=0.75, epochs=3, out=str(tmp_path / "a"), resume=str(tmp_path / "a"), trace_batches=True))
    assert extended.boundaries == (2,) and [b.length for b in extended.schedule.blocks] == [6, 6, 4, 6, 2]
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    trace = [json.loads(line) for line in (tmp_path / "a" / "batches.jsonl").read_text().splitlines()]
    teacher = [r["batch"] for r in trace if r["role"] == "teacher"]
    assert [r["batch"] for r in trace if r["role"] == "student"] == teacher and len(teacher) == 24

    b = tmp_path / "b"
    inside = _load(base / "last.pt")["position"]["actions"] + 5  # steps count on from the saved run
    with pytest.raises(TrainingInterrupted):
        run(tiny(space=0.75, epochs=3, out=str(b), resume=str(b)), stop_after=inside)
    again = run(tiny(space=0.75, epochs=3, out=str(b), resume=str(b)))
    assert again.boundaries == (2,)
    assert_bit_identical(weights(extended), weights(again))
    with pytest.raises(ValueError, match=r"epochs: last.pt was saved with 3, epochs= asks for 2 "
                                         r"\(a run can be extended, not shortened\)"):
        run(tiny(space=0.75, epochs=2, resume=str(b)))
