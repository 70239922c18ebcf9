"""What one optimizer step of each role does. The trainer decides *when*; these functions decide *what*.

Each role owns its network, optimizer and (on CUDA with overlap) its stream. Every step takes the batch's global
iteration, so the learning rate is a pure function of the data position (the student replaying a batch of epoch e
uses the learning rate of epoch e), and nothing but the role's own weights and optimizer state carries over between
its steps. That is what makes the math independent of how teacher and student steps are interleaved.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spacedkd_fast.config import TrainConfig


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def lr_at(cfg: TrainConfig, epoch_position: float) -> float:
    """Learning rate at a fractional epoch position (0 ≤ position < epochs): warm-up, then the schedule."""
    if cfg.warmup_epochs > 0 and epoch_position < cfg.warmup_epochs:
        return cfg.lr * epoch_position / cfg.warmup_epochs
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "step":
        return cfg.lr * cfg.lr_gamma ** sum(epoch_position >= m for m in cfg.lr_milestones)
    progress = (epoch_position - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-12)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * cosine


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---- learning rates: a function of the batch's data position, never of how the roles interleave ----------------
class PositionLR:
    """``lr = fn(epoch position)`` set before every step (the built-in schedules: :func:`lr_at`)."""

    def __init__(self, fn: Callable[[float], float], iters_per_epoch: int) -> None:
        self.fn, self.iters_per_epoch = fn, iters_per_epoch

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int) -> float:
        lr = self.fn(iteration / self.iters_per_epoch)
        set_lr(optimizer, lr)
        return lr

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SchedulerLR:
    """A ``torch.optim.lr_scheduler`` scheduler, stepped as the role's data position crosses epoch ends
    (``interval="epoch"``) or iterations (``"step"``): the student replaying a batch of epoch e trains at the
    learning rate the teacher had in epoch e. The position only moves forward (self KD's replays, which trail
    its fresh steps, train at the current rate)."""

    def __init__(self, scheduler, iters_per_epoch: int, interval: str = "epoch") -> None:
        if interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {interval!r}")
        self.scheduler, self.iters_per_epoch, self.interval = scheduler, iters_per_epoch, interval
        self.steps = 0

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int) -> float:
        target = iteration // self.iters_per_epoch if self.interval == "epoch" else iteration
        while self.steps < target:
            with warnings.catch_warnings():  # after a resume the restored optimizer has not stepped in this process
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                self.scheduler.step()
            self.steps += 1
        return optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps = state["steps"]


class KeepLR:
    """The optimizer's own learning rate, untouched (a user optimizer given without a scheduler)."""

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int) -> float:
        return optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass(frozen=True)
class Objectives:
    """What the steps minimize, and how they run (built from the config, or with a loss given from Python).

    * ``distill(student_logits, teacher_logits, labels, projected, teacher_features) -> loss``: the online/offline
      student's objective (teacher tensors detached; ``projected``/``teacher_features`` None without a feature
      term).
    * ``byot(logits (E, B, C), labels, features (E, B, D), projected) -> loss``: self KD's replay objective.
    * ``ce(logits, labels) -> loss``: the teacher's (and a one-network mode's fresh-batch) objective.
    """

    distill: Callable
    byot: Callable
    ce: Callable = field(default=lambda logits, labels: F.cross_entropy(logits.float(), labels))
    bf16: bool = False
    feature_term: bool = False  # the steps compute the head (projector / adapters) and its term


@dataclass
class RunningLoss:
    """A mean of step losses kept on the device (no host sync per step); :meth:`take` reads it once and restarts."""

    total: Tensor | None = None
    count: int = 0

    def add(self, value: Tensor) -> None:
        self.total = value if self.total is None else self.total + value
        self.count += 1

    def take(self) -> float | None:
        """The mean since the last call (one host sync), or None without steps."""
        if self.count == 0:
            return None
        mean = float(self.total) / self.count
        self.total, self.count = None, 0
        return mean


