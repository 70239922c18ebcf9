"""Config → parts: everything the engine trains with that the caller did not give.

The command line gives nothing but a :class:`~spacedkd_fast.config.TrainConfig`, so every part is built here; from
Python any part may be given instead (``Trainer(cfg, teacher=..., train_data=..., loss=...)``) and the rest is
still built from the config. Either way the engine receives the same kinds of parts, on one code path:

* the *feed* (:mod:`spacedkd_fast.engine.feeds`): the package's data sources, or the user's Dataset/DataLoader;
* the *networks*: registry / ``timm:`` / ``torchvision:`` models, or the user's modules, each behind
  :class:`~spacedkd_fast.engine.roles.FeatureForward`, checked on two samples (shapes, class counts);
* the *heads* of the feature term (projector, BYOT adapters);
* per role an *optimizer* and an *lr policy* (the built-in schedule as a function of the data position, or the
  user's ``torch.optim.lr_scheduler``);
* the *objectives* (the built-in losses, or the user's ``loss`` callable plus the feature term);
* the *block driver* (the schedule, the replay window, the teacher snapshots).

:func:`build_run` builds all of it in order for the trainer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spacedkd_fast.config import TrainConfig, setting_name
from spacedkd_fast.data.pipeline import FileBatchSource, derive_seed, select_data_backend
from spacedkd_fast.data.window import TierBudget
from spacedkd_fast.engine import roles as R
from spacedkd_fast.engine.checkpoint import schedule_boundaries
from spacedkd_fast.engine.distributed import DistInfo, broadcast_from_main, init_distributed
from spacedkd_fast.engine.driver import BlockDriver
from spacedkd_fast.engine.feeds import (
    Batch,
    LoaderFeed,
    SourceFeed,
    is_package_dataset,
    load_training_data,
    subset_dataset,
)
from spacedkd_fast.engine.losses import DistillObjective, Projector, SelfKDAdapters, SelfKDObjective, feature_distance
from spacedkd_fast.engine.modes import MODES, Mode
from spacedkd_fast.engine.runtime import bind_device, configure_math, resolve_device, window_budgets
from spacedkd_fast.loss.options import KDOptions
from spacedkd_fast.models import build_model, is_distilled, is_multi_exit
from spacedkd_fast.models.weights import load_weights
from spacedkd_fast.schedule import SpacingSchedule

OVERLAP_SLACK = 16  # window slots beyond one block, so the overlapped teacher may run a little ahead

CUSTOM = "custom:"  # config.json's record of a part given from Python (e.g. "custom:MyNet")


@dataclasses.dataclass
class GivenParts:
    """What the caller passed from Python (None: build it from the config)."""

    teacher: nn.Module | None = None
    student: nn.Module | None = None
    train_data: Any = None
    eval_data: Any = None
    teacher_optimizer: Any = None  # an Optimizer over the module's parameters, or params -> Optimizer
    student_optimizer: Any = None
    teacher_scheduler: Any = None  # an LRScheduler, or optimizer -> LRScheduler
    student_scheduler: Any = None
    scheduler_interval: str = "epoch"
    loss: Callable | None = None
    teacher_features: str | Callable | None = None
    student_features: str | Callable | None = None
    unpack: Callable | None = None

    def record(self, cfg: TrainConfig) -> TrainConfig:
        """The config as config.json records it: the fields of given parts name their class."""
        changes = {}
        if self.teacher is not None:
            changes["teacher_model"] = CUSTOM + type(self.teacher).__name__
        if self.student is not None:
            changes["student_model"] = CUSTOM + type(self.student).__name__
        if self.train_data is not None and not is_package_dataset(self.train_data):
            data = getattr(self.train_data, "dataset", self.train_data)
            changes["dataset"] = CUSTOM + type(data).__name__
        return dataclasses.replace(cfg, **changes) if changes else cfg


# ================================================================================================== the run
@dataclasses.dataclass
class RunParts:
    """Everything a :class:`~spacedkd_fast.engine.trainer.Trainer` trains with."""

    cfg: TrainConfig
    mode: Mode
    device: torch.device
    dist: DistInfo
    overlap: bool
    data_backend: str
    feed: Any
    schedule: SpacingSchedule
    boundaries: tuple[int, ...]
    driver: BlockDriver
    roles: dict[str, R.Role]
    objectives: R.Objectives
    num_exits: int


def build_run(cfg: TrainConfig, given: GivenParts, resume_state: dict | None) -> RunParts:
    """The parts of a run, in the order they depend on each other: the device and processes, the data, the
    schedule and the replay window (sized from free memory before the networks take theirs), the networks and
    their roles, the objectives, the teacher snapshots and the block driver."""
    mode = MODES[cfg.mode]
    device = resolve_device(cfg.device)
    dist = init_distributed(device.type, timeout=cfg.dist_timeout)
    if dist.enabled and cfg.out is not None:  # a default --out carries each rank's own clock: use rank 0's
        cfg = dataclasses.replace(cfg, out=broadcast_from_main(cfg.out, dist))
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    bind_device(device)
    configure_math(cfg, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cpu":
        # Early training on zero-padded images produces denormal activations, which x86 handles ~10x slower.
        torch.set_flush_denormal(True)
    # Only two networks training at once can overlap (self and base train one, offline a frozen teacher's student).
    overlap = mode.overlappable and (cfg.overlap if cfg.overlap is not None else device.type == "cuda")

    data_backend = select_data_backend(cfg.data_backend, device)
    feed = build_feed(cfg, given, device, dist.rank, dist.world, data_backend)
    if feed.kind == "user":
        data_backend = "user DataLoader"
    elif isinstance(feed.source, FileBatchSource):
        feed.source.strict_data = cfg.strict_data  # a broken file stops the run instead of being skipped
    boundaries = schedule_boundaries(resume_state, cfg)  # the lengths an extended run had before
    schedule = SpacingSchedule(cfg.space if mode.spaced else 0.0, feed.iters_per_epoch, cfg.epochs,
                               start_epoch=cfg.start_epoch, replay_tail=cfg.replay_tail, boundaries=boundaries)
    window = None
    if mode.spaced:
        capacity = max(schedule.block_length, 1) + (OVERLAP_SLACK if overlap else 0)
        budget = TierBudget(*window_budgets(cfg, device, dist.local_world))
        window = feed.make_window(capacity, budget, cfg.window_storage)

    networks = build_networks(cfg, mode, given, feed, device)
    heads = build_heads(cfg, mode, networks, device)
    roles = {name: build_role(cfg, mode, name, networks[name].net, heads[name], given, feed.iters_per_epoch, dist,
                              device) for name in mode.roles}
    if overlap and device.type == "cuda":
        for role in roles.values():
            role.stream = torch.cuda.Stream(device)
    snapshots = None
    if mode.snapshots:
        snapshots = R.SnapshotPool(roles["teacher"].net, 2 if overlap else 1, cfg.teacher_bn,
                                   torch.compile if cfg.compile else (lambda m: m))
    driver = BlockDriver(schedule, window, snapshots, replays=mode.replays, device=device,
                         load=lambda stored: Batch(stored, *feed.inputs(stored), None))
    num_exits = networks["student"].num_exits if mode.multi_exit else 0
    return RunParts(cfg, mode, device, dist, overlap, data_backend, feed, schedule, boundaries, driver, roles,
                    build_objectives(cfg, given), num_exits)


def build_role(cfg: TrainConfig, mode: Mode, name: str, net: R.FeatureForward, head: nn.Module | None,
               given: GivenParts, iters_per_epoch: int, dist: DistInfo, device: torch.device) -> R.Role:
    """A role: its network and head as one module (under DDP, as one DDP module), its optimizer and lr policy,
    and a random stream of its own."""
    model: nn.Module = R.TrainedModule(net, head)
    optimizer, lr_policy = build_optimization(cfg, given, name, model, iters_per_epoch)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        # Self mode's CE-only steps skip the adapters (their parameters get no gradient in those steps).
        model = DDP(model, device_ids=ids, process_group=dist.group,
                    find_unused_parameters=mode.multi_exit and head is not None)
    if cfg.compile:
        model = torch.compile(model)
    role = R.Role(name=name, model=model, optimizer=optimizer, lr_policy=lr_policy)
    role.seed_rng(derive_seed(cfg.seed, "rng", name, dist.rank), device)
    return role


# ================================================================================================== the feed
def build_feed(cfg: TrainConfig, given: GivenParts, device: torch.device, rank: int, world: int, backend: str):
    """The run's data: the given Dataset/DataLoader, a given package dataset, or the config's dataset."""
    data = given.train_data
    if data is not None and not is_package_dataset(data):
        return LoaderFeed(data, given.eval_data, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
                          seed=cfg.seed, device=device, rank=rank, world=world, unpack=given.unpack,
                          channels_last=cfg.channels_last)
    if given.eval_data is not None:
        raise ValueError("eval_data goes with a train_data Dataset/DataLoader of your own; the package's datasets "
                         "bring their test split")
    if cfg.dataset.startswith(CUSTOM):
        raise ValueError(f"dataset {cfg.dataset!r} was given from Python; resume this run from Python with the same "
                         f"train_data (and eval_data)")
    dataset = data if data is not None else load_training_data(cfg, backend)
    if cfg.subset is not None:
        dataset = subset_dataset(dataset, cfg.subset)
    return SourceFeed(dataset, batch_size=cfg.batch_size, seed=cfg.seed, device=device, rank=rank, world=world,
                      backend=backend, channels_last=cfg.channels_last)


# ================================================================================================ the networks
@dataclasses.dataclass
class Network:
    """A role's network behind ``FeatureForward``, with what the output check found."""

    net: R.FeatureForward
    num_classes: int
    feature_dim: int | None  # None: no features
    num_exits: int


def build_networks(cfg: TrainConfig, mode: Mode, given: GivenParts, feed, device: torch.device) -> dict[str, Network]:
    """The mode's networks ("teacher", "student"), given or built, moved to ``device`` and checked."""
    if cfg.teacher_weights and not mode.has_teacher:
        raise ValueError(f"{setting_name('teacher_weights')}: {setting_name('mode')} {cfg.mode} trains no separate "
                         f"teacher (use online or offline)")
    if given.teacher is not None and not mode.has_teacher:
        raise ValueError(f"teacher=: {setting_name('mode')} {cfg.mode} trains one network (pass it as student=)")
    if given.student is None:
        _check_registry_names(cfg, mode)
    networks: dict[str, Network] = {}
    probe = feed.probe_input()
    for name in mode.roles:
        module = getattr(given, name)
        if module is None:
            arch = cfg.teacher_arch if name == "teacher" else cfg.student_arch
            if arch.startswith(CUSTOM):
                raise ValueError(f"{name} model {arch!r} was given as a module from Python; resume this run from "
                                 f"Python, passing the same module ({name}=...)")
            if feed.kind != "package":
                raise ValueError(f"{name}=: with train_data of your own, give the {name} module too (the package's "
                                 f"models need the class count and image shape of a package dataset)")
            torch.manual_seed(derive_seed(cfg.seed, "init", name))  # each network's init is its own
            channels, size = feed.image_shape[0], feed.image_shape[1]
            module = build_model(arch, num_classes=feed.num_classes, in_channels=channels, image_size=size)
        elif not isinstance(module, nn.Module):
            raise TypeError(f"{name} must be an nn.Module, got {type(module).__name__}")
        if name == "teacher" and cfg.teacher_weights:
            load_weights(module, cfg.teacher_weights)
        module = module.to(device)
        if cfg.channels_last:
            module = module.to(memory_format=torch.channels_last)
        net = R.FeatureForward(module, getattr(given, f"{name}_features"))
        networks[name] = check_outputs(name, net, probe, multi_exit=mode.multi_exit)
    classes = {name: n.num_classes for name, n in networks.items()}
    if len(set(classes.values())) > 1:
        raise ValueError(f"teacher and student disagree on the class count: teacher {classes['teacher']}, student "
                         f"{classes['student']} (their logits must cover the same classes)")
    num_classes = next(iter(classes.values()))
    if feed.num_classes is None:
        feed.num_classes = num_classes  # the labels are checked against it from now on
    elif feed.num_classes != num_classes:
        raise ValueError(f"the models have {num_classes} classes, the dataset {feed.name!r} has {feed.num_classes}")
    if cfg.beta > 0:
        missing = [name for name, n in networks.items() if n.feature_dim is None]
        if missing:
            raise ValueError(f"{setting_name('beta')} {cfg.beta} needs features from the {' and '.join(missing)}: pass "
                             f"{missing[0]}_features= (a submodule name, e.g. 'fc', whose input is the feature, or a "
                             f"callable (module, x) -> (logits, features)), or set beta=0")
    return networks


