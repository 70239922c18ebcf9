"""The checkpoint format: what a checkpoint holds, how it is written and restored, and how a resume request is
checked against it.

``last.pt`` (rank 0) holds what every rank shares: the config, each role's weights / head / optimizer / lr policy,
the schedule position, the teacher snapshots still being replayed, the epoch records, and how long each log file
was (a resumed run cuts its logs back to there: :mod:`spacedkd_fast.engine.logs`). What differs between DDP ranks
(the replay window: each rank's shard of the batches; every random stream; the running losses) is rank 0's inside
``last.pt`` and ranks 1..'s in ``ranks/rank<r>-<checkpoint id>.pt``. :func:`write` and :func:`restore` are the
only code that assembles or reads that layout.
"""

from __future__ import annotations

from pathlib import Path

import torch

from spacedkd_fast.config import TrainConfig, incompatible_fields
from spacedkd_fast.engine import logs
from spacedkd_fast.engine import roles as R
from spacedkd_fast.engine.distributed import barrier
from spacedkd_fast.engine.outputs import CHECKPOINT, atomic_save, load_checkpoint

CHECKPOINT_FORMAT = 2  # 2: per-rank state (window, random streams) beside the shared one; 1 is read too
READABLE_FORMATS = (1, 2)  # the weights and config sit in the same places in both
RANK_FOLDER = "ranks"  # <run>/ranks/rank<r>-<checkpoint id>.pt: the per-rank state of ranks 1.. under DDP


def load_resume_state(cfg: TrainConfig, log=print) -> dict:
    """The checkpoint ``cfg.resume`` names, checked against ``cfg``: same format family, no field that changes
    the math differs (more epochs extend the run; an offline run cannot be extended)."""
    state, path = load_checkpoint(cfg.resume, log=log)  # last.pt, or previous.pt if that one is torn
    if not isinstance(state, dict) or "format" not in state:
        raise ValueError(f"--resume {cfg.resume}: {path.name} is not a spacedkd_fast checkpoint")
    if state.get("format") == 1:  # a single-process checkpoint of the first format: same content, other places
        state = upgrade_format_1(state)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"--resume {cfg.resume}: checkpoint format {state.get('format')!r}, this version reads "
                         f"{', '.join(map(str, READABLE_FORMATS))}")
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


def schedule_boundaries(resume_state: dict | None, cfg: TrainConfig) -> tuple[int, ...]:
    """Epochs at which earlier, shorter schedules of this run ended (``--resume DIR --epochs N`` extends one)."""
    if resume_state is None:
        return ()
    boundaries = tuple(resume_state.get("boundaries", ()))
    if resume_state["saved_epochs"] < cfg.epochs:
        boundaries += (resume_state["saved_epochs"],)
    return boundaries


def role_state(role: R.Role) -> dict:
    """What a role shares across ranks (DDP keeps it identical): weights, head, optimizer, lr policy, steps."""
    return {"model": role.net.state_dict(), "optimizer": role.optimizer.state_dict(),
            "extra": role.head.state_dict() if role.head is not None else None,
            "lr_policy": role.lr_policy.state_dict(), "steps": role.steps, "last_lr": role.last_lr}


def load_role_state(role: R.Role, saved: dict, rank_saved: dict, device: torch.device) -> None:
    role.net.load_state_dict(saved["model"])
    role.optimizer.load_state_dict(saved["optimizer"])
    if role.head is not None and saved["extra"] is not None:
        role.head.load_state_dict(saved["extra"])
    if saved.get("lr_policy"):
        role.lr_policy.load_state_dict(saved["lr_policy"])
    role.steps, role.last_lr = saved["steps"], saved["last_lr"]
    role.rng_state = rank_saved["rng"]
    for name in ("loss", "step_loss"):
        if name in rank_saved:  # (checkpoints before the step records' loss was saved: a fresh mean)
            total, count = rank_saved[name]
            setattr(role, "epoch_loss" if name == "loss" else "step_loss",
                    R.RunningLoss(total.to(device) if total is not None else None, count))


def _running(loss: R.RunningLoss) -> tuple:
    return loss.total.cpu() if loss.total is not None else None, loss.count


def rank_role_state(role: R.Role) -> dict:
    """What differs between ranks in a role: its random stream and its running losses (of the epoch record and of
    the next step record)."""
    return {"rng": role.rng_state, "loss": _running(role.epoch_loss), "step_loss": _running(role.step_loss)}


def upgrade_format_1(state: dict) -> dict:
    """A format-1 checkpoint (one process) as format 2: the window and random streams become rank 0's state."""
    rank_state = {"rank": 0, "checkpoint_id": state["position"]["actions"], "window": state.pop("window"),
                  "rng": state.pop("rng"),
                  "roles": {name: {"rng": r.pop("rng"), "loss": r.pop("loss")} for name, r in state["roles"].items()}}
    return {**state, "format": CHECKPOINT_FORMAT, "world": 1, "checkpoint_id": rank_state["checkpoint_id"],
            "rank_state": rank_state}


# ---- writing and restoring a run ----------------------------------------------------------------------------------
def best_state(trainer, epoch: int, accuracy: float) -> dict:
    """``best.pt``: the student as just measured, with the config (``python -m spacedkd_fast.hessian`` reads it)."""
    return {"format": CHECKPOINT_FORMAT, "config": trainer.cfg.to_dict(), "epoch": epoch, "student_acc": accuracy,
            "roles": {"student": role_state(trainer.student)}}