@dataclass
class Role:
    """A trained network with its optimizer, stream, random stream and running loss.

    ``model`` is a :class:`TrainedModule` (the network and its feature head), possibly wrapped by DDP and/or
    torch.compile; :attr:`net` and :attr:`head` are the plain modules under the wrappers.
    """

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    stream: torch.cuda.Stream | None = None
    steps: int = 0
    epoch_loss: RunningLoss = field(default_factory=RunningLoss)  # the mean training loss of an epoch record
    last_lr: float = 0.0
    rng_state: dict | None = None  # this role's CPU/CUDA generator states (see ``context``)
    device: torch.device | None = None  # the CUDA device whose generator ``context`` swaps
    lr_policy: PositionLR | SchedulerLR | KeepLR = field(default_factory=KeepLR)
    step_loss: RunningLoss = field(default_factory=RunningLoss)  # ... of a step record (every --log-every steps)
    checked: list | None = None  # inside dry_run(): the losses the steps computed (nothing is updated)

    @property
    def net(self) -> FeatureForward:
        return unwrap(self.model).net

    @property
    def head(self) -> nn.Module | None:
        return unwrap(self.model).head

    def seed_rng(self, seed: int, device: torch.device) -> None:
        """Give the role a random stream of its own (dropout, DropPath), seeded from ``seed``."""
        state = {"cpu": torch.Generator().manual_seed(seed).get_state()}
        if device.type == "cuda":
            state["cuda"] = torch.Generator(device=device).manual_seed(seed).get_state()
            self.device = device
        self.rng_state = state

    def context(self) -> _RoleContext:
        """Run on the role's stream with the role's random stream swapped in as the global one.

        Teacher and student draw from separate streams, so what each draws does not depend on how their steps
        are interleaved (a model with dropout or DropPath stays bit-reproducible with and without overlap).
        """
        return _RoleContext(self)

    def record_loss(self, loss: Tensor) -> None:
        value = loss.detach().float()
        self.epoch_loss.add(value)
        self.step_loss.add(value)

    @contextlib.contextmanager
    def dry_run(self):
        """Within the block the role's steps compute their loss and stop there: no backward, no optimizer or lr
        scheduler step, no running loss, the plain module (no DDP collective, no compile) in eval mode under
        no_grad (no BatchNorm statistics or random draws change). Yields the list the losses go to."""
        model = self.model
        self.model, self.checked = unwrap(model), []
        modes = [(m, m.training) for m in self.model.modules()]  # each its own (a frozen teacher stays in eval)
        self.model.eval()
        try:
            with torch.no_grad():
                yield self.checked
        finally:
            for m, training in modes:
                m.training = training
            self.model, self.checked = model, None

    def optimizer_step(self, loss: Tensor, iteration: int) -> None:
        """Backward and one optimizer step at the learning rate of data iteration ``iteration``."""
        if self.checked is not None:
            self.checked.append(loss)
            return
        self.last_lr = self.lr_policy.apply(self.optimizer, iteration)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        self.record_loss(loss)


class _RoleContext:
    """:meth:`Role.context`: a plain class, entered twice a step (a generator-based context manager costs a few
    µs more each time, a measurable share of a tiny model's step)."""

    __slots__ = ("role", "stream", "saved_cpu", "saved_cuda")

    def __init__(self, role: Role) -> None:
        self.role = role
        self.stream = torch.cuda.stream(role.stream) if role.stream is not None else None
        self.saved_cpu = self.saved_cuda = None  # the global states the role's replace while inside

    def __enter__(self) -> None:
        if self.stream is not None:
            self.stream.__enter__()
        state = self.role.rng_state
        if state is None:
            return
        self.saved_cpu = torch.default_generator.get_state()  # (torch.get_rng_state is this, one call deeper)
        torch.default_generator.set_state(state["cpu"])
        if "cuda" in state:  # the role's device explicitly: the current device need not be the training device
            self.saved_cuda = torch.cuda.get_rng_state(self.role.device)
            torch.cuda.set_rng_state(state["cuda"], self.role.device)

    def __exit__(self, *exc) -> None:
        role = self.role
        try:
            if self.saved_cpu is not None:
                state = {"cpu": torch.default_generator.get_state()}
                torch.default_generator.set_state(self.saved_cpu)
                if self.saved_cuda is not None:
                    state["cuda"] = torch.cuda.get_rng_state(role.device)
                    torch.cuda.set_rng_state(self.saved_cuda, role.device)
                role.rng_state = state
        finally:
            if self.stream is not None:
                self.stream.__exit__(*exc)


def autocast(bf16: bool, device: torch.device):
    """bf16 autocast on ``device``, or (fp32 outside any autocast, the common case) no context at all: entering a
    disabled ``torch.autocast`` costs ~3 µs, three times a step."""
    if not bf16 and not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def has_feature_contract(model: nn.Module) -> bool:
    """The package's models (and ecosystem wrappers): ``forward_features(x) -> (logits, features)``."""
    return hasattr(model, "forward_features") and hasattr(model, "feature_dim") and hasattr(model, "num_exits")


