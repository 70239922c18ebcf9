"""The engine's own cost on a user's data, CPU:

* ``test_sample_seeding``: µs per sample that the engine's sampler adds to ``dataset[i]`` (saving, comparing and
  restoring the main process's streams once a batch; for a dataset that draws from them, the sample seeds'
  derivation and seeding torch / ``random`` / numpy before each sample), against unseeded ``dataset[i]`` of the
  same samples and against the three seed calls alone (the floor of seeding all three: ``random.seed`` is most
  of it), the three back to back in every round; for a dataset without random transforms and for one drawing
  from all three streams;
* ``test_engine_overhead``: ``Trainer.fit`` of two small MLPs at s = 0 (online KD) on an in-memory ``Dataset``
  against a hand-written loop doing the same steps (teacher CE step, student ``KDLoss`` step on the teacher's
  pre-update logits, the same optimizers, batches and evaluations: the weights come out bit-identical, which the
  benchmark checks), run as pairs (engine, loop, engine, loop, ...) so that both see the same machine load; the
  ratio is the median of the pairs' ratios.

    pytest bench/bench_engine.py --bench-out /tmp/bench_engine.json

One thread (``torch.set_num_threads(1)``) for both sides: on a shared machine a second thread mostly adds noise.
The comparisons are in thread CPU time (``time.thread_time``), which other processes' load disturbs far less than
wall time (on a 2-core machine shared with other jobs, wall-time pairs ranged 1.1-4x); the engine's ratio is also
given in wall time. Nothing here runs on another thread (no prefetch on a CPU, no pinning).
"""

from __future__ import annotations

import copy
import gc
import random
import statistics
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, default_collate

from spacedkd_fast import KDLoss
from spacedkd_fast.data.pipeline import derive_seed, derive_seeds
from spacedkd_fast.engine import Callback, Trainer
from spacedkd_fast.engine.feeds import ALWAYS_SEEDED, NUMPY_SEED_BITS, STREAMS, LoaderFeed

SEED = 0  # TrainConfig's default run seed: the engine's order below is derive_seed(SEED, "order", epoch)
FEATURES, CLASSES = 1024, 10


class InMemory(Dataset):
    """A user's in-memory data: ``(features, label)`` rows of two tensors, no transform."""

    def __init__(self, n: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        means = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(1234))
        self.y = torch.randint(0, CLASSES, (n,), generator=gen)
        self.x = means[self.y] + 0.5 * torch.randn(n, FEATURES, generator=gen)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- per-sample seeding ------------------------------------------------------------------------------------------
BATCHES_PER_ROUND = 16


class Augmenting(InMemory):
    """``InMemory`` with a transform drawing from all three global streams (torch, ``random``, numpy): a random
    sign flip, scale and shift of the features; the engine seeds all three before every sample."""

    def __getitem__(self, i):
        x = self.x[i] * (1.0 if torch.rand(()) < 0.5 else -1.0)
        return x * random.uniform(0.9, 1.1) + float(np.random.uniform(-0.1, 0.1)), self.y[i]