def _check_registry_names(cfg: TrainConfig, mode: Mode) -> None:
    """The config's model names fit the mode (the registry says which are multi-exit / distilled)."""
    if mode.multi_exit:
        if not cfg.student_arch.startswith(CUSTOM) and not is_multi_exit(cfg.student_arch):
            raise ValueError(f"{setting_name('mode')} self needs a multi-exit model (byot_*), got {cfg.student_arch!r}")
        return
    archs = [cfg.student_arch] + ([cfg.teacher_arch] if mode.has_teacher else [])
    for arch in archs:
        if not arch.startswith(CUSTOM) and is_multi_exit(arch):
            raise ValueError(f"{setting_name('mode')} {cfg.mode} needs single-exit models; {arch!r} is multi-exit "
                             f"(use it with {setting_name('mode')} self)")
    plain = {a: a.removesuffix("_distilled") for a in (cfg.teacher_arch, cfg.student_arch)}
    if mode.has_teacher and is_distilled(cfg.teacher_arch):
        raise ValueError(f"{setting_name('teacher_model')} {cfg.teacher_arch!r} has a distillation token, which "
                         f"only a DeiT student uses; give the teacher the plain ViT ({plain[cfg.teacher_arch]!r})")
    if not mode.has_teacher and is_distilled(cfg.student_arch):
        raise ValueError(f"{setting_name('mode')} base trains with CE only; {cfg.student_arch!r}'s distillation "
                         f"head would learn nothing (use {plain[cfg.student_arch]!r})")


