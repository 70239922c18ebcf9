"""What a checkpoint holds, and how a resume request is checked against it.

``last.pt`` (rank 0) holds what every rank shares: the config, each role's weights / head / optimizer / lr policy,
the schedule position, the teacher snapshots still being replayed, the metrics history. What differs between DDP
ranks (the replay window: each rank's shard of the batches; every random stream) is rank 0's inside ``last.pt``
and ranks 1..'s in ``ranks/rank<r>-<checkpoint id>.pt``. The engine writes and restores them
(:meth:`Trainer._checkpoint`, :meth:`Trainer._restore`); this module is the format.
"""

from __future__ import annotations

import torch

from spacedkd_fast.config import TrainConfig, incompatible_fields
from spacedkd_fast.engine import roles as R
from spacedkd_fast.engine.outputs import load_checkpoint

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
    total, count = rank_saved["loss"]
    role.epoch_loss = R.RunningLoss(total.to(device) if total is not None else None, count)


def rank_role_state(role: R.Role) -> dict:
    """What differs between ranks in a role: its random stream and its running loss."""
    loss = role.epoch_loss
    return {"rng": role.rng_state, "loss": (loss.total.cpu() if loss.total is not None else None, loss.count)}


def upgrade_format_1(state: dict) -> dict:
    """A format-1 checkpoint (one process) as format 2: the window and random streams become rank 0's state."""
    rank_state = {"rank": 0, "checkpoint_id": state["position"]["actions"], "window": state.pop("window"),
                  "rng": state.pop("rng"),
                  "roles": {name: {"rng": r.pop("rng"), "loss": r.pop("loss")} for name, r in state["roles"].items()}}
    return {**state, "format": CHECKPOINT_FORMAT, "world": 1, "checkpoint_id": rank_state["checkpoint_id"],
            "rank_state": rank_state}
