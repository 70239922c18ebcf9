"""``python -m spacedkd_fast.repro``: does KD help on my data, does spacing help, and is the minimum flatter?

Runs the chosen settings (``--settings``) for every seed, each an ordinary ``spacedkd_fast.train`` run, then
estimates the Hessian trace of each run's final student (Hutchinson, :mod:`spacedkd_fast.hessian`) on a fixed
training subset. The settings:

* ``base``: the student alone (``--student-model``), CE only;
* ``teacher``: the teacher alone (``--teacher-model``), CE only; its ``last.pt`` is the offline setting's teacher;
* ``online``: online KD teacher → student at s = 0 and at every s of ``--spaces`` (spaced online KD);
* ``offline``: the student distils from a trained, frozen teacher: ``--teacher-weights PATH`` if given, else the
  same seed's ``teacher`` run (added when needed; with a teacher of the student's architecture, ``base`` is that
  run);
* ``self``: BYOT self KD of ``--self-model`` at s = 0 and at every s of ``--self-space``.

Writes, in ``--out``:

* ``results.md``: mean ± std (over seeds) test accuracy of the student (and teacher) and Hessian trace per setting,
  and the questions (does the teacher beat the student alone, does KD beat base, does spacing beat s = 0, does it
  lower tr(H)) answered by paired tests over the seeds (:mod:`spacedkd_fast.stats`): the mean difference, a paired
  bootstrap 95 % CI, a paired t-test and a verdict;
* ``accuracy_vs_space.png``: student accuracy against s (the paper's inverted U, if the data shows one);
* ``results.json``: every run's numbers and the tests; ``study.json``: what the study is (to continue it);
  ``runs/<setting>-seed<k>/``: each run's own outputs and, once it is done, ``repro.json`` (its record).

Rerunning the same command continues the study: finished runs (with ``repro.json``) are not trained again, an
interrupted one resumes from its ``last.pt``. More seeds, settings or s values extend it; a change of what the runs
compute (epochs, lr, α, models, Hessian sizes, ...) is another study, refused unless ``--overwrite``.
``--dry-run`` prints the run configs; ``--report-only`` rewrites the report from the runs done so far.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from spacedkd_fast.config import (
    RECIPE_NAMES,
    RECIPES,
    RESUME_MUTABLE,
    SettingError,
    TrainConfig,
    check_setting,
    cli_names,
)
from spacedkd_fast.engine.progress import say
from spacedkd_fast.stats import TOO_FEW, paired_test

SETTING_KINDS = ("teacher", "base", "online", "offline", "self")  # also the order the runs and the report take
DEFAULT_SETTINGS = ("base", "online", "self")
# The study's own defaults where they differ from TrainConfig's (a quick CPU study); a --recipe and the explicit
# flags come on top, in that order.
REPRO_DEFAULTS = dict(dataset="embedded", epochs=4, batch_size=64, lr=0.05)
DEFAULT_MODEL, DEFAULT_SELF_MODEL = "resnet8", "byot_resnet10"
# TrainConfig fields passed on to every run, with the train CLI's flag, type and help.
PASS_THROUGH = {
    "data (every run)": ("dataset", "data_dir", "image_size", "val_fraction", "split_seed", "subset", "epochs",
                         "batch_size", "eval_batch_size"),
    "optimization (every run; each network has its own optimizer)": (
        "optimizer", "lr", "momentum", "weight_decay", "lr_schedule", "warmup_epochs", "min_lr", "lr_milestones",
        "lr_gamma"),
    "distillation (the KD runs)": ("start_epoch", "replay_tail", "alpha", "temperature", "beta", "label_smoothing",
                                   "kd_objective", "teacher_bn", "self_kd_weight"),
    "execution (every run)": ("precision", "channels_last", "data_backend", "threads", "tf32", "deterministic"),
}
PASSED = tuple(name for names in PASS_THROUGH.values() for name in names)
# What each setting decides for itself, and what every run gets from the study.
PER_SETTING = ("mode", "space", "model", "teacher_model", "student_model", "teacher_weights")
PER_RUN = ("seed", "out", "resume", "overwrite", "progress", "device", "recipe")
STUDY_FILE, RESULTS, REPORT, PLOT, RUNS = "study.json", "results.json", "results.md", "accuracy_vs_space.png", "runs"
RUN_RECORD = "repro.json"  # runs/<run>/repro.json: the run's record, written once its Hessian is estimated
STUDY_OUTPUTS = (STUDY_FILE, RESULTS, REPORT, PLOT, RUNS)  # what --overwrite removes (nothing else in --out)
STUDY_FORMAT = 1


@dataclass
class Setting:
    name: str  # e.g. "online s=1.5"; its runs live in runs/<name with _ for spaces>-seed<k>
    family: str  # one of SETTING_KINDS
    space: float | None
    overrides: dict  # the TrainConfig fields this setting decides (PER_SETTING)
    teacher_from: str | None = None  # offline: the setting whose run of the same seed is the frozen teacher
    runs: list[dict] = field(default_factory=list)

    def folder(self, out: Path, seed: int) -> Path:
        return run_folder(out, self.name, seed)


def run_folder(out: Path, setting: str, seed: int) -> Path:
    """``runs/<setting, spaces as _>-seed<k>`` in the study folder ``out``."""
    return out / RUNS / f"{setting.replace(' ', '_')}-seed{seed}"


@dataclass
class Run:
    setting: Setting
    seed: int
    cfg: TrainConfig

    @property
    def folder(self) -> Path:
        return Path(self.cfg.out)


# ==================================================================================================== the study
def resolve_models(args) -> tuple[str, str]:
    """``(teacher, student)`` architectures: ``--teacher-model`` / ``--student-model``, else ``--model``, else the
    recipe's, else resnet8. ``--model`` is the shorthand for both: given with both of the others it would say
    nothing, which is refused."""
    if args.model is not None and args.teacher_model is not None and args.student_model is not None:
        raise SettingError(f"--model sets both the teacher and the student, so it cannot go with both --teacher-model "
                           f"and --student-model (got --model {args.model}, --teacher-model {args.teacher_model}, "
                           f"--student-model {args.student_model}): drop --model, or one of the other two")
    recipe = RECIPES.get(args.recipe, {}) if args.recipe else {}
    fallback = recipe.get("model", DEFAULT_MODEL)
    teacher = args.teacher_model or args.model or recipe.get("teacher_model") or fallback
    student = args.student_model or args.model or recipe.get("student_model") or fallback
    return teacher, student


def model_flag(args, who: str) -> str:
    """The flag behind the architecture of ``who`` ("teacher", "student", "self"), for messages: its own flag if
    given, else ``--model`` if given, else its own."""
    if who == "self":
        return "--self-model"
    return "--model" if getattr(args, f"{who}_model") is None and args.model is not None else f"--{who}-model"


def common_settings(args) -> dict:
    """The TrainConfig fields every run shares: the study's defaults < ``--recipe`` (less what the settings decide)
    < the explicit flags."""
    common = dict(REPRO_DEFAULTS)
    if args.recipe:
        common.update({k: v for k, v in RECIPES[args.recipe].items() if k not in PER_SETTING})
    given = {name: getattr(args, name) for name in PASSED if hasattr(args, name)}
    if "lr_milestones" in given:
        given["lr_milestones"] = tuple(given["lr_milestones"])
    common.update(given)
    return common


def kinds_of(args) -> list[str]:
    """The setting kinds of the study, in :data:`SETTING_KINDS` order; ``offline`` without ``--teacher-weights``
    brings its teacher (the ``teacher`` run, or ``base`` when teacher and student are one architecture)."""
    kinds = set(args.settings)
    teacher, student = resolve_models(args)
    if "offline" in kinds and not args.teacher_weights and "teacher" not in kinds:
        kinds.add("base" if teacher == student else "teacher")
    return [k for k in SETTING_KINDS if k in kinds]


def build_settings(args) -> list[Setting]:
    teacher, student = resolve_models(args)
    kinds = kinds_of(args)
    pair = dict(model=student, teacher_model=teacher if teacher != student else None)
    settings = []
    for kind in kinds:
        if kind == "teacher":
            settings.append(Setting("teacher", "teacher", None, dict(mode="base", model=teacher)))
        elif kind == "base":
            settings.append(Setting("base", "base", None, dict(mode="base", model=student)))
        elif kind == "online":
            for s in (0.0, *args.spaces):
                settings.append(Setting(f"online s={s:g}", "online", s, dict(mode="online", space=s, **pair)))
        elif kind == "offline":
            source = None if args.teacher_weights else ("teacher" if "teacher" in kinds else "base")
            settings.append(Setting("offline", "offline", None, dict(
                mode="offline", **pair, teacher_weights=str(Path(args.teacher_weights).expanduser())
                if args.teacher_weights else None), teacher_from=source))
        elif kind == "self":
            for s in (0.0, *args.self_space):
                settings.append(Setting(f"self s={s:g}", "self", s, dict(mode="self", space=s, model=args.self_model)))
    return settings


def run_config(args, common: dict, setting: Setting, seed: int, out: Path) -> TrainConfig:
    folder = setting.folder(out, seed)
    overrides = dict(setting.overrides)
    if setting.teacher_from is not None:  # the frozen teacher: the same seed's run of that setting, as it ended
        overrides["teacher_weights"] = str(run_folder(out, setting.teacher_from, seed) / "last.pt")
    return TrainConfig(**{**common, **overrides, "seed": seed, "out": str(folder), "progress": False,
                          "device": args.device, "recipe": args.recipe})


def plan(args, out: Path) -> tuple[list[Setting], list[Run], dict]:
    """The study's settings, its runs (teachers before the settings that read them) and the common settings."""
    common = common_settings(args)
    settings = build_settings(args)
    runs = [Run(st, seed, run_config(args, common, st, seed, out)) for st in settings for seed in args.seeds]
    return settings, runs, common


