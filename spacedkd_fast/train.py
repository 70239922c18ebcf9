"""``python -m spacedkd_fast.train``: spaced knowledge distillation from the command line.

With no arguments it runs spaced online KD on the embedded dataset (5,000 real MNIST digits) on the CPU in a few
minutes. Every flag maps 1:1 onto a :class:`spacedkd_fast.config.TrainConfig` field. Precedence: defaults <
``--recipe`` < the saved config of ``--resume`` < explicit flags.

Examples::

    python -m spacedkd_fast.train                                    # CPU quick start, spaced online KD, s = 1
    python -m spacedkd_fast.train --space 0 --out runs/online        # ordinary online KD baseline
    python -m spacedkd_fast.train --recipe paper --data-dir ~/data/cifar-100-python --out runs/paper
    python -m spacedkd_fast.train --mode self --model byot_resnet10 --space 2
    python -m spacedkd_fast.train --resume runs/paper                # continue an interrupted run
    torchrun --nproc_per_node=4 -m spacedkd_fast.train --recipe paper --data-dir ...   # DDP
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import errno
import json
import os
import socket
import sys
import typing
from pathlib import Path

from spacedkd_fast.config import RECIPES, TrainConfig, cli_names, config_fields
from spacedkd_fast.engine.outputs import CHECKPOINT, PREVIOUS, OutputWriteError, RunFolderInUse, setting_value
from spacedkd_fast.engine.progress import say
from spacedkd_fast.models import MODEL_NAMES

GROUPS = {
    "what to train": ("mode", "space", "start_epoch", "replay_tail", "model", "teacher_model", "student_model",
                      "teacher_weights"),
    "data": ("dataset", "data_dir", "image_size", "val_fraction", "split_seed", "stream", "strict_data", "subset",
             "epochs", "batch_size", "eval_batch_size"),
    "optimization (each network has its own optimizer)": (
        "optimizer", "lr", "momentum", "weight_decay", "lr_schedule", "warmup_epochs", "min_lr", "lr_milestones",
        "lr_gamma"),
    "distillation": ("alpha", "temperature", "beta", "label_smoothing", "kd_objective", "teacher_bn",
                     "self_kd_weight"),
    "execution": ("device", "precision", "channels_last", "compile", "tf32", "deterministic", "overlap",
                  "seed", "threads", "dist_timeout"),
    "data path": ("data_backend", "prefetch", "window_budget", "host_budget", "window_storage"),
    "outputs": ("out", "resume", "overwrite", "log_every", "tensorboard", "trace_batches", "progress", "recipe"),
}


def _field_type(f: dataclasses.Field):
    """The field's type with ``| None`` removed."""
    hint = typing.get_type_hints(TrainConfig)[f.name]
    if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m spacedkd_fast.train",
        usage="%(prog)s [options]      (torchrun --nproc_per_node=K -m spacedkd_fast.train [options] for DDP)",
        description=(
            "Spaced knowledge distillation (Sun et al., ICML 2025): the teacher trains s epochs ahead on fresh\n"
            "batches; the student replays exactly those batches, distilling from the teacher as it stands at the\n"
            "end of each block. With no arguments: spaced online KD on the embedded MNIST digits, on the CPU,\n"
            "in a few minutes."),
        epilog=(
            "Precedence: defaults < --recipe < the saved config of --resume < explicit flags.\n"
            "Outputs in --out (default runs/<mode>-<date>-<time>): config.json, metrics.jsonl, curves.png,\n"
            "last.pt / previous.pt / best.pt, status.json (+ batches.jsonl with --trace-batches). Ctrl-C (or\n"
            "SIGTERM) writes last.pt and exits 0; continue with --resume DIR, extend a finished run with --resume DIR\n"
            "--epochs N. Exit codes: 0 finished or stopped on request, 2 bad input, 75 a DDP peer stopped answering\n"
            "(the checkpoints are intact: resume), 1 anything else."),
        argument_default=argparse.SUPPRESS,  # only explicitly given flags reach the namespace
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=30, width=110),
    )
    fields = {f.name: f for f in config_fields()}
    defaults = TrainConfig()
    for title, names in GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            add_setting_flag(group, name, getattr(defaults, name),
                             f"; one of: {', '.join(MODEL_NAMES)}" if name == "model" else "")
    missing = set(fields) - {n for names in GROUPS.values() for n in names}
    assert not missing, f"config fields without a CLI group: {missing}"
    return parser