@pytest.mark.parametrize("draws", ["no draws", "torch+random+numpy"])
@pytest.mark.parametrize("batch", [16, 64])
def test_sample_seeding(measure, one_thread, batch, draws):
    data = (InMemory if draws == "no draws" else Augmenting)(BATCHES_PER_ROUND * batch)
    feed = LoaderFeed(data, batch_size=batch, eval_batch_size=batch, seed=SEED, device=torch.device("cpu"))
    feed._samples.__getitems__(feed._keys(0))  # the engine learns which streams the dataset draws from
    expected = ALWAYS_SEEDED if draws == "no draws" else frozenset(STREAMS)
    assert feed._samples.drawn == expected, f"the engine saw {set(feed._samples.drawn)} drawn, not {set(expected)}"
    samples = BATCHES_PER_ROUND * batch
    order = feed._order(0).tolist()
    keys = [feed._keys(i) for i in range(BATCHES_PER_ROUND)]
    seeds = [seed for k in keys for seed in derive_seeds(*k.seed_prefix, count=len(k.indices))]

    def unseeded():
        for i in range(BATCHES_PER_ROUND):
            [data[j] for j in order[i * batch:(i + 1) * batch]]

    def engine():  # what a fetch does before the collate: the keys (order slice, seeds), then the seeded reads
        for i in range(BATCHES_PER_ROUND):
            feed._samples.__getitems__(feed._keys(i))

    def seed_calls():  # seeding all three streams, nothing else: the floor of seeding them
        seed_torch, seed_random, seed_numpy = torch.default_generator.manual_seed, random.seed, np.random.seed
        for s in seeds:
            seed_torch(s)
            seed_random(s)
            seed_numpy(s & NUMPY_SEED_BITS)

    variants = dict(unseeded=unseeded, seed_calls=seed_calls, engine=engine)
    times: dict[str, list[float]] = {name: [] for name in variants}

    def interleaved():  # the three back to back in each round: they see the same machine load
        for name, fn in variants.items():
            start = time.thread_time()
            fn()
            times[name].append(time.thread_time() - start)

    def summary() -> dict:
        us = {name: statistics.median(t) / samples * 1e6 for name, t in times.items()}
        return dict(clock="thread CPU time", dataset_item_us_per_sample=us["unseeded"],
                    engine_sampler_us_per_sample=us["engine"], seeding_us_per_sample=us["engine"] - us["unseeded"],
                    seed_calls_us_per_sample=us["seed_calls"], streams_seeded=sorted(feed._samples.drawn))

    record = measure(interleaved, group=f"user data: per-sample seeding, batch {batch}, {draws} (cpu)",
                     provider="dataset[i], seed calls, engine sampler", after=summary,
                     info=dict(samples_per_round=samples, batch=batch, threads=1, draws=draws))
    print(f"\nbatch {batch}, {draws}: seeding adds {record['seeding_us_per_sample']:.2f} us/sample to dataset[i] "
          f"({record['dataset_item_us_per_sample']:.2f} us); seeding all three streams alone "
          f"{record['seed_calls_us_per_sample']:.2f} us")


# ---- Trainer.fit against a hand-written loop ---------------------------------------------------------------------
TRAIN, EVAL, BATCH, EPOCHS, PAIRS = 4096, 512, 64, 2, 11


def mlp(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # no dropout: the loop's weights must come out bit-identical to the engine's
    return nn.Sequential(nn.Linear(FEATURES, width), nn.ReLU(), nn.Linear(width, CLASSES))


def teacher_optimizer(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def student_optimizer(params):
    return torch.optim.AdamW(params, lr=2e-3)


class CountEvaluations(Callback):
    def __init__(self) -> None:
        self.count = 0

    def on_evaluate(self, trainer, record):
        self.count += 1


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(data), EVAL):  # one batch of eval_batch_size, as the engine's
        x, y = default_collate([data[i] for i in range(start, min(start + EVAL, len(data)))])
        correct += (model(x).argmax(-1) == y).sum()
    model.train()
    return correct.item() / len(data)


def hand_written_loop(teacher, student, train, test, kd) -> tuple[nn.Module, nn.Module]:
    """Online KD at s = 0 the way one writes it by hand, on the engine's batches (its seeded epoch order)."""
    t_opt, s_opt = teacher_optimizer(teacher.parameters()), student_optimizer(student.parameters())
    for epoch in range(EPOCHS):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(derive_seed(SEED, "order", epoch)))
        order = order.tolist()
        for start in range(0, len(train), BATCH):
            x, y = default_collate([train[i] for i in order[start:start + BATCH]])
            t_logits = teacher(x)
            loss = F.cross_entropy(t_logits, y)
            t_opt.zero_grad(set_to_none=True)
            loss.backward()
            t_opt.step()
            s_loss = kd(student(x), t_logits.detach(), y)  # the teacher's pre-update logits
            s_opt.zero_grad(set_to_none=True)
            s_loss.backward()
            s_opt.step()
        accuracy(teacher, test)
        accuracy(student, test)
    return teacher, student


