"""What a checkpoint holds, how it is checked, found and read back, and how a resume request is checked against it.

``last.pt`` (rank 0) holds what every rank shares: the config, each role's weights / head / optimizer / lr policy,
the schedule position, the teacher snapshots still being replayed, the metrics history. What differs between DDP
ranks (the replay window: each rank's shard of the batches; every random stream) is rank 0's inside ``last.pt``
and ranks 1..'s in ``ranks/rank<r>-<checkpoint id>.pt``. The engine writes and restores them
(:meth:`Trainer._checkpoint`, :meth:`Trainer._restore`); ``outputs.py`` writes the files (durably, rotating
``last.pt`` into ``previous.pt``); this module is the format.

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
from spacedkd_fast.engine import roles as R
from spacedkd_fast.engine.outputs import CHECKPOINT, CONFIG, PREVIOUS, RANK_FOLDER, RUN_FILES, setting_value
from spacedkd_fast.models.weights import load_error_reason

__all__ = ["CHECKPOINT_FORMAT", "READABLE_FORMATS", "RANK_FOLDER", "checkpoint_problem", "checkpoint_file_problem",
           "load_checkpoint", "load_resume_state"]

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


def load_resume_state(cfg: TrainConfig, log=print) -> dict:
    """The checkpoint ``cfg.resume`` names, checked against ``cfg``: same format family, no field that changes
    the math differs (more epochs extend the run; an offline run cannot be extended)."""
    state, path = load_checkpoint(cfg.resume, log=log)  # last.pt, or previous.pt if that one is not valid
    if state["format"] == 1:  # a single-process checkpoint of the first format: same content, other places
        state = upgrade_format_1(state)
    saved = TrainConfig.from_dict(state["config"])
    differ = incompatible_fields(saved, cfg)
    if differ:
        details = "; ".join(f"{f}: {path.name} was saved with {getattr(saved, f)!r}, {source} {getattr(cfg, f)!r}"
                            for f, source in _requested_by(cfg, differ).items())
        raise ValueError(f"{setting_value('resume', cfg.resume)}: incompatible config, these fields differ from the "
                         f"saved run: {details}" +
                         (" (a run can be extended, not shortened)" if "epochs" in differ else ""))
    if cfg.epochs > saved.epochs and cfg.mode == "offline":
        raise ValueError(f"{setting_value('resume', cfg.resume)} {setting_value('epochs', cfg.epochs)}: an offline "
                         f"run cannot be extended (its frozen teacher's phase has {saved.epochs} epochs)")
    state["saved_epochs"] = saved.epochs
    state["checkpoint_file"] = path.name
    return state


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
