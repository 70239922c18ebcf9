"""Per-sample seeding of the user's data: a ``Dataset`` whose ``__getitem__`` augments with numpy's global RNG,
Python's ``random`` or torch's global generator replays, resumes and regenerates ("fetched again") exactly, with
or without worker processes; a sample is ``dataset[i]`` under the documented seed; and reading batches leaves the
main process's random streams as they were."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from spacedkd_fast.data import pipeline
from spacedkd_fast.data.pipeline import derive_seed, derive_seeds
from spacedkd_fast.engine import Callback, Trainer, TrainingInterrupted, feeds
from spacedkd_fast.engine.feeds import LoaderFeed

QUIET = dict(progress=False, device="cpu")
FETCHED_AGAIN = dict(window_budget=0.0, host_budget=0.0)  # no kept batch fits: every replay fetches it again


class Augmented(Dataset):
    """Fixed class means plus noise (NoisyBlobs' data, no dataset package needed), augmented in ``__getitem__`` from
    one global RNG, the way albumentations-style (numpy), hand-written (``random``) or torchvision (torch) transforms
    do, or from a numpy Generator seeded from ``torch.initial_seed()``: a random scale, a random shift of the
    features and a noise vector. A single Gaussian draw per sample leaves
    numpy's and ``random``'s cached second Gaussian behind, so a seeding that does not clear those caches shows."""

    def __init__(self, n: int, rng: str, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        means = torch.randn(10, 1024, generator=torch.Generator().manual_seed(1234))
        self.y = torch.randint(0, 10, (n,), generator=gen)
        self.x = means[self.y] + 0.5 * torch.randn(n, 1024, generator=gen)
        self.rng = rng

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        if self.rng == "numpy":
            scale, shift = 1 + 0.1 * np.random.standard_normal(), int(np.random.randint(0, 8))
            noise = torch.from_numpy(np.random.uniform(-0.05, 0.05, 1024).astype(np.float32))
        elif self.rng == "random":
            scale, shift = 1 + 0.1 * random.gauss(0.0, 1.0), random.randrange(8)
            noise = torch.tensor([random.uniform(-0.05, 0.05) for _ in range(16)]).repeat(64)
        elif self.rng == "own generator":  # the README's recipe for a generator object of one's own
            rng = np.random.default_rng(torch.initial_seed())
            scale, shift = 1 + 0.1 * rng.standard_normal(), int(rng.integers(0, 8))
            noise = torch.from_numpy(rng.uniform(-0.05, 0.05, 1024).astype(np.float32))
        else:
            scale, shift = 1 + 0.1 * torch.randn(()).item(), int(torch.randint(0, 8, ()))
            noise = 0.05 * torch.randn(1024)
        return torch.roll(self.x[i], shift) * scale + noise, self.y[i]


RNGS = ("numpy", "random", "torch")


def mlp(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # dropout: the roles' own torch streams matter too
    return nn.Sequential(nn.Linear(1024, width), nn.ReLU(), nn.Dropout(0.1), nn.Linear(width, 10))


def run(out, rng: str, callbacks=(), **settings) -> Trainer:
    """Spaced online KD (s = 0.5: blocks of 4 of the 8 iterations per epoch) of two MLPs on ``Augmented`` data."""
    parts = dict(teacher=mlp(64, 1), student=mlp(32, 2), train_data=Augmented(256, rng),
                 eval_data=Augmented(64, rng, seed=1), callbacks=list(callbacks))
    given = dict(mode="online", space=0.5, epochs=2, batch_size=32, trace_batches=True, out=str(out)) | settings
    return Trainer(**parts, log=lambda *a: None, **QUIET, **given)


def trace(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "batches.jsonl").read_text().splitlines()]


def weights(folder, role: str) -> dict:
    return torch.load(folder / "last.pt", map_location="cpu", weights_only=True)["roles"][role]["model"]


class StopAt(Callback):
    """Ask for a stop after ``actions`` optimizer steps (the engine stops at the next whole iteration)."""

    def __init__(self, actions: int) -> None:
        self.actions = actions

    def on_step_end(self, trainer, step):
        if trainer.actions >= self.actions:
            trainer.request_stop("test")


@pytest.mark.parametrize("tier", ["window", "fetched again"])
@pytest.mark.parametrize("rng", RNGS)
def test_replay_and_mid_epoch_resume_are_exact_for_every_global_rng(tmp_path, rng, tier):
    """The student's batches are the teacher's, byte-identical, whether the window kept them or they are fetched
    again; a run stopped mid-epoch (teacher iteration 4 of 8, the data loader's position lost) and resumed in a new
    Trainer ends with bit-identical weights and the same batch trace."""
    budgets = FETCHED_AGAIN if tier == "fetched again" else {}
    full = run(tmp_path / "full", rng, **budgets)
    full.fit()
    records = trace(tmp_path / "full")
    teacher = [r["batch"] for r in records if r["role"] == "teacher"]
    student = [r["batch"] for r in records if r["role"] == "student"]
    assert len(teacher) == 16 and len(set(teacher)) == 16, "the augmentation makes every batch unique"
    equal = sum(a == b for a, b in zip(teacher, student))
    assert student == teacher, f"{equal}/16 replayed batches equal the teacher's ({rng} augmentation, {tier})"

    part = tmp_path / "part"
    with pytest.raises(TrainingInterrupted):  # T0-T3 S0, stop: the checkpoint is at teacher iteration 4
        run(part, rng, callbacks=[StopAt(5)], **budgets).fit()
    resumed = run(part, rng, resume=str(part), **budgets)
    assert resumed.driver.fresh == 4, "the stop must fall mid-epoch for the test to mean anything"
    resumed.fit()
    assert [r["batch"] for r in trace(part)] == [r["batch"] for r in records]
    for role in ("teacher", "student"):
        a, b = weights(tmp_path / "full", role), weights(part, role)
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f"{role} after the resume ({rng}, {tier}): {differ}"


@pytest.mark.parametrize("rng", [*RNGS, "own generator"])
def test_worker_processes_draw_the_same_batches(tmp_path, rng):
    """A DataLoader with 2 workers gives the batches the main process gives (fresh and fetched again): each sample
    is seeded on its own, wherever it is read."""
    hashes = {}
    for workers in (0, 2):
        loader = DataLoader(Augmented(192, rng), batch_size=48, shuffle=True, num_workers=workers)
        out = tmp_path / f"w{workers}"
        Trainer(teacher=mlp(32, 1), student=mlp(16, 2), train_data=loader, mode="online", space=1.0, epochs=1,
                out=str(out), trace_batches=True, log=lambda *a: None, **QUIET, **FETCHED_AGAIN).fit()
        hashes[workers] = [(r["role"], r["batch"]) for r in trace(out)]
    assert len(hashes[0]) == 8 and len({h for _, h in hashes[0]}) == 4  # 4 fresh batches, each replayed once
    assert hashes[2] == hashes[0], f"{rng} augmentation: 2 workers changed the batches"


def test_a_mid_epoch_resume_with_worker_processes_is_exact(tmp_path):
    """With workers the loader is started again at the resumed iteration: its iterator's worker base seed must
    not be drawn from the teacher's stream (its dropout), or the resumed teacher trains on other masks."""
    def loader():
        return DataLoader(Augmented(256, "numpy"), batch_size=32, shuffle=True, num_workers=2)

    def fit(out, **settings):
        return Trainer(teacher=mlp(64, 1), student=mlp(32, 2), train_data=loader(), mode="online", space=0.5,
                       epochs=2, out=str(out), trace_batches=True, log=lambda *a: None, **QUIET, **settings).fit()

    fit(tmp_path / "full")
    with pytest.raises(TrainingInterrupted):
        fit(tmp_path / "part", callbacks=[StopAt(5)])
    fit(tmp_path / "part", resume=str(tmp_path / "part"))
    assert [r["batch"] for r in trace(tmp_path / "part")] == [r["batch"] for r in trace(tmp_path / "full")]
    for role in ("teacher", "student"):
        a, b = weights(tmp_path / "full", role), weights(tmp_path / "part", role)
        assert all(torch.equal(a[k], b[k]) for k in a), role


def test_evaluation_does_not_change_training(tmp_path):
    """Reading the evaluation data draws nothing from the roles' streams: the same run with and without
    ``eval_data`` ends with the same weights (the evaluation loader's worker base seed comes from a generator of
    its own)."""
    for name, eval_data in (("with", Augmented(64, "torch", seed=1)), ("without", None)):
        Trainer(teacher=mlp(64, 1), student=mlp(32, 2), train_data=Augmented(256, "torch"), eval_data=eval_data,
                mode="online", space=0.5, epochs=2, batch_size=32, out=str(tmp_path / name), log=lambda *a: None,
                **QUIET).fit()
    for role in ("teacher", "student"):
        a, b = weights(tmp_path / "with", role), weights(tmp_path / "without", role)
        assert all(torch.equal(a[k], b[k]) for k in a), role


@pytest.mark.parametrize("rng", [*RNGS, "own generator"])
def test_a_sample_is_the_dataset_item_under_its_documented_seed(rng):
    """``s = derive_seed(run seed, "sample", data iteration, rank, k)`` is the seed of a batch's k-th sample:
    ``dataset[i]`` read after ``torch.manual_seed(s)``, ``random.seed(s)`` and ``np.random.seed(s & 0xFFFFFFFF)`` is
    that sample, so a user can reproduce any sample of a run by hand."""
    data = Augmented(64, rng)
    feed = LoaderFeed(data, batch_size=16, eval_batch_size=16, seed=3, device=torch.device("cpu"))
    x, y = feed._fetch(5)  # data iteration 5: epoch 1, the second batch of its order
    order = torch.randperm(64, generator=torch.Generator().manual_seed(derive_seed(3, "order", 1)))
    indices = order[16:32].tolist()
    assert y.tolist() == data.y[indices].tolist()
    for k, i in enumerate(indices):
        s = derive_seed(3, "sample", 5, 0, k)
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s & 0xFFFFFFFF)
        assert torch.equal(x[k], data[i][0]), f"sample {k} (index {i})"


@pytest.mark.parametrize("raw_bytes", ["raw bytes", "get_state only"])
def test_reading_batches_leaves_the_main_process_streams_as_they_were(monkeypatch, raw_bytes):
    """The roles' torch stream is the default generator while a batch is read, and the user's own code may draw
    from ``random`` and numpy between batches: every stream continues as if no batch had been read, cached
    Gaussians included (numpy's and ``random``'s keep the second value of a pair). numpy's state is saved with
    ``get_state()`` only when its raw bytes moved or a Gaussian is cached, ``random``'s with ``getstate()`` only when
    its raw bytes or cached Gaussian moved; without the raw bytes (a numpy or an interpreter whose layout is not
    the expected one), always."""
    if raw_bytes == "get_state only":
        monkeypatch.setattr(feeds, "_numpy_raw_state", lambda: None)
        monkeypatch.setattr(feeds, "_random_raw_state", lambda: None)
    else:
        assert feeds._numpy_raw_state() is not None, "this numpy's MT19937 bytes were not recognized"
        assert feeds._random_raw_state() is not None, "this interpreter's random object layout was not recognized"
    feed = LoaderFeed(Augmented(64, "numpy"), batch_size=16, eval_batch_size=16, seed=0, device=torch.device("cpu"))
    other = LoaderFeed(Augmented(64, "random"), batch_size=16, eval_batch_size=16, seed=0, device=torch.device("cpu"))

    def draws(read):
        torch.manual_seed(11)
        random.seed(12)
        np.random.seed(13)
        out = [torch.randn(3).tolist(), random.gauss(0, 1), np.random.standard_normal()]  # both caches hold one
        read(0)
        out += [np.random.standard_normal(), random.gauss(0, 1)]  # the cached halves: numpy's bytes did not move
        read(1)
        read(2)  # nothing drawn in between: numpy's saved state is reused
        out += [np.random.rand(), random.random(), torch.randn(3).tolist()]
        read(3)
        out += [np.random.standard_normal(3).tolist(), random.gauss(0, 1), torch.randn(3).tolist()]
        return out

    def read(i):
        feed._fetch(i)
        other._fetch(i)

    reference = draws(lambda i: None)
    calls = []
    real_get_state, real_getstate = np.random.get_state, random.getstate
    monkeypatch.setattr(np.random, "get_state", lambda *a, **k: calls.append("numpy") or real_get_state(*a, **k))
    monkeypatch.setattr(random, "getstate", lambda: calls.append("random") or real_getstate())
    assert draws(read) == reference
    # Once the states are known (their bytes as a read left them, no Gaussian cached in numpy's), a read with
    # nothing drawn before it asks for no get_state() / getstate() (not for the save, nor to see whether the
    # dataset drew from the stream).
    np.random.seed(5)
    random.seed(6)
    read(4)
    calls.clear()
    read(5)
    read(6)
    if raw_bytes == "raw bytes":
        assert not calls, f"state reads: {calls}"
    else:
        assert {"numpy", "random"} <= set(calls), f"state reads: {calls}"


@pytest.mark.parametrize("implementation", ["C++ extension", "hashlib"])
def test_derive_seeds_are_derive_seeds_values(implementation, monkeypatch):
    """The per-sample seeds are derived from a shared prefix's text: the values must stay ``derive_seed``'s (a run
    resumed by a newer version fetches the same batches again), from the extension's BLAKE2b and from hashlib's,
    for prefixes whose text fills none, one or several of BLAKE2b's 128-byte blocks (and ends on their edges)."""
    if implementation == "C++ extension":
        assert pipeline._native_derive_seeds() is not None, "the C++ extension (or its derive_seeds) is not built"
    else:
        monkeypatch.setattr(pipeline, "_native_derive_seeds", lambda: None)
    prefixes = [(0, "sample", 5, 0), (2**62 + 7, "sample", 123456, 3), ("it's", -1), ("é✓",)]
    prefixes += [(0, "x" * length) for length in (100, 113, 114, 115, 116, 117, 200, 241, 242, 243, 500)]
    for prefix in prefixes:
        assert derive_seeds(*prefix, count=70) == [derive_seed(*prefix, k) for k in range(70)], prefix
    assert derive_seeds(0, "sample", count=0) == []
    with pytest.raises(ValueError, match="at least one prefix part"):
        derive_seeds(count=3)


def test_nested_saves_restore_their_own_streams():
    """An evaluation's save around a batch read's save (or any nesting): each restore brings back its own streams,
    and the numpy shortcut's remembered state follows the outer restore."""
    streams = feeds._STREAMS

    def draw():
        return torch.rand(()).item(), random.random(), np.random.rand()

    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    outer = streams.save()
    draw()
    inner = streams.save()
    draw()
    streams.restore(inner)
    streams.restore(outer)
    first = draw()
    again = streams.save()  # the shortcut may reuse the remembered numpy state: it must be this one
    draw()
    streams.restore(again)
    second = draw()
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    assert [first, second] == [draw(), draw()]


class LateNumpy(Dataset):
    """Draws from numpy only from sample ``first_draw`` on (a transform that starts late, or only some samples
    take), and counts its reads."""

    def __init__(self, n: int, first_draw: int) -> None:
        self.n, self.first_draw, self.reads = n, first_draw, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        noise = float(np.random.uniform()) if i >= self.first_draw else 0.0
        return torch.tensor([float(i) + noise, torch.initial_seed() % 1000 / 1000]), torch.tensor(i % 10)


def test_a_stream_first_drawn_late_is_seeded_from_then_on():
    """Which global streams a dataset draws from is observed: torch's is always seeded (a sample may read its
    seed), numpy's once a batch is seen moving it. That batch is read again with numpy seeded, so every sample
    is the documented one (the same as seeding all three before every sample), and no other batch is read
    twice."""
    data = LateNumpy(64, first_draw=40)
    feed = LoaderFeed(DataLoader(data, batch_size=16, shuffle=False), batch_size=16, eval_batch_size=16, seed=7,
                      device=torch.device("cpu"))
    assert feed._samples.drawn == frozenset({"torch"})
    batches = [feed._fetch(i) for i in range(4)]
    assert feed._samples.drawn == frozenset({"torch", "numpy"})
    assert data.reads == 64 + 16, f"{data.reads} reads: only the batch that first moved numpy is read twice"
    reference = LateNumpy(64, first_draw=40)
    for i, (x, _) in enumerate(batches):
        for k in range(16):
            feeds.seed_global_rngs(derive_seed(7, "sample", i, 0, k))
            assert torch.equal(x[k], reference[16 * i + k][0]), f"batch {i} sample {k}"
    # the numpy draws of the batch read twice did not reach the main process's stream
    np.random.seed(3)
    expected = np.random.uniform()
    np.random.seed(3)
    LoaderFeed(DataLoader(LateNumpy(64, 0), batch_size=16, shuffle=False), batch_size=16, eval_batch_size=16, seed=7,
               device=torch.device("cpu"))._fetch(0)
    assert np.random.uniform() == expected


def test_the_samplers_random_seeding_is_random_seed():
    """The sampler seeds ``random`` through the C generator's own seed (skipping ``Random.seed``'s Python wrapper):
    the state, the cached Gaussian (dropped) and the draws after it are those of ``random.seed(s)``."""
    assert feeds._seed_random is not random.seed, "this interpreter's random module is not the C generator's"
    for s in (0, 1, 2**32 - 1, 2**32, 2**62 + 12345, derive_seed(0, "sample", 3, 0, 7)):
        random.seed(99)
        random.gauss(0.0, 1.0)  # a second Gaussian is cached: seeding must drop it
        feeds._seed_random(s)
        fast = (random.getstate(), random.gauss(0.0, 1.0), random.random())
        random.seed(99)
        random.gauss(0.0, 1.0)
        random.seed(s)
        assert (random.getstate(), random.gauss(0.0, 1.0), random.random()) == fast, s