def check_outputs(name: str, net: R.FeatureForward, probe: Tensor, *, multi_exit: bool) -> Network:
    """Run ``net`` on the probe batch (eval mode, no gradient: nothing changes) and check what it returns:
    ``(B, C)`` logits (``(2, B, C)`` for a distilled ViT in training mode), or ``(E, B, C)`` stacked exits with
    ``multi_exit``; features ``(B, D)`` / ``(E, B, D)`` when there are any."""
    module = net.inner
    what = f"{name} ({type(module).__name__})"
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = net(probe)
    except Exception as exc:
        raise ValueError(f"{what} failed on a batch of shape {tuple(probe.shape)} from the training data: "
                         f"{type(exc).__name__}: {exc}") from exc
    finally:
        module.train(was_training)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Tensor)):
        raise ValueError(f"{what} returned {type(out).__name__}; its forward must return the logits tensor")
    logits, features = out
    b = probe.shape[0]
    expected = "stacked exits (E, B, C), deepest first" if multi_exit else "logits (B, C)"
    ok = logits.dim() == 3 and logits.shape[1] == b and logits.shape[0] >= 2 if multi_exit else (
        logits.dim() == 2 and logits.shape[0] == b)
    if not ok:
        raise ValueError(f"{what} returned shape {tuple(logits.shape)} for a batch of {b}; expected {expected}"
                         + ("" if multi_exit else " (self KD takes a multi-exit module: --mode self)"))
    if not logits.dtype.is_floating_point:
        raise ValueError(f"{what} returned {logits.dtype} logits; expected floating point")
    feature_dim = None
    if features is not None:
        want = 3 if multi_exit else 2
        if not isinstance(features, Tensor) or features.dim() != want or features.shape[-2] != b:
            raise ValueError(f"{what}'s features have shape {tuple(getattr(features, 'shape', ()))}; expected "
                             f"{'(E, B, D)' if multi_exit else '(B, D)'}")
        feature_dim = features.shape[-1]
    num_exits = logits.shape[0] if multi_exit else 1  # (a distilled ViT's eval-mode logits are (B, C) too)
    return Network(net, logits.shape[-1], feature_dim, num_exits)


def build_heads(cfg: TrainConfig, mode: Mode, networks: dict[str, Network], device: torch.device) -> dict:
    """The feature term's trained heads (none without ``beta``): the online/offline student's projector
    ``D_s → D_t``; self KD's adapters on the two shallowest exits (the official code skips exit 3)."""
    heads: dict[str, nn.Module | None] = {name: None for name in networks}
    if cfg.beta <= 0:
        return heads
    student = networks["student"]
    if mode.multi_exit:
        heads["student"] = SelfKDAdapters(student.feature_dim, min(2, student.num_exits - 1)).to(device)
    elif mode.has_teacher:
        heads["student"] = Projector(student.feature_dim, networks["teacher"].feature_dim).to(device)
    return heads


