"""The spaced-KD engine: one training run, interleaving the roles' steps over one timeline of fresh batches.

Where things live (a reader's map of ``spacedkd_fast/engine``):

* ``modes.py``: the modes as data (which networks, what each kind of step computes);
* ``build.py``: config → parts (feed, networks, heads, optimizers and lr policies, objectives) for whatever the
  caller did not give from Python: the command line gives nothing, so it builds everything, on this same path;
* ``feeds.py``: fresh batches and the replay window (the package's sources, or the user's Dataset/DataLoader);
* ``roles.py``: a role (network, optimizer, stream, random stream), its steps, the teacher snapshots;
* ``callbacks.py``: step / evaluation / epoch hooks, and the built-in metrics files and TensorBoard that use them;
* ``checkpoint.py`` / ``outputs.py``: what a checkpoint holds; the run folder's files;
* this file: :class:`Trainer`, the scheduler loop.

Reading order of the loop: ``Trainer.fit`` runs one optimizer step per turn, of the teacher (a fresh batch, kept in
the replay window) or of the student (a replayed batch, against the teacher snapshot of its block); ``_fresh_step``
and ``_replay_step`` do what the mode says those steps are; evaluation, metrics and checkpoints follow.

Teacher and student are two independent step sequences: the teacher's depends only on the data, the student's only
on the data and on snapshots taken at fixed teacher iterations (block ends). Any interleaving of the two therefore
gives the same weights. Sequential mode (``--no-overlap``) runs the official order, a teacher block then its replay;
overlap alternates them (teacher block k+1 with the replay of block k), which on CUDA puts the two roles on two
streams that run concurrently, synchronized only by events on the window slots and the snapshots.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from spacedkd_fast.config import TrainConfig
from spacedkd_fast.data.pipeline import derive_seed, select_data_backend
from spacedkd_fast.engine import roles as R
from spacedkd_fast.engine.build import (
    GivenParts,
    build_feed,
    build_heads,
    build_networks,
    build_objectives,
    build_optimization,
)
from spacedkd_fast.engine.callbacks import Callback, Callbacks, MetricsFiles, TensorBoard
from spacedkd_fast.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    RANK_FOLDER,
    load_resume_state,
    load_role_state,
    rank_role_state,
    role_state,
    schedule_boundaries,
)
from spacedkd_fast.engine.distributed import (
    DistInfo,
    all_reduce_sum,
    any_rank,
    barrier,
    broadcast_from_main,
    init_distributed,
)
from spacedkd_fast.engine.modes import MODES
from spacedkd_fast.engine.outputs import (
    CHECKPOINT,
    RunOutputs,
    atomic_save,
    open_run_folder,
    summary_table,
)
from spacedkd_fast.engine.runtime import bind_device, configure_math, resolve_device, window_budgets
from spacedkd_fast.schedule import Block, SpacingSchedule

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


class Trainer:
    """One training run: ``Trainer(cfg).fit()`` returns a :class:`Summary`.

    From the command line ``cfg`` is everything. From Python, any part may be given instead of being built from
    ``cfg`` (see :mod:`spacedkd_fast.engine.build`); settings may be keyword arguments (``Trainer(mode="online",
    space=1.0, epochs=5, ...)``: the :class:`~spacedkd_fast.config.TrainConfig` fields, over ``cfg``'s).

    Args:
        teacher, student: ``nn.Module`` whose forward returns ``(B, C)`` logits (self KD: a multi-exit module
            returning stacked exits ``(E, B, C)``, deepest first, as ``student``).
        teacher_features, student_features: where the feature term's features come from (``beta > 0``): a
            submodule name whose input is the feature (``"fc"``), or ``(module, x) -> (logits, features)``.
        train_data, eval_data: a map-style ``Dataset`` or a ``DataLoader`` over one, yielding ``(inputs, labels)``
            (or dicts; ``unpack`` splits other batches); or a package dataset (``spacedkd_fast.data.load_dataset``).
        teacher_optimizer, student_optimizer: a ``torch.optim.Optimizer`` over the module's parameters, or a
            factory ``params -> Optimizer``; default: ``cfg.optimizer`` with the built-in lr schedule.
        teacher_scheduler, student_scheduler: a ``torch.optim.lr_scheduler`` scheduler (or ``optimizer ->
            scheduler``), stepped every epoch (``scheduler_interval="step"``: every iteration) of the role's data.
        loss: the student's objective ``loss(student_logits, teacher_logits, labels) -> scalar`` (default: the
            built-in ``KDLoss`` of ``alpha``/``temperature``); for self KD ``loss(exit_logits, labels)``.
        callbacks: :class:`~spacedkd_fast.engine.callbacks.Callback` instances.
        log: where the engine's few lines go.
    """

    def __init__(self, cfg: TrainConfig | None = None, *, teacher: nn.Module | None = None,
                 student: nn.Module | None = None, train_data=None, eval_data=None, teacher_optimizer=None,
                 student_optimizer=None, teacher_scheduler=None, student_scheduler=None,
                 scheduler_interval: str = "epoch", loss=None, teacher_features=None, student_features=None,
                 unpack=None, callbacks: list[Callback] | tuple = (), log=print, **settings) -> None:
        given = GivenParts(teacher, student, train_data, eval_data, teacher_optimizer, student_optimizer,
                           teacher_scheduler, student_scheduler, scheduler_interval, loss, teacher_features,
                           student_features, unpack)
        cfg = _with_settings(cfg if cfg is not None else TrainConfig(), settings)
        self.cfg, self.log = given.record(cfg), log
        cfg = self.cfg
        self.mode = MODES[cfg.mode]
        resume_state = load_resume_state(cfg, log) if cfg.resume is not None else None

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
        # Only two networks training at once can overlap (self and base train one, offline a frozen teacher's student).
        self.overlap = self.mode.overlappable and (cfg.overlap if cfg.overlap is not None else
                                                   self.device.type == "cuda")

        # ---- data ----------------------------------------------------------------------------------------------
        self.data_backend = select_data_backend(cfg.data_backend, self.device)
        self.feed = build_feed(cfg, given, self.device, self.dist.rank, self.dist.world, self.data_backend)
        if self.feed.kind == "user":
            self.data_backend = "user DataLoader"
        self.iters_per_epoch = self.feed.iters_per_epoch

        # ---- schedule and replay window ------------------------------------------------------------------------
        space = cfg.space if self.mode.spaced else 0.0
        self.boundaries = schedule_boundaries(resume_state, cfg)  # the lengths an extended run had before
        self.schedule = SpacingSchedule(space, self.iters_per_epoch, cfg.epochs, start_epoch=cfg.start_epoch,
                                        replay_tail=cfg.replay_tail, boundaries=self.boundaries)
        capacity = max(self.schedule.block_length, 1) + (OVERLAP_SLACK if self.overlap else 0)
        self.feed.make_window(capacity, *window_budgets(cfg, self.device, self.dist.local_world), cfg.window_storage)

        # ---- networks, roles, objectives -----------------------------------------------------------------------
        networks = build_networks(cfg, self.mode, given, self.feed, self.device)
        heads = build_heads(cfg, self.mode, networks, self.device)
        self.num_exits = networks["student"].num_exits if self.mode.multi_exit else 0
        roles = {name: self._role(name, networks[name].net, heads[name], given) for name in self.mode.roles}
        self.teacher: R.Role | None = roles.get("teacher")
        self.student: R.Role = roles["student"]
        self.objectives = build_objectives(cfg, given)
        if self.overlap and self.device.type == "cuda":
            self.teacher.stream = torch.cuda.Stream(self.device)
            self.student.stream = torch.cuda.Stream(self.device)
        self.snapshots = None
        if self.mode.replay == "distill_snapshot":
            self.snapshots = R.SnapshotPool(self.teacher.net, 2 if self.overlap else 1, cfg.teacher_bn,
                                            torch.compile if cfg.compile else (lambda m: m))

        # ---- run state -----------------------------------------------------------------------------------------
        self.t_iter = 0  # next teacher iteration (per phase in offline mode)
        # Offline mode: "teacher", then "student"; a teacher given by --teacher-weights is trained already.
        self.phase = self.mode.phases[-1 if cfg.teacher_weights else 0].name
        self._frozen_teacher_acc: float | None = None  # offline with --teacher-weights: measured once
        if self.phase == "student" and self.teacher is not None:
            self.teacher.net.eval()
        self.s_block = self._next_replayed(0)  # the block the student replays next
        self.s_offset = 0  # the student's position inside it
        self.online_outputs: dict[int, tuple] = {}  # s = 0: the teacher outputs waiting for the student
        self.history: list[dict] = []  # epoch records written so far
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
        self._progress = _NoProgress()

        # ---- outputs -------------------------------------------------------------------------------------------
        # On every rank (ranks > 0 write their own checkpoint state there). A resumed run stays in its folder.
        self.run_folder = Path(cfg.resume) if cfg.resume else (Path(cfg.out) if cfg.out else None)
        # Rank 0 locks the folder (until fit ends), removes orphaned writes, refuses another run, clears a failed start.
        self._run_lock = open_run_folder(self.run_folder, resume=resume_state is not None, overwrite=cfg.overwrite,
                                         dist=self.dist, log=log)
        try:
            self.best_acc: float | None = resume_state.get("best_acc") if resume_state is not None else None
            self._checkpoint_ids: list[int] = []  # DDP rank files kept: those of last.pt and previous.pt
            self.outputs = RunOutputs(self.run_folder, enabled=self.dist.is_main, trace_batches=cfg.trace_batches,
                                      resume=resume_state is not None, log=log)
            self.outputs.write_config(cfg.to_dict())
            self.callbacks = Callbacks(self._builtin_callbacks(resume_state is not None) + list(callbacks))
            if resume_state is not None:
                self._restore(resume_state)
        except BaseException:
            self._run_lock.release()  # a Trainer that cannot start leaves the folder free for the corrected one
            raise

    # ================================================================================================ setup helpers
    def _role(self, name: str, net: R.FeatureForward, head: nn.Module | None, given: GivenParts) -> R.Role:
        model: nn.Module = R.TrainedModule(net, head)
        optimizer, lr_policy = build_optimization(self.cfg, given, name, model, self.iters_per_epoch)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # Self mode's CE-only steps skip the adapters (their parameters get no gradient in those steps).
            model = DDP(model, device_ids=ids, process_group=self.dist.group,
                        find_unused_parameters=self.mode.multi_exit and head is not None)
        if self.cfg.compile:
            model = torch.compile(model)
        role = R.Role(name=name, model=model, optimizer=optimizer, lr_policy=lr_policy)
        role.seed_rng(derive_seed(self.cfg.seed, "rng", name, self.dist.rank), self.device)
        return role

    def _builtin_callbacks(self, resume: bool) -> list[Callback]:
        """The run folder's metrics files and TensorBoard, on rank 0 (they are callbacks like the user's)."""
        if self.outputs.folder is None:
            if self.cfg.tensorboard:
                raise ValueError("--tensorboard writes into the run folder; give out= (or --out)")
            return []
        built: list[Callback] = [MetricsFiles(self.outputs.folder, resume=resume, num_exits=self.num_exits)]
        if self.cfg.tensorboard:
            built.append(TensorBoard(self.outputs.folder / "tensorboard"))
        return built

    def _replays(self, block: Block) -> bool:
        """Whether the student replays ``block`` (self mode's s = 0 blocks are one BYOT step, taken at once)."""
        return block.replay and self.mode.spaced and not (block.online and not self.mode.student_learns_online)

    def _next_replayed(self, index: int) -> int:
        blocks = self.schedule.blocks
        while index < len(blocks) and not self._replays(blocks[index]):
            index += 1
        return index

    @property
    def source(self):
        """The package data source (``SourceFeed``), as the benchmarks and tests reach it."""
        return self.feed.source

    @property
    def window(self):
        return self.feed.window

    # ====================================================================================================== the loop
    def fit(self) -> Summary:
        """Train to the end (or to a stop request); the run folder's lock is released however it ends."""
        try:
            return self._fit()
        finally:
            self._run_lock.release()

    def _fit(self) -> Summary:
        self.log(f"spacedkd_fast: {self.cfg.mode} on {self.feed.name} ({self.feed.num_train} train / "
                 f"{self.feed.num_test} test {'images' if self.feed.kind == 'package' else 'samples'}), {self.device}"
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
        self._step_clock = (self._start, self.images_seen)
        if self.dist.is_main:
            self.callbacks.on_fit_start(self)
        if self.mode.student_learns_online and self.actions == 0:
            self._student_evals(None)  # epochs that end before the first replay evaluate the untrained student
        if self.phase == "student" and self.cfg.teacher_weights:
            counts, _ = self._measure(self.teacher)  # the given teacher, once (it is not trained here)
            self._frozen_teacher_acc = counts[0].item() / counts[1].item() if counts is not None else None
        self._progress = self._progress_bar()
        depth = self.cfg.prefetch if self.cfg.prefetch is not None else (2 if self.device.type == "cuda" else 0)
        self.feed.start(self._data_iteration(), self.schedule.total_iterations * len(self.mode.phases), depth)
        try:
            while not self._done():
                action = self._choose()
                role, iteration = self._fresh_step() if action == "teacher" else self._replay_step()
                self._last_action = action
                self.actions += 1
                self._progress.update(1)
                self._log_step(role, iteration)
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
            self._progress.close()
            self.feed.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for cb in self.callbacks.callbacks:
                if isinstance(cb, MetricsFiles):
                    cb.close()  # line-buffered already; closed here on an interruption too
        self._sync()
        session = time.perf_counter() - self._start
        wall = self.elapsed_before + session
        self.outputs.close()
        last = self.history[-1] if self.history else {}
        summary = Summary(epochs=self.cfg.epochs, teacher_acc=last.get("teacher_acc"),
                          student_acc=last.get("student_acc"), exit_acc=last.get("exit_acc"),
                          images_per_s=self.images_seen / max(wall, 1e-9), wall_s=wall,
                          out=str(self.outputs.folder) if self.outputs.folder is not None else None,
                          data_wait_s=self.data_wait_s, session_s=session)
        if self.dist.is_main:
            self.callbacks.on_fit_end(self, summary)
        return summary

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
        fresh_done = self.t_iter >= self.schedule.total_iterations and self.phase == self.mode.phases[-1].name
        return fresh_done and self.s_block >= len(self.schedule.blocks)

    def _student_ready(self) -> bool:
        """Whether the student's next replay step has its data and its teacher."""
        if self.s_block >= len(self.schedule.blocks):
            return False
        block = self.schedule.blocks[self.s_block]
        return block.start in self.online_outputs if block.online else self.t_iter >= block.stop

    def _teacher_ready(self) -> bool:
        """Whether the next fresh step can run now: a free window slot; a free snapshot buffer at a block end."""
        if self.t_iter >= self.schedule.total_iterations:
            return False
        if not self.mode.spaced:
            return True
        block = self.schedule.block_at(self.t_iter)
        if block.online:
            return not self.online_outputs  # the s = 0 student consumes each batch before the next one
        if self._replays(block) and not self.feed.is_free(self.t_iter):
            return False
        at_block_end = self.t_iter == block.stop - 1
        return not (at_block_end and self._replays(block) and self.snapshots is not None
                    and not self.snapshots.available())

    def _choose(self) -> str:
        teacher, student = self._teacher_ready(), self._student_ready()
        if not teacher and not student:
            raise RuntimeError(f"scheduler stalled at teacher iteration {self.t_iter}, student block {self.s_block} "
                               f"position {self.s_offset}, window holding {len(self.feed)} batches")
        if not self.overlap:  # the official order: replay a finished block before the teacher moves on
            return "student" if student else "teacher"
        if teacher and student:
            return "student" if self._last_action == "teacher" else "teacher"
        return "teacher" if teacher else "student"

    # ---- steps on fresh batches ----------------------------------------------------------------------------------
    def _fresh_step(self) -> tuple[R.Role, int]:
        """The phase's role steps on the next fresh batch (kept for the replay when its block is replayed)."""
        i, phase, obj = self.t_iter, self.mode.phase(self.phase), self.objectives
        role = self.teacher if phase.trains == "teacher" else self.student
        with role.context():
            waited = time.perf_counter()
            stored, plan, x, y = self.feed.fresh(self._data_iteration())
            self.data_wait_s += time.perf_counter() - waited
            block = self.schedule.block_at(i) if self.mode.spaced else None
            if phase.fresh == "distill_frozen":
                R.frozen_teacher_step(obj, role, self.teacher.net, x, y, i)
            elif block is not None and block.online and self.mode.online == "byot":
                R.byot_step(obj, role, x, y, i)  # s = 0 self KD: one BYOT step per batch
            elif block is not None and block.online:
                logits, features = R.ce_step(obj, role, x, y, i, keep_outputs=True)
                self.online_outputs[i] = (stored, x, y, logits, features, self._event(), role.steps - 1)
            else:
                if block is not None and self._replays(block):
                    self.feed.keep(i, stored, plan)
                R.ce_step(obj, role, x, y, i, multi_exit=phase.fresh == "ce_deepest")
                if block is not None and i == block.stop - 1 and self._replays(block) and self.snapshots is not None:
                    self.snapshots.take(block.index, self.teacher.net, self.device)
            if self.outputs.trace:  # spaced modes: the fresh timeline is the teacher's (self KD's deepest exit)
                label = "teacher" if self.mode.spaced else role.name
                self.outputs.batch(label, role.steps - 1, self.feed.digest(stored))
        self.images_seen += y.shape[0] * self.dist.world
        self.t_iter += 1
        return role, i

    # ---- student steps on replayed batches -----------------------------------------------------------------------
    def _replay_step(self) -> tuple[R.Role, int]:
        role, obj = self.student, self.objectives
        block = self.schedule.blocks[self.s_block]
        i = block.start + self.s_offset
        with role.context():
            if block.online:  # s = 0: the teacher's pre-update outputs of this very batch
                stored, x, y, logits, features, ready, teacher_updates = self.online_outputs.pop(i)
                if ready is not None:  # produced on the teacher's stream
                    stream = torch.cuda.current_stream(self.device)
                    stream.wait_event(ready)
                    for t in (x, y, logits, features, *torch.utils._pytree.tree_leaves(stored)):
                        if t is not None:
                            t.record_stream(stream)
                R.distill_step(obj, role, x, y, i, logits, features)
            else:
                waited = time.perf_counter()
                stored, x, y = self.feed.replayed(i)
                self._prefetch_replay(block)  # the next replayed batch, if it lives off the device
                self.data_wait_s += time.perf_counter() - waited
                teacher_updates = None
                if self.mode.replay == "byot":
                    R.byot_step(obj, role, x, y, i)
                else:
                    R.replay_step(obj, role, self.snapshots.get(block.index, self.device), x, y, i)
                    teacher_updates = block.stop  # the snapshot was taken after the block's last teacher update
            if self.outputs.trace:
                self.outputs.batch("student", role.steps - 1, self.feed.digest(stored), teacher_updates)
            if not block.online:
                self.feed.release(i)  # after the trace: a device-tier batch is a view of its slot
            self.s_offset += 1
            if self.s_offset == block.length:
                if not block.online and self.snapshots is not None:
                    self.snapshots.release(block.index, self.device)
                if self.mode.has_teacher:
                    self._student_evals(block)
                self.s_block, self.s_offset = self._next_replayed(self.s_block + 1), 0
        return role, i

    @property
    def _student_epoch_offset(self) -> int:
        """Offline mode numbers the student's epochs after the teacher's (none when the teacher came trained)."""
        return self.cfg.epochs if len(self.mode.phases) > 1 and not self.cfg.teacher_weights else 0

    def _data_iteration(self) -> int:
        """Index of the next fresh batch in the data stream (offline's student phase reads epochs E..2E-1 of it,
        fresh batches of its own)."""
        phase_index = [p.name for p in self.mode.phases].index(self.phase)
        return self.t_iter + phase_index * self.schedule.total_iterations

    def _prefetch_replay(self, block: Block) -> None:
        nxt = block.start + self.s_offset + 1
        if nxt >= block.stop:
            following = self._next_replayed(self.s_block + 1)
            if following >= len(self.schedule.blocks):
                return
            nxt = self.schedule.blocks[following].start
        self.feed.prefetch(nxt)

    def _event(self) -> torch.cuda.Event | None:
        if not (self.overlap and self.device.type == "cuda"):
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    # ====================================================================================== evaluation and metrics
    def _log_step(self, role: R.Role, iteration: int) -> None:
        """Tell the callbacks about the step; every ``log_every`` steps of a role, a step record with the mean loss
        since its last one (one host sync). ``iteration``: the data iteration the step trained on."""
        if not self.dist.is_main:
            return
        offset = self._student_epoch_offset if self.phase == "student" else 0
        step = {"role": role.name, "step": role.steps, "iteration": iteration,
                "epoch": (iteration + 1) / self.iters_per_epoch + offset}
        self.callbacks.on_step_end(self, step)
        every = self.cfg.log_every
        if not every or role.steps % every:
            return
        now = time.perf_counter()
        start, seen = self._step_clock
        self._step_clock = (now, self.images_seen)
        record = {"kind": "step", **step, "loss": role.step_loss.take(), "lr": role.last_lr,
                  "images_per_s": (self.images_seen - seen) / max(now - start, 1e-9),
                  "elapsed_s": self.elapsed_before + now - self._start}
        self._progress.set_postfix_str(f"{role.name} loss {record['loss']:.4g}", refresh=False)
        self.callbacks.on_log(self, record)

    def _after_action(self) -> None:
        """Epoch-end evaluations on the teacher's timeline."""
        if self.t_iter == 0 or self.t_iter % self.iters_per_epoch:
            return
        epoch = self.t_iter // self.iters_per_epoch
        if self.mode.student_learns_online:  # online: the teacher now; the student when its replay gets here
            if self._last_action == "teacher":
                self._evaluate("teacher", epoch)
            return
        # One network (self, base) or one phase (offline): evaluate once the replays due by this epoch are done.
        if self._student_ready() or epoch <= self.evaluated_through:
            return
        self.evaluated_through = epoch
        trained = self.mode.phase(self.phase).trains
        self._evaluate(trained, epoch + (self._student_epoch_offset if trained == "student" else 0))
        phases = [p.name for p in self.mode.phases]
        if epoch == self.cfg.epochs and self.phase != phases[-1]:  # the teacher is done: freeze it, train the student
            self.phase, self.t_iter, self.evaluated_through = phases[phases.index(self.phase) + 1], 0, 0
            self.teacher.net.eval()

    def _evaluate(self, which: str, epoch: int) -> None:
        role = self.teacher if which == "teacher" else self.student
        counts, loss = self._measure(role, multi_exit=self.mode.multi_exit)
        if which == "student":
            self._keep_if_best(counts, epoch)
        entry = self.pending.setdefault(epoch, {"kind": "epoch", "epoch": epoch})
        entry.update({f"{which}_counts": counts, f"{which}_loss": loss, f"lr_{which}": role.last_lr})
        self._announce_evaluation(which, epoch, counts, loss, role.last_lr)
        self._emit_ready()

    def _student_evals(self, block: Block | None) -> None:
        """Online mode: the student just finished replaying ``block``; evaluate it for the epochs it stands for."""
        epochs = self.schedule.student_eval_epochs(block)
        if not epochs:
            return
        counts, loss = self._measure(self.student)
        self._keep_if_best(counts, epochs[-1])
        for epoch in epochs:
            entry = self.pending.setdefault(epoch, {"kind": "epoch", "epoch": epoch})
            entry.update(student_counts=counts, student_loss=loss, lr_student=self.student.last_lr)
        self._announce_evaluation("student", epochs[-1], counts, loss, self.student.last_lr)
        self._emit_ready()

    def _announce_evaluation(self, which: str, epoch: int, counts, loss, lr) -> None:
        if not self.dist.is_main:
            return
        multi_exit = self.mode.multi_exit and which == "student"
        accuracy = _student_accuracy(counts.tolist(), multi_exit) if counts is not None else None
        self.callbacks.on_evaluate(self, {"role": which, "epoch": epoch, "accuracy": accuracy, "loss": loss,
                                          "lr": lr})

    def _keep_if_best(self, counts: torch.Tensor | None, epoch: int) -> None:
        """Write best.pt when the student just measured beats every earlier evaluation (its weights as measured)."""
        if counts is None:
            return
        acc = _student_accuracy(counts.tolist(), multi_exit=self.mode.multi_exit)
        if self.best_acc is not None and acc <= self.best_acc:
            return
        self.best_acc = acc
        if self.dist.is_main and self.run_folder is not None:
            self.outputs.best({"format": CHECKPOINT_FORMAT, "config": self.cfg.to_dict(), "epoch": epoch,
                               "student_acc": acc, "roles": {"student": role_state(self.student)}})

    def _measure(self, role: R.Role, multi_exit: bool = False) -> tuple[torch.Tensor | None, float | None]:
        """Test-set counts (CPU tensor; None without evaluation data) and the role's mean training loss since the
        last call. Both are computed on the role's stream (the counts summed over ranks there) and read back on
        that same stream, after the work that produced them: the default stream knows nothing of it."""
        with role.context():
            counts = R.evaluate(role.net, self.feed.test_batches(self.cfg.eval_batch_size), multi_exit)
            if counts is not None:
                counts = all_reduce_sum(counts, self.dist).cpu()
            return counts, role.epoch_loss.take()

    def _record_complete(self, entry: dict) -> bool:
        if self.mode.student_learns_online:
            return "teacher_counts" in entry and "student_counts" in entry
        return "teacher_counts" in entry or "student_counts" in entry

    def _emit_ready(self) -> None:
        """Hand the complete epoch records on in epoch order; a checkpoint follows each epoch."""
        while self.pending and self._record_complete(self.pending[min(self.pending)]):
            record = self._finish_record(self.pending.pop(min(self.pending)))
            self.history.append(record)
            if self.dist.is_main:
                self.callbacks.on_epoch_end(self, record)
            self._checkpoint_due = True

    def _finish_record(self, entry: dict) -> dict:
        record = {k: v for k, v in entry.items() if not k.endswith("_counts")}
        if entry.get("teacher_counts") is not None:
            correct, total = entry["teacher_counts"].tolist()
            record["teacher_acc"] = correct / total
        if entry.get("student_counts") is not None:
            counts = entry["student_counts"].tolist()
            if self.mode.multi_exit:
                record["exit_acc"] = [c / counts[-1] for c in counts[:-2]]
                record["ensemble_acc"] = counts[-2] / counts[-1]
                record["teacher_acc"] = record["exit_acc"][0]  # the deepest exit
            record["student_acc"] = _student_accuracy(counts, multi_exit=self.mode.multi_exit)
        if len(self.mode.phases) > 1 and "teacher_acc" not in record:
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

    def _roles(self) -> dict[str, R.Role]:
        return {name: role for name, role in (("teacher", self.teacher), ("student", self.student))
                if role is not None}

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
        rank_state = {
            "rank": self.dist.rank,
            "checkpoint_id": checkpoint_id,
            "window": self.feed.state_dict(),
            "roles": {name: rank_role_state(role) for name, role in self._roles().items()},
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }
        rank_dir = self.run_folder / RANK_FOLDER
        if self.dist.enabled and not self.dist.is_main:
            rank_dir.mkdir(parents=True, exist_ok=True)
            atomic_save(rank_state, rank_dir / f"rank{self.dist.rank}-{checkpoint_id}.pt")
        barrier(self.dist)  # every rank file is on disk before last.pt points at them
        if self.dist.is_main:
            state = {
                "format": CHECKPOINT_FORMAT,
                "config": self.cfg.to_dict(),
                "world": self.dist.world,
                "checkpoint_id": checkpoint_id,
                "boundaries": list(self.boundaries),
                "best_acc": self.best_acc,
                "roles": {name: role_state(role) for name, role in self._roles().items()},
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
        for name, role in self._roles().items():
            load_role_state(role, state["roles"][name], rank_state["roles"][name], self.device)
        position = state["position"]
        self.t_iter, self.phase = position["t_iter"], position["phase"]
        self.s_block, self.s_offset = position["s_block"], position["s_offset"]
        self._last_action, self.actions = position["last_action"], position["actions"]
        self.evaluated_through = position["evaluated_through"]
        if self.phase == "student" and self.teacher is not None:
            self.teacher.net.eval()
        if self.snapshots is not None:
            self.snapshots.load_state_dict(state["snapshots"], self.device)
        self.feed.load_state_dict(rank_state["window"])
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
        if not self.mode.spaced:
            return f"{self.iters_per_epoch} iterations/epoch × {self.cfg.epochs} epochs; data: {self.data_backend}"
        text = self.schedule.describe()
        if self.schedule.block_length > 0:
            text += f"; replay window {self.feed.describe_window()}"
        return text + f"; data: {self.data_backend}"

    def total_actions(self) -> int:
        """Optimizer steps of the whole run (the progress bar's total)."""
        total = self.schedule.total_iterations
        if len(self.mode.phases) > 1:
            return total + self._student_epoch_offset * self.iters_per_epoch
        if not self.mode.spaced:
            return total
        return total + sum(b.length for b in self.schedule.blocks if self._replays(b))

    def _progress_bar(self):
        if not (self.cfg.progress and self.dist.is_main):
            return _NoProgress()
        from tqdm import tqdm

        return tqdm(total=self.total_actions(), initial=self.actions, unit="step", dynamic_ncols=True,
                    mininterval=0.5, desc=f"{self.cfg.mode} s={self.schedule.space:g}", leave=False)


def _with_settings(cfg: TrainConfig, settings: dict) -> TrainConfig:
    """``cfg`` with keyword settings applied (names checked: a typo is an error, not a silent default)."""
    if not settings:
        return cfg
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise TypeError(f"Trainer got unknown setting(s) {', '.join(unknown)}; settings are TrainConfig fields "
                        f"(e.g. mode, space, epochs, batch_size, lr, alpha, temperature, beta, out)")
    return dataclasses.replace(cfg, **settings)


def _student_accuracy(counts: list, multi_exit: bool) -> float:
    """The student's test accuracy from evaluation counts: ``[correct, total]``, or for a BYOT network
    ``[exit_0, ..., exit_{E-1}, ensemble, total]``, whose student is its best shallow exit."""
    if multi_exit:
        return max(c / counts[-1] for c in counts[1:-2])
    return counts[0] / counts[1]


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass
