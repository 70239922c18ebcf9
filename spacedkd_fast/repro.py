"""``python -m spacedkd_fast.repro``: does spacing help on my data, and is the minimum flatter?

Runs, for every seed: base (the student alone, CE), online KD (s = 0), spaced online KD for each s in ``--spaces``,
self KD (BYOT, s = 0) and spaced self KD (``--self-space``); then estimates the Hessian trace of each run's final
student (Hutchinson, :mod:`spacedkd_fast.hessian`) on a fixed training subset. Writes, in ``--out``:

* ``results.md``: mean ± std (over seeds) test accuracy of the student (and teacher) and Hessian trace per setting,
  plus the two questions answered from the numbers: is spaced ≥ online, and is its trace lower;
* ``accuracy_vs_space.png``: student accuracy against s (the paper's inverted U, if the data shows one);
* ``results.json``: every run's numbers; ``runs/<setting>-seed<k>/``: each run's own outputs.

The defaults (embedded digits, resnet8 / byot_resnet10, 2 seeds) finish on a 2-core CPU in about a quarter of an
hour. Every run is an ordinary ``spacedkd_fast.train`` run; ``--dry-run`` prints their configs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from spacedkd_fast.config import SettingError, TrainConfig, check_setting, cli_names
from spacedkd_fast.engine.progress import say


@dataclass
class Setting:
    name: str  # e.g. "online s=1.5"
    family: str  # base | online | self
    space: float | None
    overrides: dict
    runs: list[dict] = field(default_factory=list)


def build_settings(args) -> list[Setting]:
    settings = [Setting("base", "base", None, dict(mode="base", model=args.model)),
                Setting("online s=0", "online", 0.0, dict(mode="online", space=0.0, model=args.model))]
    for s in args.spaces:
        settings.append(Setting(f"online s={s:g}", "online", s, dict(mode="online", space=s, model=args.model)))
    settings.append(Setting("self s=0", "self", 0.0, dict(mode="self", space=0.0, model=args.self_model)))
    settings.append(Setting(f"self s={args.self_space:g}", "self", args.self_space,
                            dict(mode="self", space=args.self_space, model=args.self_model)))
    return settings


def run_config(args, setting: Setting, seed: int, out: Path) -> TrainConfig:
    return TrainConfig(**{
        **dict(dataset=args.dataset, data_dir=args.data_dir, subset=args.subset, epochs=args.epochs,
               batch_size=args.batch_size, device=args.device, seed=seed, progress=False, out=str(out),
               lr=args.lr),
        **setting.overrides})


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "–"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def write_report(args, settings: list[Setting], out: Path, wall: float, command: str) -> str:
    lines = [f"# Spaced KD reproduction study: {args.dataset}", "",
             f"Command: `{command}`", "",
             f"{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), {args.epochs} epochs, batch "
             f"{args.batch_size}, models {args.model} (base/online) and {args.self_model} (self); Hessian trace: "
             f"Hutchinson, {args.hessian_probes} Rademacher probes on {args.hessian_samples} training images "
             f"(no augmentation, BN in eval mode), CE of the student (deepest exit in self mode). "
             f"Wall time {wall / 60:.1f} min.", "",
             "| setting | student test acc (%) | teacher test acc (%) | tr(H) of the student | probe s.e. of tr(H) |",
             "|---|---|---|---|---|"]
    for st in settings:
        acc = [r["student_acc"] for r in st.runs]
        teacher = [r.get("teacher_acc") for r in st.runs]
        trace = [r.get("hessian_trace") for r in st.runs]
        stderr = _mean_std([r.get("hessian_stderr") for r in st.runs])[0]
        lines.append(f"| {st.name} | {_fmt(acc, 100)} | {_fmt(teacher, 100) if st.family != 'base' else '–'} | "
                     f"{_fmt(trace, 1, 1)} | ±{stderr:.1f} |")
    online = next(s for s in settings if s.name == "online s=0")
    spaced = [s for s in settings if s.family == "online" and s.space]
    best = max(spaced, key=lambda s: _mean_std([r["student_acc"] for r in s.runs])[0]) if spaced else None
    lines += ["", "## Answers from these numbers", ""]
    if best is not None:
        base_acc = _mean_std([r["student_acc"] for r in online.runs])[0]
        base_tr = _mean_std([r.get("hessian_trace") for r in online.runs])[0]
        for st in spaced:
            acc = _mean_std([r["student_acc"] for r in st.runs])[0]
            tr = _mean_std([r.get("hessian_trace") for r in st.runs])[0]
            lines.append(f"- {st.name}: student accuracy {'≥' if acc >= base_acc else '<'} online s=0 "
                         f"({100 * acc:.2f} vs {100 * base_acc:.2f} %, mean over seeds); Hessian trace "
                         f"{'lower' if tr < base_tr else 'not lower'} ({tr:.1f} vs {base_tr:.1f}).")
    selfs = [s for s in settings if s.family == "self"]
    if len(selfs) == 2:
        a, b = (_mean_std([r["student_acc"] for r in s.runs])[0] for s in selfs)
        ta, tb = (_mean_std([r.get("hessian_trace") for r in s.runs])[0] for s in selfs)
        lines.append(f"- {selfs[1].name}: best shallow exit {'≥' if b >= a else '<'} self s=0 "
                     f"({100 * b:.2f} vs {100 * a:.2f} %); Hessian trace {'lower' if tb < ta else 'not lower'} "
                     f"({tb:.1f} vs {ta:.1f}).")
    lines += ["", "Accuracy: mean ± std over seeds. tr(H): mean ± std over seeds of each run's estimate; the last "
              "column is the mean standard error of one run's estimate from its probes. Differences smaller than "
              "these spreads are noise. `accuracy_vs_space.png` plots the student accuracy against s; "
              "`results.json` has every run."]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def plot(args, settings: list[Setting], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    online = [s for s in settings if s.family == "online"]
    xs = [s.space for s in online]
    means = [100 * _mean_std([r["student_acc"] for r in s.runs])[0] for s in online]
    stds = [100 * _mean_std([r["student_acc"] for r in s.runs])[1] for s in online]
    ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label="online KD student")
    selfs = [s for s in settings if s.family == "self"]
    if selfs:
        ax.errorbar([s.space for s in selfs], [100 * _mean_std([r["student_acc"] for r in s.runs])[0] for s in selfs],
                    yerr=[100 * _mean_std([r["student_acc"] for r in s.runs])[1] for s in selfs], marker="s",
                    capsize=3, label="self KD (best shallow exit)")
    base = next((s for s in settings if s.family == "base"), None)
    if base is not None:
        ax.axhline(100 * _mean_std([r["student_acc"] for r in base.runs])[0], color="grey", linestyle="--",
                   label="base (CE only)")
    ax.set_xlabel("space interval s (epochs)")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(f"{args.dataset}: accuracy against s ({len(args.seeds)} seeds, mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_space.png")
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spacedkd_fast.repro", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="embedded", help="any dataset of spacedkd_fast.train")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--subset", type=int, default=None, help="train on N images of the training set")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--spaces", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0], help="s of the spaced runs")
    p.add_argument("--self-space", type=float, default=1.0, help="s of the spaced self-KD run")
    p.add_argument("--model", default="resnet8", help="teacher and student of base/online runs")
    p.add_argument("--self-model", default="byot_resnet10", help="multi-exit network of the self-KD runs")
    p.add_argument("--hessian-samples", type=int, default=256)
    p.add_argument("--hessian-probes", type=int, default=20)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/repro")
    p.add_argument("--dry-run", action="store_true", help="print the run configs and stop")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite results.md and the plot from --out's results.json (no training)")
    return p


def check_args(args) -> None:
    """Refuse what would fail (or silently collide) after hours of training, before the first run: every run's
    config (TrainConfig's rules, named by this command's flags: ``--seeds`` for each seed), the Hessian's counts
    against the training set, s values that would give two settings one name, models that do not fit their mode.
    Raises ValueError / FileNotFoundError with one line."""
    from spacedkd_fast.models import is_multi_exit

    check_setting("out", args.out)
    seeds = [check_setting("seed", seed, shown="--seeds") for seed in args.seeds]
    if len(set(seeds)) != len(seeds):
        raise SettingError(f"--seeds must be distinct (each seed is one run folder), got {args.seeds}")
    spaces = [check_setting("space", s, shown="--spaces") for s in args.spaces]
    if not all(s > 0 for s in spaces) or len({f"{s:g}" for s in spaces}) != len(spaces):
        raise SettingError(f"--spaces must be distinct numbers of epochs > 0 (s = 0 is the online run every study "
                           f"has), got {args.spaces}")
    if not check_setting("space", args.self_space, shown="--self-space") > 0:
        raise SettingError(f"--self-space must be a number of epochs > 0 (s = 0 is the self run every study has), "
                           f"got {args.self_space}")
    check_setting("model", args.self_model, shown="--self-model")
    check_setting("model", args.model)
    if not is_multi_exit(args.self_model):
        raise SettingError(f"--self-model must be a multi-exit (byot_*) model for the self-KD runs, got "
                           f"{args.self_model!r}")
    if is_multi_exit(args.model):
        raise SettingError(f"--model must be a single-exit model for the base and online runs (multi-exit ones go "
                           f"to --self-model), got {args.model!r}")
    for flag, value in (("--hessian-samples", args.hessian_samples), ("--hessian-probes", args.hessian_probes)):
        if value < 1:
            raise SettingError(f"{flag} must be an integer >= 1, got {value}")
    from spacedkd_fast.engine.runtime import resolve_device

    resolve_device(args.device)  # a CUDA device this machine lacks fails the Hessian after the first run otherwise


def check_hessian_samples(args) -> None:
    """The Hessian averages over the first --hessian-samples training images of each run: no more than the run's
    training set (--subset, else the dataset's; loaded once here, as each run will)."""
    if args.subset is not None:
        available = args.subset
    else:
        from spacedkd_fast.data import load_dataset

        available = len(load_dataset(args.dataset, args.data_dir).train_labels)
    if args.hessian_samples > available:
        raise SettingError(f"--hessian-samples must be at most the training set's {available} images "
                           f"({'--subset' if args.subset is not None else args.dataset}), got {args.hessian_samples}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from spacedkd_fast.engine import Trainer
    from spacedkd_fast.hessian import hessian_trace_of_checkpoint

    out = Path(args.out)
    try:
        with cli_names():  # TrainConfig's messages name this command's flags (--lr, --epochs...)
            check_args(args)
            settings = build_settings(args)
            configs = [(st, seed, run_config(args, st, seed, out / "runs" / f"{st.name.replace(' ', '_')}-seed{seed}"))
                       for st in settings for seed in args.seeds]
            if args.report_only and not (out / "results.json").is_file():
                raise FileNotFoundError(f"--report-only: there is no {out / 'results.json'} (--out of a finished "
                                        f"study)")
            if not args.dry_run and not args.report_only:
                check_hessian_samples(args)
    except (ValueError, FileNotFoundError) as exc:
        say(f"error: {exc}")
        return 2
    if args.dry_run:
        for st, seed, cfg in configs:
            print(st.name, seed, json.dumps({k: v for k, v in cfg.to_dict().items() if v is not None}))
        return 0
    if args.report_only:
        saved = json.loads((out / "results.json").read_text())
        by_name = {st.name: st for st in settings}
        for record in saved["runs"]:
            by_name[record["setting"]].runs.append(record)
        plot(args, settings, out)
        print(write_report(args, settings, out, saved["wall_s"], saved["command"]))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m spacedkd_fast.repro " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    for k, (st, seed, cfg) in enumerate(configs, 1):
        print(f"[{k}/{len(configs)}] {st.name}, seed {seed} ...", flush=True)
        summary = Trainer(cfg, log=lambda *a: None).fit()
        estimate = hessian_trace_of_checkpoint(Path(cfg.out) / "last.pt", role="student",
                                               samples=args.hessian_samples, probes=args.hessian_probes,
                                               device=args.device)
        record = dict(setting=st.name, seed=seed, student_acc=summary.student_acc, teacher_acc=summary.teacher_acc,
                      hessian_trace=estimate.trace, hessian_stderr=estimate.stderr, wall_s=summary.wall_s)
        st.runs.append(record)
        print(f"    student {100 * summary.student_acc:.2f} %, tr(H) {estimate.trace:.1f} ± {estimate.stderr:.1f}, "
              f"{summary.wall_s:.0f} s", flush=True)
    wall = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps({"command": command, "wall_s": wall, "args": vars(args),
                                                  "runs": [r for st in settings for r in st.runs]}, indent=2) + "\n")
    plot(args, settings, out)
    print(write_report(args, settings, out, wall, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
