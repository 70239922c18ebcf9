"""The spaced-KD engine: one training run, interleaving the roles' steps over one timeline of fresh batches.

Where things live (a reader's map of ``spacedkd_fast/engine``): ``modes.py`` (the modes as data: networks and the
step of each kind of batch), ``build.py`` (config → parts, for whatever the caller did not give), ``feeds.py``
(fresh batches), ``driver.py`` (the schedule's two cursors, the replay window, the teacher snapshots), ``roles.py``
(a role and its steps), ``records.py`` (the run position, epoch records, the best student), ``checkpoint.py``
(the checkpoint format, writing and restoring), ``stopping.py`` (stop requests), ``callbacks.py`` / ``outputs.py``
/ ``logs.py`` (what a run writes), and this file: the loop.

Teacher and student are two independent step sequences: the teacher's depends only on the data, the student's only
on the data and on snapshots taken at fixed teacher iterations (block ends). Any interleaving of the two therefore
gives the same weights. Sequential mode (``--no-overlap``) runs the official order, a teacher block then its replay;
overlap alternates them (teacher block k+1 with the replay of block k), which on CUDA puts the two roles on two
streams that run concurrently, synchronized only by events on the window's batches and the snapshots.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from spacedkd_fast.config import TrainConfig, explicit_settings, with_settings
from spacedkd_fast.data.files import broken_files_error
from spacedkd_fast.engine import checkpoint, logs
from spacedkd_fast.engine import roles as R
from spacedkd_fast.engine.build import GivenParts, build_run
from spacedkd_fast.engine.callbacks import Callback, Callbacks, MetricsFiles, builtin_callbacks
from spacedkd_fast.engine.distributed import all_reduce_sum, any_rank
from spacedkd_fast.engine.outputs import RunOutputs, open_run_folder
from spacedkd_fast.engine.preflight import check_first_batch
from spacedkd_fast.engine.progress import Clock, describe_run, log_step, progress_bar
from spacedkd_fast.engine.records import EpochRecords, RunPosition, Summary
from spacedkd_fast.engine.stopping import TrainingInterrupted, install_stop_signals

STOP_CHECK_EVERY = 8  # DDP: optimizer steps between the ranks' agreements on a stop request (a gloo all-reduce)


class Trainer:
    """One training run: ``Trainer(cfg).fit()`` returns a :class:`Summary`.

    From the command line ``cfg`` is everything. From Python, any part may be given instead of being built from
    ``cfg`` (see :mod:`spacedkd_fast.engine.build`), and settings may be keyword arguments (``Trainer(mode="online",
    space=1.0, epochs=5, ...)``: :class:`~spacedkd_fast.config.TrainConfig` fields, over ``cfg``'s). Resuming
    (``resume=DIR``) works as on the command line: the saved config wins, the keywords given override only what
    may change on a resume (device, logging, budgets; more ``epochs`` extend the run), anything else is refused
    naming it. A ``cfg`` given alone is taken as the whole request and compared with the saved run as it is.

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
        self.log = log
        complete = cfg is not None and not settings  # a whole TrainConfig (the command line's): compared as it is
        cfg = given.record(with_settings(cfg if cfg is not None else TrainConfig(), settings))
        resume_state = None
        if cfg.resume is not None:  # the saved config wins where the keywords say nothing (as on the command line)
            explicit = None if complete else explicit_settings(cfg, settings)
            resume_state, cfg = checkpoint.load_resume_state(cfg, log, explicit)
        run = build_run(cfg, given, resume_state)  # device, processes, data, schedule, window, networks, roles
        self.cfg, self.mode, self.device, self.dist, self.overlap = run.cfg, run.mode, run.device, run.dist, run.overlap
        self.feed, self.data_backend, self.schedule, self.driver = run.feed, run.data_backend, run.schedule, run.driver
        self.roles, self.objectives, self.num_exits, self.boundaries = run.roles, run.objectives, run.num_exits, \
            run.boundaries
        self.teacher: R.Role | None = self.roles.get("teacher")
        self.student: R.Role = self.roles["student"]
        self.iters_per_epoch = self.feed.iters_per_epoch
        # Offline mode: "teacher", then "student"; a teacher given by --teacher-weights is trained already.
        self.position = RunPosition(phase=self.mode.phases[-1 if self.cfg.teacher_weights else 0].name)
        self.clock = Clock()
        self.records = EpochRecords(self.mode, lambda: self.clock.record_timing(self))
        self._stop_reason: str | None = None
        self._checkpoint_due = False
        self._checkpoint_ids: list[int] = []  # DDP rank files kept: those of last.pt and previous.pt
        # ---- outputs: on every rank (ranks > 0 write their own checkpoint state there); a resumed run stays put
        self.run_folder = Path(self.cfg.resume or self.cfg.out) if (self.cfg.resume or self.cfg.out) else None
        # Rank 0 locks the folder (until fit ends), removes orphaned writes, refuses another run, clears a failed start.
        self._run_lock = open_run_folder(self.run_folder, resume=resume_state is not None,
                                         overwrite=self.cfg.overwrite, dist=self.dist, log=log)
        try:
            if self.run_folder is not None and self.dist.is_main and resume_state is not None:
                logs.cut_back(self.run_folder, resume_state.get("logs"))  # the logs end where the checkpoint does
            self.outputs = RunOutputs(self.run_folder, enabled=self.dist.is_main,
                                      trace_batches=self.cfg.trace_batches, resume=resume_state is not None, log=log)
            self.outputs.write_config(self.cfg.to_dict())
            self.callbacks = Callbacks(builtin_callbacks(self.outputs.folder, self.cfg, resume_state is not None,
                                                         self.num_exits) + list(callbacks))
            if resume_state is not None:
                checkpoint.restore(self, resume_state)
        except BaseException:
            self._run_lock.release()  # a Trainer that cannot start leaves the folder free for the corrected one
            raise
        if self.position.phase == "student" and self.teacher is not None:
            self.teacher.net.eval()  # offline KD's frozen teacher

    @property
    def source(self):
        """The package data source, as the benchmarks and tests reach it."""
        return self.feed.source

    @property
    def window(self):
        return self.driver.window

    @property
    def actions(self) -> int:
        return self.position.actions

    # ====================================================================================================== the loop
    def fit(self) -> Summary:
        """Train to the end (or to a stop request); the run folder's lock is released however it ends."""
        try:
            return self._fit()
        finally:
            self._run_lock.release()

    def _fit(self) -> Summary:
        for line in describe_run(self):
            self.log(line)
        previous = self._install_signal_handlers()
        if self.overlap and self.device.type == "cuda":
            for role in (self.teacher, self.student):
                role.stream.wait_stream(torch.cuda.current_stream(self.device))
        self.clock.start(self)
        if self.dist.is_main:
            self.callbacks.on_fit_start(self)
        if self.mode.online_student and self.actions == 0:
            self._student_evals(None)  # epochs that end before the first replay evaluate the untrained student
        if self.position.phase == "student" and self.cfg.teacher_weights:
            self.records.frozen_teacher_acc = self.records.accuracy(self._measure(self.teacher)[0], "teacher")
        check_first_batch(self)
        self._progress = progress_bar(self)
        depth = self.cfg.prefetch if self.cfg.prefetch is not None else (2 if self.device.type == "cuda" else 0)
        self.feed.start(self._data_iteration(), self.schedule.total_iterations * len(self.mode.phases), depth)
        try:
            while not self._done():
                action = self._choose()
                try:
                    role, iteration = self._fresh_step() if action == "teacher" else self._replay_step()
                except Exception as exc:  # broken files that stop the run (--strict-data): keep the steps taken
                    broken = broken_files_error(exc)  # (a prefetch thread's error arrives wrapped)
                    if broken is None:
                        raise
                    if not self.driver.recorded and not self.dist.enabled:
                        checkpoint.write(self)  # the failed render changed nothing: last.pt holds every whole step
                    if broken is not exc:
                        raise broken from exc
                    raise
                self.position.last_action = action
                self.position.actions += 1
                self._progress.update(1)
                log_step(self, role, iteration)
                self._after_action()
                if self.driver.recorded:
                    continue  # an s = 0 student step is due: state is only saved between whole iterations
                stop = self._stop_agreed()
                if self._checkpoint_due or stop:
                    checkpoint.write(self)
                if stop:
                    where = f"; resume with --resume {self.run_folder}" if self.run_folder else ""
                    raise TrainingInterrupted(f"stopped by {self._stop_reason or 'a signal to another rank'} at "
                                              f"teacher iteration {self.driver.fresh}{where}")
        finally:
            self._progress.close()
            self.feed.close()
            previous.restore()
            for cb in self.callbacks.callbacks:
                if isinstance(cb, MetricsFiles):
                    cb.close()  # line-buffered already; closed here on an interruption too
        summary = self.clock.summary(self)
        self.outputs.close()
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
        return not self.actions % STOP_CHECK_EVERY and any_rank(self._stop_reason is not None, self.dist)

    def _install_signal_handlers(self):
        # SIGINT/SIGTERM -> request_stop; under DDP also wakes a rank blocked in a collective (engine/stopping.py).
        return install_stop_signals(self.request_stop, self.dist, self.run_folder)

    # ---- the scheduler -------------------------------------------------------------------------------------------
    def _done(self) -> bool:
        return self.driver.done and self.position.phase == self.mode.phases[-1].name

    def _choose(self) -> str:
        teacher, student = self.driver.fresh_ready(), self.driver.replay_ready()
        if not teacher and not student:
            raise RuntimeError(f"scheduler stalled at teacher iteration {self.driver.fresh}, student block "
                               f"{self.driver.replay_block} position {self.driver.replay_offset}")
        if not self.overlap:  # the official order: replay a finished block before the teacher moves on
            return "student" if student else "teacher"
        if teacher and student:
            return "student" if self.position.last_action == "teacher" else "teacher"
        return "teacher" if teacher else "student"

    def _fresh_step(self) -> tuple[R.Role, int]:
        """The phase's role steps on the next fresh batch (kept for the replay when its block is replayed)."""
        i, block, phase = self.driver.fresh, self.driver.fresh_block(), self.mode.phase(self.position.phase)
        role = self.roles[phase.trains]
        with role.context():
            waited = time.perf_counter()
            batch = self.feed.fresh(self._data_iteration())
            self.clock.data_wait_s += time.perf_counter() - waited
            self.driver.keep(batch.stored, batch.plan)
            teacher = self.roles[phase.teacher].net if phase.teacher else None
            outputs = self.mode.fresh_step(phase, block)(self.objectives, role, batch.inputs, batch.labels, i, teacher)
            self.driver.finish_fresh(self.teacher.net if self.teacher else None, outputs, batch)
            if self.outputs.trace:  # spaced modes: the fresh timeline is the teacher's (self KD's deepest exit)
                self.outputs.batch("teacher" if self.mode.spaced else role.name, role.steps - 1,
                                   self.feed.digest(batch.stored))
        self.position.images_seen += batch.labels.shape[0] * self.dist.world
        return role, i

    def _replay_step(self) -> tuple[R.Role, int]:
        """The student's step on its next replayed batch, against the teacher of that batch's block."""
        role = self.student
        with role.context():
            waited = time.perf_counter()
            replay = self.driver.next_replay()
            self.driver.prefetch_next()  # the next replayed batch, if it lives off the device
            self.clock.data_wait_s += time.perf_counter() - waited
            batch, i = replay.stored, replay.iteration
            self.mode.replay(self.objectives, role, batch.inputs, batch.labels, i, replay.teacher)
            if self.outputs.trace:  # the teacher updates behind the targets: before batch i's at s = 0
                updates = (i if replay.block.online else replay.block.stop) if self.mode.snapshots else None
                self.outputs.batch("student", role.steps - 1, self.feed.digest(batch.stored), updates)
            finished = self.driver.finish_replay()  # after the trace: a device-tier batch is a view of its slot
        if finished is not None and self.mode.online_student:
            self._student_evals(finished)
        return role, i

    def _data_iteration(self) -> int:
        """Index of the next fresh batch in the data stream (offline's student phase reads epochs E..2E-1 of it,
        fresh batches of its own)."""
        phase_index = [p.name for p in self.mode.phases].index(self.position.phase)
        return self.driver.fresh + phase_index * self.schedule.total_iterations

    @property
    def _student_epoch_offset(self) -> int:
        """Offline mode numbers the student's epochs after the teacher's (none when the teacher came trained)."""
        return self.cfg.epochs if len(self.mode.phases) > 1 and not self.cfg.teacher_weights else 0

    # ====================================================================================== evaluation and metrics
    def _after_action(self) -> None:
        """Epoch-end evaluations on the teacher's timeline."""
        t = self.driver.fresh
        if t == 0 or t % self.iters_per_epoch:
            return
        epoch = t // self.iters_per_epoch
        if self.mode.online_student:  # the teacher now; the student when its replay gets here
            if self.position.last_action == "teacher":
                self._evaluate("teacher", [epoch])
            return
        # One network (self, base) or one phase (offline): evaluate once the replays due by this epoch are done.
        if self.driver.replay_ready() or epoch <= self.records.evaluated_through:
            return
        self.records.evaluated_through = epoch
        trained = self.mode.phase(self.position.phase).trains
        self._evaluate(trained, [epoch + (self._student_epoch_offset if trained == "student" else 0)])
        phases = [p.name for p in self.mode.phases]
        if epoch == self.cfg.epochs and self.position.phase != phases[-1]:  # the teacher is done: freeze it
            self.position.phase = phases[phases.index(self.position.phase) + 1]
            self.driver.fresh, self.records.evaluated_through = 0, 0
            self.teacher.net.eval()

    def _student_evals(self, block) -> None:
        """Online KD: the student just finished replaying ``block``; evaluate it for the epochs it stands for."""
        epochs = self.schedule.student_eval_epochs(block)
        if epochs:
            self._evaluate("student", list(epochs))

    def _evaluate(self, which: str, epochs: list[int]) -> None:
        role = self.roles[which]
        counts, loss = self._measure(role)
        accuracy = self.records.accuracy(counts, which)
        if which == "student" and self.records.improves(accuracy) and self.dist.is_main and self.outputs.folder:
            self.outputs.best(checkpoint.best_state(self, epochs[-1], accuracy))  # (a copy of the student's state)
        if self.dist.is_main:
            self.callbacks.on_evaluate(self, {"role": which, "epoch": epochs[-1], "accuracy": accuracy,
                                              "loss": loss, "lr": role.last_lr})
        for record in self.records.add(which, epochs, counts, loss, role.last_lr):
            if self.dist.is_main:
                self.callbacks.on_epoch_end(self, record)
            self._checkpoint_due = True

    def _measure(self, role: R.Role) -> tuple[torch.Tensor | None, float | None]:
        """Test-set counts (CPU tensor; None without evaluation data) and the role's mean training loss since the
        last call, both on the role's stream (the counts summed over ranks there) and read back after the work that
        produced them: the default stream knows nothing of it."""
        with role.context():
            batches = self.feed.test_batches(self.cfg.eval_batch_size)
            counts = R.evaluate(role.net, batches, self.mode.multi_exit and role is self.student)
            if counts is not None:
                counts = all_reduce_sum(counts, self.dist).cpu()
            return counts, role.epoch_loss.take()

    @property
    def history(self) -> list[dict]:
        return self.records.history

    @property
    def best_acc(self) -> float | None:
        return self.records.best_acc