def study_identity(args, common: dict) -> dict:
    """What makes two invocations the same study: every setting its runs share that changes what they compute
    (not the device, logging or budgets: :data:`~spacedkd_fast.config.RESUME_MUTABLE`; not the dataset's folder),
    the models, the teacher file and the Hessian's sizes. Seeds, settings and s values may grow: each run is its own
    folder."""
    cfg = TrainConfig(**common).to_dict()
    # data_dir says where the dataset is, not what it is: a study's records carried to another machine continue there
    identity = {k: v for k, v in sorted(cfg.items())
                if k not in RESUME_MUTABLE and k not in PER_SETTING and k not in PER_RUN and k != "data_dir"}
    teacher, student = resolve_models(args)
    identity.update(teacher_model=teacher, student_model=student, self_model=args.self_model,
                    teacher_weights=_resolved(args.teacher_weights), hessian_samples=args.hessian_samples,
                    hessian_probes=args.hessian_probes)
    return json.loads(json.dumps(identity))  # tuples as lists: as study.json gives them back


def _resolved(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _run_differences(saved: TrainConfig, planned: TrainConfig) -> list[str]:
    """The fields a run folder's config.json has other than the run this study would start there."""
    differ = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in RESUME_MUTABLE:
            continue
        a, b = getattr(saved, f.name), getattr(planned, f.name)
        if f.name == "teacher_weights":
            a, b = _resolved(a), _resolved(b)
        if a != b:
            differ.append(f"{f.name} {a!r} there, {b!r} here")
    return differ


def check_study_folder(out: Path, identity: dict, runs: list[Run], overwrite: bool) -> bool:
    """Refuse an ``--out`` that holds another study (one line: what differs, and how to go on). Returns whether it
    holds a study at all (``--overwrite`` then replaces it)."""
    how = "rerun with that study's settings to continue it, choose another --out, or pass --overwrite to replace it"
    study_file = out / STUDY_FILE
    if out.exists() and not out.is_dir():
        raise SettingError(f"--out {out}: is a file, not a folder")
    holds = study_file.exists() or (out / RESULTS).exists() or (out / RUNS).is_dir()
    if not holds or overwrite:
        return holds
    if not study_file.is_file():
        raise SettingError(f"--out {out} holds a study without {STUDY_FILE} (from a version that could not "
                           f"continue one), so it cannot be told from this one: choose another --out, or pass "
                           f"--overwrite to replace it (--report-only still reports it)")
    try:
        saved = json.loads(study_file.read_text())
        saved_identity = saved["identity"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SettingError(f"--out {out}: {study_file} is unreadable ({type(exc).__name__}: {exc}); {how}") from None
    keys = sorted(set(saved_identity) | set(identity))
    differ = [f"{_flag(k)} {saved_identity.get(k)!r} there, {identity.get(k)!r} here" for k in keys
              if saved_identity.get(k) != identity.get(k)]
    if differ:
        raise SettingError(f"--out {out} holds another study ({'; '.join(differ)}); {how}")
    for run in runs:  # a run folder of this study whose config is not the run's (edited by hand, another version)
        config = run.folder / "config.json"
        if not config.is_file():
            continue
        try:
            saved_cfg = TrainConfig.from_dict(json.loads(config.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise SettingError(f"--out {out}: {config} is unreadable ({type(exc).__name__}: {exc}); {how}") from None
        differ = _run_differences(saved_cfg, run.cfg)
        if differ:
            raise SettingError(f"--out {out} holds another study: its run {run.folder.name} has "
                               f"{'; '.join(differ)}; {how}")
    return True


# ===================================================================================================== checks
def check_args(args) -> None:
    """Refuse what would fail (or silently collide) after hours of training, before the first run: every run's
    config (TrainConfig's rules, named by this command's flags: ``--seeds`` for each seed), s values that would give
    two settings one name, models that do not fit their settings. Raises ValueError / FileNotFoundError with one
    line."""
    from spacedkd_fast.models import is_multi_exit

    check_setting("out", args.out)
    seeds = [check_setting("seed", seed, shown="--seeds") for seed in args.seeds]
    if len(set(seeds)) != len(seeds):
        raise SettingError(f"--seeds must be distinct (each seed is one run folder), got {args.seeds}")
    spaces = [check_setting("space", s, shown="--spaces") for s in args.spaces]
    if not all(s > 0 for s in spaces) or len({f"{s:g}" for s in spaces}) != len(spaces):
        raise SettingError(f"--spaces must be distinct numbers of epochs > 0 (s = 0 is the online run every study "
                           f"has), got {args.spaces}")
    self_spaces = [check_setting("space", s, shown="--self-space") for s in args.self_space]
    if not all(s > 0 for s in self_spaces) or len({f"{s:g}" for s in self_spaces}) != len(self_spaces):
        raise SettingError(f"--self-space must be distinct numbers of epochs > 0 (s = 0 is the self run every study "
                           f"has), got {args.self_space}")
    for flag in ("model", "teacher_model", "student_model"):
        if getattr(args, flag) is not None:
            check_setting("model", getattr(args, flag), shown=_flag(flag))
    check_setting("model", args.self_model, shown="--self-model")
    teacher, student = resolve_models(args)
    kinds = kinds_of(args)
    if "self" in kinds and not is_multi_exit(args.self_model):
        raise SettingError(f"--self-model must be a multi-exit (byot_*) model for the self-KD runs, got "
                           f"{args.self_model!r}")
    uses = {"student": [k for k in kinds if k in ("base", "online", "offline")],
            "teacher": [k for k in kinds if k in ("teacher", "online", "offline")]}
    for role, arch in (("student", student), ("teacher", teacher)):
        if uses[role] and is_multi_exit(arch):
            raise SettingError(f"{model_flag(args, role)} must be a single-exit model for the "
                               f"{', '.join(uses[role])} runs (multi-exit ones go to --self-model), got {arch!r}")
    if args.teacher_weights is not None:
        check_setting("teacher_weights", args.teacher_weights)
        if "offline" not in kinds:
            raise SettingError(f"--teacher-weights is the frozen teacher of the offline setting, which --settings "
                               f"{' '.join(args.settings)} does not include: add offline")
        if not Path(args.teacher_weights).expanduser().exists():
            raise FileNotFoundError(f"--teacher-weights {args.teacher_weights}: no such file")
    for flag, value in (("--hessian-samples", args.hessian_samples), ("--hessian-probes", args.hessian_probes)):
        if value < 1:
            raise SettingError(f"{flag} must be an integer >= 1, got {value}")
    from spacedkd_fast.engine.runtime import resolve_device

    resolve_device(args.device)  # a CUDA device this machine lacks fails the Hessian after the first run otherwise


def check_modes(settings: list[Setting], runs: list[Run]) -> None:
    """The engine's rules on which model fits which mode (a distilled ViT in base mode, ...), per setting."""
    from spacedkd_fast.engine.build import _check_registry_names
    from spacedkd_fast.engine.modes import MODES

    for st in settings:
        cfg = next(r.cfg for r in runs if r.setting is st)
        try:
            _check_registry_names(cfg, MODES[cfg.mode])
        except ValueError as exc:
            raise SettingError(f"--settings {st.family} ({st.name}): {exc}") from None


def check_data_and_models(args, runs: list[Run]) -> None:
    """What needs the dataset, before the first run: the Hessian's sample count against the training set, and every
    model built on the dataset's images and class count and run on two of them (a teacher and a student that do not
    fit the images or each other's classes; ``--teacher-weights`` that do not fit the teacher, via the engine's
    own loader)."""
    import torch

    from spacedkd_fast.data.pipeline import select_data_backend
    from spacedkd_fast.engine import roles as R
    from spacedkd_fast.engine.build import check_outputs
    from spacedkd_fast.engine.feeds import load_training_data, subset_dataset
    from spacedkd_fast.engine.runtime import resolve_device
    from spacedkd_fast.models import build_model
    from spacedkd_fast.models.weights import load_weights

    cfg = runs[0].cfg
    if cfg.subset is not None and args.hessian_samples > cfg.subset:
        raise SettingError(f"--hessian-samples must be at most the training set's {cfg.subset} images (--subset), "
                           f"got {args.hessian_samples}")
    dataset = load_training_data(cfg, select_data_backend(cfg.data_backend, resolve_device(args.device)))
    if cfg.subset is not None:
        subset_dataset(dataset, cfg.subset)  # a subset larger than the training set: the engine's message
    available = len(dataset.train_labels)
    if args.hessian_samples > available:
        raise SettingError(f"--hessian-samples must be at most the training set's {available} images "
                           f"({cfg.dataset}), got {args.hessian_samples}")
    shape, classes = tuple(dataset.image_shape), dataset.num_classes
    images = f"{cfg.dataset}'s {'×'.join(map(str, shape))} images"
    probe = torch.zeros((2, *shape))
    built: dict[tuple[str, str], int] = {}  # (role, arch) -> class count
    weights_checked = False
    for run in runs:
        mode = run.cfg.mode
        roles = [("student", run.cfg.student_arch)] + ([("teacher", run.cfg.teacher_arch)]
                                                       if mode in ("online", "offline") else [])
        for role, arch in roles:
            given = run.setting.overrides.get("teacher_weights") if role == "teacher" else None
            # whose architecture it is: the teacher run's one network is the teacher's
            who = "self" if mode == "self" else "teacher" if run.setting.family == "teacher" else role
            key = (who, arch)
            if key in built and (given is None or weights_checked):
                continue
            flag = model_flag(args, who)
            torch.manual_seed(0)
            try:
                module = build_model(arch, num_classes=classes, in_channels=shape[0], image_size=shape[1])
            except ValueError as exc:
                raise SettingError(f"{flag} {arch} cannot take {images}: {exc}") from None
            if given is not None:
                load_weights(module, given)  # ValueError naming --teacher-weights and the first parameters differing
                weights_checked = True
            try:
                network = check_outputs(role, R.FeatureForward(module, None), probe, multi_exit=mode == "self")
            except ValueError as exc:
                raise SettingError(f"{flag} {arch} does not fit {images}: {exc}") from None
            built[key] = network.num_classes
    found = {key: n for key, n in built.items() if n != classes}
    if found:
        (who, arch), n = next(iter(found.items()))
        raise SettingError(f"{model_flag(args, who)} {arch} gives {n} classes, {cfg.dataset} has {classes} (teacher "
                           f"and student logits must cover the dataset's classes)")



# ==================================================================================================== the report
def _mean_std(values: list[float | None]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(values: list[float | None], scale: float = 1.0, digits: int = 2) -> str:
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "–"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def setting_of_record(record: dict) -> Setting:
    """A report's setting from a run record (records of earlier versions have only the name: ``base``,
    ``online s=1.5``, ``self s=0``)."""
    name = record["setting"]
    family, space = record.get("family"), record.get("space")
    if family is None:
        family = name.split(" ")[0]
        space = float(name.split("s=")[1]) if "s=" in name else None
    return Setting(name, family, space, {})


def settings_from_records(records: list[dict]) -> list[Setting]:
    settings: dict[str, Setting] = {}
    for record in records:
        st = settings.setdefault(record["setting"], setting_of_record(record))
        st.runs.append(record)
    order = {k: i for i, k in enumerate(SETTING_KINDS)}
    return sorted(settings.values(), key=lambda s: (order.get(s.family, len(order)), s.space or 0.0, s.name))


def questions(settings: list[Setting], identity: dict) -> list[dict]:
    """The study's questions as paired tests over seeds (A − B per seed): each a dict with its comparisons."""
    by_family: dict[str, list[Setting]] = {}
    for st in settings:
        by_family.setdefault(st.family, []).append(st)
    first = {family: sts[0] for family, sts in by_family.items()}
    base, teacher = first.get("base"), first.get("teacher")
    online0 = next((s for s in by_family.get("online", []) if s.space == 0), None)
    self0 = next((s for s in by_family.get("self", []) if s.space == 0), None)
    spaced = [(s, online0) for s in by_family.get("online", []) if s.space and online0] + \
             [(s, self0) for s in by_family.get("self", []) if s.space and self0]
    asked = []
    if teacher is not None and base is not None:
        asked.append((f"Is the teacher ({identity.get('teacher_model')}) stronger than the student "
                      f"({identity.get('student_model')}) alone?", "student_acc", True, [(teacher, base)]))
    if base is not None:
        kd = [(s, base) for s in by_family.get("online", []) + by_family.get("offline", [])]
        if kd:
            asked.append(("Does KD beat base (the student alone, CE only)?", "student_acc", True, kd))
    if spaced:
        asked.append(("Does spacing beat KD without it (s = 0), at each s?", "student_acc", True, spaced))
        asked.append(("Does spacing flatten the minimum (a lower tr(H) of the student than at s = 0)?",
                      "hessian_trace", False, spaced))
    answered = []
    for text, metric, higher, pairs in asked:
        comparisons = []
        for a, b in pairs:
            test = paired_test({r["seed"]: r.get(metric) for r in a.runs}, {r["seed"]: r.get(metric) for r in b.runs},
                               higher_is_better=higher)
            comparisons.append({"a": a.name, "b": b.name, **test.to_dict()})
        answered.append({"question": text, "metric": metric, "higher_is_better": higher, "comparisons": comparisons})
    return answered


def _number(value, digits: int) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):  # "inf" / "-inf"
        return "∞" if value == "inf" else "−∞"
    return f"{value:.{digits}f}".replace("-", "−")


def _p(value) -> str:
    if value is None:
        return "–"
    return f"{value:.2g}" if value >= 0.001 or value == 0 else f"{value:.1e}"


def _count(n, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def question_lines(answered: list[dict]) -> list[str]:
    lines = ["## Questions", "",
             "Each comparison pairs the runs of A and B by seed (same seed: same data order and augmentations, and "
             "the same initialization of a network both train) and tests the per-seed differences A − B: their mean, "
             "a paired bootstrap 95 % CI of it (10,000 resamples, generator seed 0), and a paired t-test (two-sided, "
             "n − 1 degrees of freedom). **better** / **worse**: the CI excludes 0 *and* p < 0.05 (the percentile "
             "bootstrap alone is too narrow with few seeds); otherwise **no difference at this budget**. Each "
             "comparison is tested on its own: of k comparisons, about 0.05·k may come out better or worse by "
             "chance. Accuracy differences are in percentage points, tr(H) in its own units.", ""]
    for q in answered:
        scale, digits = (100.0, 2) if q["metric"] == "student_acc" else (1.0, 1)
        lines += [f"### {q['question']}", "",
                  "| A vs B | seeds | mean A − B | 95 % CI | t (df) | p | verdict |", "|---|---|---|---|---|---|---|"]
        for c in q["comparisons"]:
            scaled = {k: (c[k] * scale if isinstance(c[k], float) else c[k]) for k in ("mean", "ci_low", "ci_high")}
            ci = "–" if c["ci_low"] is None else f"[{_number(scaled['ci_low'], digits)}, " \
                                                 f"{_number(scaled['ci_high'], digits)}]"
            t = "–" if c["t"] is None else f"{_number(c['t'], 2)} ({c['df']})"
            lines.append(f"| {c['a']} vs {c['b']} | {c['n']} | {_number(scaled['mean'], digits)} | {ci} | {t} | "
                         f"{_p(c['p'])} | {c['verdict']} |")
        lines.append("")
    if any(c["verdict"] == TOO_FEW for q in answered for c in q["comparisons"]):
        lines += ["With fewer than 2 seeds there is nothing to test: rerun with more `--seeds` (≥ 5 recommended; "
                  "the runs done are kept).", ""]
    return lines


def write_report(identity: dict, settings: list[Setting], out: Path, command: str, compute_s: float,
                 answered: list[dict], planned: int | None = None) -> str:
    seeds = sorted({r["seed"] for st in settings for r in st.runs})
    done = sum(len(st.runs) for st in settings)
    get = identity.get
    subset = "" if get("subset") is None else f", {get('subset')} training images"
    lines = [f"# Spaced KD reproduction study: {get('dataset')}", "", f"Command: `{command}`", "",
             f"{_count(len(seeds), 'seed')} ({', '.join(map(str, seeds))}), {_count(get('epochs'), 'epoch')}, batch "
             f"{get('batch_size')}{subset}, {get('optimizer', 'sgd')} lr {get('lr')} ({get('lr_schedule', 'cosine')}); "
             f"teacher {get('teacher_model')} → student {get('student_model')} (base, online, offline), self KD "
             f"{get('self_model')}; KD: α = {get('alpha', 0.3)}, T = {get('temperature', 3.0)}, objective "
             f"{get('kd_objective', 'kl')}, β = {get('beta', 0.0)}, teacher BN in replay {get('teacher_bn', 'train')}, "
             f"spacing from epoch {get('start_epoch', 0)}; Hessian trace: Hutchinson, "
             f"{_count(get('hessian_probes'), 'Rademacher probe')} on {get('hessian_samples')} training images (no "
             f"augmentation, BN in eval mode), CE of the student (deepest exit in self mode). Compute: "
             f"{compute_s / 60:.1f} min (training and Hessian, summed over runs).", ""]
    if planned is not None and done < planned:
        lines += [f"**Partial: {done} of {planned} runs done.** Rerun the study's command to continue it.", ""]
    lines += ["| setting | runs | student test acc (%) | its best epoch (%) | teacher test acc (%) | tr(H) of the "
              "student | probe s.e. of tr(H) |", "|---|---|---|---|---|---|---|"]
    for st in settings:
        acc = [r["student_acc"] for r in st.runs]
        teacher = [r.get("teacher_acc") for r in st.runs]
        trace = [r.get("hessian_trace") for r in st.runs]
        stderr = _mean_std([r.get("hessian_stderr") for r in st.runs])[0]  # nan with 1 probe: no spread
        best = [r.get("best_student_acc") for r in st.runs]
        lines.append(f"| {st.name} | {len(st.runs)} | {_fmt(acc, 100)} | {_fmt(best, 100)} | "
                     f"{_fmt(teacher, 100) if st.family not in ('base', 'teacher') else '–'} | "
                     f"{_fmt(trace, 1, 1)} | {'–' if math.isnan(stderr) else f'±{stderr:.1f}'} |")
    lines += ["", "Accuracy: mean ± std over seeds of the student's last-epoch test accuracy (a self-KD run's is its "
              "best shallow exit; the teacher row's is the teacher alone), which the questions below test; \"its best "
              "epoch\" is the best of its epochs on the test set (the official code's figure: selected on the test "
              "set, so optimistic). tr(H): mean ± std over seeds of each run's "
              "estimate; the last column is the mean standard error of one run's estimate from its probes. "
              "`accuracy_vs_space.png` plots the student accuracy against s; `results.json` has every run and test.",
              "", *question_lines(answered)]
    text = "\n".join(lines).rstrip() + "\n"
    (out / REPORT).write_text(text)
    return text


def plot(identity: dict, settings: list[Setting], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def stat(st: Setting, k: int) -> float:
        return 100 * _mean_std([r["student_acc"] for r in st.runs])[k]

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for family, marker, label in (("online", "o", "online KD student"), ("self", "s", "self KD (best shallow exit)")):
        group = [s for s in settings if s.family == family]
        if group:
            ax.errorbar([s.space for s in group], [stat(s, 0) for s in group], yerr=[stat(s, 1) for s in group],
                        marker=marker, capsize=3, label=label)
    for family, style, label in (("base", "--", "base (student alone, CE)"), ("teacher", ":", "teacher alone (CE)"),
                                 ("offline", "-.", "offline KD student")):
        st = next((s for s in settings if s.family == family), None)
        if st is not None:
            ax.axhline(stat(st, 0), color="grey", linestyle=style, label=label)
    seeds = len({r["seed"] for st in settings for r in st.runs})
    ax.set_xlabel("space interval s (epochs)")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(f"{identity.get('dataset')}: accuracy against s ({seeds} seeds, mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / PLOT)
    plt.close(fig)


def legacy_identity(saved_args: dict) -> dict:
    """The identity of a study written before study.json existed, from its results.json ``args``."""
    defaults = TrainConfig()
    identity = {k: getattr(defaults, k) for k in ("optimizer", "lr_schedule", "alpha", "temperature", "kd_objective",
                                                  "beta", "teacher_bn", "start_epoch")}
    identity.update({k: saved_args.get(k, v) for k, v in REPRO_DEFAULTS.items()})
    model = saved_args.get("model", DEFAULT_MODEL)
    identity.update(subset=saved_args.get("subset"), teacher_model=model, student_model=model,
                    self_model=saved_args.get("self_model", DEFAULT_SELF_MODEL),
                    hessian_samples=saved_args.get("hessian_samples"), hessian_probes=saved_args.get("hessian_probes"))
    return identity


def report_only(out: Path) -> str:
    """Rewrite results.md and the plot from results.json, or, for a study still under way, from its runs' records."""
    results = out / RESULTS
    if results.is_file():
        saved = json.loads(results.read_text())
        records = saved["runs"]
        identity = saved.get("study") or legacy_identity(saved.get("args", {}))
        command, planned = saved["command"], saved.get("planned")
        compute = saved.get("compute_s", saved.get("wall_s", 0.0))
    else:
        records = [json.loads(p.read_text()) for p in sorted((out / RUNS).glob(f"*/{RUN_RECORD}"))]
        study = json.loads((out / STUDY_FILE).read_text()) if (out / STUDY_FILE).is_file() else {}
        identity, command, planned = study.get("identity", {}), study.get("command", "?"), study.get("planned")
        compute = sum(r.get("wall_s", 0.0) + r.get("hessian_s", 0.0) for r in records)
    settings = settings_from_records(records)
    plot(identity, settings, out)
    return write_report(identity, settings, out, command, compute, questions(settings, identity), planned)


# ====================================================================================================== the CLI
def build_parser() -> argparse.ArgumentParser:
    from spacedkd_fast.train import add_setting_flag

    p = argparse.ArgumentParser(prog="python -m spacedkd_fast.repro", description=__doc__.split("\n\n")[0],
                                formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=30,
                                                                                    width=110))
    g = p.add_argument_group("the study")
    g.add_argument("--settings", nargs="+", choices=SETTING_KINDS, default=list(DEFAULT_SETTINGS), metavar="KIND",
                   help=f"settings to run, any of {', '.join(SETTING_KINDS)}: base (student alone, CE), teacher "
                        f"(teacher alone, CE), online (KD at s = 0 and every --spaces), offline (KD from a frozen "
                        f"trained teacher: --teacher-weights, else the teacher run), self (BYOT at s = 0 and every "
                        f"--self-space) (default: {' '.join(DEFAULT_SETTINGS)})")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1], metavar="K",
                   help="one run of every setting per seed, paired across settings; the paired tests need >= 2, "
                        "and >= 5 are recommended (a difference of a few tenths of a point hides in fewer) "
                        "(default: 0 1)")
    g.add_argument("--spaces", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0], metavar="S",
                   help="s of the spaced online runs, epochs > 0 (default: 0.5 1 1.5 2)")
    g.add_argument("--self-space", type=float, nargs="+", default=[1.0], metavar="S",
                   help="s of the spaced self-KD runs, epochs > 0 (default: 1)")
    g.add_argument("--model", default=None, metavar="NAME",
                   help=f"teacher and student of the base/teacher/online/offline runs, the shorthand for both of "
                        f"the next two (default: the recipe's, else {DEFAULT_MODEL})")
    g.add_argument("--teacher-model", default=None, metavar="NAME",
                   help="the teacher's architecture (default: --model)")
    g.add_argument("--student-model", default=None, metavar="NAME",
                   help="the student's architecture (default: --model)")
    g.add_argument("--self-model", default=DEFAULT_SELF_MODEL, metavar="NAME",
                   help=f"multi-exit network of the self-KD runs (default: {DEFAULT_SELF_MODEL})")
    g.add_argument("--teacher-weights", default=None, metavar="PATH",
                   help="the offline setting's frozen teacher: a state_dict (.pt/.pth/.safetensors) or a run folder "
                        "/ checkpoint of this package, checked against --teacher-model before any run (default: "
                        "each seed's teacher run)")
    g.add_argument("--recipe", default=None, choices=RECIPE_NAMES,
                   help="a train recipe's settings for every run (its mode and s are the settings'; its model is the "
                        "default of --model), under the explicit flags")
    for title, names in PASS_THROUGH.items():
        group = p.add_argument_group(title)
        for name in names:
            default = REPRO_DEFAULTS.get(name, getattr(TrainConfig(), name))
            add_setting_flag(group, name, default, default=argparse.SUPPRESS)
    g = p.add_argument_group("the Hessian trace and the outputs")
    g.add_argument("--hessian-samples", type=int, default=256, metavar="N",
                   help="training images of each run's estimate (default: 256)")
    g.add_argument("--hessian-probes", type=int, default=20, metavar="N",
                   help="Rademacher probes per estimate (default: 20)")
    g.add_argument("--device", default="auto", metavar="DEVICE",
                   help="auto, cpu, cuda, cuda:N: training and Hessian (default: auto)")
    g.add_argument("--out", default="runs/repro", metavar="DIR",
                   help="the study's folder (default: runs/repro); rerunning the same command there continues the "
                        "study")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the study --out holds (its runs/, results and study.json) instead of refusing one "
                        "that differs")
    g.add_argument("--dry-run", action="store_true", help="print the run configs and stop")
    g.add_argument("--report-only", action="store_true",
                   help="rewrite results.md and the plot from --out's results.json, or from the runs done so far "
                        "(no training)")
    return p


def _quiet(*args) -> None:
    pass


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    command = "python -m spacedkd_fast.repro " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        with cli_names():  # TrainConfig's messages name this command's flags (--lr, --epochs...)
            if args.report_only:
                check_setting("out", args.out)
                if not (out / RESULTS).is_file() and not any((out / RUNS).glob(f"*/{RUN_RECORD}")):
                    raise FileNotFoundError(f"--report-only: there is no {out / RESULTS} (--out of a finished "
                                            f"study) and no run record {out / RUNS / '*' / RUN_RECORD}")
            else:
                check_args(args)
                settings, runs, common = plan(args, out)
                check_modes(settings, runs)
                identity = study_identity(args, common)
                holds = check_study_folder(out, identity, runs, args.overwrite)
                if not args.dry_run:
                    check_data_and_models(args, runs)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        say(f"error: {exc}")
        return 2
    if args.report_only:
        print(report_only(out))
        return 0
    if args.dry_run:
        for run in runs:
            print(run.setting.name, run.seed, json.dumps({k: v for k, v in run.cfg.to_dict().items() if v is not None}))
        return 0
    if len(args.seeds) < 2:
        say("spacedkd_fast.repro: one seed: the report has no statistics (the paired tests need >= 2 seeds, 5 "
            "recommended)")
    if holds and args.overwrite:
        say(f"spacedkd_fast.repro: --overwrite: replacing the study in {out}")
        for name in STUDY_OUTPUTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / STUDY_FILE, {"format": STUDY_FORMAT, "identity": identity, "command": command,
                                   "planned": len(runs)})
    code = train_runs(args, runs)
    if code is not None:
        return code
    settings = [st for st in settings if st.runs]
    records = [r for st in settings for r in st.runs]
    compute = sum(r.get("wall_s", 0.0) + r.get("hessian_s", 0.0) for r in records)
    answered = questions(settings, identity)
    _write_json(out / RESULTS, {"command": command, "compute_s": compute, "planned": len(runs),
                                "args": vars(args), "study": identity, "runs": records, "questions": answered})
    plot(identity, settings, out)
    print(write_report(identity, settings, out, command, compute, answered))
    return 0


def train_runs(args, runs: list[Run]) -> int | None:
    """Train (or resume) every run without a record, estimate its Hessian and write its record; skip the runs done.
    None when every run is done; an exit code when the study stops (a stop request, a run that cannot start)."""
    from spacedkd_fast.engine import Trainer, TrainingInterrupted
    from spacedkd_fast.engine.outputs import CHECKPOINT, PREVIOUS, RunFolderInUse
    from spacedkd_fast.hessian import hessian_trace_of_checkpoint

    for k, run in enumerate(runs, 1):
        st, folder = run.setting, run.folder
        where = f"[{k}/{len(runs)}] {st.name}, seed {run.seed}"
        record_file = folder / RUN_RECORD
        if record_file.is_file():
            st.runs.append(json.loads(record_file.read_text()))
            print(f"{where}: done earlier ({record_file})", flush=True)
            continue
        resume = (folder / CHECKPOINT).exists() or (folder / PREVIOUS).exists()
        print(f"{where} ...{' (resuming its last checkpoint)' if resume else ''}", flush=True)
        try:
            with cli_names():
                trainer = Trainer(dataclasses.replace(run.cfg, resume=str(folder)) if resume else run.cfg, log=_quiet)
            summary = trainer.fit()
            start = time.perf_counter()
            estimate = hessian_trace_of_checkpoint(folder / CHECKPOINT, role="student", samples=args.hessian_samples,
                                                   probes=args.hessian_probes, device=args.device)
        except TrainingInterrupted:
            say(f"spacedkd_fast.repro: stopped during {st.name}, seed {run.seed} (its last.pt is written); rerun the "
                f"same command to continue the study")
            return 0
        except KeyboardInterrupt:
            say(f"spacedkd_fast.repro: stopped during {st.name}, seed {run.seed}; rerun the same command to continue "
                f"the study")
            return 130
        except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, RunFolderInUse) as exc:
            say(f"error: {st.name}, seed {run.seed}: {exc}")
            return 2
        record = dict(setting=st.name, family=st.family, space=st.space, seed=run.seed,
                      student_acc=summary.student_acc, best_student_acc=trainer.records.best_acc,
                      teacher_acc=summary.teacher_acc, exit_acc=summary.exit_acc,
                      hessian_trace=estimate.trace, hessian_stderr=estimate.stderr,
                      hessian_samples=args.hessian_samples, hessian_probes=args.hessian_probes,
                      wall_s=summary.wall_s, hessian_s=time.perf_counter() - start, config=run.cfg.to_dict())
        _write_json(record_file, record)
        st.runs.append(record)
        print(f"    student {100 * summary.student_acc:.2f} %, tr(H) {estimate.trace:.1f} ± {estimate.stderr:.1f}, "
              f"{summary.wall_s:.0f} s", flush=True)
    return None


if __name__ == "__main__":
    sys.exit(main())
