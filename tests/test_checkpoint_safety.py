"""Checkpoints and run folders that never lose the last good state and never block the corrected run: kills at any
point of a checkpoint write (also after a resume that fell back to previous.pt), a full disk, foreign or malformed
checkpoints, runs that never reached a checkpoint, a second process on the same folder, orphaned temporary files,
and the messages that name the file or setting at fault."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from test_engine import assert_bit_identical, run, tiny, weights

from spacedkd_fast.engine import Callback, Trainer, TrainingInterrupted
from spacedkd_fast.engine.checkpoint import checkpoint_problem, load_checkpoint, load_resume_state
from spacedkd_fast.engine.outputs import LOCK, RunFolderInUse, RunLock, open_run_folder
from spacedkd_fast.train import config_from_args, main

SPACE = dict(space=0.75)  # 8 iterations/epoch, blocks of 6: checkpoints at the epoch ends, mid-replay stops


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _orphans(folder):
    return sorted(p.name for p in folder.rglob(".*") if p.name != LOCK)


@pytest.fixture(scope="module")
def reference():
    """The weights of the uninterrupted run every recovery here must reproduce bit for bit."""
    return weights(run(tiny(**SPACE)))


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped at step 20: last.pt (the stop) and previous.pt (the end of epoch 1)."""
    folder = tmp_path_factory.mktemp("stopped") / "run"
    with pytest.raises(TrainingInterrupted, match="stopped by test"):
        run(tiny(out=str(folder), **SPACE), stop_after=20)
    assert {"last.pt", "previous.pt"} <= {p.name for p in folder.iterdir()}
    return folder


@pytest.fixture
def copy_of(tmp_path):
    def copy(folder):
        target = tmp_path / folder.name
        shutil.copytree(folder, target)
        return target
    return copy


def _resume(folder, lines=None, **extra):
    trainer = Trainer(tiny(out=str(folder), resume=str(folder), **SPACE, **extra),
                      log=(lines.append if lines is not None else lambda *a: None))
    trainer.fit()
    return trainer


# ---- kill -9 during a checkpoint write ---------------------------------------------------------------------------
# A child process resumes the run and kills itself (SIGKILL) inside its first checkpoint write: halfway through the
# bytes of the new file, or right after the first rename of the rotation. Only checkpoint writes are hit (best.pt
# and config.json pass), whatever the writer's internals: torch.save and os.replace are the lowest common level.
KILLER = r"""
import io, json, os, signal, sys
from pathlib import Path
import torch
from spacedkd_fast.config import TrainConfig
from spacedkd_fast.engine import Trainer

cfg, where = TrainConfig.from_dict(json.loads(sys.argv[1])), sys.argv[2]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_save, real_replace = torch.save, os.replace

def torn_save(obj, f, *args, **kwargs):
    if not (isinstance(obj, dict) and "position" in obj):  # best.pt, rank files: written as usual
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer)
    data = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    if isinstance(f, (str, os.PathLike)):
        with open(f, "wb") as out:
            out.write(data)
    else:
        f.write(data)
        f.flush()
    die()

def replace_then_die(src, dst, *args, **kwargs):
    real_replace(src, dst, *args, **kwargs)
    if Path(dst).name in ("last.pt", "previous.pt"):
        die()

if where == "mid_write":
    torch.save = torn_save
else:
    os.replace = replace_then_die
Trainer(cfg, log=print).fit()
print("NOT KILLED")
"""


def _kill_during_checkpoint(folder, where):
    cfg = tiny(out=str(folder), resume=str(folder), **SPACE).to_dict()
    child = subprocess.run([sys.executable, "-u", "-c", KILLER, json.dumps(cfg), where], capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr[-3000:]
    return child.stdout


@pytest.mark.parametrize("torn_last, where", [
    (True, "mid_write"),  # the user's double fault: resumed from previous.pt, killed while writing the next one
    (True, "after_first_rename"),
    (False, "after_first_rename"),  # an ordinary rotation, killed between its two renames
], ids=["torn_last-mid_write", "torn_last-after_rename", "valid_last-between_renames"])
def test_a_kill_during_a_checkpoint_write_never_loses_the_last_good_one(stopped, copy_of, reference, torn_last,
                                                                        where):
    folder = copy_of(stopped)
    if torn_last:
        data = (folder / "last.pt").read_bytes()
        (folder / "last.pt").write_bytes(data[: len(data) // 2])  # truncated, as by a full disk
    resumed_from = _load(folder / ("previous.pt" if torn_last else "last.pt"))["position"]["actions"]
    printed = _kill_during_checkpoint(folder, where)
    if torn_last:
        assert "resuming from previous.pt instead" in printed, printed

    state, path = load_checkpoint(folder, log=lambda *a: None)  # a valid checkpoint is there, whatever the point
    assert checkpoint_problem(state) is None
    assert state["position"]["actions"] >= resumed_from, "the checkpoint the child resumed from is not lost"
    if torn_last:  # the good previous.pt stays where it was, never overwritten by the torn last.pt
        assert _load(folder / "previous.pt")["position"]["actions"] == resumed_from

    orphaned = _orphans(folder)  # the killed write's temporary file, unless it was renamed into place already
    assert bool(orphaned) == (where == "mid_write" or not torn_last), orphaned

    lines = []
    trainer = _resume(folder, lines)
    assert_bit_identical(reference, weights(trainer))
    assert not _orphans(folder), _orphans(folder)  # cleaned up at the start, with one line
    assert sum("removed 1 unfinished write(s)" in line and ".last.pt." in line for line in lines) == bool(orphaned)


# ---- a full disk -------------------------------------------------------------------------------------------------
# The child runs the command line with RLIMIT_FSIZE below the size of best.pt and last.pt (and SIGXFSZ ignored), so
# their writes fail with EFBIG as on a full disk, while config.json and the metrics lines still fit.
FULL_DISK = r"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
from spacedkd_fast.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_warns_for_best_pt_and_stops_cleanly_at_last_pt_keeping_the_old_one(tmp_path):
    folder = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="stopped by test"):
        run(tiny(out=str(folder), **SPACE), stop_after=3)  # before any evaluation: no best.pt yet
    assert not (folder / "best.pt").exists()
    before = (folder / "last.pt").read_bytes()
    child = subprocess.run([sys.executable, "-c", FULL_DISK, "--resume", str(folder), "--no-progress"],
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 1, child.stdout + child.stderr
    assert "Traceback" not in child.stderr and "enforce fail" not in child.stderr, child.stderr
    warnings = [line for line in child.stdout.splitlines() if "warning" in line]
    assert warnings == [f"spacedkd_fast: warning: cannot write {folder}/best.pt: [Errno 27] File too large; the run "
                        f"goes on without it"], child.stdout
    errors = [line for line in child.stderr.splitlines() if line.strip()]
    assert errors == [f"error: cannot write {folder}/last.pt: [Errno 27] File too large; {folder} keeps its last "
                      f"checkpoint: continue with --resume {folder} once the disk is fixed"], child.stderr
    assert (folder / "last.pt").read_bytes() == before  # the old last.pt is intact, not moved to previous.pt
    assert not (folder / "previous.pt").exists() and not (folder / "best.pt").exists()
    assert not _orphans(folder) and not (folder / LOCK).exists()  # temporary files removed, the lock released


def test_a_failed_best_pt_or_curves_png_is_one_warning_and_the_run_goes_on(tmp_path):
    folder = tmp_path / "run"

    class Obstruct(Callback):  # after the folder was checked: directories where the two files should go
        def on_fit_start(self, trainer):
            for name in ("best.pt", "curves.png"):
                (folder / name).mkdir()
                (folder / name / "keep").write_text("x")

    lines = []
    trainer = Trainer(tiny(out=str(folder), **SPACE), callbacks=[Obstruct()], log=lines.append)
    summary = trainer.fit()
    assert summary.student_acc is not None and len(trainer.history) == 2
    warnings = [line for line in lines if "warning" in line]
    assert warnings == [
        f"spacedkd_fast: warning: cannot write {folder}/best.pt: [Errno 21] Is a directory; the run goes on without it",
        f"spacedkd_fast: warning: cannot write {folder}/curves.png: [Errno 21] Is a directory; the run goes on "
        f"without it"], lines
    assert checkpoint_problem(_load(folder / "last.pt")) is None and not _orphans(folder)


# ---- a folder that never reached a checkpoint --------------------------------------------------------------------
def test_a_run_that_never_reached_a_checkpoint_does_not_block_the_next_one(tmp_path, capsys):
    folder = tmp_path / "run"

    class Boom(Callback):
        def on_step_end(self, trainer, step):
            raise RuntimeError("an error in the first batches")

    with pytest.raises(RuntimeError, match="first batches"):
        Trainer(tiny(out=str(folder), **SPACE), callbacks=[Boom()], log=lambda *a: None).fit()
    assert {"config.json", "metrics.jsonl"} <= {p.name for p in folder.iterdir()}
    assert not (folder / "last.pt").exists() and not (folder / LOCK).exists()  # released on the exception

    with pytest.raises(FileNotFoundError, match=r"resume=.*: that run never reached its first checkpoint .*config.json"
                                                r".*: start it again without resume=, with out="):
        Trainer(tiny(out=str(folder), resume=str(folder), **SPACE), log=lambda *a: None)
    assert main(["--resume", str(folder), "--no-progress"]) == 2
    assert "start it again without --resume, with --out" in capsys.readouterr().err

    lines = []
    Trainer(tiny(out=str(folder), epochs=1, **SPACE), log=lines.append).fit()
    assert sum("ended before its first checkpoint" in line for line in lines) == 1, lines
    assert [json.loads(line)["epoch"] for line in (folder / "metrics.jsonl").read_text().splitlines()] == [1]


# ---- one process per folder --------------------------------------------------------------------------------------
HOLDER = r"""
import sys, time
from spacedkd_fast.engine.outputs import RunLock
lock = RunLock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_process_is_refused_while_a_run_holds_the_folder(stopped, copy_of, capsys):
    folder = copy_of(stopped)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        who = f"in use by pid {holder.pid} on {socket.gethostname()}"
        metrics = (folder / "metrics.jsonl").read_text()
        with pytest.raises(RunFolderInUse, match=f"resume={folder}: the run folder is {who}"):
            Trainer(tiny(out=str(folder), resume=str(folder), **SPACE), log=lambda *a: None)
        with pytest.raises(RunFolderInUse, match=f"out={folder}: the run folder is {who}"):
            Trainer(tiny(out=str(folder), overwrite=True, **SPACE), log=lambda *a: None)
        assert main(["--resume", str(folder), "--no-progress"]) == 2
        assert f"error: --resume {folder}: the run folder is {who}" in capsys.readouterr().err
        assert (folder / "metrics.jsonl").read_text() == metrics and (folder / "last.pt").exists()  # untouched
    finally:
        holder.kill()
        holder.wait()
    lines = []  # its holder died without releasing it: the lock file is left, and taken over
    trainer = Trainer(tiny(out=str(folder), resume=str(folder), **SPACE), log=lines.append)
    assert sum(f"taking over the lock left by pid {holder.pid}" in line for line in lines) == 1, lines
    assert json.loads((folder / LOCK).read_text())["pid"] == os.getpid()
    trainer.fit()
    assert not (folder / LOCK).exists()  # released at the end of fit


def test_a_newer_trainer_of_the_same_process_takes_the_folder_over(tmp_path):
    folder = tmp_path / "run"
    first = Trainer(tiny(out=str(folder), epochs=1), log=lambda *a: None)
    lines = []
    second = Trainer(tiny(out=str(folder), epochs=1), log=lines.append)  # e.g. a notebook cell run again
    assert any("taking the run folder over from an earlier Trainer" in line for line in lines), lines
    first._run_lock.release()  # the earlier one no longer holds it: its release leaves the new one's lock alone
    assert (folder / LOCK).exists()
    other = subprocess.run([sys.executable, "-c", HOLDER, str(folder)], capture_output=True, text=True, timeout=120)
    assert other.returncode == 1 and f"RunFolderInUse: out={folder}: the run folder is in use by pid {os.getpid()}" \
        in other.stderr, other.stderr  # held, by this process, against others
    second._run_lock.release()
    assert not (folder / LOCK).exists()


def test_under_ddp_rank_0_holds_the_lock_and_every_rank_gets_the_refusal(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    lock = RunLock.acquire(folder)
    try:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        started = time.time()
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
             "spacedkd_fast.train", "--subset", "256", "--batch-size", "32", "--threads", "1", "--epochs", "1",
             "--device", "cpu", "--out", str(folder), "--no-progress"],
            capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode != 0 and time.time() - started < 300
        refusal = f"error: --out {folder}: the run folder is in use by pid {os.getpid()}"
        assert result.stderr.count(refusal) == 2, result.stderr[-3000:]  # both ranks: neither waits for the other
        assert json.loads((folder / LOCK).read_text())["pid"] == os.getpid()  # no rank took it
        assert not (folder / "config.json").exists()
    finally:
        lock.release()


# ---- foreign, malformed and older checkpoints --------------------------------------------------------------------
@pytest.mark.parametrize("content, reason", [
    ({"format": 2}, r"not a resumable spacedkd_fast checkpoint \(no 'config' entry\)"),
    ([1, 2, 3], r"not a spacedkd_fast checkpoint \(it holds a list, not a dict\)"),
    (torch.zeros(3), r"not a spacedkd_fast checkpoint \(it holds a Tensor, not a dict\)"),
    ("best", r"not a resumable spacedkd_fast checkpoint \(no 'position' entry\)"),  # best.pt copied over it
    ("format 3", r"checkpoint format 3, this version reads 1, 2"),
], ids=["format-only", "list", "tensor", "best.pt", "newer-format"])
def test_a_foreign_or_malformed_last_pt_falls_back_to_previous_pt(stopped, copy_of, content, reason):
    folder = copy_of(stopped)
    if content == "best":
        shutil.copy(folder / "best.pt", folder / "last.pt")
    elif content == "format 3":
        torch.save({**_load(folder / "last.pt"), "format": 3}, folder / "last.pt")
    else:
        torch.save(content, folder / "last.pt")
    lines = []
    state, _ = load_resume_state(tiny(out=str(folder), resume=str(folder), **SPACE), log=lines.append)
    assert state["checkpoint_file"] == "previous.pt"
    assert state["position"]["actions"] == _load(folder / "previous.pt")["position"]["actions"]
    assert len(lines) == 1
    assert re.search(f"resume={re.escape(str(folder))}: last.pt: {reason}; resuming from previous.pt instead",
                     lines[0]), lines


@pytest.mark.parametrize("damage, reason", [
    (lambda s: s["position"].pop("s_block"), "no 's_block' in its position"),
    (lambda s: s["roles"]["student"].pop("optimizer"), "no 'optimizer' entry in role 'student'"),
    (lambda s: s["roles"].__setitem__("student", 7), "role 'student' is a int"),
    (lambda s: s["rank_state"].pop("window"), "no 'window' entry in its rank_state"),
    (lambda s: s["rank_state"]["roles"].pop("teacher"), "its rank_state has other roles"),
    (lambda s: s.__setitem__("history", {}), "its 'history' entry is a dict"),
    (lambda s: s["config"].__setitem__("colour", "red"), "its config does not load (unknown config fields: colour)"),
])
def test_the_structure_of_a_checkpoint_is_checked(stopped, damage, reason):
    state = _load(stopped / "last.pt")
    assert checkpoint_problem(state) is None
    damage(state)
    assert reason in checkpoint_problem(state)


def test_a_format_1_checkpoint_still_resumes(stopped, copy_of, reference):
    folder = copy_of(stopped)
    state = _load(folder / "last.pt")  # as the first format held it: one process, its state at the top
    rank_state = state.pop("rank_state")
    del state["world"], state["checkpoint_id"]
    state.update(format=1, window=rank_state["window"], rng=rank_state["rng"])
    for name, role in state["roles"].items():
        role.update(rank_state["roles"][name])
    torch.save(state, folder / "last.pt")
    lines = []
    trainer = _resume(folder, lines)
    assert any("resuming" in line and "from last.pt" in line for line in lines), lines
    assert_bit_identical(reference, weights(trainer))


# ---- orphans -----------------------------------------------------------------------------------------------------
def test_orphans_of_killed_writes_are_removed_at_the_start_even_complete_ones(stopped, copy_of):
    folder = copy_of(stopped)
    last = (folder / "last.pt").read_bytes()
    (folder / ".last.pt.k1ll3d").write_bytes(last)  # complete and valid, but never committed: not recovered
    (folder / ".best.pt.x9").write_bytes(b"torn")
    (folder / ".config.json.q2").write_text("{")
    (folder / "ranks").mkdir()
    (folder / "ranks" / ".rank1-20.pt.z").write_bytes(b"")
    (folder / ".hidden-notes").write_text("mine")  # not ours: stays
    lines = []
    lock = open_run_folder(folder, resume=True, overwrite=False, log=lines.append)
    try:
        assert lines == [f"spacedkd_fast: {folder}: removed 4 unfinished write(s) of a process that was killed "
                         f"(.best.pt.x9, .config.json.q2, .last.pt.k1ll3d, ranks/.rank1-20.pt.z); its last committed "
                         f"checkpoint is what counts"]
        assert _orphans(folder) == [".hidden-notes"] and (folder / "last.pt").read_bytes() == last
    finally:
        lock.release()


# ---- messages that name the file or the setting ------------------------------------------------------------------
def test_a_corrupt_config_json_is_named(stopped, copy_of):
    folder = copy_of(stopped)
    (folder / "config.json").write_text('{"mode": "online",')
    with pytest.raises(ValueError, match=f"--resume {folder}: {folder}/config.json is not valid JSON"):
        config_from_args(["--resume", str(folder)])
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json holds a JSON list, not the run's config"):
        config_from_args(["--resume", str(folder)])


def test_out_naming_a_file_says_so(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=f"out={afile}: is a file, not a folder"):
        Trainer(tiny(out=str(afile)), log=lambda *a: None)
    assert main(["--out", str(afile), "--subset", "256", "--batch-size", "32", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"error: --out {afile}: is a file, not a folder" in err and "Errno" not in err
    assert afile.read_text() == "not a folder"


def test_a_resume_mismatch_says_where_each_value_comes_from(stopped, copy_of, capsys):
    folder = copy_of(stopped)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "batch_size": 64}))  # rewritten since the checkpoint
    assert main(["--resume", str(folder), "--alpha", "0.9", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (f"batch_size: last.pt was saved with 32, {folder}/config.json says 64; "
            f"alpha: last.pt was saved with 0.3, --alpha asks for 0.9") in err, err