# ============================================================================================= optimization
def build_optimization(cfg: TrainConfig, given: GivenParts, name: str, module: nn.Module, iters_per_epoch: int):
    """``(optimizer, lr policy)`` of a role. ``module`` is everything the role trains (network and head).

    A given optimizer must hold parameters of the role's network; parameters it does not hold (the feature term's
    head) join it as a new parameter group with its defaults. A factory is called with the parameters."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = getattr(given, f"{name}_optimizer")
    scheduler = getattr(given, f"{name}_scheduler")
    if optimizer is None:
        if scheduler is not None:
            raise ValueError(f"{name}_scheduler= needs {name}_optimizer= (the built-in optimizer has its built-in "
                             f"schedule, {setting_name('lr_schedule')})")
        built = R.build_optimizer(cfg, params)
        return built, R.PositionLR(functools.partial(R.lr_at, cfg), iters_per_epoch)
    if not isinstance(optimizer, torch.optim.Optimizer):
        if not callable(optimizer):
            raise TypeError(f"{name}_optimizer must be a torch.optim.Optimizer or a callable params -> Optimizer, got "
                            f"{type(optimizer).__name__}")
        optimizer = optimizer(params)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{name}_optimizer(params) returned {type(optimizer).__name__}, not a torch.optim."
                            f"Optimizer")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not held & {id(p) for p in params}:
        raise ValueError(f"{name}_optimizer holds none of the {name}'s parameters (build it over "
                         f"{name}.parameters() after the module is created, or pass a factory)")
    extra = [p for p in params if id(p) not in held]
    if extra:
        optimizer.add_param_group({"params": extra})
    if scheduler is None:
        return optimizer, R.KeepLR()
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        scheduler = scheduler(optimizer) if callable(scheduler) else scheduler
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        raise TypeError(f"{name}_scheduler must be a torch.optim.lr_scheduler scheduler (or optimizer -> scheduler), "
                        f"got {type(scheduler).__name__}")
    if scheduler.optimizer is not optimizer:
        raise ValueError(f"{name}_scheduler schedules another optimizer than {name}_optimizer")
    return optimizer, R.SchedulerLR(scheduler, iters_per_epoch, given.scheduler_interval)


# =============================================================================================== objectives
def build_objectives(cfg: TrainConfig, given: GivenParts) -> R.Objectives:
    """The built-in objectives (:mod:`spacedkd_fast.engine.losses`), or the given ``loss`` with the feature term.

    A given ``loss`` is ``loss(student_logits, teacher_logits, labels) -> scalar`` for online/offline KD (e.g. a
    :class:`~spacedkd_fast.KDLoss`), ``loss(exit_logits (E, B, C), labels) -> scalar`` for self KD."""
    distill = DistillObjective(KDOptions(temperature=cfg.temperature, alpha=cfg.alpha,
                                         label_smoothing=cfg.label_smoothing), paper=cfg.kd_objective == "paper",
                               beta=cfg.beta)
    byot = SelfKDObjective(KDOptions(temperature=cfg.temperature, alpha=cfg.self_kd_weight,
                                     label_smoothing=cfg.label_smoothing, t_squared=False), beta=cfg.beta)
    if given.loss is not None:
        if not callable(given.loss):
            raise TypeError(f"loss must be callable, got {type(given.loss).__name__}")
        distill = functools.partial(_user_distill, given.loss, cfg.beta)
        byot = functools.partial(_user_byot, given.loss, cfg.beta)
    return R.Objectives(distill=distill, byot=byot, ce=_cross_entropy, bf16=cfg.precision == "bf16",
                        feature_term=cfg.beta > 0)


def _cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """The teacher's objective on fresh batches (fp32, no label smoothing, as the official code)."""
    return F.cross_entropy(logits.float(), labels)


def _user_distill(loss, beta, student_logits, teacher_logits, labels, projected, teacher_features):
    value = _scalar(loss(student_logits, teacher_logits, labels))
    if beta > 0 and projected is not None:
        value = value + beta * feature_distance(projected, teacher_features)
    return value


def _user_byot(loss, beta, logits, labels, features, projected):
    value = _scalar(loss(logits, labels))
    if beta > 0 and projected is not None:
        target = features[0].detach()
        for adapted in projected:
            value = value + beta * feature_distance(adapted, target)
    return value


def _scalar(value) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError(f"loss returned {type(value).__name__}{tuple(getattr(value, 'shape', ()))}; it must return "
                         f"a scalar tensor (use reduction='mean')")
    return value.reshape(())
