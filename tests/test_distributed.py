"""DDP on CPU with gloo, two processes: self KD with the feature term (its adapters all-reduced), a SIGTERM to one
rank stopping both at the same step with a checkpoint, and the resumed run ending bit-identical to an
uninterrupted one (which also runs overlapped, the interrupted one sequential: the order of the collectives of the
two roles on their one communicator must not matter).

The ranks are started directly with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) so that a signal
can reach one rank alone; ``test_train_cli.py`` runs the same CLI under torchrun itself.
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


def test_sigterm_to_one_rank_stops_both_and_resume_is_bit_identical(tmp_path):
    args = ["--epochs", "3", "--space", "0.75"]
    reference = tmp_path / "reference"
    for code, _, stderr in _finish(_train(*args, "--overlap", "--out", str(reference))):
        assert code == 0, stderr[-3000:]

    run = tmp_path / "run"
    procs = _train(*args, "--no-overlap", "--out", str(run))
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or not metrics.read_text().strip()):
        time.sleep(0.05)  # the first epoch is done; interrupt inside the second
    procs[1].send_signal(signal.SIGTERM)  # rank 1 only: rank 0 must learn it from the agreement
    results = _finish(procs)
    stops = []
    for code, _, stderr in results:
        assert code == 130, stderr[-3000:]
        line = next(line for line in stderr.splitlines() if "stopped by" in line)
        stops.append(line.split("at teacher iteration")[1].split(";")[0].strip())
    assert stops[0] == stops[1], stops  # the same agreed point on both ranks
    assert "SIGTERM" in results[1][2] and "another rank" in results[0][2]
    student, teacher, state = _student_teacher(run)
    assert state["world"] == 2 and 0 < state["position"]["t_iter"] < 48
    assert state["position"]["t_iter"] == int(stops[0])
    rank_files = {p.name for p in (run / "ranks").glob("rank1-*.pt")}
    previous_id = torch.load(run / "previous.pt", weights_only=True)["checkpoint_id"]
    assert rank_files == {f"rank1-{i}.pt" for i in (state["checkpoint_id"], previous_id)}  # older ones removed
    rank1 = torch.load(run / "ranks" / f"rank1-{state['checkpoint_id']}.pt", weights_only=True)
    assert rank1["rank"] == 1 and rank1["checkpoint_id"] == state["checkpoint_id"]
    # Rank 1's window holds its own shard of the batches, not rank 0's.
    own, other = rank1["window"]["entries"], state["rank_state"]["window"]["entries"]
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
