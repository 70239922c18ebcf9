"""DDP on CPU with gloo, two processes: self KD with the feature term (its adapters all-reduced), a SIGTERM to one
rank under torchrun stopping both at the same step with a checkpoint and exit code 0, and the resumed run ending
bit-identical to an uninterrupted one (which also runs overlapped, the interrupted one sequential: the order of the
collectives of the two roles on their one communicator must not matter). Liveness: a rank whose peer stops
answering (SIGSTOP) gives up after ``--dist-timeout`` with one line and exit code 75, or a few seconds after a
SIGTERM; the checkpoint stays usable.

Most ranks are started directly with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...), so that a signal
can reach one rank alone and each rank's output is its own; the SIGTERM test runs under torchrun itself and finds
its workers through /proc.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

pytestmark = pytest.mark.slow

RUN = ["--subset", "512", "--batch-size", "32", "--eval-batch-size", "128", "--threads", "1", "--device", "cpu",
       "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, world: int, port: int) -> dict:
    return dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")


def _start(argv: list[str], world: int = 2, cwd=None) -> list[subprocess.Popen]:
    port = _free_port()
    return [subprocess.Popen(argv, env=_rank_env(r, world, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=cwd) for r in range(world)]


def _finish(procs, timeout=600) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append((p.returncode, stdout, stderr))
    return out


def _rank_results(script: str, folder, world: int = 2) -> list[dict]:
    """Run ``script`` on ``world`` ranks; it builds a ``trainer`` and a ``result`` dict, which each rank saves.
    Returns the ranks' results in rank order (every rank must exit 0)."""
    script += textwrap.dedent(f"""
        torch.save(result, r"{folder}/rank" + str(trainer.dist.rank) + ".pt")
        from spacedkd_fast.engine.distributed import shutdown
        shutdown(trainer.dist)
    """)
    for code, _, stderr in _finish(_start([sys.executable, "-c", script], world=world)):
        assert code == 0, stderr[-3000:]
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _train(*args) -> list[subprocess.Popen]:
    return _start([sys.executable, "-m", "spacedkd_fast.train", *RUN, *args])


def test_self_kd_with_feature_term_trains_with_synchronized_adapters(tmp_path):
    """`--mode self --beta` under DDP crashed (the adapters lived outside DDP); their gradients must be
    all-reduced, so both ranks end with the same adapters although each saw its own shard."""
    script = textwrap.dedent("""
        import sys, torch
        from spacedkd_fast.config import TrainConfig
        from spacedkd_fast.engine import Trainer
        cfg = TrainConfig(mode="self", model="byot_resnet10", space=0.5, beta=0.03, epochs=1, subset=256,
                          batch_size=32, eval_batch_size=128, threads=1, device="cpu", progress=False)
        trainer = Trainer(cfg, log=lambda *a: None)
        summary = trainer.fit()
        params = lambda m: {n: p.detach() for n, p in m.named_parameters()}  # BN buffers are rank-local
        result = {"net": params(trainer.student.net), "head": params(trainer.student.head),
                  "acc": summary.student_acc}
    """)
    ranks = _rank_results(script, tmp_path)
    assert ranks[0]["head"].keys() and ranks[0]["head"].keys() == ranks[1]["head"].keys()
    for part in ("net", "head"):
        for k in ranks[0][part]:
            assert torch.equal(ranks[0][part][k], ranks[1][part][k]), f"{part}.{k} differs between ranks"
    assert 0 <= ranks[0]["acc"] <= 1


def _student_teacher(folder):
    state = torch.load(folder / "last.pt", weights_only=True)
    return state["roles"]["student"]["model"], state["roles"]["teacher"]["model"], state


def _torchrun(*args) -> subprocess.Popen:
    """The CLI under real torchrun (its own process group, so the test can end it as a whole if it hangs)."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "spacedkd_fast.train", *RUN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)


def _worker(launcher: subprocess.Popen, rank: int, timeout: float = 120) -> int:
    """The pid of torchrun's worker of ``rank`` (a child of the launcher whose environment says RANK=rank)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid != launcher.pid:
                    continue
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if f"RANK={rank}".encode() in f.read().split(b"\0"):
                        return int(entry)
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile, or not ours to read
        time.sleep(0.1)
    raise AssertionError(f"no torchrun worker of rank {rank} under pid {launcher.pid}")


