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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spacedkd_fast.config import TrainConfig
from spacedkd_fast.engine.losses import online_student_loss, self_kd_loss


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
    loss_sum: Tensor | None = None  # on device: no host sync per step
    loss_count: int = 0
    last_lr: float = 0.0
    rng_state: dict | None = None  # this role's CPU/CUDA generator states (see ``context``)
    device: torch.device | None = None  # the CUDA device whose generator ``context`` swaps

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

    @contextlib.contextmanager
    def context(self):
        """Run on the role's stream with the role's random stream swapped in as the global one.

        Teacher and student draw from separate streams, so what each draws does not depend on how their steps
        are interleaved (a model with dropout or DropPath stays bit-reproducible with and without overlap).
        """
        stream = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        if self.rng_state is None:
            with stream:
                yield
            return
        cuda = "cuda" in self.rng_state
        device = self.device  # explicit: the current device need not be the training device
        saved_cpu = torch.get_rng_state()
        saved_cuda = torch.cuda.get_rng_state(device) if cuda else None
        torch.set_rng_state(self.rng_state["cpu"])
        if cuda:
            torch.cuda.set_rng_state(self.rng_state["cuda"], device)
        try:
            with stream:
                yield
        finally:
            self.rng_state = {"cpu": torch.get_rng_state(),
                              **({"cuda": torch.cuda.get_rng_state(device)} if cuda else {})}
            torch.set_rng_state(saved_cpu)
            if cuda:
                torch.cuda.set_rng_state(saved_cuda, device)

    def record_loss(self, loss: Tensor) -> None:
        value = loss.detach().float()
        self.loss_sum = value if self.loss_sum is None else self.loss_sum + value
        self.loss_count += 1

    def take_mean_loss(self) -> float | None:
        """Mean loss since the last call (one host sync)."""
        if self.loss_count == 0:
            return None
        mean = float(self.loss_sum) / self.loss_count
        self.loss_sum, self.loss_count = None, 0
        return mean

    def optimizer_step(self, loss: Tensor, lr: float) -> None:
        set_lr(self.optimizer, lr)
        self.last_lr = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        self.record_loss(loss)


def autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


class FeatureForward(nn.Module):
    """Makes ``forward_features`` the module's ``forward``: ``x -> (logits, features)`` for every model (the
    features cost nothing extra), so DDP, torch.compile and the snapshots see a single entry point."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.inner.forward_features(x)


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
        logits, features = self.net(x)
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
def ce_step(cfg: TrainConfig, role: Role, x: Tensor, y: Tensor, lr: float, *, keep_outputs: bool = False,
            multi_exit: bool = False) -> tuple[Tensor, Tensor] | None:
    """One CE step on fresh data (teacher; base network; self mode's deepest exit). Returns the pre-update
    ``(logits, features)``, detached, when ``keep_outputs`` (the s = 0 student learns from them)."""
    with autocast(cfg, x.device):
        logits, features, _ = role.model(x, with_head=False)
    loss = F.cross_entropy((logits[0] if multi_exit else logits).float(), y)
    kept = (logits.detach(), features.detach()) if keep_outputs else None
    role.optimizer_step(loss, lr)
    return kept


def distill_step(cfg: TrainConfig, role: Role, x: Tensor, y: Tensor, lr: float, teacher_logits: Tensor,
                 teacher_features: Tensor) -> None:
    """One online/offline student step against given (detached) teacher outputs."""
    with autocast(cfg, x.device):
        logits, _, projected = role.model(x, with_head=cfg.beta > 0)
    loss = online_student_loss(cfg, logits, teacher_logits, y, projected, teacher_features)
    role.optimizer_step(loss, lr)


def replay_step(cfg: TrainConfig, role: Role, snapshot: nn.Module, x: Tensor, y: Tensor, lr: float) -> None:
    """One student replay step: targets from the teacher snapshot taken at the block end."""
    with torch.no_grad(), autocast(cfg, x.device):
        teacher_logits, teacher_features = snapshot(x)
    distill_step(cfg, role, x, y, lr, teacher_logits, teacher_features)


def self_replay_step(cfg: TrainConfig, role: Role, x: Tensor, y: Tensor, lr: float) -> None:
    """One BYOT step of the live multi-exit network (self mode's replay, and its s = 0 step)."""
    with autocast(cfg, x.device):
        logits, features, projected = role.model(x, with_head=cfg.beta > 0)
    loss = self_kd_loss(cfg, logits, y, features, projected)
    role.optimizer_step(loss, lr)


@torch.no_grad()
def evaluate(model: nn.Module, batches, normalize, device: torch.device, multi_exit: bool) -> Tensor:
    """Correct predictions over ``batches`` of (uint8 images, labels): a device tensor of counts
    ``[exit_0, ..., exit_{E-1}, ensemble, total]`` (``[correct, total]`` for a single-exit model).

    ``model`` maps images to ``(logits, features)`` (a :class:`FeatureForward`). Nothing is read back to the host
    per batch: the totals are counted on the host from the batch sizes."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    counts, total = None, 0
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits, _ = model(normalize(images))
        if multi_exit:
            per_exit = (logits.argmax(-1) == labels).sum(-1)  # (E,)
            ensemble = (logits.float().softmax(-1).mean(0).argmax(-1) == labels).sum()[None]
            batch_counts = torch.cat([per_exit, ensemble])
        else:
            batch_counts = (logits.argmax(-1) == labels).sum()[None]
        counts = batch_counts if counts is None else counts + batch_counts
        total += labels.shape[0]
    model.train(was_training)
    return torch.cat([counts, torch.full((1,), total, dtype=counts.dtype, device=counts.device)])