class FeatureForward(nn.Module):
    """Every network as ``x -> (logits, features)``, so DDP, torch.compile and the snapshots see one entry point.

    ``features`` says where the features of the feature term (``beta``) come from:

    * None: the package's models' ``forward_features`` (the features cost nothing extra); for any other module
      ``forward(x)`` gives the logits and there are no features (``features`` is None);
    * a string naming a submodule (``"fc"``, ``"head.fc"``): the *input* of that layer, flattened to ``(B, D)``,
      recorded by a forward pre-hook during the one forward pass (the classifier's input: the usual
      penultimate features);
    * a callable ``features(module, x) -> (logits, features)``.
    """

    def __init__(self, model: nn.Module, features: str | Callable | None = None) -> None:
        super().__init__()
        self.inner = model
        self.features_from = features
        self._captured: list[Tensor] = []
        self._contract = features is None and has_feature_contract(model)
        if isinstance(features, str):
            try:
                layer = model.get_submodule(features)
            except AttributeError as exc:
                names = [n for n, _ in model.named_modules() if n][:12]
                raise ValueError(f"features={features!r}: {type(model).__name__} has no submodule of that name "
                                 f"(some it has: {', '.join(names)})") from exc
            # A bound method, not a closure: a deep copy (the teacher's snapshots) rebinds it to the copy.
            layer.register_forward_pre_hook(self._capture)
        elif features is not None and not callable(features):
            raise TypeError(f"features must be None, a submodule name or a callable (module, x) -> (logits, "
                            f"features), got {type(features).__name__}")

    def _capture(self, module: nn.Module, args: tuple) -> None:
        self._captured.append(args[0])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        if self._contract:
            return self.inner.forward_features(x)
        if callable(self.features_from):
            return self.features_from(self.inner, x)
        self._captured.clear()
        logits = self.inner(x)
        features = self._captured[-1].flatten(1) if self._captured else None
        self._captured.clear()
        return logits, features


class TrainedModule(nn.Module):
    """Everything one optimizer trains: the network and the head that maps its features for the feature term
    (the online student's projector, self mode's adapters). DDP wraps this whole module, so the head's gradients
    are all-reduced with the network's, and it is called as one::

        logits, features, projected = module(x)                    # projected = head(features), or None
        logits, features, _ = module(x, with_head=False)           # steps without the feature term

    The head runs in fp32 outside autocast. Skipping it where the loss does not use it keeps its parameters out
    of the graph, which is how DDP (``find_unused_parameters``) tells they get no gradient in that step.
    """

    def __init__(self, net: FeatureForward, head: nn.Module | None = None) -> None:
        super().__init__()
        self.net = net
        self.head = head

    def forward(self, x: Tensor, with_head: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        # FeatureForward is the engine's own layer, with no hooks: its forward directly, not one more module call
        # (the user's network inside it is called as a module, hooks and all).
        logits, features = self.net.forward(x)
        projected = None
        if with_head and self.head is not None:
            with torch.autocast(x.device.type, enabled=False):
                projected = self.head(features.float())
        return logits, features, projected


# ---- snapshots ---------------------------------------------------------------------------------------------------
class SnapshotPool:
    """Frozen copies of the teacher taken at block ends, reused round-robin.

    With overlap, the teacher may finish block k+1 while the student still replays block k: two buffers let it take
    T_{k+1} without waiting. On CUDA a buffer carries the event after which the student no longer reads it.
    """

    def __init__(self, teacher: nn.Module, size: int, bn_mode: str, wrap=lambda m: m) -> None:
        self._template = unwrap(teacher)
        self._wrap = wrap  # e.g. torch.compile
        self.size = size
        self.bn_mode = bn_mode
        self._free: list[tuple[nn.Module, torch.cuda.Event | None]] = []
        self._created = 0
        self.in_use: dict[int, tuple[nn.Module, torch.cuda.Event | None]] = {}  # block index -> (snapshot, ready)

    def available(self) -> bool:
        return bool(self._free) or self._created < self.size

    def take(self, block_index: int, teacher: nn.Module, device: torch.device) -> nn.Module:
        """Copy the live teacher into a free buffer (on the current stream) and hold it for ``block_index``."""
        if self._free:
            snapshot, free_event = self._free.pop()
            if free_event is not None:
                torch.cuda.current_stream(device).wait_event(free_event)
        elif self._created < self.size:
            snapshot = self._new()
        else:
            raise RuntimeError("no free teacher snapshot buffer")
        source, target = unwrap(teacher), unwrap(snapshot)
        with torch.no_grad():
            for dst, src in ((list(target.parameters()), list(source.parameters())),
                             (list(target.buffers()), list(source.buffers()))):
                if dst:  # a ViT has no buffers, and _foreach_copy_ refuses empty lists
                    torch._foreach_copy_(dst, src)
        snapshot.train(self.bn_mode == "train")
        ready = None
        if device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(device))
        self.in_use[block_index] = (snapshot, ready)
        return snapshot

    def _new(self) -> nn.Module:
        snapshot = copy.deepcopy(self._template)
        for p in snapshot.parameters():
            p.requires_grad_(False)
        self._created += 1
        return self._wrap(snapshot)

    def get(self, block_index: int, device: torch.device) -> nn.Module:
        snapshot, ready = self.in_use[block_index]
        if ready is not None:
            torch.cuda.current_stream(device).wait_event(ready)
        return snapshot

    def release(self, block_index: int, device: torch.device) -> None:
        snapshot, _ = self.in_use.pop(block_index)
        free_event = None
        if device.type == "cuda":
            free_event = torch.cuda.Event()
            free_event.record(torch.cuda.current_stream(device))
        self._free.append((snapshot, free_event))

    # checkpointing: the snapshots of blocks still being replayed
    def state_dict(self) -> dict[int, dict]:
        return {k: {n: t.detach().cpu() for n, t in unwrap(m).state_dict().items()}
                for k, (m, _) in self.in_use.items()}

    def load_state_dict(self, state: dict[int, dict], device: torch.device) -> None:
        for block_index, tensors in sorted(state.items()):
            snapshot = self._new()
            unwrap(snapshot).load_state_dict(tensors)
            snapshot.train(self.bn_mode == "train")
            self.in_use[int(block_index)] = (snapshot, None)


