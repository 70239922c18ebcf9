"""The spaced-KD training loop.

Reading order:
  1. ``Trainer.__init__``: device → data → schedule and replay window → models and roles → outputs → resume.
  2. ``Trainer.fit``: the scheduler loop. Each turn runs one optimizer step, of the teacher (a fresh batch, kept in
     the replay window) or of the student (a replayed batch, against the teacher snapshot of its block).
  3. ``_teacher_step`` / ``_student_step``: what those steps are, per mode.
  4. Evaluation and metrics, then checkpoints.

Teacher and student are two independent step sequences: the teacher's depends only on the data, the student's only
on the data and on snapshots taken at fixed teacher iterations (block ends). Any interleaving of the two therefore
gives the same weights. Sequential mode (``--no-overlap``) runs the official order, a teacher block then its replay;
overlap alternates them (teacher block k+1 with the replay of block k), which on CUDA puts the two roles on two
streams that run concurrently, synchronized only by events on the window slots and the snapshots.

Modes: online (teacher CE; student distills from the snapshot of its block), self (one BYOT multi-exit network: CE on
the deepest exit for fresh batches, the BYOT loss when replaying), base (one network, CE), offline (the teacher
trains all epochs, then the student distills from it, frozen, for as many epochs).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from spacedkd_fast.config import TrainConfig, incompatible_fields
from spacedkd_fast.data import load_dataset
from spacedkd_fast.data.augment import normalize
from spacedkd_fast.data.datasets import canonical_dataset_name
from spacedkd_fast.data.files import FILE_DATASET_NAMES, FileDataset, scan_folder_dataset
from spacedkd_fast.data.pipeline import derive_seed, make_source, select_data_backend
from spacedkd_fast.data.producer import Prefetcher
from spacedkd_fast.data.window import TierPlan, WindowCache
from spacedkd_fast.engine import roles as R
from spacedkd_fast.engine.distributed import (
    DistInfo,
    all_reduce_sum,
    any_rank,
    barrier,
    broadcast_from_main,
    init_distributed,
)
from spacedkd_fast.engine.losses import Projector, SelfKDAdapters
from spacedkd_fast.engine.outputs import (
    CHECKPOINT,
    RunOutputs,
    atomic_save,
    check_run_folder,
    clear_run_folder,
    load_checkpoint,
    summary_table,
)
from spacedkd_fast.models import build_model, is_distilled, is_multi_exit
from spacedkd_fast.models.weights import load_weights
from spacedkd_fast.schedule import Block, SpacingSchedule

CHECKPOINT_FORMAT = 2  # 2: per-rank state (window, random streams) beside the shared one; 1 is read too
READABLE_FORMATS = (1, 2)  # the weights and config sit in the same places in both
RANK_FOLDER = "ranks"  # <run>/ranks/rank<r>-<checkpoint id>.pt: the per-rank state of ranks 1.. under DDP
STOP_CHECK_EVERY = 8  # DDP: optimizer steps between the ranks' agreements on a stop request (a gloo all-reduce)
OVERLAP_SLACK = 16  # window slots beyond one block, so the overlapped teacher may run a little ahead


class TrainingInterrupted(Exception):
    """Raised by ``fit`` after SIGINT/SIGTERM (or ``request_stop``), once ``last.pt`` is written."""


@dataclass
class Summary:
    """End-of-run figures."""

    epochs: int
    teacher_acc: float | None
    student_acc: float | None
    exit_acc: list[float] | None
    images_per_s: float
    wall_s: float
    out: str | None
    data_wait_s: float = 0.0  # host time the loop spent waiting for batches (fresh or replayed), this session
    session_s: float = 0.0  # wall time of this session (wall_s includes the time before a resume)

    def table(self) -> str:
        rows = [("epochs", str(self.epochs))]
        if self.teacher_acc is not None:
            rows.append(("teacher test accuracy", f"{100 * self.teacher_acc:.2f} %"))
        if self.student_acc is not None:
            rows.append(("student test accuracy", f"{100 * self.student_acc:.2f} %"))
        for i, acc in enumerate(self.exit_acc or []):
            rows.append((f"exit {i}{' (deepest)' if i == 0 else ''} test accuracy", f"{100 * acc:.2f} %"))
        rows += [("training images/s", f"{self.images_per_s:,.0f}"), ("wall time", f"{self.wall_s:.1f} s")]
        if self.session_s > 0:
            rows.append(("waiting for data", f"{self.data_wait_s:.1f} s ({100 * self.data_wait_s / self.session_s:.1f} "
                                              f"% of the run)"))
        if self.out:
            rows.append(("outputs", self.out))
        return summary_table(rows)


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; validates explicit names. A CUDA device always comes back with
    its index (``cuda`` → the current device), which streams, threads and generators need."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine (use cpu or auto)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def bind_device(device: torch.device) -> None:
    """Make ``device`` the current CUDA device of this process: Triton launches, ``torch.cuda.*`` calls without a
    device argument and new threads' defaults all follow the current device, not the one tensors live on."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def configure_math(cfg: TrainConfig, device: torch.device) -> None:
    """CUDA numerics of a run.

    * TF32 for fp32 matrix multiplies and convolutions (``--tf32``, default on): Ampere and later run them on tensor
      cores at ~8x the fp32 rate, with a 10-bit mantissa in the products and fp32 accumulation.
    * ``--deterministic``: deterministic kernels where PyTorch has them (cuDNN's fastest convolution algorithms and
      atomics-based reductions vary between runs in the last bits), so overlap, reruns and resumes are
      bit-identical. Ops with no deterministic CUDA kernel warn once and run as they are (``warn_only``): the
      bilinear upsampling of BYOT's attention gates is one (its backward adds with atomics).
    """
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    if cfg.deterministic:
        # cuBLAS reads this when it creates its handles, i.e. at the first matrix multiply of the process.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def _available_host_memory() -> int:
    """Bytes of available host memory (MemAvailable), or 8 GiB where /proc/meminfo is missing."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def window_budgets(cfg: TrainConfig, device: torch.device, local_world: int = 1) -> tuple[float, float]:
    """Bytes for the device and host tiers of the replay window of this process (see ``--window-budget``/
    ``--host-budget``, which are per process). The defaults share host memory between the ``local_world``
    processes of this machine: 25 % of it in all, not per rank."""
    host_share = 0.25 * _available_host_memory() / max(local_world, 1)
    if cfg.window_budget is not None:
        device_budget = cfg.window_budget * 1e9
    elif device.type == "cuda":
        device_budget = 0.25 * torch.cuda.mem_get_info(device)[0]  # each rank has a GPU of its own
    else:
        device_budget = host_share
    if cfg.host_budget is not None:
        host_budget = cfg.host_budget * 1e9
    else:  # on a CPU the "device" tier already is host memory
        host_budget = host_share if device.type == "cuda" else 0.0
    return device_budget, host_budget


def load_training_data(cfg: TrainConfig, data_backend: str):
    """The run's dataset: decoded into memory, or (folder datasets with ``--stream``, by default with DALI) a
    :class:`~spacedkd_fast.data.files.FileDataset` streamed from disk."""
    name = canonical_dataset_name(cfg.dataset)
    folder = name in FILE_DATASET_NAMES
    stream = cfg.stream if cfg.stream is not None else folder and data_backend == "dali"
    if stream and not folder:
        raise ValueError(f"--stream applies to folder datasets ({', '.join(FILE_DATASET_NAMES)}), not "
                         f"{cfg.dataset!r}")
    split = dict(val_fraction=cfg.val_fraction, split_seed=cfg.split_seed)
    if stream:
        default_size = 64 if name == "tiny-imagenet" else 224
        return scan_folder_dataset(cfg.dataset, cfg.data_dir, image_size=cfg.image_size or default_size, **split)
    return load_dataset(cfg.dataset, cfg.data_dir, image_size=cfg.image_size, **split)


def subset_dataset(dataset, n: int):
    """The first ``n`` training images (and ``n // 4`` test images) of a fixed shuffle, the same for every seed."""
    if n > len(dataset.train_labels):
        raise ValueError(f"--subset {n} is larger than the training set ({len(dataset.train_labels)} images)")
    train = torch.randperm(len(dataset.train_labels), generator=torch.Generator().manual_seed(0))[:n]
    test = torch.randperm(len(dataset.test_labels), generator=torch.Generator().manual_seed(1))
    test = test[:max(n // 4, min(len(test), 16))]
    if isinstance(dataset, FileDataset):
        return dataclasses.replace(dataset, name=f"{dataset.name}[subset {n}]",
                                   train_files=tuple(dataset.train_files[i] for i in train.tolist()),
                                   train_labels=dataset.train_labels[train].contiguous(),
                                   test_files=tuple(dataset.test_files[i] for i in test.tolist()),
                                   test_labels=dataset.test_labels[test].contiguous())
    return dataclasses.replace(dataset, name=f"{dataset.name}[subset {n}]",
                               train_images=dataset.train_images[train].contiguous(),
                               train_labels=dataset.train_labels[train].contiguous(),
                               test_images=dataset.test_images[test].contiguous(),
                               test_labels=dataset.test_labels[test].contiguous())


class Trainer:
    """One training run: ``Trainer(cfg).fit()`` returns a :class:`Summary`."""

    def __init__(self, cfg: TrainConfig, *, log=print) -> None:
        self.cfg, self.log = cfg, log
        resume_state = self._load_resume(cfg) if cfg.resume is not None else None

        # ---- device, processes, threads ------------------------------------------------------------------------
        self.device = resolve_device(cfg.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if self.dist.enabled and cfg.out is not None:  # a default --out carries each rank's own clock: use rank 0's
            self.cfg = cfg = dataclasses.replace(cfg, out=broadcast_from_main(cfg.out, self.dist))
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        bind_device(self.device)
        configure_math(cfg, self.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if self.device.type == "cpu":
            # Early training on zero-padded images produces denormal activations, which x86 handles ~10x slower.
            torch.set_flush_denormal(True)
        # self and base train one network, offline a frozen teacher's student: nothing to overlap.
        self.overlap = cfg.mode == "online" and (cfg.overlap if cfg.overlap is not None else self.device.type == "cuda")

        # ---- data ----------------------------------------------------------------------------------------------
        self.data_backend = select_data_backend(cfg.data_backend, self.device)
        self.dataset = load_training_data(cfg, self.data_backend)
        if cfg.subset is not None:
            self.dataset = subset_dataset(self.dataset, cfg.subset)
        self.source = make_source(self.dataset, batch_size=cfg.batch_size, seed=cfg.seed, device=self.device,
                                  rank=self.dist.rank, world=self.dist.world, backend=self.data_backend)
        self.iters_per_epoch = self.source.iters_per_epoch
        mean, std = self.dataset.mean, self.dataset.std
        self.normalize = lambda u8: normalize(u8, mean, std, channels_last=cfg.channels_last)

        # ---- schedule and replay window ------------------------------------------------------------------------
        space = cfg.space if cfg.mode in ("online", "self") else 0.0
        self.boundaries = _schedule_boundaries(resume_state, cfg)  # the lengths an extended run had before
        self.schedule = SpacingSchedule(space, self.iters_per_epoch, cfg.epochs, start_epoch=cfg.start_epoch,
                                        replay_tail=cfg.replay_tail, boundaries=self.boundaries)
        self._block_starts = [b.start for b in self.schedule.blocks]
        capacity = max(self.schedule.block_length, 1) + (OVERLAP_SLACK if self.overlap else 0)
        batch = self.source.local_batch_size(0)
        slot_bytes = batch * (math.prod(self.source.image_shape) + 8)
        device_budget, host_budget = window_budgets(cfg, self.device, self.dist.local_world)
        tiers = TierPlan.for_budget(capacity, slot_bytes, device_budget, host_budget)
        self.window = WindowCache(capacity, self.source.image_shape, batch, self.device, self.normalize,
                                  storage=cfg.window_storage, tiers=tiers, regenerate=self.source.regenerate)

        # ---- models and roles ----------------------------------------------------------------------------------
        if cfg.teacher_weights and cfg.mode in ("self", "base"):
            raise ValueError(f"--teacher-weights: --mode {cfg.mode} trains no separate teacher (use online or "
                             f"offline)")
        self.teacher: R.Role | None = None
        channels, size = self.source.image_shape[0], self.source.image_shape[1]
        if cfg.mode == "self":
            if not is_multi_exit(cfg.student_arch):
                raise ValueError(f"--mode self needs a multi-exit model (byot_*), got {cfg.student_arch!r}")
            net = self._build(cfg.student_arch, "student", channels, size)
            adapters = None
            if cfg.beta > 0:  # the two shallowest exits get a feature term (the official code skips exit 3)
                adapters = SelfKDAdapters(net.feature_dim, min(2, net.num_exits - 1)).to(self.device)
            self.student = self._role("student", net, adapters, multi_exit=True)
        else:
            archs = [cfg.student_arch] + ([cfg.teacher_arch] if cfg.mode != "base" else [])
            for arch in archs:
                if is_multi_exit(arch):
                    raise ValueError(f"--mode {cfg.mode} needs single-exit models; {arch!r} is multi-exit "
                                     f"(use it with --mode self)")
            plain = {a: a.removesuffix("_distilled") for a in (cfg.teacher_arch, cfg.student_arch)}
            if cfg.mode != "base" and is_distilled(cfg.teacher_arch):
                raise ValueError(f"--teacher-model {cfg.teacher_arch!r} has a distillation token, which only a DeiT "
                                 f"student uses; give the teacher the plain ViT ({plain[cfg.teacher_arch]!r})")
            if cfg.mode == "base" and is_distilled(cfg.student_arch):
                raise ValueError(f"--mode base trains with CE only; {cfg.student_arch!r}'s distillation head would "
                                 f"learn nothing (use {plain[cfg.student_arch]!r})")
            if cfg.mode != "base":
                teacher_net = self._build(cfg.teacher_arch, "teacher", channels, size)
                if cfg.teacher_weights:
                    load_weights(teacher_net, cfg.teacher_weights)
                self.teacher = self._role("teacher", teacher_net, None)
            student_net = self._build(cfg.student_arch, "student", channels, size)
            projector = None
            if cfg.beta > 0 and cfg.mode != "base":
                projector = Projector(student_net.feature_dim, teacher_net.feature_dim).to(self.device)
            self.student = self._role("student", student_net, projector)
        if self.overlap and self.device.type == "cuda":
            self.teacher.stream = torch.cuda.Stream(self.device)
            self.student.stream = torch.cuda.Stream(self.device)
        self.snapshots = None
        if cfg.mode == "online":
            self.snapshots = R.SnapshotPool(self.teacher.net, 2 if self.overlap else 1, cfg.teacher_bn,
                                            torch.compile if cfg.compile else (lambda m: m))

        # ---- run state -----------------------------------------------------------------------------------------
        self.t_iter = 0  # next teacher iteration (per phase in offline mode)
        # Offline mode: "teacher", then "student"; a teacher given by --teacher-weights is trained already.
        self.phase = "student" if cfg.mode == "offline" and cfg.teacher_weights else "teacher"
        self._frozen_teacher_acc: float | None = None  # offline with --teacher-weights: measured once
        if self.phase == "student" and self.teacher is not None:
            self.teacher.net.eval()
        self.s_block = self._next_replayed(0)  # the block the student replays next
        self.s_offset = 0  # the student's position inside it
        self.online_outputs: dict[int, tuple] = {}  # s = 0: the teacher outputs waiting for the student
        self.history: list[dict] = []  # metrics records written so far
        self.pending: dict[int, dict] = {}  # epoch -> evaluations not yet complete
        self.evaluated_through = 0  # one-network modes: last epoch evaluated
        self.actions = 0  # optimizer steps taken (progress)
        self.images_seen = 0  # fresh training images consumed (both phases)
        # Host seconds the loop spent on getting batches: rendering one inline, the prefetch queue running dry,
        # fetching or regenerating a replayed one (on a GPU mostly queued on a side stream, so not counted). Near 0
        # means the data path is not the bottleneck.
        self.data_wait_s = 0.0
        self.elapsed_before = 0.0
        self._last_action = "student"
        self._stop_reason: str | None = None
        self._checkpoint_due = False
        self._prefetcher: Prefetcher | None = None

        # ---- outputs -------------------------------------------------------------------------------------------
        # On every rank (ranks > 0 write their own checkpoint state there). A resumed run stays in its folder.
        self.run_folder = Path(cfg.resume) if cfg.resume else (Path(cfg.out) if cfg.out else None)
        if self.run_folder is not None:
            check_run_folder(self.run_folder, resume=resume_state is not None, overwrite=cfg.overwrite)
            if cfg.overwrite and resume_state is None and self.dist.is_main:
                clear_run_folder(self.run_folder)
            barrier(self.dist)
        self.best_acc: float | None = resume_state.get("best_acc") if resume_state is not None else None
        self._checkpoint_ids: list[int] = []  # DDP rank files kept: those of last.pt and previous.pt
        self.outputs = RunOutputs(self.run_folder, enabled=self.dist.is_main, trace_batches=cfg.trace_batches,
                                  resume=resume_state is not None)
        self.outputs.write_config(cfg.to_dict())
        if resume_state is not None:
            self._restore(resume_state)

    # ================================================================================================ setup helpers
    def _build(self, arch: str, which: str, channels: int, size: int) -> nn.Module:
        torch.manual_seed(derive_seed(self.cfg.seed, "init", which))  # each network's init is its own
        model = build_model(arch, num_classes=self.dataset.num_classes, in_channels=channels, image_size=size)
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.cfg.channels_last else model

    def _role(self, name: str, net: nn.Module, head: nn.Module | None, multi_exit: bool = False) -> R.Role:
        model: nn.Module = R.TrainedModule(R.FeatureForward(net), head)
        params = list(model.parameters())
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # Self mode's CE-only steps skip the adapters (their parameters get no gradient in those steps).
            model = DDP(model, device_ids=ids, process_group=self.dist.group,
                        find_unused_parameters=multi_exit and head is not None)
        if self.cfg.compile:
            model = torch.compile(model)
        role = R.Role(name=name, model=model, optimizer=R.build_optimizer(self.cfg, params))
        role.seed_rng(derive_seed(self.cfg.seed, "rng", name, self.dist.rank), self.device)
        return role

    def _replays(self, block: Block) -> bool:
        """Whether the student replays ``block`` (self mode's s = 0 blocks are one BYOT step, taken at once)."""
        return block.replay and self.cfg.mode in ("online", "self") and not (self.cfg.mode == "self" and block.online)

    def _next_replayed(self, index: int) -> int:
        blocks = self.schedule.blocks
        while index < len(blocks) and not self._replays(blocks[index]):
            index += 1
        return index

    def _block_at(self, iteration: int) -> Block:
        return self.schedule.blocks[bisect.bisect_right(self._block_starts, iteration) - 1]

    def _lr(self, iteration: int) -> float:
        """The learning rate of a batch: a function of its epoch position only."""
        return R.lr_at(self.cfg, iteration / self.iters_per_epoch)

    # ====================================================================================================== the loop
    def fit(self) -> Summary:
        self.log(f"spacedkd_fast: {self.cfg.mode} on {self.dataset.name} ({len(self.dataset.train_labels)} train / "
                 f"{len(self.dataset.test_labels)} test images), {self.device}"
                 f"{f' x{self.dist.world} ranks' if self.dist.enabled else ''}, "
                 f"{'overlapped' if self.overlap else 'sequential'}; {self._describe_schedule()}")
        self.log(f"spacedkd_fast: outputs in {self.run_folder}" if self.run_folder is not None else
                 "spacedkd_fast: no output folder (out=None): no metrics, no checkpoint, nothing to resume from")
        previous = self._install_signal_handlers()
        if self.overlap and self.device.type == "cuda":
            for role in (self.teacher, self.student):
                role.stream.wait_stream(torch.cuda.current_stream(self.device))
        self._start = time.perf_counter()
        self._record_clock = (self._start, self.images_seen, self.data_wait_s)
        if self.cfg.mode == "online" and self.actions == 0:
            self._student_evals(None)  # epochs that end before the first replay evaluate the untrained student
        if self.cfg.mode == "offline" and self.cfg.teacher_weights:
            counts, _ = self._measure(self.teacher)  # the given teacher, once (it is not trained here)
            self._frozen_teacher_acc = counts[0].item() / counts[1].item()
        progress = self._progress_bar()
        self._start_prefetcher()
        try:
            while not self._done():
                action = self._choose()
                self._teacher_step() if action == "teacher" else self._student_step()
                self._last_action = action
                self.actions += 1
                progress.update(1)
                self._after_action()
                if self.online_outputs:
                    continue  # an s = 0 student step is due: state is only saved between whole iterations
                if self._checkpoint_due:
                    self._checkpoint()
                if self._stop_agreed():
                    self._checkpoint()
                    where = f"; resume with --resume {self.run_folder}" if self.run_folder else ""
                    reason = self._stop_reason or "a signal to another rank"
                    raise TrainingInterrupted(f"stopped by {reason} at teacher iteration {self.t_iter}{where}")
        finally:
            progress.close()
            if self._prefetcher is not None:
                self._prefetcher.close()
            self.source.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self._sync()
        session = time.perf_counter() - self._start
        wall = self.elapsed_before + session
        self.outputs.curves(self.history)
        self.outputs.close()
        last = self.history[-1] if self.history else {}
        return Summary(epochs=self.cfg.epochs, teacher_acc=last.get("teacher_acc"),
                       student_acc=last.get("student_acc"), exit_acc=last.get("exit_acc"),
                       images_per_s=self.images_seen / max(wall, 1e-9), wall_s=wall,
                       out=str(self.outputs.folder) if self.outputs.folder is not None else None,
                       data_wait_s=self.data_wait_s, session_s=session)

    def request_stop(self, reason: str = "request") -> None:
        """Stop at the next whole iteration and write last.pt, as SIGINT/SIGTERM do (under DDP: every rank stops
        at the same step, within ``STOP_CHECK_EVERY`` steps of the request, whichever rank got it)."""
        self._stop_reason = reason

    def _stop_agreed(self) -> bool:
        """Whether to stop now. Under DDP the ranks decide together, at the same optimizer step (the schedule is
        the same on every rank), so none is left waiting in a collective that the others never join."""
        if not self.dist.enabled:
            return self._stop_reason is not None
        if self.actions % STOP_CHECK_EVERY:
            return False
        return any_rank(self._stop_reason is not None, self.dist)

    def _install_signal_handlers(self) -> dict:
        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda signum, frame: self.request_stop(signal.Signals(signum).name))
        except ValueError:  # not the main thread: leave signals alone
            pass
        return previous

    # ---- the scheduler -------------------------------------------------------------------------------------------
    def _done(self) -> bool:
        if self.cfg.mode == "offline":
            return self.phase == "student" and self.t_iter >= self.schedule.total_iterations
        return self.t_iter >= self.schedule.total_iterations and self.s_block >= len(self.schedule.blocks)

    def _student_ready(self) -> bool:
        """Whether the student's next replay step has its data and its teacher."""
        if self.s_block >= len(self.schedule.blocks):
            return False
        block = self.schedule.blocks[self.s_block]
        return block.start in self.online_outputs if block.online else self.t_iter >= block.stop

    def _teacher_ready(self) -> bool:
        """Whether the teacher's next step can run now: a free window slot; a free snapshot buffer at a block end."""
        if self.t_iter >= self.schedule.total_iterations:
            return False
        if self.cfg.mode not in ("online", "self"):
            return True
        block = self._block_at(self.t_iter)
        if block.online:
            return not self.online_outputs  # the s = 0 student consumes each batch before the next one
        if self._replays(block) and not self.window.is_free(self.t_iter):
            return False
        at_block_end = self.t_iter == block.stop - 1
        return not (at_block_end and self._replays(block) and self.snapshots is not None
                    and not self.snapshots.available())

    def _choose(self) -> str:
        teacher, student = self._teacher_ready(), self._student_ready()
        if not teacher and not student:
            raise RuntimeError(f"scheduler stalled at teacher iteration {self.t_iter}, student block {self.s_block} "
                               f"position {self.s_offset}, window holding {len(self.window)} batches")
        if not self.overlap:  # the official order: replay a finished block before the teacher moves on
            return "student" if student else "teacher"
        if teacher and student:
            return "student" if self._last_action == "teacher" else "teacher"
        return "teacher" if teacher else "student"

    # ---- teacher steps: fresh batches ----------------------------------------------------------------------------
    def _teacher_step(self) -> None:
        cfg, i = self.cfg, self.t_iter
        role = self.teacher if self.teacher is not None and self.phase == "teacher" else self.student
        with role.context():
            waited = time.perf_counter()
            plan, images, labels = self._fresh_batch(self._data_iteration())
            self.data_wait_s += time.perf_counter() - waited
            x, lr = self.normalize(images), self._lr(i)
            if cfg.mode in ("base", "offline") and not (cfg.mode == "offline" and self.phase == "student"):
                R.ce_step(cfg, role, x, labels, lr)
            elif cfg.mode == "offline":
                with torch.no_grad(), R.autocast(cfg, self.device):
                    t_logits, t_features = self.teacher.net(x)
                R.distill_step(cfg, role, x, labels, lr, t_logits, t_features)
            else:
                block = self._block_at(i)
                if block.online and cfg.mode == "self":
                    R.self_replay_step(cfg, role, x, labels, lr)  # s = 0 self-KD: one BYOT step per batch
                elif block.online:
                    logits, features = R.ce_step(cfg, role, x, labels, lr, keep_outputs=True)
                    self.online_outputs[i] = (images, x, labels, logits, features, self._event(), role.steps - 1)
                else:
                    if self._replays(block):
                        self.window.put(i, images, labels, plan)
                    R.ce_step(cfg, role, x, labels, lr, multi_exit=cfg.mode == "self")
                    if i == block.stop - 1 and self._replays(block) and self.snapshots is not None:
                        self.snapshots.take(block.index, self.teacher.net, self.device)
            self.outputs.batch("teacher" if cfg.mode != "base" else "student", role.steps - 1, images, labels)
        self.images_seen += labels.shape[0] * self.dist.world
        self.t_iter += 1

    # ---- student steps: replayed batches -------------------------------------------------------------------------
    def _student_step(self) -> None:
        cfg, role = self.cfg, self.student
        block = self.schedule.blocks[self.s_block]
        i = block.start + self.s_offset
        with role.context():
            lr = self._lr(i)
            if block.online:  # s = 0: the teacher's pre-update outputs of this very batch
                images, x, labels, logits, features, ready, teacher_updates = self.online_outputs.pop(i)
                if ready is not None:  # produced on the teacher's stream
                    torch.cuda.current_stream(self.device).wait_event(ready)
                    for t in (images, x, labels, logits, features):
                        t.record_stream(torch.cuda.current_stream(self.device))
                R.distill_step(cfg, role, x, labels, lr, logits, features)
            else:
                waited = time.perf_counter()
                images, labels = self.window.raw(i)
                self._prefetch_replay(block)  # the next replayed batch, if it lives off the device
                self.data_wait_s += time.perf_counter() - waited
                x = self.normalize(images)
                teacher_updates = None
                if cfg.mode == "self":
                    R.self_replay_step(cfg, role, x, labels, lr)
                else:
                    R.replay_step(cfg, role, self.snapshots.get(block.index, self.device), x, labels, lr)
                    teacher_updates = block.stop  # the snapshot was taken after the block's last teacher update
            if self.outputs.trace:
                self.outputs.batch("student", role.steps - 1, images, labels, teacher_updates)
            if not block.online:
                self.window.release(i)  # after the trace: a device-tier batch is a view of its slot
            self.s_offset += 1
            if self.s_offset == block.length:
                if not block.online and self.snapshots is not None:
                    self.snapshots.release(block.index, self.device)
                if cfg.mode == "online":
                    self._student_evals(block)
                self.s_block, self.s_offset = self._next_replayed(self.s_block + 1), 0

    @property
    def _student_epoch_offset(self) -> int:
        """Offline mode numbers the student's epochs after the teacher's (none when the teacher came trained)."""
        return self.cfg.epochs if self.cfg.mode == "offline" and not self.cfg.teacher_weights else 0

    def _data_iteration(self) -> int:
        """Index of the teacher's next fresh batch in the data stream (offline's student phase reads epochs
        E..2E-1 of it, fresh batches of its own)."""
        return self.t_iter + (self.schedule.total_iterations if self.phase == "student" else 0)

    def _fresh_batch(self, data_iteration: int):
        """``(plan, uint8 images, labels)`` of a fresh batch: from the prefetch thread, or rendered here."""
        if self._prefetcher is not None:
            return self._prefetcher.next(data_iteration)
        return self._render_fresh(data_iteration)

    def _render_fresh(self, data_iteration: int):
        """``(plan, uint8 images, labels)`` of the data stream's batch ``data_iteration`` (the prefetch thread runs
        this too)."""
        plan = self.source.plan(data_iteration)
        return (plan, *self.source.render(plan))

    def _prefetch_replay(self, block: Block) -> None:
        nxt = block.start + self.s_offset + 1
        if nxt >= block.stop:
            following = self._next_replayed(self.s_block + 1)
            if following >= len(self.schedule.blocks):
                return
            nxt = self.schedule.blocks[following].start
        if nxt in self.window:
            self.window.prefetch(nxt)

    def _start_prefetcher(self) -> None:
        depth = self.cfg.prefetch if self.cfg.prefetch is not None else (2 if self.device.type == "cuda" else 0)
        self._prefetcher = None
        if depth > 0:
            end = self.schedule.total_iterations * (2 if self.cfg.mode == "offline" else 1)
            self._prefetcher = Prefetcher(range(self._data_iteration(), end), self._render_fresh, depth, self.device)

    def _event(self) -> torch.cuda.Event | None:
        if not (self.overlap and self.device.type == "cuda"):
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    # ====================================================================================== evaluation and metrics
    def _after_action(self) -> None:
        """Epoch-end evaluations on the teacher's timeline."""
        if self.t_iter == 0 or self.t_iter % self.iters_per_epoch:
            return
        epoch, cfg = self.t_iter // self.iters_per_epoch, self.cfg
        if cfg.mode == "online":
            if self._last_action == "teacher":
                self._evaluate("teacher", epoch)
            return
        # One network (self, base) or one phase (offline): evaluate once the replays due by this epoch are done.
        if self._student_ready() or epoch <= self.evaluated_through:
            return
        self.evaluated_through = epoch
        if cfg.mode == "offline" and self.phase == "teacher":
            self._evaluate("teacher", epoch)
            if epoch == cfg.epochs:  # the teacher is done: freeze it, train the student on fresh data
                self.phase, self.t_iter, self.evaluated_through = "student", 0, 0
                self.teacher.net.eval()
        else:
            self._evaluate("student", epoch + self._student_epoch_offset)

    def _evaluate(self, which: str, epoch: int) -> None:
        role = self.teacher if which == "teacher" else self.student
        counts, loss = self._measure(role, multi_exit=self.cfg.mode == "self")
        if which == "student":
            self._keep_if_best(counts, epoch)
        entry = self.pending.setdefault(epoch, {"epoch": epoch})
        entry.update({f"{which}_counts": counts, f"{which}_loss": loss, f"lr_{which}": role.last_lr})
        self._emit_ready()

    def _student_evals(self, block: Block | None) -> None:
        """Online mode: the student just finished replaying ``block``; evaluate it for the epochs it stands for."""
        epochs = self.schedule.student_eval_epochs(block)
        if not epochs:
            return
        counts, loss = self._measure(self.student)
        self._keep_if_best(counts, epochs[-1])
        for epoch in epochs:
            entry = self.pending.setdefault(epoch, {"epoch": epoch})
            entry.update(student_counts=counts, student_loss=loss, lr_student=self.student.last_lr)
        self._emit_ready()

    def _keep_if_best(self, counts: torch.Tensor, epoch: int) -> None:
        """Write best.pt when the student just measured beats every earlier evaluation (its weights as measured)."""
        acc = _student_accuracy(counts.tolist(), multi_exit=self.cfg.mode == "self")
        if self.best_acc is not None and acc <= self.best_acc:
            return
        self.best_acc = acc
        if self.dist.is_main and self.run_folder is not None:
            self.outputs.best({"format": CHECKPOINT_FORMAT, "config": self.cfg.to_dict(), "epoch": epoch,
                               "student_acc": acc, "roles": {"student": _role_state(self.student)}})

    def _measure(self, role: R.Role, multi_exit: bool = False) -> tuple[torch.Tensor, float | None]:
        """Test-set counts (CPU tensor) and the role's mean training loss since the last call. Both are computed
        on the role's stream (the counts summed over ranks there) and read back on that same stream, after the
        work that produced them: the default stream knows nothing of it."""
        with role.context():
            batches = self.source.test_batches(self.cfg.eval_batch_size)
            counts = R.evaluate(role.net, batches, self.normalize, self.device, multi_exit)
            return all_reduce_sum(counts, self.dist).cpu(), role.take_mean_loss()

    def _record_complete(self, entry: dict) -> bool:
        if self.cfg.mode == "online":
            return "teacher_counts" in entry and "student_counts" in entry
        return "teacher_counts" in entry or "student_counts" in entry

    def _emit_ready(self) -> None:
        """Write the complete metrics records in epoch order; a checkpoint follows each epoch."""
        while self.pending and self._record_complete(self.pending[min(self.pending)]):
            record = self._finish_record(self.pending.pop(min(self.pending)))
            self.history.append(record)
            self.outputs.metrics(record)
            self._checkpoint_due = True

    def _finish_record(self, entry: dict) -> dict:
        record = {k: v for k, v in entry.items() if not k.endswith("_counts")}
        if "teacher_counts" in entry:
            correct, total = entry["teacher_counts"].tolist()
            record["teacher_acc"] = correct / total
        if "student_counts" in entry:
            counts = entry["student_counts"].tolist()
            if self.cfg.mode == "self":
                record["exit_acc"] = [c / counts[-1] for c in counts[:-2]]
                record["ensemble_acc"] = counts[-2] / counts[-1]
                record["teacher_acc"] = record["exit_acc"][0]  # the deepest exit
            record["student_acc"] = _student_accuracy(counts, multi_exit=self.cfg.mode == "self")
        if self.cfg.mode == "offline" and "teacher_acc" not in record:
            teacher_records = [r for r in self.history if "teacher_acc" in r]
            record["teacher_acc"] = teacher_records[-1]["teacher_acc"] if teacher_records else self._frozen_teacher_acc
        now = time.perf_counter()
        start, seen, waited = self._record_clock
        record["images_per_s"] = (self.images_seen - seen) / max(now - start, 1e-9)
        record["data_wait_fraction"] = (self.data_wait_s - waited) / max(now - start, 1e-9)
        record["elapsed_s"] = self.elapsed_before + now - self._start
        self._record_clock = (now, self.images_seen, self.data_wait_s)
        return record

    # =============================================================================================== checkpoints
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _checkpoint(self) -> None:
        """Write last.pt atomically: everything needed to continue bit-identically.

        Under DDP the models, optimizers and schedule are the same on every rank, but the replay window (this
        rank's shard of the batches) and the random streams are not: ranks 1.. write theirs to
        ``ranks/rank<r>-<id>.pt`` first, then rank 0 writes last.pt naming that id, then the older rank files go.
        A crash at any point leaves a last.pt (or previous.pt) whose rank files exist."""
        self._checkpoint_due = False
        if self.run_folder is None:
            return
        self._sync()
        checkpoint_id = self.actions
        rank_state = self._rank_state(checkpoint_id)
        rank_dir = self.run_folder / RANK_FOLDER
        if self.dist.enabled and not self.dist.is_main:
            rank_dir.mkdir(parents=True, exist_ok=True)
            atomic_save(rank_state, rank_dir / f"rank{self.dist.rank}-{checkpoint_id}.pt")
        barrier(self.dist)  # every rank file is on disk before last.pt points at them
        if self.dist.is_main:
            roles = {"teacher": self.teacher, "student": self.student}
            state = {
                "format": CHECKPOINT_FORMAT,
                "config": self.cfg.to_dict(),
                "world": self.dist.world,
                "checkpoint_id": checkpoint_id,
                "boundaries": list(self.boundaries),
                "best_acc": self.best_acc,
                "roles": {name: _role_state(role) for name, role in roles.items() if role is not None},
                "position": {"t_iter": self.t_iter, "phase": self.phase, "s_block": self.s_block,
                             "s_offset": self.s_offset, "last_action": self._last_action, "actions": self.actions,
                             "evaluated_through": self.evaluated_through},
                "snapshots": self.snapshots.state_dict() if self.snapshots is not None else {},
                "history": self.history,
                "pending": {e: {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in entry.items()}
                            for e, entry in self.pending.items()},
                "images_seen": self.images_seen,
                "elapsed": self.elapsed_before + time.perf_counter() - self._start,
                "rank_state": rank_state,
            }
            self.outputs.checkpoint(state)
        barrier(self.dist)
        self._checkpoint_ids = (self._checkpoint_ids + [checkpoint_id])[-2:]  # last.pt's and previous.pt's
        if self.dist.enabled and not self.dist.is_main:
            keep = {f"rank{self.dist.rank}-{i}.pt" for i in self._checkpoint_ids}
            for old in rank_dir.glob(f"rank{self.dist.rank}-*.pt"):
                if old.name not in keep:
                    old.unlink(missing_ok=True)

    def _rank_state(self, checkpoint_id: int) -> dict:
        """What differs between ranks: the window (this rank's batches) and every random stream."""
        roles = {"teacher": self.teacher, "student": self.student}
        return {
            "rank": self.dist.rank,
            "checkpoint_id": checkpoint_id,
            "window": self.window.state_dict(),
            "roles": {name: {"rng": role.rng_state,
                             "loss": (role.loss_sum.cpu() if role.loss_sum is not None else None, role.loss_count)}
                      for name, role in roles.items() if role is not None},
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def _load_resume(self, cfg: TrainConfig) -> dict:
        state, path = load_checkpoint(cfg.resume, log=self.log)  # last.pt, or previous.pt if that one is torn
        if not isinstance(state, dict) or "format" not in state:
            raise ValueError(f"--resume {cfg.resume}: {path.name} is not a spacedkd_fast checkpoint")
        if state.get("format") == 1:  # a single-process checkpoint of the first format: same content, other places
            state = _upgrade_format_1(state)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"--resume {cfg.resume}: checkpoint format {state.get('format')!r}, this version reads "
                             f"{CHECKPOINT_FORMAT}")
        saved = TrainConfig.from_dict(state["config"])
        differ = incompatible_fields(saved, cfg)
        if differ:
            details = "; ".join(f"{f}: saved {getattr(saved, f)!r}, requested {getattr(cfg, f)!r}" for f in differ)
            raise ValueError(f"--resume {cfg.resume}: incompatible config, these fields differ from the saved run: "
                             f"{details}" + (" (a run can be extended, not shortened)" if "epochs" in differ else ""))
        if cfg.epochs > saved.epochs and cfg.mode == "offline":
            raise ValueError(f"--resume {cfg.resume} --epochs {cfg.epochs}: an offline run cannot be extended (its "
                             f"frozen teacher's phase has {saved.epochs} epochs)")
        state["saved_epochs"] = saved.epochs
        state["checkpoint_file"] = path.name
        return state

    def _load_rank_state(self, state: dict) -> dict:
        """This rank's part of a checkpoint (rank 0's travels in last.pt)."""
        world = state.get("world", 1)
        if world != self.dist.world:
            raise ValueError(f"--resume {self.cfg.resume}: the run was saved by {world} process(es) and is resumed "
                             f"by {self.dist.world}; each rank replays its own shard of the batches, so resume it "
                             f"with {world} (torchrun --nproc_per_node={world})" if world > 1 else
                             f"--resume {self.cfg.resume}: the run was saved by a single process; resume it with one")
        if self.dist.is_main:
            return state["rank_state"]
        path = Path(self.cfg.resume) / RANK_FOLDER / f"rank{self.dist.rank}-{state['checkpoint_id']}.pt"
        if not path.exists():
            raise FileNotFoundError(f"--resume {self.cfg.resume}: rank {self.dist.rank}'s state {path} is missing "
                                    f"(written beside {CHECKPOINT} by that rank)")
        rank_state = torch.load(path, map_location="cpu", weights_only=True)
        if rank_state.get("rank") != self.dist.rank or rank_state.get("checkpoint_id") != state["checkpoint_id"]:
            raise ValueError(f"--resume {self.cfg.resume}: {path} does not belong to {state['checkpoint_file']}")
        return rank_state

    def _restore(self, state: dict) -> None:
        rank_state = self._load_rank_state(state)
        for name, role in (("teacher", self.teacher), ("student", self.student)):
            if role is not None:
                _load_role_state(role, state["roles"][name], rank_state["roles"][name], self.device)
        position = state["position"]
        self.t_iter, self.phase = position["t_iter"], position["phase"]
        self.s_block, self.s_offset = position["s_block"], position["s_offset"]
        self._last_action, self.actions = position["last_action"], position["actions"]
        self.evaluated_through = position["evaluated_through"]
        if self.cfg.mode == "offline" and self.phase == "student":
            self.teacher.net.eval()
        if self.snapshots is not None:
            self.snapshots.load_state_dict(state["snapshots"], self.device)
        self.window.load_state_dict(rank_state["window"])
        self.history = state["history"]
        self.pending = {e: dict(entry) for e, entry in state["pending"].items()}
        self.images_seen, self.elapsed_before = state["images_seen"], state["elapsed"]
        self._checkpoint_ids = [state["checkpoint_id"]]
        torch.set_rng_state(rank_state["rng"]["cpu"])
        if rank_state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rank_state["rng"]["cuda"])
        extended = f"; extended from {state['saved_epochs']} to {self.cfg.epochs} epochs" if (
            state["saved_epochs"] < self.cfg.epochs) else ""
        self.log(f"spacedkd_fast: resuming {self.cfg.resume} from {state['checkpoint_file']} at teacher iteration "
                 f"{self.t_iter} (epoch {self.t_iter / self.iters_per_epoch:.2f} of the {self.phase} phase){extended}")

    # =================================================================================================== display
    def _describe_schedule(self) -> str:
        if self.cfg.mode in ("base", "offline"):
            return f"{self.iters_per_epoch} iterations/epoch × {self.cfg.epochs} epochs"
        text = self.schedule.describe()
        if self.schedule.block_length > 0:
            text += f"; replay window {self.window.describe()}"
        return text + f"; data: {self.data_backend}"

    def total_actions(self) -> int:
        """Optimizer steps of the whole run (the progress bar's total)."""
        total = self.schedule.total_iterations
        if self.cfg.mode == "offline":
            return total + self._student_epoch_offset * self.iters_per_epoch
        if self.cfg.mode == "base":
            return total
        return total + sum(b.length for b in self.schedule.blocks if self._replays(b))

    def _progress_bar(self):
        if not (self.cfg.progress and self.dist.is_main):
            return _NoProgress()
        from tqdm import tqdm

        return tqdm(total=self.total_actions(), initial=self.actions, unit="step", dynamic_ncols=True,
                    mininterval=0.5, desc=f"{self.cfg.mode} s={self.schedule.space:g}", leave=False)


def _role_state(role: R.Role) -> dict:
    """What a role shares across ranks (DDP keeps it identical): weights, head, optimizer, step count."""
    return {"model": role.net.state_dict(), "optimizer": role.optimizer.state_dict(),
            "extra": role.head.state_dict() if role.head is not None else None,
            "steps": role.steps, "last_lr": role.last_lr}


def _load_role_state(role: R.Role, saved: dict, rank_saved: dict, device: torch.device) -> None:
    role.net.load_state_dict(saved["model"])
    role.optimizer.load_state_dict(saved["optimizer"])
    if role.head is not None and saved["extra"] is not None:
        role.head.load_state_dict(saved["extra"])
    role.steps, role.last_lr = saved["steps"], saved["last_lr"]
    role.rng_state = rank_saved["rng"]
    loss_sum, role.loss_count = rank_saved["loss"]
    role.loss_sum = loss_sum.to(device) if loss_sum is not None else None


def _student_accuracy(counts: list, multi_exit: bool) -> float:
    """The student's test accuracy from evaluation counts: ``[correct, total]``, or for a BYOT network
    ``[exit_0, ..., exit_{E-1}, ensemble, total]``, whose student is its best shallow exit."""
    if multi_exit:
        return max(c / counts[-1] for c in counts[1:-2])
    return counts[0] / counts[1]


def _schedule_boundaries(resume_state: dict | None, cfg: TrainConfig) -> tuple[int, ...]:
    """Epochs at which earlier, shorter schedules of this run ended (``--resume DIR --epochs N`` extends one)."""
    if resume_state is None:
        return ()
    boundaries = tuple(resume_state.get("boundaries", ()))
    if resume_state["saved_epochs"] < cfg.epochs:
        boundaries += (resume_state["saved_epochs"],)
    return boundaries


def _upgrade_format_1(state: dict) -> dict:
    """A format-1 checkpoint (one process) as format 2: the window and random streams become rank 0's state."""
    rank_state = {"rank": 0, "checkpoint_id": state["position"]["actions"], "window": state.pop("window"),
                  "rng": state.pop("rng"),
                  "roles": {name: {"rng": r.pop("rng"), "loss": r.pop("loss")} for name, r in state["roles"].items()}}
    return {**state, "format": CHECKPOINT_FORMAT, "world": 1, "checkpoint_id": rank_state["checkpoint_id"],
            "rank_state": rank_state}


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass
