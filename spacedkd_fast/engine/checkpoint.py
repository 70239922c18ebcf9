"""The checkpoint format: what a checkpoint holds, how it is checked, written, found, read back and restored, and
how a resume request is checked against it.

``last.pt`` (rank 0) holds what every rank shares: the config, each role's weights / head / optimizer / lr policy,
the schedule position, the teacher snapshots still being replayed, the epoch records, and how long each log file
was (a resumed run cuts its logs back to there: :mod:`spacedkd_fast.engine.logs`). What differs between DDP ranks
(the replay window: each rank's shard of the batches; every random stream; the running losses) is rank 0's inside
``last.pt`` and ranks 1..'s in ``ranks/rank<r>-<checkpoint id>.pt``. :func:`write` and :func:`restore` are the
only code that assembles or reads that layout; ``outputs.py`` writes the files (durably, rotating ``last.pt`` into
``previous.pt``).

A checkpoint is judged on its structure (:func:`checkpoint_problem`), not only on ``torch.load`` succeeding: a torn,
foreign (``torch.save({"format": 2})``, a tensor, a list) or newer-format ``last.pt`` is one reason, and a resume
falls back to ``previous.pt`` for any of them alike (:func:`load_checkpoint`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from spacedkd_fast.config import TrainConfig, incompatible_fields, setting_name
from spacedkd_fast.engine import logs
from spacedkd_fast.engine import roles as R
from spacedkd_fast.engine.distributed import barrier
from spacedkd_fast.engine.modes import MODES
from spacedkd_fast.engine.outputs import (
    CHECKPOINT,
    CONFIG,
    PREVIOUS,
    RANK_FOLDER,
    RUN_FILES,
    atomic_save,
    setting_value,
)
from spacedkd_fast.models.weights import load_error_reason

__all__ = ["CHECKPOINT_FORMAT", "READABLE_FORMATS", "RANK_FOLDER", "checkpoint_problem", "checkpoint_file_problem",
           "load_checkpoint", "load_resume_state", "write", "restore", "best_state"]

CHECKPOINT_FORMAT = 2  # 2: per-rank state (window, random streams) beside the shared one; 1 is read too
READABLE_FORMATS = (1, 2)  # the weights and config sit in the same places in both

# What a resumable checkpoint holds (Trainer._checkpoint writes it): entry -> type. Checked before a resume relies
# on a file, and before a rotation keeps the old last.pt as previous.pt.
_NUMBER = (int, float)
SHARED_ENTRIES = {"format": int, "config": dict, "roles": dict, "position": dict, "snapshots": dict,
                  "history": list, "pending": dict, "images_seen": int, "elapsed": _NUMBER}
FORMAT_ENTRIES = {1: {"window": dict, "rng": dict},  # format 1: one process, its window and streams at the top
                  2: {"world": int, "checkpoint_id": int, "rank_state": dict}}
POSITION_ENTRIES = ("t_iter", "phase", "s_block", "s_offset", "last_action", "actions", "evaluated_through")
ROLE_ENTRIES = {"model": dict, "optimizer": dict, "extra": object, "steps": int, "last_lr": object}
RANK_ENTRIES = {"window": dict, "roles": dict, "rng": dict}  # format 2's rank_state (format 1: top level / roles)


def _missing(state: dict, entries: dict, where: str) -> str | None:
    for key, kind in entries.items():
        if key not in state:
            return f"no {key!r} entry{where}"
        if not isinstance(state[key], kind):
            return f"its {key!r} entry{where} is a {type(state[key]).__name__}"
    return None


def checkpoint_problem(state) -> str | None:
    """Why ``state`` (a loaded ``last.pt``) is not a checkpoint this version can resume from, in a few words, or
    None when it is one. Checks the structure the restore relies on: format, config (it must load), roles with
    weights and optimizer, the schedule position, the per-rank state."""
    if not isinstance(state, dict):
        return f"not a spacedkd_fast checkpoint (it holds a {type(state).__name__}, not a dict)"
    if "format" not in state:
        return "not a spacedkd_fast checkpoint (no 'format' entry)"
    if state["format"] not in READABLE_FORMATS:
        return f"checkpoint format {state['format']!r}, this version reads {', '.join(map(str, READABLE_FORMATS))}"
    problem = (_missing(state, SHARED_ENTRIES, "") or _missing(state, FORMAT_ENTRIES[state["format"]], ""))
    if problem is not None:
        return f"not a resumable spacedkd_fast checkpoint ({problem})"
    try:
        TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as exc:
        return f"its config does not load ({exc})"
    for key in POSITION_ENTRIES:
        if key not in state["position"]:
            return f"not a resumable spacedkd_fast checkpoint (no {key!r} in its position)"
    if not state["roles"]:
        return "not a resumable spacedkd_fast checkpoint (no roles)"
    for name, role in state["roles"].items():
        role_entries = ROLE_ENTRIES | ({"rng": object, "loss": object} if state["format"] == 1 else {})
        problem = _missing(role, role_entries, f" in role {name!r}") if isinstance(role, dict) else \
            f"role {name!r} is a {type(role).__name__}"
        if problem is not None:
            return f"not a resumable spacedkd_fast checkpoint ({problem})"
    if state["format"] == 2:
        rank_state = state["rank_state"]
        problem = _missing(rank_state, RANK_ENTRIES, " in its rank_state")
        if problem is None and set(rank_state["roles"]) != set(state["roles"]):
            problem = "its rank_state has other roles"
        if problem is not None:
            return f"not a resumable spacedkd_fast checkpoint ({problem})"
    return None


def _read(path: Path, mmap: bool = False) -> tuple[dict | None, str | None]:
    """(state, None) for a resumable checkpoint at ``path``, else (None, why not)."""
    try:
        # weights_only: tensors and plain containers only (a file named by the user must not run code). mmap: the
        # tensors stay on disk, for a structure check that reads only the pickle and the zip directory.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file raises many types
        return None, f"unreadable ({type(exc).__name__}: {load_error_reason(exc)})"
    problem = checkpoint_problem(state)
    return (None, problem) if problem is not None else (state, None)


def checkpoint_file_problem(path: str | os.PathLike) -> str | None:
    """Why the file at ``path`` is not a resumable checkpoint (torn, foreign, unreadable...), or None. Cheap: the
    tensors are memory-mapped, not read."""
    return _read(Path(path), mmap=True)[1]


def load_checkpoint(folder: str | os.PathLike, log=print) -> tuple[dict, Path]:
    """The newest valid checkpoint of a run folder: ``last.pt``, else (missing, torn, foreign, another format)
    ``previous.pt``, with one line saying why it fell back.

    Raises:
        FileNotFoundError: neither exists (the message says whether the folder is missing, empty of runs, or holds
            a run that never reached its first checkpoint). ValueError: neither is valid (both reasons named).
        NotADirectoryError: ``folder`` is a file.
    """
    folder = Path(folder)
    where = setting_value("resume", folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{where}: is a file, not a run folder (give the folder holding {CHECKPOINT})")
    problems = []
    for name in (CHECKPOINT, PREVIOUS):
        path = folder / name
        if not path.exists():
            problems.append(f"{name}: missing")
            continue
        state, problem = _read(path)
        if problem is not None:
            problems.append(f"{name}: {problem}")
            continue
        if problems:
            log(f"spacedkd_fast: {where}: {problems[-1]}; resuming from {name} instead")
        return state, path
    if all(p.endswith("missing") for p in problems):
        found = [name for name in RUN_FILES if (folder / name).exists()]
        if not folder.exists():
            raise FileNotFoundError(f"{where}: no such folder, so no {CHECKPOINT} to resume from")
        if found:
            raise FileNotFoundError(f"{where}: that run never reached its first checkpoint (the folder holds "
                                    f"{', '.join(found)} but no {CHECKPOINT} or {PREVIOUS}): start it again without "
                                    f"{setting_name('resume')}, with {setting_value('out', folder)} (the folder is "
                                    f"reused)")
        raise FileNotFoundError(f"{where}: there is no {CHECKPOINT} (or {PREVIOUS}) in that folder")
    raise ValueError(f"{where}: no readable checkpoint: {'; '.join(problems)}")


def load_resume_state(cfg: TrainConfig, log=print, explicit: dict | None = None) -> tuple[dict, TrainConfig]:
    """The checkpoint ``cfg.resume`` names and the config the resumed run trains with, checked against each other:
    same format family, no field that changes the math differs (more epochs extend the run; an offline run cannot be
    extended).

    ``explicit`` (Python's keywords): the settings the caller spelled out. The saved config wins where they say
    nothing; where they say something, a resume-mutable setting (device, logging, budgets, ...) or more epochs
    override it, anything else that differs is refused, naming it. None (the command line, or a complete
    ``TrainConfig``): ``cfg`` is the whole request, already laid over the run's config.json."""
    state, path = load_checkpoint(cfg.resume, log=log)  # last.pt, or previous.pt if that one is not valid
    if state["format"] == 1:  # a single-process checkpoint of the first format: same content, other places
        state = upgrade_format_1(state)
    saved = TrainConfig.from_dict(state["config"])
    if explicit is not None:
        cfg = TrainConfig.from_dict({**saved.to_dict(), **explicit})
    differ = incompatible_fields(saved, cfg)
    if differ:
        details = "; ".join(f"{f}: {path.name} was saved with {getattr(saved, f)!r}, {source} {getattr(cfg, f)!r}"
                            for f, source in _requested_by(cfg, differ).items())
        raise ValueError(f"{setting_value('resume', cfg.resume)}: incompatible config, these fields differ from the "
                         f"saved run: {details}" +
                         (" (a run can be extended, not shortened)" if "epochs" in differ else ""))
    if cfg.epochs > saved.epochs and not MODES[cfg.mode].extendable:
        raise ValueError(f"{setting_value('resume', cfg.resume)} {setting_value('epochs', cfg.epochs)}: an offline "
                         f"run cannot be extended (its frozen teacher's phase has {saved.epochs} epochs)")
    state["saved_epochs"] = saved.epochs
    state["checkpoint_file"] = path.name
    return state, cfg


def _requested_by(cfg: TrainConfig, fields: list[str]) -> dict[str, str]:
    """Where each of ``fields``' values in ``cfg`` came from, as the mismatch message says it: from Python the
    caller's keyword (``space= asks for``); on the command line (which starts from the run folder's config.json,
    then applies the explicit flags) the folder's config.json when it holds that value, else the flag."""
    folder_config = None
    if setting_name("resume").startswith("--"):  # the command line (cli_names)
        path = Path(cfg.resume) / CONFIG
        try:
            folder_config = TrainConfig.from_dict(json.loads(path.read_text()))
        except (OSError, TypeError, ValueError):  # gone or damaged since: the flags' word it is
            folder_config = None
    return {f: (f"{Path(cfg.resume) / CONFIG} says" if folder_config is not None and
                getattr(folder_config, f) == getattr(cfg, f) else f"{setting_name(f)} asks for") for f in fields}


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