def add_setting_flag(group, name: str, shown_default, extra_help: str = "", **kwargs) -> None:
    """Add ``--name-with-dashes`` for TrainConfig field ``name`` to ``group`` (an argparse parser or group): its
    type, choices and help from the field, ``(default: SHOWN_DEFAULT)`` appended unless None, booleans as
    ``--x/--no-x``, tuples as ``nargs="+"``. ``kwargs`` go to ``add_argument`` (``python -m spacedkd_fast.repro``
    passes the same training flags on to its runs this way)."""
    f = next(f for f in config_fields() if f.name == name)
    flag = "--" + name.replace("_", "-")
    meta = dict(f.metadata)
    help_text = meta.pop("help") + extra_help
    if shown_default is not None and "default" not in help_text:
        help_text += f" (default: {shown_default})"
    kind = _field_type(f)
    if kind is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text, **kwargs)
    elif kind is tuple or typing.get_origin(kind) is tuple:
        group.add_argument(flag, nargs="+", type=meta.pop("type", int), metavar=meta.pop("metavar", None),
                           help=help_text, **kwargs)
    else:
        group.add_argument(flag, type=kind, help=help_text, **meta, **kwargs)


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse flags into a TrainConfig (raises SystemExit on a bad flag, ValueError on a bad value; errors name the
    flags)."""
    with cli_names():
        return _config_from_args(argv)


def _config_from_args(argv: list[str] | None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    if "lr_milestones" in args:
        args["lr_milestones"] = tuple(args["lr_milestones"])
    base = TrainConfig().to_dict()
    if args.get("recipe"):
        base.update(RECIPES[args["recipe"]])
    if args.get("resume"):
        base = saved_config(args["resume"])
    base.update(args)
    if not base.get("resume") and base.get("out") is None:  # never lose a run: it gets a folder of its own
        base["out"] = default_out(base.get("mode", "online"))
    return TrainConfig.from_dict(base)


def saved_config(folder: str) -> dict:
    """The config.json of run folder ``folder`` (``--resume``), as a dict of config fields.

    Raises:
        FileNotFoundError: there is none. ValueError: it is not JSON, not an object, or has fields this version
            does not know (each naming the file).
    """
    path, where = Path(folder) / "config.json", setting_value("resume", folder)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no config.json there (is it a run folder?)")
    try:
        saved = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: {path} is not valid JSON ({exc}); it is the run's config, written when the run "
                         f"started: restore it (its checkpoint holds the same config)") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{where}: {path} holds a JSON {type(saved).__name__}, not the run's config (an object of "
                         f"config fields)")
    unknown = sorted(set(saved) - {f.name for f in config_fields()})
    if unknown:
        raise ValueError(f"{where}: {path} has fields this version does not know: {', '.join(unknown)}")
    return saved


def default_out(mode: str) -> str:
    """``runs/<mode>-<date>-<time>`` (a second later, a new folder)."""
    return f"runs/{mode}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


# OS errors of a full, read-only or size-limited disk: a one-line error, not a traceback, when they end a run.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES}
EXIT_OK = 0  # finished, or stopped on request (SIGINT/SIGTERM) with last.pt written: status.json tells which
EXIT_BAD_INPUT = 2  # a bad flag or value, a missing dataset, a folder that holds another run
STATUS = "status.json"  # the run's state for scripts: running / finished / stopped / peer-lost / failed


def main(argv: list[str] | None = None) -> int:
    """The command line: exit codes :data:`EXIT_OK`, :data:`EXIT_BAD_INPUT`,
    :data:`~spacedkd_fast.engine.distributed.EXIT_PEER_LOST` (75), 1 for anything else (with its traceback)."""
    with cli_names():  # errors name settings by their flags
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    from spacedkd_fast.data.files import BrokenFilesError
    from spacedkd_fast.engine import Trainer, TrainingInterrupted
    from spacedkd_fast.engine.distributed import EXIT_PEER_LOST, DistInfo, last_words, peer_lost, shutdown

    cfg = None
    try:
        cfg = config_from_args(argv)
        trainer = Trainer(cfg)
    except OutputWriteError as exc:  # config.json: the disk, not the input
        say(f"error: {exc}")
        return 1
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, RunFolderInUse) as exc:
        say(f"error: {exc}")
        return EXIT_BAD_INPUT
    except Exception as exc:
        world = int(os.environ.get("WORLD_SIZE", "1"))  # the Trainer's DistInfo does not exist yet
        lost = peer_lost(exc, DistInfo(rank=int(os.environ.get("RANK", "0")), world=world))
        if lost is None:
            raise
        say(lost.line(cfg.resume or cfg.out if cfg is not None else None))
        return EXIT_PEER_LOST

    info, folder = trainer.dist, trainer.run_folder
    status = RunStatus(folder, info)
    status.write("running")

    def record_lost(code: int, line: str | None) -> None:  # the stop watchdog ends the process: say why first
        status.write("peer-lost", code, line, any_rank=True)

    try:
        with last_words(record_lost):
            summary = trainer.fit()
        outcome, line = "finished", None
    except TrainingInterrupted as exc:
        outcome = "stopped"
        line = f"spacedkd_fast: {exc}"
        if folder is not None:
            line += f" (last.pt written{f'; with torchrun --nproc_per_node={info.world}' if info.enabled else ''})"
    except BrokenFilesError as exc:  # --strict-data, or a batch of broken files: last.pt holds the steps taken
        shutdown(info, peers_alive=False)
        say(f"\nerror: {exc}")
        status.write("failed", 1, str(exc))
        return 1
    except OSError as exc:
        if not isinstance(exc, OutputWriteError) and exc.errno not in STORAGE_ERRNOS:
            status.write("failed", 1, f"{type(exc).__name__}: {exc}")
            raise
        shutdown(info, peers_alive=False)
        kept = folder is not None and any((folder / name).exists() for name in (CHECKPOINT, PREVIOUS))
        line = f"error: {exc}; " + (f"{folder} keeps its last checkpoint: continue with "
                                    f"{setting_value('resume', folder)} once the disk is fixed" if kept else
                                    "no checkpoint was written yet")
        say(line)
        status.write("failed", 1, line)
        return 1
    except Exception as exc:
        lost = peer_lost(exc, info)
        shutdown(info, peers_alive=False)  # whatever went wrong, a barrier now would only wait out the timeout
        if lost is None:
            status.write("failed", 1, f"{type(exc).__name__}: {exc}")
            raise
        line = lost.line(folder)
        say(line)
        status.write("peer-lost", EXIT_PEER_LOST, line, any_rank=True)
        return EXIT_PEER_LOST
    try:
        shutdown(info)
    except Exception as exc:
        lost = peer_lost(exc, info)
        if lost is None:
            raise
        line = lost.line(folder)
        say(line)
        status.write("peer-lost", EXIT_PEER_LOST, line, any_rank=True)
        return EXIT_PEER_LOST
    if outcome == "stopped":
        say(line)
    elif info.is_main:
        print(summary.table())
    status.write(outcome, EXIT_OK, line)
    return EXIT_OK


class RunStatus:
    """``status.json`` in the run folder: what a script (a job array, a requeue hook) checks after the process ends,
    since under torchrun a requested stop and a finished run both exit 0. Written atomically, by rank 0 (any rank
    for ``peer-lost``: rank 0 may be the rank that stopped answering)::

        {"state": "stopped", "exit_code": 0, "message": "...", "resume": "torchrun ... --resume DIR", ...}

    ``running`` left behind means the process died without a word (SIGKILL, out of memory)."""

    def __init__(self, folder, info) -> None:
        self.folder, self.info = (Path(folder) if folder is not None else None), info

    def write(self, state: str, exit_code: int | None = None, message: str | None = None, *,
              any_rank: bool = False) -> None:
        if self.folder is None or not (self.info.is_main or any_rank):
            return
        launch = f"torchrun --nproc_per_node={self.info.world}" if self.info.enabled else "python"
        record = {"state": state, "exit_code": exit_code, "message": message,
                  "resume": None if state == "finished" else f"{launch} -m spacedkd_fast.train --resume {self.folder}",
                  "rank": self.info.rank, "world": self.info.world, "pid": os.getpid(), "host": socket.gethostname(),
                  "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        tmp = self.folder / f".{STATUS}.{os.getpid()}"
        try:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
            os.replace(tmp, self.folder / STATUS)
        except OSError as exc:  # the state file must never be why a run fails
            say(f"spacedkd_fast: could not write {self.folder / STATUS}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
