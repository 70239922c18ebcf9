"""The training engine on CPU: exact replay, interleaving independence, bit-identical resume, modes, outputs."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

from spacedkd_fast import backends
from spacedkd_fast.config import TrainConfig
from spacedkd_fast.engine import Trainer, TrainingInterrupted
from spacedkd_fast.engine.roles import unwrap


def tiny(**overrides) -> TrainConfig:
    """256 embedded digits, batch 32 (8 iterations/epoch), resnet8: a run takes about a second per epoch."""
    base = dict(dataset="embedded", subset=256, batch_size=32, epochs=2, model="resnet8", lr=0.05, progress=False,
                eval_batch_size=64, threads=2)
    return TrainConfig(**(base | overrides))


def run(cfg: TrainConfig, stop_after: int | None = None) -> Trainer:
    trainer = Trainer(cfg, log=lambda *a: None)
    if stop_after is not None:
        original = trainer._after_action

        def after_action():
            original()
            if trainer.actions == stop_after:
                trainer.request_stop("test")

        trainer._after_action = after_action
    trainer.fit()
    return trainer


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {}
    for name in ("teacher", "student"):
        role = getattr(trainer, name)
        if role is not None:
            state |= {f"{name}.{k}": v.clone() for k, v in unwrap(role.model).state_dict().items()}
            state |= {f"{name}.opt.{i}.{k}": v.clone() for i, s in role.optimizer.state_dict()["state"].items()
                      for k, v in s.items() if torch.is_tensor(v)}
    return state


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- exact replay -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("space, replay_tail", [(0.5, True), (0.75, True), (0.75, False)])
def test_student_replays_the_teachers_batches_in_order(tmp_path, space, replay_tail):
    cfg = tiny(space=space, replay_tail=replay_tail, trace_batches=True, out=str(tmp_path))
    trainer = run(cfg)
    records = read_jsonl(tmp_path / "batches.jsonl")
    teacher = [r["batch"] for r in records if r["role"] == "teacher"]
    student = [r for r in records if r["role"] == "student"]
    assert len(teacher) == 16 and len(set(teacher)) == 16  # 2 epochs x 8 iterations, all distinct batches
    n = int(space * 8)  # block length
    replayed = 16 if replay_tail else (16 // n) * n
    assert [r["batch"] for r in student] == teacher[:replayed], "byte-identical batches, in the teacher's order"
    # Each replayed batch is distilled from the teacher as it stood at the end of its block.
    for step, record in enumerate(student):
        block_stop = min((step // n + 1) * n, 16)
        assert record["teacher_updates"] == block_stop
    assert trainer.student.steps == replayed and trainer.teacher.steps == 16


def test_space_zero_is_online_kd(tmp_path):
    run(tiny(space=0.0, trace_batches=True, out=str(tmp_path)))
    records = read_jsonl(tmp_path / "batches.jsonl")
    teacher = [r for r in records if r["role"] == "teacher"]
    student = [r for r in records if r["role"] == "student"]
    assert [r["batch"] for r in student] == [r["batch"] for r in teacher]
    # The student of iteration i learns from the teacher's logits of that same forward pass, before its update i.
    assert [r["teacher_updates"] for r in student] == list(range(16))
    assert [r["role"] for r in records[:4]] == ["teacher", "student", "teacher", "student"]


# ---- the math does not depend on the interleaving ---------------------------------------------------------------

@pytest.mark.parametrize("extra", [dict(space=0.75), dict(space=0.5, start_epoch=1), dict(space=0.75, beta=0.03),
                                   dict(space=0.75, teacher_model="vit_tiny_32", student_model="vit_micro_32_distilled",
                                        subset=64, epochs=1, optimizer="adamw", lr=1e-3)],
                         ids=["tail", "online_then_spaced", "feature_term", "vit_droppath"])
def test_overlapped_order_gives_the_sequential_weights(extra):
    sequential = run(tiny(overlap=False, **extra))
    interleaved = run(tiny(overlap=True, **extra))
    assert interleaved.overlap and not sequential.overlap
    assert_bit_identical(weights(sequential), weights(interleaved))
    assert [r["student_acc"] for r in sequential.history] == [r["student_acc"] for r in interleaved.history]
    assert [r["teacher_acc"] for r in sequential.history] == [r["teacher_acc"] for r in interleaved.history]


# ---- checkpoint / resume ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, stop_after", [
    (dict(space=0.75), 7),  # mid-block, before the first replay
    (dict(space=0.75, overlap=True), 15),  # teacher and student both mid-block
    (dict(space=0.75), 12),  # mid-replay, sequential
    (dict(space=0.0), 17),  # online KD, inside epoch 2
    (dict(mode="self", model="byot_resnet10", space=0.5, beta=0.03), 13),
    (dict(mode="offline", epochs=1), 11),  # the student phase
    (dict(mode="base"), 5),
], ids=["mid_block", "overlap", "mid_replay", "online", "self", "offline", "base"])
def test_interrupted_run_resumes_bit_identically(tmp_path, extra, stop_after):
    uninterrupted = run(tiny(**extra))
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="resume with --resume"):
        run(tiny(out=str(out), **extra), stop_after=stop_after)
    assert (out / "last.pt").exists()
    resumed = run(tiny(out=str(out), resume=str(out), **extra))
    assert_bit_identical(weights(uninterrupted), weights(resumed))
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [r["epoch"] for r in uninterrupted.history]
    for a, b in zip(records, uninterrupted.history):
        assert a.get("student_acc") == b.get("student_acc") and a.get("teacher_acc") == b.get("teacher_acc")


def test_resume_with_a_different_config_names_the_fields(tmp_path):
    out = tmp_path / "run"
    run(tiny(out=str(out), epochs=1, space=0.5))
    with pytest.raises(ValueError, match=r"space: last.pt was saved with 0.5, space= asks for 1.0; "
                                         r"alpha: last.pt was saved with 0.3, alpha= asks for 0.9"):
        Trainer(tiny(out=str(out), resume=str(out), epochs=1, space=1.0, alpha=0.9), log=lambda *a: None)
    with pytest.raises(FileNotFoundError, match="no last.pt"):
        Trainer(tiny(resume=str(tmp_path / "nowhere")), log=lambda *a: None)


# ---- modes and options ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [
    dict(mode="base"),
    dict(mode="offline", epochs=1),
    dict(mode="self", model="byot_resnet10", space=0.0),
    dict(mode="self", model="byot_resnet10", space=0.5, beta=0.03),
    dict(kd_objective="paper", beta=0.03, replay_tail=False, space=0.75),
    dict(teacher_bn="eval", teacher_model="resnet20"),
    dict(precision="bf16", channels_last=True),
    dict(window_storage="host"),
    dict(optimizer="adamw", lr=2e-3, lr_schedule="step", lr_milestones=(1,), warmup_epochs=0.5),
    dict(teacher_model="vit_micro_32", student_model="vit_micro_32_distilled", optimizer="adamw", lr=1e-3,
         alpha=0.5, temperature=1.0, kd_objective="paper", min_lr=1e-5, warmup_epochs=0.5),
], ids=["base", "offline", "self_s0", "self_spaced", "paper_quirks", "eval_bn_other_arch", "bf16_cl", "host_window",
        "adamw_step", "deit_vit"])
def test_modes_train_and_record_every_epoch(tmp_path, extra):
    trainer = run(tiny(out=str(tmp_path), **extra))
    records = read_jsonl(tmp_path / "metrics.jsonl")
    epochs = 2 * trainer.cfg.epochs if trainer.cfg.mode == "offline" else trainer.cfg.epochs
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
    last = records[-1]
    assert 0.0 <= last["student_acc"] <= 1.0 and last["images_per_s"] > 0 and last["elapsed_s"] > 0
    if trainer.cfg.mode in ("online", "offline", "self"):
        assert last["teacher_acc"] is not None
    if trainer.cfg.mode == "self":
        assert len(last["exit_acc"]) == 4 and 0 <= last["ensemble_acc"] <= 1
    for loss_key in ("student_loss", "teacher_loss"):
        if last.get(loss_key) is not None:
            assert last[loss_key] == last[loss_key] and last[loss_key] > 0  # finite, not NaN


def test_outputs(tmp_path):
    trainer = run(tiny(out=str(tmp_path), space=0.5))
    assert TrainConfig.from_dict(json.loads((tmp_path / "config.json").read_text())) == trainer.cfg
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["position"]["t_iter"] == 16 and state["config"] == trainer.cfg.to_dict()
    record = read_jsonl(tmp_path / "metrics.jsonl")[0]
    for key in ("epoch", "teacher_acc", "student_acc", "teacher_loss", "student_loss", "lr_teacher", "lr_student",
                "images_per_s", "data_wait_fraction", "elapsed_s"):
        assert key in record, key
    assert 0.0 <= record["data_wait_fraction"] <= 1.0


@pytest.mark.parametrize("prefetch", [0, 2])
def test_time_spent_waiting_for_data_is_reported(prefetch):
    """A renderer slower than the step shows up as waiting time, inline or through the prefetch queue, and a
    regenerated replay batch counts too."""
    trainer = Trainer(tiny(space=0.75, prefetch=prefetch, window_budget=0.0, host_budget=0.0), log=lambda *a: None)
    render, regenerate = trainer.source.render, trainer.source.regenerate
    delay = 0.03

    def slow(function):
        def wrapper(plan):
            time.sleep(delay)
            return function(plan)
        return wrapper

    trainer.source.render = slow(render)
    trainer.window.regenerate = slow(regenerate)
    summary = trainer.fit()
    fresh, replayed = trainer.driver.fresh, trainer.student.steps
    assert fresh == replayed == 16
    # Prefetching overlaps part of the rendering with the steps, but the replays regenerate inline.
    assert summary.data_wait_s >= delay * (replayed + (fresh if prefetch == 0 else 0)) * 0.9
    assert summary.data_wait_s <= summary.session_s and "waiting for data" in summary.table()


@pytest.mark.slow
def test_the_default_run_reaches_90_percent():
    """`python -m spacedkd_fast.train` with no arguments: spaced online KD on the embedded digits, on the CPU. Its
    wall time is measured by ``bench/bench_train.py::test_default_run`` (a timed assertion would fail on a loaded
    machine, not on the code)."""
    trainer = Trainer(TrainConfig(progress=False), log=lambda *a: None)
    summary = trainer.fit()
    assert trainer.cfg.mode == "online" and trainer.cfg.space > 0 and trainer.device.type == "cpu"
    assert summary.student_acc >= 0.90, summary.table()


# ---- bad input --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, error, message", [
    (dict(dataset="cifar10", data_dir="/nonexistent/folder"), Exception, "cifar-10-batches-py"),
    (dict(batch_size=512), ValueError, "larger than the training set"),
    (dict(mode="self", model="resnet8"), ValueError, "needs a multi-exit model"),
    (dict(model="byot_resnet10"), ValueError, "needs single-exit models"),
    (dict(model="vit_micro_32_distilled"), ValueError, "has a distillation token"),
    (dict(subset=10**6), ValueError, "subset= .* larger than the training set"),
])
def test_bad_input_is_rejected_with_a_clear_message(extra, error, message):
    with pytest.raises(error, match=message):
        Trainer(tiny(**extra), log=lambda *a: None)


INF, NAN = float("inf"), float("nan")
STEP = dict(lr_schedule="step")
# (field, bad value, other settings, the whole message as Python reports it). tiny() trains 2 epochs at lr 0.05.
# Every TrainConfig field has at least one case (tests/test_validation.py checks that); the CLI's twin is
# tests/test_train_cli.py::CLI_BAD_VALUES.
BAD_CONFIG_VALUES = [
    ("mode", "mutual", {}, "mode= must be one of online, self, base, offline, got 'mutual'"),
    ("space", -1.0, {}, "space= must be a finite number of epochs >= 0, got -1.0"),
    ("space", INF, {}, "space= must be a finite number of epochs >= 0, got inf"),
    ("space", "1.5", {}, "space= must be a finite number of epochs >= 0, got '1.5' (str)"),
    ("start_epoch", 3, {}, "start_epoch= must be an integer epoch in [0, epochs=2], got 3"),
    ("start_epoch", 0.5, {}, "start_epoch= must be an integer epoch in [0, epochs=2], got 0.5 (float)"),
    ("replay_tail", "yes", {}, "replay_tail= must be True or False, got 'yes' (str)"),
    ("model", "resnet19", {}, "model= must be a model name (one of: byot_resnet10, "),
    ("teacher_model", "resnet19", {}, "teacher_model= must be a model name as for model=, or None (the same), "
                                      "got 'resnet19'"),
    ("student_model", 8, {}, "student_model= must be a model name as for model=, or None (the same), got 8 (int)"),
    ("teacher_weights", "", {}, "teacher_weights= must be a non-empty path"),
    ("dataset", "svhn", {}, "dataset= must be a dataset name (one of embedded, cifar10, cifar100, tiny-imagenet, "
                            "imagefolder, synthetic), got 'svhn'"),
    ("data_dir", 3, {}, "data_dir= must be a non-empty folder path, or None, got 3 (int)"),
    ("image_size", 0, {}, "image_size= must be an integer >= 1 (px), or None, got 0"),
    ("val_fraction", 1.0, {}, "val_fraction= must be a finite number in (0, 1), or None, got 1.0"),
    ("split_seed", -1, {}, "split_seed= must be an integer >= 0, got -1"),
    ("stream", "no", {}, "stream= must be True, False or None (the backend's default), got 'no' (str)"),
    ("strict_data", 1, {}, "strict_data= must be True or False, got 1 (int)"),
    ("subset", 1, {}, "subset= must be an integer >= 2 images, or None, got 1"),
    ("epochs", 0, {}, "epochs= must be an integer >= 1, got 0"),
    ("epochs", 2.0, {}, "epochs= must be an integer >= 1, got 2.0 (float)"),
    ("batch_size", 0, {}, "batch_size= must be an integer >= 1, got 0"),
    ("eval_batch_size", 0, {}, "eval_batch_size= must be an integer >= 1, got 0"),
    ("optimizer", "adam", {}, "optimizer= must be one of sgd, adamw, got 'adam'"),
    ("lr", INF, {}, "lr= must be a finite number > 0, got inf"),
    ("lr", 0.0, {}, "lr= must be a finite number > 0, got 0.0"),
    ("lr", "0.1", {}, "lr= must be a finite number > 0, got '0.1' (str)"),
    ("lr", True, {}, "lr= must be a finite number > 0, got True (bool)"),
    ("momentum", NAN, {}, "momentum= must be a finite number in [0, 1), got nan"),
    ("momentum", 1.0, {}, "momentum= must be a finite number in [0, 1), got 1.0"),
    ("weight_decay", -1e-4, {}, "weight_decay= must be a finite number >= 0, got -0.0001"),
    ("lr_schedule", "linear", {}, "lr_schedule= must be one of constant, cosine, step, got 'linear'"),
    ("warmup_epochs", NAN, {}, "warmup_epochs= must be a finite number of epochs in [0, epochs=2], got nan"),
    ("warmup_epochs", 3, {}, "warmup_epochs= must be a finite number of epochs in [0, epochs=2], got 3"),
    ("min_lr", 0.1, {}, "min_lr= must be a finite number in [0, lr=0.05], got 0.1"),
    ("lr_milestones", (-1,), STEP, "lr_milestones= must be at least one epoch with lr_schedule='step', each in "
                                   "(0, epochs=2], strictly increasing, got (-1,)"),
    ("lr_milestones", (3,), STEP, "each in (0, epochs=2], strictly increasing, got (3,)"),
    ("lr_milestones", (2, 1), STEP, "each in (0, epochs=2], strictly increasing, got (2, 1)"),
    ("lr_milestones", (1, 1), STEP, "each in (0, epochs=2], strictly increasing, got (1, 1)"),
    ("lr_milestones", (), STEP, "lr_milestones= must be at least one epoch with lr_schedule='step'"),
    ("lr_milestones", (1,), {}, "lr_milestones= must be empty without lr_schedule='step' (the cosine schedule has "
                                "no milestones), got (1,)"),
    ("lr_milestones", (1.5,), STEP, "strictly increasing, got (1.5,) (tuple)"),
    ("lr_gamma", 0.0, STEP | dict(lr_milestones=(1,)), "lr_gamma= must be a finite number > 0, got 0.0"),
    ("alpha", 1.5, {}, "alpha= must be a finite number in [0, 1], got 1.5"),
    ("temperature", INF, {}, "temperature= must be a finite number > 0, got inf"),
    ("temperature", 0, {}, "temperature= must be a finite number > 0, got 0"),
    ("beta", NAN, {}, "beta= must be a finite number >= 0, got nan"),
    ("beta", -0.1, {}, "beta= must be a finite number >= 0, got -0.1"),
    ("label_smoothing", 1.0, {}, "label_smoothing= must be a finite number in [0, 1), got 1.0"),
    ("kd_objective", "mse", {}, "kd_objective= must be one of kl, paper, got 'mse'"),
    ("teacher_bn", "frozen", {}, "teacher_bn= must be one of train, eval, got 'frozen'"),
    ("self_kd_weight", 5, dict(mode="self", model="byot_resnet10"),
     "self_kd_weight= must be a finite number in [0, 1], got 5"),
    ("device", "tpu", {}, "device= must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("precision", "fp16", {}, "precision= must be one of fp32, bf16, got 'fp16'"),
    ("channels_last", "True", {}, "channels_last= must be True or False, got 'True' (str)"),
    ("compile", 0, {}, "compile= must be True or False, got 0 (int)"),
    ("tf32", None, {}, "tf32= must be True or False, got None (NoneType)"),
    ("deterministic", 1.0, {}, "deterministic= must be True or False, got 1.0 (float)"),
    ("overlap", 1, {}, "overlap= must be True, False or None (on with CUDA), got 1 (int)"),
    ("data_backend", "cuda", {}, "data_backend= must be one of auto, torch, dali, got 'cuda'"),
    ("prefetch", -1, {}, "prefetch= must be an integer >= 0, or None, got -1"),
    ("window_budget", -1.0, {}, "window_budget= must be a finite number >= 0 (GB), or None, got -1.0"),
    ("window_budget", INF, {}, "window_budget= must be a finite number >= 0 (GB), or None, got inf"),
    ("host_budget", NAN, {}, "host_budget= must be a finite number >= 0 (GB), or None, got nan"),
    ("window_storage", "disk", {}, "window_storage= must be one of device, host, got 'disk'"),
    ("seed", -1, {}, "seed= must be an integer >= 0, got -1"),
    ("threads", -1, {}, "threads= must be an integer >= 1, or None (torch's choice), got -1"),
    ("threads", 0, {}, "threads= must be an integer >= 1, or None (torch's choice), got 0"),
    ("dist_timeout", 0.0, {}, "dist_timeout= must be a finite number of seconds > 0, got 0.0"),
    ("dist_timeout", INF, {}, "dist_timeout= must be a finite number of seconds > 0, got inf"),
    ("out", "", {}, "out= must be a non-empty folder path, or None, got ''"),
    ("resume", "", {}, "resume= must be a non-empty run folder path, or None, got ''"),
    ("overwrite", "no", {}, "overwrite= must be True or False, got 'no' (str)"),
    ("trace_batches", 1, {}, "trace_batches= must be True or False, got 1 (int)"),
    ("log_every", -1, {}, "log_every= must be an integer >= 0 steps (0: no step records), got -1"),
    ("tensorboard", "yes", {}, "tensorboard= must be True or False, got 'yes' (str)"),
    ("progress", 1, {}, "progress= must be True or False, got 1 (int)"),
    ("recipe", "fast", {}, "recipe= must be one of paper, paper-vit, or None, got 'fast'"),
]


@pytest.mark.parametrize("field, value, extra, message", BAD_CONFIG_VALUES,
                         ids=[f"{c[0]}={c[1]!r}" for c in BAD_CONFIG_VALUES])
def test_bad_config_values(field, value, extra, message):
    """From Python the message names the keyword (``lr=``), says what was expected and quotes what was given;
    a value of the wrong type is also a TypeError."""
    from spacedkd_fast.config import SettingError, SettingTypeError

    with pytest.raises(SettingError) as info:
        tiny(**extra, **{field: value})
    assert str(info.value).startswith(f"{field}= must be ") and message in str(info.value), str(info.value)
    assert isinstance(info.value, ValueError)  # the command line reports every ValueError in one line, exit 2
    wrong_type = re.search(r" \((str|int|float|bool|tuple|NoneType)\)$", message) is not None
    assert isinstance(info.value, SettingTypeError) == isinstance(info.value, TypeError) == wrong_type


@pytest.mark.slow
def test_torch_compile_option_trains(tmp_path):
    trainer = run(tiny(compile=True, subset=128, epochs=1, space=0.5, out=str(tmp_path)))
    assert trainer.history[-1]["student_acc"] is not None and trainer.student.steps == 4


# ---- replay window tiers and prefetching ------------------------------------------------------------------------

TIER_BUDGETS = {
    "device": dict(window_budget=None, host_budget=None),
    "host": dict(window_budget=0.0, host_budget=1.0),
    "regenerate": dict(window_budget=0.0, host_budget=0.0),
    "mixed": dict(window_budget=3 * 32 * (1024 + 8) / 1e9, host_budget=2 * 32 * (1024 + 8) / 1e9),
}


def test_every_window_tier_replays_identical_batches(tmp_path):
    """Device ring, host ring, regeneration from plans (and a mix): the same batch hashes and weights."""
    traces, finals = {}, {}
    for name, budgets in TIER_BUDGETS.items():
        out = tmp_path / name
        trainer = run(tiny(space=0.75, trace_batches=True, out=str(out), **budgets))
        slots = trainer.window.storage.slots
        tiers = (slots["device"], slots["host"], trainer.window.capacity - slots["device"] - slots["host"])
        expected = {"device": (6, 0, 0), "host": (0, 6, 0), "regenerate": (0, 0, 6), "mixed": (3, 2, 1)}[name]
        assert tiers == expected, (name, tiers)
        traces[name] = (out / "batches.jsonl").read_text()
        finals[name] = weights(trainer)
    for name in ("host", "regenerate", "mixed"):
        assert traces[name] == traces["device"], name
        assert_bit_identical(finals["device"], finals[name])


@pytest.mark.parametrize("extra", [dict(prefetch=2), dict(prefetch=3, overlap=True, window_budget=0.0,
                                                          host_budget=0.0)], ids=["prefetch", "prefetch_regen"])
def test_prefetching_changes_nothing(extra):
    assert_bit_identical(weights(run(tiny(space=0.75, prefetch=0))), weights(run(tiny(space=0.75, **extra))))


def test_resume_across_tiers(tmp_path):
    """A run saved with a regenerate-tier window resumes with everything on the device, bit-identically."""
    reference = run(tiny(space=0.75))
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        run(tiny(space=0.75, out=str(out), window_budget=0.0, host_budget=0.0), stop_after=5)
    resumed = run(tiny(space=0.75, out=str(out), resume=str(out)))
    assert sum(resumed.window.storage.slots.values()) == resumed.window.capacity  # no regenerate tier now
    assert_bit_identical(weights(reference), weights(resumed))


# ---- data backends: DALI (its CPU twin here) and folders streamed from disk ---------------------------------------

def _folder(root, classes=3, per_class=12, size=40):
    """An ImageFolder of small PNGs (lossless, so the renderers' inputs are exact)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 4)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                image = (rng.integers(0, 64, (size, size + 8, 3)) + 60 * c).astype(np.uint8)
                Image.fromarray(image).save(folder / f"{i}.png")
    return root


NEEDS_DALI = pytest.mark.skipif(not backends.dali().available, reason="nvidia.dali is not installed")


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=NEEDS_DALI)])
def test_streamed_folder_replays_exactly_in_every_tier(tmp_path, backend):
    data = _folder(tmp_path / "data")
    common = dict(dataset="imagefolder", data_dir=str(data), stream=True, image_size=24, subset=None, batch_size=6,
                  epochs=2, space=0.5, data_backend=backend, trace_batches=True, eval_batch_size=8)
    traces = []
    for name, budgets in (("device", {}), ("regenerate", dict(window_budget=0.0, host_budget=0.0))):
        out = tmp_path / f"{backend}-{name}"
        trainer = Trainer(tiny(out=str(out), **common, **budgets), log=lambda *a: None)
        opened = []  # DALI: fresh batches come from one file reader per epoch
        open_reader = trainer.source._open_reader
        trainer.source._open_reader = lambda i, seen=opened, original=open_reader: (seen.append(i), original(i))[1]
        trainer.fit()
        assert opened == ([0, 6] if backend == "dali" else [])
        assert trainer.source.__class__.__name__ == "FileBatchSource" and trainer.data_backend == backend
        assert trainer.source.image_shape == (3, 24, 24)
        records = read_jsonl(out / "batches.jsonl")
        teacher = [r["batch"] for r in records if r["role"] == "teacher"]
        student = [r["batch"] for r in records if r["role"] == "student"]
        assert student == teacher and len(teacher) == 12  # 36 images / batch 6 = 6 iterations x 2 epochs
        traces.append(teacher)
    assert traces[0] == traces[1], "a regenerated batch is byte-identical to the stored one"


@NEEDS_DALI
def test_dali_backend_on_in_memory_data_trains_and_regenerates_identically(tmp_path):
    traces = []
    regenerate = dict(window_budget=0.0, host_budget=0.0)
    # The last run renders fresh batches in the prefetch thread while the loop regenerates replayed ones: both
    # threads share the one DALI pipeline.
    for budgets in ({}, regenerate, dict(regenerate, prefetch=3, overlap=True)):
        out = tmp_path / str(len(traces))
        trainer = run(tiny(data_backend="dali", space=0.75, trace_batches=True, out=str(out), **budgets))
        assert trainer.data_backend == "dali"
        traces.append(sorted((out / "batches.jsonl").read_text().splitlines()))  # overlap interleaves the roles
    assert traces[0] == traces[1] == traces[2]
    assert trainer.history[-1]["student_acc"] is not None