def write(trainer) -> None:
    """Write ``last.pt`` (and under DDP each rank's state): everything needed to continue bit-identically.

    Ranks 1.. write ``ranks/rank<r>-<id>.pt`` first, then rank 0 writes last.pt naming that id, then the older rank
    files go: a crash at any point leaves a last.pt (or previous.pt) whose rank files exist. Callbacks flush their
    files first (``on_checkpoint``), so the log lengths recorded are the ones the weights correspond to."""
    trainer._checkpoint_due = False
    folder, dist = trainer.run_folder, trainer.dist
    if folder is None:
        return
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    checkpoint_id = trainer.actions
    driver = trainer.driver.state_dict()
    rank_state = {
        "rank": dist.rank, "checkpoint_id": checkpoint_id, "window": driver["window"],
        "roles": {name: rank_role_state(role) for name, role in trainer.roles.items()},
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    rank_dir = folder / RANK_FOLDER
    if dist.enabled and not dist.is_main:
        rank_dir.mkdir(parents=True, exist_ok=True)
        atomic_save(rank_state, rank_dir / f"rank{dist.rank}-{checkpoint_id}.pt")
    barrier(dist)  # every rank file is on disk before last.pt points at them
    if dist.is_main:
        trainer.callbacks.on_checkpoint(trainer)
        trainer.outputs.flush()
        records, position = trainer.records.state_dict(), trainer.position
        state = {
            "format": CHECKPOINT_FORMAT, "config": trainer.cfg.to_dict(), "world": dist.world,
            "checkpoint_id": checkpoint_id, "boundaries": list(trainer.boundaries), "best_acc": records["best_acc"],
            "roles": {name: role_state(role) for name, role in trainer.roles.items()},
            "position": {**driver["position"], "phase": position.phase, "last_action": position.last_action,
                         "actions": position.actions, "evaluated_through": records["evaluated_through"]},
            "snapshots": driver["snapshots"], "history": records["history"], "pending": records["pending"],
            "images_seen": position.images_seen, "elapsed": trainer.clock.elapsed(trainer),
            "logs": logs.positions(folder), "rank_state": rank_state,
        }
        trainer.outputs.checkpoint(state)
    barrier(dist)
    trainer._checkpoint_ids = (trainer._checkpoint_ids + [checkpoint_id])[-2:]  # last.pt's and previous.pt's
    if dist.enabled and not dist.is_main:
        keep = {f"rank{dist.rank}-{i}.pt" for i in trainer._checkpoint_ids}
        for old in rank_dir.glob(f"rank{dist.rank}-*.pt"):
            if old.name not in keep:
                old.unlink(missing_ok=True)


def _rank_state(trainer, state: dict) -> dict:
    """This rank's part of a checkpoint (rank 0's travels in last.pt)."""
    dist, resume = trainer.dist, trainer.cfg.resume
    world = state.get("world", 1)
    if world != dist.world:
        raise ValueError(f"--resume {resume}: the run was saved by {world} process(es) and is resumed by "
                         f"{dist.world}; each rank replays its own shard of the batches, so resume it with {world} "
                         f"(torchrun --nproc_per_node={world})" if world > 1 else
                         f"--resume {resume}: the run was saved by a single process; resume it with one")
    if dist.is_main:
        return state["rank_state"]
    path = Path(resume) / RANK_FOLDER / f"rank{dist.rank}-{state['checkpoint_id']}.pt"
    if not path.exists():
        raise FileNotFoundError(f"--resume {resume}: rank {dist.rank}'s state {path} is missing (written beside "
                                f"{CHECKPOINT} by that rank)")
    rank_state = torch.load(path, map_location="cpu", weights_only=True)
    if rank_state.get("rank") != dist.rank or rank_state.get("checkpoint_id") != state["checkpoint_id"]:
        raise ValueError(f"--resume {resume}: {path} does not belong to {state['checkpoint_file']}")
    return rank_state


def restore(trainer, state: dict) -> None:
    """Continue ``trainer`` from a checkpoint (as :func:`load_resume_state` returned it)."""
    rank_state = _rank_state(trainer, state)
    for name, role in trainer.roles.items():
        load_role_state(role, state["roles"][name], rank_state["roles"][name], trainer.device)
    position = state["position"]
    trainer.driver.load_state_dict({"position": position, "snapshots": state["snapshots"],
                                    "window": rank_state["window"]})
    trainer.position.phase, trainer.position.last_action = position["phase"], position["last_action"]
    trainer.position.actions = position["actions"]
    trainer.records.load_state_dict({"history": state["history"], "pending": state["pending"],
                                     "best_acc": state.get("best_acc"),
                                     "evaluated_through": position["evaluated_through"]})
    trainer.position.images_seen, trainer.position.elapsed_before = state["images_seen"], state["elapsed"]
    trainer._checkpoint_ids = [state["checkpoint_id"]]
    torch.set_rng_state(rank_state["rng"]["cpu"])
    if rank_state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rank_state["rng"]["cuda"])
    extended = f"; extended from {state['saved_epochs']} to {trainer.cfg.epochs} epochs" if (
        state["saved_epochs"] < trainer.cfg.epochs) else ""
    trainer.log(f"spacedkd_fast: resuming {trainer.cfg.resume} from {state['checkpoint_file']} at teacher iteration "
                f"{trainer.driver.fresh} (epoch {trainer.driver.fresh / trainer.iters_per_epoch:.2f} of the "
                f"{trainer.position.phase} phase){extended}")