def test_engine_overhead(measure, one_thread):
    train, test = InMemory(TRAIN), InMemory(EVAL, seed=1)
    nets = dict(teacher=mlp(64, 1), student=mlp(32, 2))
    pairs: list[tuple[float, float, float, float]] = []  # engine wall, engine CPU, loop wall, loop CPU
    evaluations: list[int] = []
    checked = []

    def make():
        counter = CountEvaluations()
        trainer = Trainer(teacher=copy.deepcopy(nets["teacher"]), student=copy.deepcopy(nets["student"]),
                          train_data=train, eval_data=test, teacher_optimizer=teacher_optimizer,
                          student_optimizer=student_optimizer, loss=KDLoss(temperature=4.0, alpha=0.9),
                          callbacks=[counter], mode="online", space=0.0, epochs=EPOCHS, batch_size=BATCH,
                          eval_batch_size=EVAL, seed=SEED, out=None, progress=False, device="cpu",
                          log=lambda *a: None)
        loop_parts = (copy.deepcopy(nets["teacher"]), copy.deepcopy(nets["student"]), train, test,
                      KDLoss(temperature=4.0, alpha=0.9))
        return trainer, counter, loop_parts

    def pair(trainer, counter, loop_parts):
        gc.collect()  # a full collection falling into one side (up to 0.2 s here) would decide the pair
        wall, cpu = time.perf_counter(), time.thread_time()
        trainer.fit()
        engine = time.perf_counter() - wall, time.thread_time() - cpu
        gc.collect()
        wall, cpu = time.perf_counter(), time.thread_time()
        teacher, student = hand_written_loop(*loop_parts)
        pairs.append((*engine, time.perf_counter() - wall, time.thread_time() - cpu))
        evaluations.append(counter.count)
        if not checked:  # once: the loop does the engine's steps, or the ratio compares different work
            for name, net in (("teacher", teacher), ("student", student)):
                a, b = getattr(trainer, name).net.inner.state_dict(), net.state_dict()  # (inner: the given module)
                differ = [k for k in b if not torch.equal(a[k], b[k])]
                assert not differ, f"the hand-written loop's {name} differs from the engine's: {differ}"
            checked.append(True)

    def summary() -> dict:
        timed = pairs[-PAIRS:]  # the warm-up pair is not one of them
        wall = [e / lp for e, _, lp, _ in timed]
        cpu = [e / lp for _, e, _, lp in timed]
        return dict(engine_s=statistics.median(p[0] for p in timed), loop_s=statistics.median(p[2] for p in timed),
                    engine_cpu_s=statistics.median(p[1] for p in timed),
                    loop_cpu_s=statistics.median(p[3] for p in timed),
                    ratio_engine_vs_loop=statistics.median(wall), ratio_min=min(wall), ratio_max=max(wall),
                    cpu_ratio_engine_vs_loop=statistics.median(cpu), cpu_ratio_min=min(cpu), cpu_ratio_max=max(cpu),
                    # the fastest of each side: what the machine's slow spells (which hit pairs unevenly) leave out
                    cpu_ratio_of_fastest=min(p[1] for p in timed) / min(p[3] for p in timed),
                    pairs_wall_cpu_s=timed, evaluations=evaluations[-1], threads=1)

    record = measure(pair, setup=make, rounds=PAIRS, warmup=1,
                     group=f"engine overhead: online KD s=0, MLPs 64/32, {TRAIN} samples b{BATCH} x{EPOCHS} (cpu)",
                     provider="Trainer.fit then hand-written loop", after=summary,
                     info=dict(pairs=PAIRS, samples_read_per_fit=TRAIN * EPOCHS,
                               steps_per_fit=2 * (TRAIN // BATCH) * EPOCHS))
    assert record["evaluations"] == 2 * EPOCHS, (f"the engine evaluated {record['evaluations']} times, the loop "
                                                 f"{2 * EPOCHS}: the ratio would compare different work")
    print(f"\nengine {record['engine_s'] * 1e3:.1f} ms, hand-written loop {record['loop_s'] * 1e3:.1f} ms: "
          f"{record['ratio_engine_vs_loop']:.3f}x wall (pairs {record['ratio_min']:.3f}-{record['ratio_max']:.3f}x), "
          f"{record['cpu_ratio_engine_vs_loop']:.3f}x CPU time (pairs {record['cpu_ratio_min']:.3f}-"
          f"{record['cpu_ratio_max']:.3f}x); fastest engine / fastest loop {record['cpu_ratio_of_fastest']:.3f}x")
