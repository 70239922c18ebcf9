"""Fail before work starts: before any optimizer step, the next fresh batch goes through every step the mode will
take (each phase's fresh step, the s = 0 and replay steps), losses only (:meth:`~spacedkd_fast.engine.roles.Role.
dry_run`: the plain modules in eval mode under no_grad, no backward, no optimizer or scheduler step). A batch, a
model or a setting that fails (a label out of range, a loss that is not a finite scalar, ...) stops the run in
seconds, not after the teacher's first block, and leaves nothing a corrected run would trip over."""

from __future__ import annotations

import contextlib

import torch


def check_first_batch(trainer) -> None:
    """Raise ``ValueError`` naming the role and the step that fails on the next fresh batch (nothing changes)."""
    mode, roles, schedule = trainer.mode, trainer.roles, trainer.schedule
    i = trainer._data_iteration()
    batch = trainer.feed.peek(i)
    steps = [(phase.trains, mode.fresh_step(phase, block), phase.teacher) for phase in mode.phases
             for block in (schedule.blocks[0], schedule.blocks[-1])]
    if mode.spaced:
        steps.append(("student", mode.replay, "teacher" if mode.snapshots else None))
    for name, step, teacher in dict.fromkeys(steps):
        role = roles[name]
        try:
            with contextlib.ExitStack() as dry:
                checked = [dry.enter_context(r.dry_run()) for r in roles.values()]  # all in eval mode
                with role.context():
                    teacher_net = roles[teacher].net if teacher else None
                    step(trainer.objectives, role, batch.inputs, batch.labels, i, teacher_net)
                losses = sum(checked, [])
            for loss in losses:
                if not (torch.is_tensor(loss) and loss.numel() == 1 and loss.dtype.is_floating_point):
                    raise ValueError(f"the loss is {type(loss).__name__} {tuple(getattr(loss, 'shape', ()))}, not a "
                                     f"scalar")
                if not torch.isfinite(loss).all():
                    raise ValueError(f"the loss is {float(loss)}")
        except Exception as exc:  # noqa: BLE001 - whatever failed, it failed before any training
            raise ValueError(f"the {name}'s {step.__name__} fails on the first batch (data iteration {i}), before any "
                             f"training: {type(exc).__name__}: {exc}") from exc