def _wait_for_first_epoch(folder, procs, timeout=300) -> None:
    """Until the first epoch record and the first checkpoint are written (the record comes first: a signal
    between the two finds no checkpoint yet)."""
    metrics = folder / "metrics.jsonl"
    deadline = time.time() + timeout
    while not metrics.exists() or not metrics.read_text().strip() or not (folder / "last.pt").exists():
        assert time.time() < deadline, "no epoch record in time"
        assert all(p.poll() is None for p in procs), "a process ended before its first epoch"
        time.sleep(0.05)


def _status(folder) -> dict:
    return json.loads((folder / "status.json").read_text())


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc")
def test_sigterm_to_one_rank_under_torchrun_stops_both_cleanly_and_resume_is_bit_identical(tmp_path):
    """A SIGTERM to one rank of a real torchrun: both ranks stop at the same agreed step with last.pt, exit 0, and
    torchrun exits 0 without a ChildFailedError; the resumed run ends bit-identical to an uninterrupted one."""
    args = ["--epochs", "3", "--space", "0.75"]
    reference = tmp_path / "reference"
    for code, _, stderr in _finish(_train(*args, "--overlap", "--out", str(reference))):
        assert code == 0, stderr[-3000:]
    assert _status(reference)["state"] == "finished"

    run = tmp_path / "run"
    launcher = _torchrun(*args, "--no-overlap", "--out", str(run))
    try:
        rank1 = _worker(launcher, 1)
        _wait_for_first_epoch(run, [launcher])  # the first epoch is done; interrupt inside the second
        os.kill(rank1, signal.SIGTERM)  # rank 1 only: rank 0 must learn it from the agreement
        stdout, stderr = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
    output = stdout + stderr
    assert launcher.returncode == 0, output[-3000:]
    assert "ChildFailedError" not in output and "Traceback" not in output, output[-3000:]
    stops = [line for line in stderr.splitlines() if "stopped by" in line]
    assert len(stops) == 2, stderr[-3000:]  # one line per rank, nothing else about it
    assert any("stopped by SIGTERM" in line for line in stops), stops
    assert any("stopped by a signal to another rank" in line for line in stops), stops
    points = {line.split("at teacher iteration")[1].split(";")[0].strip() for line in stops}
    assert len(points) == 1, stops  # the same agreed point on both ranks
    assert all("--resume" in line and "last.pt written" in line for line in stops), stops
    status = _status(run)
    assert status["state"] == "stopped" and status["exit_code"] == 0 and "--resume" in status["resume"]

    student, teacher, state = _student_teacher(run)
    assert state["world"] == 2 and 0 < state["position"]["t_iter"] < 48
    assert state["position"]["t_iter"] == int(points.pop())
    rank_files = {p.name for p in (run / "ranks").glob("rank1-*.pt")}
    previous_id = torch.load(run / "previous.pt", weights_only=True)["checkpoint_id"]
    assert rank_files == {f"rank1-{i}.pt" for i in (state["checkpoint_id"], previous_id)}  # older ones removed
    rank1_state = torch.load(run / "ranks" / f"rank1-{state['checkpoint_id']}.pt", weights_only=True)
    assert rank1_state["rank"] == 1 and rank1_state["checkpoint_id"] == state["checkpoint_id"]
    # Rank 1's window holds its own shard of the batches, not rank 0's.
    own, other = rank1_state["window"]["entries"], state["rank_state"]["window"]["entries"]
    assert own and [e[0] for e in own] == [e[0] for e in other]
    assert not torch.equal(own[0][1][0], other[0][1][0])  # (iteration, [images, labels], plan)

    single = subprocess.run([sys.executable, "-m", "spacedkd_fast.train", "--resume", str(run), "--no-progress",
                             "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert single.returncode == 2 and "saved by 2 process(es)" in single.stderr  # a 1-process resume is refused

    for code, _, stderr in _finish(_train("--resume", str(run), "--overlap")):
        assert code == 0, stderr[-3000:]
    ref_student, ref_teacher, _ = _student_teacher(reference)
    got_student, got_teacher, _ = _student_teacher(run)
    for ref, got in ((ref_student, got_student), (ref_teacher, got_teacher)):
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    assert _status(run)["state"] == "finished"


def test_sigkill_of_both_ranks_resumes_with_the_uninterrupted_logs(tmp_path):
    """Two gloo ranks killed with SIGKILL (no handler runs) some steps after a checkpoint, then resumed: weights
    and every log file rank 0 writes equal an uninterrupted 2-rank run's (the records written after the checkpoint
    are cut away, not duplicated)."""
    from test_resume_logs import _records, _rows

    args = ["--epochs", "3", "--space", "0.75", "--trace-batches", "--log-every", "3"]
    reference = tmp_path / "reference"
    for code, _, stderr in _finish(_train(*args, "--out", str(reference))):
        assert code == 0, stderr[-3000:]
    total = len((reference / "batches.jsonl").read_text().splitlines())

    run = tmp_path / "run"
    procs = _train(*args, "--out", str(run))
    try:
        deadline = time.monotonic() + 300
        trace = run / "batches.jsonl"
        while time.monotonic() < deadline:  # the second epoch's checkpoint, then a few steps more
            if (run / "previous.pt").exists() and trace.exists() and len(trace.read_text().splitlines()) >= 70:
                break
            assert all(p.poll() is None for p in procs), "a rank ended before the kill"
            time.sleep(0.02)
        for p in procs:
            p.send_signal(signal.SIGKILL)
    finally:
        for p in procs:
            p.communicate(timeout=60)
    assert all(p.returncode == -signal.SIGKILL for p in procs)
    assert len(trace.read_text().splitlines()) < total, "the run finished before the kill"
    saved = torch.load(run / "last.pt", weights_only=True)["logs"]
    assert trace.stat().st_size > saved["batches.jsonl"], "no record after the checkpoint: the test shows nothing"

    for code, _, stderr in _finish(_train("--resume", str(run))):
        assert code == 0, stderr[-3000:]
    assert trace.read_text() == (reference / "batches.jsonl").read_text(), "batches.jsonl"
    assert _records(run / "metrics.jsonl") == _records(reference / "metrics.jsonl"), "metrics.jsonl"
    for name in ("epochs.csv", "steps.csv"):
        assert _rows(run / name) == _rows(reference / name), name
    for ref, got in zip(_student_teacher(reference)[:2], _student_teacher(run)[:2]):
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


# ---- liveness: a peer that stops answering ------------------------------------------------------------------------
LIVENESS = ["--subset", "256", "--epochs", "30", "--space", "0.5"]  # far more epochs than the test lets it run


def _stop_a_peer(tmp_path, stopped: int, timeout: float, sigterm_after: float | None = None, within: float = 90):
    """Two ranks; after their first epoch (so last.pt exists) rank ``stopped`` gets SIGSTOP. With
    ``sigterm_after``, the other rank gets a SIGTERM that many seconds later. Returns the other rank's exit code,
    its stderr, the seconds from the SIGSTOP to its exit, and the stopped rank's (code, stderr) once it is sent
    SIGCONT (it finds its peer gone). A survivor still running ``within`` seconds after the SIGSTOP fails the
    test."""
    run = tmp_path / "run"
    procs = _train(*LIVENESS, "--out", str(run), "--dist-timeout", str(timeout))
    survivor = procs[1 - stopped]
    try:
        _wait_for_first_epoch(run, procs)
        procs[stopped].send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        if sigterm_after is not None:
            time.sleep(sigterm_after)
            assert survivor.poll() is None, "the survivor ended before the SIGTERM"
            survivor.send_signal(signal.SIGTERM)
        try:
            _, stderr = survivor.communicate(timeout=within)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the survivor still runs {within:.0f} s after its peer stopped") from None
        waited = time.monotonic() - stopped_at
        procs[stopped].send_signal(signal.SIGCONT)
        try:
            _, peer_stderr = procs[stopped].communicate(timeout=120)
        except subprocess.TimeoutExpired:
            raise AssertionError("the resumed peer did not notice that its partner is gone") from None
        return survivor.returncode, stderr, waited, (procs[stopped].returncode, peer_stderr), run
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


def _assert_one_line_peer_lost(stderr: str, rank: int, run) -> str:
    lines = [line for line in stderr.splitlines() if "a peer stopped answering" in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    line = lines[0]
    assert line.startswith(f"spacedkd_fast: rank {rank} of 2: a peer stopped answering during "), line
    assert "exits with code 75" in line and f"--nproc_per_node=2 -m spacedkd_fast.train --resume {run}" in line
    return line


def _assert_checkpoint_intact(run) -> None:
    """last.pt loads, and the rank file it names is there: a resume has all it needs."""
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["world"] == 2 and state["position"]["t_iter"] > 0
    rank1 = torch.load(run / "ranks" / f"rank1-{state['checkpoint_id']}.pt", weights_only=True)
    assert rank1["checkpoint_id"] == state["checkpoint_id"]


def test_a_stopped_peer_ends_the_other_rank_at_the_dist_timeout_with_one_line(tmp_path):
    """SIGSTOP to rank 0 (which also hosts the rendezvous store): rank 1 gives up after --dist-timeout, not
    torch's 30 minutes, with one line and exit code 75, and the checkpoint stays usable."""
    timeout = 20.0
    code, stderr, waited, (peer_code, peer_stderr), run = _stop_a_peer(tmp_path, stopped=0, timeout=timeout,
                                                                       within=timeout + 90)
    assert code == 75, stderr[-3000:]
    line = _assert_one_line_peer_lost(stderr, 1, run)
    assert f"no answer within {timeout:g} s (--dist-timeout" in line, line
    assert timeout - 3 < waited < timeout + 60, waited  # the timeout ended it: not earlier, not much later
    assert peer_code == 75, peer_stderr[-3000:]  # woken up, rank 0 finds rank 1 gone and says so too
    _assert_one_line_peer_lost(peer_stderr, 0, run)
    _assert_checkpoint_intact(run)
    assert _status(run)["state"] == "peer-lost" and _status(run)["exit_code"] == 75


def test_sigterm_ends_a_rank_blocked_on_a_stopped_peer_within_seconds(tmp_path):
    """The rank's main thread waits inside a C++ collective, where Python never runs its signal handler: the
    watchdog thread must end it a grace period after the SIGTERM, long before the (here 10-minute) timeout."""
    from spacedkd_fast.engine.stopping import STOP_GRACE_S

    code, stderr, waited, (peer_code, _), run = _stop_a_peer(tmp_path, stopped=1, timeout=600, sigterm_after=2)
    assert code == 75, stderr[-3000:]
    line = _assert_one_line_peer_lost(stderr, 0, run)
    assert "SIGTERM arrived while this rank had waited" in line and "no checkpoint is written" in line, line
    assert waited < 2 + STOP_GRACE_S + 45, waited  # seconds after the signal, not the timeout
    assert peer_code == 75
    _assert_checkpoint_intact(run)


def test_sigterm_ends_a_wait_in_the_control_group_for_a_busy_peer(tmp_path):
    """The other kind of wait: one of the engine's own collectives (here a barrier), the peer alive but never coming
    (its main thread busy elsewhere). The watchdog names the wait and ends the rank after its grace period."""
    script = textwrap.dedent(f"""
        import pathlib, time
        from spacedkd_fast.engine.distributed import barrier, init_distributed
        from spacedkd_fast.engine.stopping import install_stop_signals
        info = init_distributed("cpu", timeout=600)
        install_stop_signals(lambda reason: None, info, folder=None, grace=2.0)
        pathlib.Path(r"{tmp_path}/ready" + str(info.rank)).touch()
        if info.rank == 1:
            time.sleep(300)  # alive, answering nothing
        barrier(info)
    """)
    procs = _start([sys.executable, "-c", script])
    try:
        deadline = time.time() + 120
        while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
            assert time.time() < deadline and all(p.poll() is None for p in procs), "the ranks did not start"
            time.sleep(0.05)
        time.sleep(1.0)  # rank 0 is in its barrier
        procs[0].send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, stderr = procs[0].communicate(timeout=60)
        waited = time.monotonic() - sent
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert procs[0].returncode == 75, stderr[-3000:]
    assert "rank 0 of 2: a peer stopped answering during a barrier: SIGTERM arrived" in stderr, stderr[-3000:]
    assert "nothing to resume from" in stderr and "Traceback" not in stderr
    assert waited < 30, waited


def test_dist_timeout_is_validated_and_named_as_the_caller_knows_it():
    from spacedkd_fast.config import TrainConfig, cli_names

    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"^dist_timeout= must be a finite number of seconds > 0"):
            TrainConfig(dist_timeout=bad)
        with cli_names(), pytest.raises(ValueError, match=r"^--dist-timeout must be a finite number of seconds > 0"):
            TrainConfig(dist_timeout=bad)
    assert TrainConfig().dist_timeout == 300.0 and TrainConfig(dist_timeout=0.5).dist_timeout == 0.5
    result = subprocess.run([sys.executable, "-m", "spacedkd_fast.train", "--dist-timeout", "0", "--no-progress"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--dist-timeout must be a finite number of seconds > 0, got 0.0" in result.stderr


def test_peer_failures_are_told_apart_from_other_errors():
    from spacedkd_fast.engine.distributed import DistInfo, PeerLost, peer_lost

    two = DistInfo(rank=1, world=2, timeout=20.0)
    timed_out = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms for recv "
                             "operation to complete")
    lost = peer_lost(timed_out, two)
    assert isinstance(lost, PeerLost) and lost.timed_out and lost.rank == 1
    assert "no answer within 20 s" in lost.line(None) and "nothing to resume from" in lost.line(None)
    closed = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234. This is "
                          "typically caused by a remote worker crashing.")
    assert peer_lost(closed, two).detail == "Connection closed by peer [127.0.0.1]:1234"
    # gloo, in the next collective on a pair a timeout closed (DDP's buffer broadcast, when the timed-out wait was
    # the previous one): a timeout too (seen in CI, the machine loaded)
    closed_by_timeout = RuntimeError("Application timeout caused pair closure")
    assert peer_lost(closed_by_timeout, two).timed_out
    assert "no answer within 20 s" in peer_lost(closed_by_timeout, two).line(None)
    assert peer_lost(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), two) is None  # a bug keeps its trace
    assert peer_lost(timed_out, DistInfo()) is None  # one process has no peers


def test_stop_signals_restore_what_was_there():
    """Installed in one process: SIGTERM becomes a stop request; afterwards the previous handlers are back."""
    from spacedkd_fast.engine.stopping import install_stop_signals

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    requests = []
    stop = install_stop_signals(requests.append)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 10
        while not requests and time.time() < deadline:
            time.sleep(0.01)  # the handler runs between two bytecodes of this thread
    finally:
        stop.restore()
    assert requests == ["SIGTERM"] and stop.requested == "SIGTERM"
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_ranks_write_to_rank_0s_output_folder(tmp_path):
    """The default --out carries each rank's own clock; whatever the ranks were given, rank 0's folder wins."""
    script = textwrap.dedent(f"""
        import os
        from spacedkd_fast.config import TrainConfig
        from spacedkd_fast.engine import Trainer
        from spacedkd_fast.engine.distributed import shutdown
        out = r"{tmp_path}/given-by-rank" + os.environ["RANK"]
        cfg = TrainConfig(epochs=1, subset=128, batch_size=32, eval_batch_size=128, space=0.5, threads=1,
                          device="cpu", progress=False, out=out)
        trainer = Trainer(cfg, log=lambda *a: None)
        trainer.fit()
        print("FOLDER", trainer.run_folder)
        shutdown(trainer.dist)
    """)
    results = _finish(_start([sys.executable, "-c", script]))
    for code, _, stderr in results:
        assert code == 0, stderr[-3000:]
    assert {line for _, out, _ in results for line in out.splitlines()} == {f"FOLDER {tmp_path}/given-by-rank0"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["given-by-rank0"]
    assert [p.name for p in (tmp_path / "given-by-rank0" / "ranks").iterdir()][0].startswith("rank1-")


def test_user_modules_and_dataset_train_under_ddp_with_sharded_batches(tmp_path):
    """The engine with a user Dataset and modules under DDP: each rank replays its own shard (different batch
    hashes), the weights stay identical across ranks, the evaluation counts cover the whole eval set once."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from test_engine_api import user_run
        trainer = user_run(r"{tmp_path}/run", threads=1, trace_batches=False)
        digests = []
        trainer.outputs.trace = True
        trainer.outputs.batch = lambda role, step, digest, *a: digests.append((role, digest))
        summary = trainer.fit()
        counts, _ = trainer._measure(trainer.student)
        params = {{n: p.detach() for n, p in trainer.student.net.named_parameters()}}
        result = {{"net": params, "digests": digests, "counts": counts, "acc": summary.student_acc}}
    """)
    ranks = _rank_results(script, tmp_path)
    for k in ranks[0]["net"]:
        assert torch.equal(ranks[0]["net"][k], ranks[1]["net"][k]), f"{k} differs between ranks"
    for r in ranks:
        teacher = [d for role, d in r["digests"] if role == "teacher"]
        student = [d for role, d in r["digests"] if role == "student"]
        assert len(teacher) == 16 and student == teacher  # each rank replays exactly its own shard
    assert set(ranks[0]["digests"]).isdisjoint(ranks[1]["digests"])
    assert ranks[0]["counts"].tolist() == ranks[1]["counts"].tolist() and ranks[0]["counts"][-1] == 64
