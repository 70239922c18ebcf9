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
import sys
import typing
from pathlib import Path

from spacedkd_fast.config import RECIPES, TrainConfig, cli_names, config_fields
from spacedkd_fast.engine.outputs import CHECKPOINT, PREVIOUS, OutputWriteError, RunFolderInUse, setting_value
from spacedkd_fast.models import MODEL_NAMES

GROUPS = {
    "what to train": ("mode", "space", "start_epoch", "replay_tail", "model", "teacher_model", "student_model",
                      "teacher_weights"),
    "data": ("dataset", "data_dir", "image_size", "val_fraction", "split_seed", "stream", "subset", "epochs",
             "batch_size", "eval_batch_size"),
    "optimization (each network has its own optimizer)": (
        "optimizer", "lr", "momentum", "weight_decay", "lr_schedule", "warmup_epochs", "min_lr", "lr_milestones",
        "lr_gamma"),
    "distillation": ("alpha", "temperature", "beta", "label_smoothing", "kd_objective", "teacher_bn",
                     "self_kd_weight"),
    "execution": ("device", "precision", "channels_last", "compile", "tf32", "deterministic", "overlap",
                  "seed", "threads"),
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
            "last.pt / previous.pt / best.pt (+ batches.jsonl with --trace-batches). Ctrl-C (or SIGTERM) writes\n"
            "last.pt; continue with --resume DIR, extend a finished run with --resume DIR --epochs N."),
        argument_default=argparse.SUPPRESS,  # only explicitly given flags reach the namespace
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=30, width=110),
    )
    fields = {f.name: f for f in config_fields()}
    defaults = TrainConfig()
    for title, names in GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            f = fields[name]
            flag = "--" + name.replace("_", "-")
            meta = dict(f.metadata)
            default = getattr(defaults, name)
            help_text = meta.pop("help")
            if name in ("model", "teacher_model", "student_model"):
                help_text += f"; one of: {', '.join(MODEL_NAMES)}" if name == "model" else ""
            if default is not None and "default" not in help_text:
                help_text += f" (default: {default})"
            kind = _field_type(f)
            if kind is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
            elif kind is tuple or typing.get_origin(kind) is tuple:
                group.add_argument(flag, nargs="+", type=meta.pop("type", int), metavar=meta.pop("metavar", None),
                                   help=help_text)
            else:
                group.add_argument(flag, type=kind, help=help_text, **meta)
    missing = set(fields) - {n for names in GROUPS.values() for n in names}
    assert not missing, f"config fields without a CLI group: {missing}"
    return parser


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


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 done, 2 bad input (or a run folder that cannot be used), 1 the disk failed the run,
    130 interrupted (last.pt written)."""
    from spacedkd_fast.engine import Trainer, TrainingInterrupted

    with cli_names():  # errors name settings by their flags
        try:
            cfg = config_from_args(argv)
            trainer = Trainer(cfg)
        except OutputWriteError as exc:  # config.json: the disk, not the input
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, RunFolderInUse) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        from spacedkd_fast.engine.distributed import shutdown

        try:
            summary = trainer.fit()
        except TrainingInterrupted as exc:
            print(f"\ninterrupted: {exc}", file=sys.stderr)
            return 130
        except OSError as exc:
            if not isinstance(exc, OutputWriteError) and exc.errno not in STORAGE_ERRNOS:
                raise
            folder = trainer.run_folder
            kept = folder is not None and any((folder / name).exists() for name in (CHECKPOINT, PREVIOUS))
            print(f"error: {exc}; " + (f"{folder} keeps its last checkpoint: continue with "
                                       f"{setting_value('resume', folder)} once the disk is fixed" if kept else
                                       "no checkpoint was written yet"),
                  file=sys.stderr)
            return 1
        finally:
            shutdown(trainer.dist)
        if trainer.dist.is_main:
            print(summary.table())
        return 0


if __name__ == "__main__":
    sys.exit(main())