# ---- the steps -----------------------------------------------------------------------------------------------------
# Every step is ``step(obj, role, x, y, i, teacher=None)``: ``obj`` the run's :class:`Objectives`, ``x``/``y`` the
# batch's inputs and labels, ``i`` its data iteration (its learning rate), ``teacher`` a module answering
# ``teacher(x) -> (logits, features)`` (a block-end snapshot, the frozen teacher, or the recorded pre-update outputs
# of an s = 0 iteration). It returns the role's own pre-update ``(logits, features)``, detached (an s = 0 student
# learns from the teacher's), or None.
def ce_step(obj: Objectives, role: Role, x: Tensor, y: Tensor, i: int, teacher=None):
    """One CE step on fresh data (teacher; base network)."""
    with autocast(obj.bf16, x.device):
        logits, features, _ = role.model(x, with_head=False)
    loss = obj.ce(logits, y)
    outputs = (logits.detach(), _detach(features))
    role.optimizer_step(loss, i)
    return outputs


def ce_deepest_step(obj: Objectives, role: Role, x: Tensor, y: Tensor, i: int, teacher=None) -> None:
    """Self KD outside replay: CE on the deepest exit only (the official code's step on fresh batches)."""
    with autocast(obj.bf16, x.device):
        logits, _, _ = role.model(x, with_head=False)
    role.optimizer_step(obj.ce(logits[0], y), i)


def distill_step(obj: Objectives, role: Role, x: Tensor, y: Tensor, i: int, teacher) -> None:
    """One online/offline student step: targets from ``teacher`` (no gradient), then the distillation objective."""
    with torch.no_grad(), autocast(obj.bf16, x.device):
        teacher_logits, teacher_features = teacher(x)
    with autocast(obj.bf16, x.device):
        logits, _, projected = role.model(x, with_head=obj.feature_term)
    loss = obj.distill(logits, teacher_logits, y, projected, teacher_features if obj.feature_term else None)
    role.optimizer_step(loss, i)


def byot_step(obj: Objectives, role: Role, x: Tensor, y: Tensor, i: int, teacher=None) -> None:
    """One BYOT step of the live multi-exit network (self mode's replay, and its s = 0 step)."""
    with autocast(obj.bf16, x.device):
        logits, features, projected = role.model(x, with_head=obj.feature_term)
    loss = obj.byot(logits, y, features, projected)
    role.optimizer_step(loss, i)


def _detach(t: Tensor | None) -> Tensor | None:
    return t.detach() if t is not None else None


@torch.no_grad()
def evaluate(model: nn.Module, batches, multi_exit: bool) -> Tensor | None:
    """Correct predictions over ``batches`` of (model inputs, labels) on the device: a device tensor of counts
    ``[exit_0, ..., exit_{E-1}, ensemble, total]`` (``[correct, total]`` for a single-exit model); None without
    batches.

    ``model`` maps images to ``(logits, features)`` (a :class:`FeatureForward`). Nothing is read back to the host
    per batch: the totals are counted on the host from the batch sizes."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    counts, total = None, 0
    for x, labels in batches:
        logits, _ = model(x)
        if multi_exit:
            per_exit = (logits.argmax(-1) == labels).sum(-1)  # (E,)
            ensemble = (logits.float().softmax(-1).mean(0).argmax(-1) == labels).sum()[None]
            batch_counts = torch.cat([per_exit, ensemble])
        else:
            batch_counts = (logits.argmax(-1) == labels).sum()[None]
        counts = batch_counts if counts is None else counts + batch_counts
        total += labels.shape[0]
    model.train(was_training)
    if counts is None:
        return None
    return torch.cat([counts, torch.full((1,), total, dtype=counts.dtype, device=counts.device)])
