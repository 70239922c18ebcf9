"""python -m spacedkd_fast.repro end to end on a tiny budget: every setting runs, the report answers with paired
tests, a study resumes instead of retraining, and bad input is refused in one line before any training."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from spacedkd_fast import repro
from spacedkd_fast.engine import Callback, Trainer
from spacedkd_fast.models import build_model

TINY = ["--subset", "64", "--epochs", "1", "--batch-size", "32", "--hessian-samples", "8", "--hessian-probes", "1",
        "--device", "cpu"]
LEGACY_STUDY = Path(__file__).resolve().parent.parent / "bench" / "results" / "repro-embedded-2026-11-22"


def test_repro_runs_every_setting_and_writes_the_report(tmp_path):
    out = tmp_path / "study"
    code = repro.main(["--subset", "64", "--epochs", "1", "--batch-size", "32", "--seeds", "0", "1", "--spaces",
                       "0.5", "--self-space", "0.5", "--hessian-samples", "8", "--hessian-probes", "2",
                       "--out", str(out), "--device", "cpu"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    settings = {r["setting"] for r in results["runs"]}
    assert settings == {"base", "online s=0", "online s=0.5", "self s=0", "self s=0.5"}
    assert len(results["runs"]) == 10 and all(r["hessian_trace"] == r["hessian_trace"] for r in results["runs"])
    for record in results["runs"]:  # each run's record beside its outputs, as written when it finished
        folder = out / "runs" / f"{record['setting'].replace(' ', '_')}-seed{record['seed']}"
        assert json.loads((folder / "repro.json").read_text()) == record
    asked = {q["question"]: q for q in results["questions"]}
    assert [c["a"] + " vs " + c["b"] for c in asked["Does KD beat base (the student alone, CE only)?"]["comparisons"]] \
        == ["online s=0 vs base", "online s=0.5 vs base"]
    flat = asked["Does spacing flatten the minimum (a lower tr(H) of the student than at s = 0)?"]
    assert [(c["a"], c["n"]) for c in flat["comparisons"]] == [("online s=0.5", 2), ("self s=0.5", 2)]
    assert all(c["verdict"] in ("better", "worse", "no difference at this budget")
               for q in results["questions"] for c in q["comparisons"])
    report = (out / "results.md").read_text()
    assert "| online s=0.5 | 2 |" in report and "## Questions" in report and "| online s=0.5 vs online s=0 | 2 |" \
        in report and "paired bootstrap 95 % CI" in report
    assert (out / "accuracy_vs_space.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "study.json").read_text())["identity"]["epochs"] == 1


def _dry(capsys, *args) -> list[tuple[str, int, dict]]:
    assert repro.main(["--dry-run", *args]) == 0
    rows = []
    for line in capsys.readouterr().out.strip().splitlines():
        head, config = line.split(" {", 1)
        name, seed = head.rsplit(" ", 1)
        rows.append((name, int(seed), json.loads("{" + config)))
    return rows


def test_dry_run_lists_the_configs(capsys):
    assert repro.main(["--dry-run", "--seeds", "0", "--spaces", "1.5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and lines[2].startswith("online s=1.5 0")


def test_a_teacher_other_than_the_student_and_the_kd_knobs_reach_every_run(capsys, tmp_path):
    out = tmp_path / "study"
    rows = _dry(capsys, "--settings", "base", "online", "offline", "--teacher-model", "resnet20", "--student-model",
                "resnet8", "--seeds", "0", "1", "--spaces", "1", "--alpha", "0.5", "--temperature", "4",
                "--start-epoch", "1", "--teacher-bn", "eval", "--out", str(out))
    assert [(n, s) for n, s, _ in rows] == [(n, s) for n in ("teacher", "base", "online s=0", "online s=1", "offline")
                                            for s in (0, 1)]
    for name, seed, cfg in rows:
        assert (cfg["alpha"], cfg["temperature"], cfg["start_epoch"], cfg["teacher_bn"]) == (0.5, 4.0, 1, "eval")
        assert cfg["seed"] == seed and cfg["out"] == str(out / "runs" / f"{name.replace(' ', '_')}-seed{seed}")
        if name == "teacher":  # the teacher alone: its network is the run's only one
            assert cfg["mode"] == "base" and cfg["model"] == "resnet20"
        elif name == "base":
            assert cfg["mode"] == "base" and cfg["model"] == "resnet8"
        else:
            assert (cfg["teacher_model"], cfg["model"]) == ("resnet20", "resnet8")
            assert cfg["mode"] == ("offline" if name == "offline" else "online")
        if name == "offline":  # offline KD from the same seed's teacher run, as it ended
            assert cfg["teacher_weights"] == str(out / "runs" / f"teacher-seed{seed}" / "last.pt")
    # --teacher-weights: the offline setting's teacher for every seed, and no teacher run
    weights = tmp_path / "teacher.pt"
    weights.write_bytes(b"")
    rows = _dry(capsys, "--settings", "offline", "--teacher-model", "resnet20", "--student-model", "resnet8",
                "--teacher-weights", str(weights), "--seeds", "0", "1", "--out", str(out))
    assert [(n, c["teacher_weights"]) for n, _, c in rows] == [("offline", str(weights))] * 2
    # one architecture for both: the base run is the offline teacher (the same network trained the same way)
    rows = _dry(capsys, "--settings", "offline", "--model", "resnet20", "--seeds", "0", "--out", str(out))
    assert [n for n, _, _ in rows] == ["base", "offline"]
    assert rows[1][2]["teacher_weights"] == str(out / "runs" / "base-seed0" / "last.pt")
    assert "teacher_model" not in rows[1][2] and rows[1][2]["model"] == "resnet20"


def test_a_recipe_sets_every_run_under_the_explicit_flags(capsys, tmp_path):
    rows = _dry(capsys, "--recipe", "paper", "--data-dir", str(tmp_path / "cifar-100-python"), "--settings", "base",
                "online", "--spaces", "1.5", "--seeds", "0", "--out", str(tmp_path / "study"))
    assert [n for n, _, _ in rows] == ["base", "online s=0", "online s=1.5"]
    for _, _, cfg in rows:
        assert (cfg["dataset"], cfg["model"], cfg["epochs"], cfg["batch_size"], cfg["lr"], cfg["lr_schedule"],
                cfg["alpha"], cfg["temperature"], cfg["beta"], cfg["kd_objective"], cfg["replay_tail"]) == (
            "cifar100", "resnet18", 80, 128, 0.01, "constant", 0.3, 3.0, 0.03, "paper", False)
    rows = _dry(capsys, "--recipe", "paper", "--data-dir", str(tmp_path), "--settings", "online", "--spaces", "1.5",
                "--seeds", "0", "--epochs", "2", "--model", "resnet20", "--out", str(tmp_path / "study"))
    assert {(c["epochs"], c["model"], c["lr"]) for _, _, c in rows} == {(2, "resnet20", 0.01)}


@pytest.mark.parametrize("args, message", [
    (["--hessian-samples", "0"], "--hessian-samples must be an integer >= 1, got 0"),
    (["--hessian-probes", "0"], "--hessian-probes must be an integer >= 1, got 0"),
    (["--subset", "64", "--hessian-samples", "65"],
     "--hessian-samples must be at most the training set's 64 images (--subset), got 65"),
    (["--hessian-samples", "4001"],
     "--hessian-samples must be at most the training set's 4000 images (embedded), got 4001"),
    (["--seeds", "0", "-1"], "--seeds must be an integer >= 0, got -1"),
    (["--seeds", "1", "1"], "--seeds must be distinct (each seed is one run folder), got [1, 1]"),
    (["--spaces", "-0.5"], "--spaces must be a finite number of epochs >= 0, got -0.5"),
    (["--spaces", "nan"], "--spaces must be a finite number of epochs >= 0, got nan"),
    (["--spaces", "0"], "--spaces must be distinct numbers of epochs > 0 (s = 0 is the online run every study has), "
                        "got [0.0]"),
    (["--spaces", "1", "1.0"], "--spaces must be distinct numbers of epochs > 0"),
    (["--self-space", "0"], "--self-space must be distinct numbers of epochs > 0 (s = 0 is the self run"),
    (["--self-model", "resnet8"], "--self-model must be a multi-exit (byot_*) model for the self-KD runs, got "
                                  "'resnet8'"),
    (["--self-model", "resnet19"], "--self-model must be a model name (one of: byot_resnet10"),
    (["--model", "byot_resnet10"], "--model must be a single-exit model for the base, online runs (multi-exit ones "
                                   "go to --self-model), got 'byot_resnet10'"),
    (["--student-model", "byot_resnet10"], "--student-model must be a single-exit model for the base, online runs"),
    (["--settings", "teacher", "--teacher-model", "byot_resnet10"],
     "--teacher-model must be a single-exit model for the teacher runs"),
    (["--teacher-model", "resnet21"], "--teacher-model must be a model name (one of: "),
    (["--model", "resnet8", "--teacher-model", "resnet20", "--student-model", "resnet8"],
     "--model sets both the teacher and the student, so it cannot go with both --teacher-model and --student-model"),
    (["--teacher-weights", "nowhere.pt"], "--teacher-weights is the frozen teacher of the offline setting, which "
                                          "--settings base online self does not include: add offline"),
    (["--settings", "offline", "--teacher-weights", "nowhere.pt"], "--teacher-weights nowhere.pt: no such file"),
    (["--settings", "online", "--teacher-model", "imagenet_resnet18"],
     "--teacher-model imagenet_resnet18 cannot take embedded's 1×32×32 images: build_model: image_size must be >= "
     "64 for 'imagenet_resnet18'"),
    (["--settings", "base", "--student-model", "vit_micro_32_distilled"],
     "--settings base (base): --mode base trains with CE only; 'vit_micro_32_distilled''s distillation head"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),  # TrainConfig's rule, named by this flag
    (["--alpha", "2"], "--alpha must be a finite number in [0, 1], got 2.0"),
    (["--temperature", "0"], "--temperature must be a finite number > 0, got 0.0"),
    (["--start-epoch", "5"], "--start-epoch must be an integer epoch in [0, epochs=4], got 5"),
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--subset", "1"], "--subset must be an integer >= 2 images, or None, got 1"),
    (["--subset", "5000"], "--subset 5000 is larger than the training set (4000 images)"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--out", ""], "--out must be a non-empty folder path, or None, got ''"),
    (["--report-only"], "--report-only: there is no "),
])
def test_bad_arguments_are_refused_before_the_first_run(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "study"
    argv = ["--out", str(out), *args] if "--out" not in args else args
    assert repro.main([*argv, "--device", "cpu"] if "--device" not in args else argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --") and message in err and err.count("\n") == 1, err
    assert not out.exists(), "nothing trained, nothing written"


def test_empty_seeds_are_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        repro.main(["--seeds"])
    assert exc.value.code == 2 and "--seeds: expected at least one argument" in capsys.readouterr().err


def _save(model_name: str, path: Path, num_classes: int = 10) -> str:
    torch.save(build_model(model_name, num_classes=num_classes, in_channels=1).state_dict(), path)
    return str(path)


@pytest.mark.parametrize("weights, message", [
    (("resnet8", 10), "does not fit the teacher model: 72 of its parameters are not in the file (e.g. ["),
    (("resnet20", 100), "does not fit the teacher model; shapes differ for fc.weight: file (100, 64), model (10, 64)"),
])
def test_teacher_weights_that_do_not_fit_the_teacher_are_refused_before_training(weights, message, tmp_path, capsys):
    path = _save(*weights[:1], tmp_path / "teacher.pt", num_classes=weights[1])
    out = tmp_path / "study"
    assert repro.main(["--settings", "offline", "--teacher-model", "resnet20", "--student-model", "resnet8",
                       "--teacher-weights", path, "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --teacher-weights {path} ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_teacher_weights_that_fit_pass_the_checks(tmp_path, capsys, monkeypatch):
    path = _save("resnet20", tmp_path / "teacher.pt")
    started = []
    monkeypatch.setattr(repro, "train_runs", lambda args, runs: started.extend(runs) or 0)
    assert repro.main(["--settings", "offline", "--teacher-model", "resnet20", "--student-model", "resnet8",
                       "--teacher-weights", path, "--seeds", "0", "--out", str(tmp_path / "study"),
                       "--device", "cpu"]) == 0
    assert [(r.setting.name, r.cfg.teacher_weights) for r in started] == [("offline", path)]


def test_teacher_and_student_must_agree_on_the_classes(tmp_path, capsys, monkeypatch):
    import spacedkd_fast.models as models

    real = models.build_model

    def other_classes(name, **kwargs):  # a model of its own mind, as a foreign builder could give
        return real(name, **{**kwargs, "num_classes": 7 if name == "resnet20" else kwargs["num_classes"]})

    monkeypatch.setattr(models, "build_model", other_classes)
    out = tmp_path / "study"
    assert repro.main(["--settings", "online", "--teacher-model", "resnet20", "--student-model", "resnet8",
                       "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --teacher-model resnet20 gives 7 classes, embedded has 10 (teacher and student logits must " \
                  "cover the dataset's classes)\n" and not out.exists()


class _StopAtFirstStep(Callback):
    def on_step_end(self, trainer, step) -> None:
        trainer.request_stop("the test")


@pytest.fixture(scope="module")
def resumed_study(tmp_path_factory):
    """A study stopped in its first run, continued, then extended by a seed, then rerun: the runs each invocation
    trained (their folders, and whether they resumed)."""
    out = tmp_path_factory.mktemp("resumed") / "study"
    args = [*TINY, "--settings", "base", "--out", str(out)]
    fits: list[list[tuple[str, str | None]]] = []
    real_init, real_fit = Trainer.__init__, Trainer.fit
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "__init__", lambda self, *a, callbacks=(), **kw: real_init(
            self, *a, callbacks=[*callbacks, _StopAtFirstStep()], **kw))
        assert repro.main([*args, "--seeds", "0"]) == 0  # a stop request: last.pt written, exit 0
    assert (out / "runs" / "base-seed0" / "last.pt").is_file() \
        and not (out / "runs" / "base-seed0" / "repro.json").exists()
    with pytest.MonkeyPatch.context() as mp:
        def fit(self):
            fits[-1].append((Path(self.run_folder).name, self.cfg.resume))
            return real_fit(self)

        mp.setattr(Trainer, "fit", fit)
        for seeds in (["0"], ["0", "1"], ["0", "1"]):
            fits.append([])
            assert repro.main([*args, "--seeds", *seeds]) == 0
    return out, args, fits


def test_a_study_resumes_instead_of_retraining_finished_runs(resumed_study, capsys):
    out, _, fits = resumed_study
    resumed, extended, rerun = fits
    assert resumed == [("base-seed0", str(out / "runs" / "base-seed0"))]  # the stopped run continues from last.pt
    assert extended == [("base-seed1", None)]  # seed 0 is done: only the new seed trains
    assert rerun == []  # nothing left to train
    results = json.loads((out / "results.json").read_text())
    assert [(r["setting"], r["seed"]) for r in results["runs"]] == [("base", 0), ("base", 1)]
    assert results["runs"][0] == json.loads((out / "runs" / "base-seed0" / "repro.json").read_text())


def test_a_folder_holding_another_study_is_refused_in_one_line(resumed_study, capsys, tmp_path):
    out, args, _ = resumed_study
    before = (out / "results.json").read_text()
    for change, differs in ((["--epochs", "2"], "--epochs 1 there, 2 here"),
                            (["--hessian-probes", "2"], "--hessian-probes 1 there, 2 here"),
                            (["--student-model", "resnet20"], "--student-model 'resnet8' there, 'resnet20' here"),
                            (["--alpha", "0.5"], "--alpha 0.3 there, 0.5 here")):
        assert repro.main([*args, "--seeds", "0", "1", *change]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out} holds another study (") and differs in err, err
        assert err.endswith("choose another --out, or pass --overwrite to replace it\n") and err.count("\n") == 1
    assert repro.main([*args, "--seeds", "0", "1", "--epochs", "2", "--overwrite", "--dry-run"]) == 0  # allowed
    assert (out / "results.json").read_text() == before, "refusals and dry runs change nothing"
    # a run folder whose config is not the run's (edited by hand): refused too, naming the run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    config = copy / "runs" / "base-seed1" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "lr": 0.1}))
    assert repro.main([*args[:-1], str(copy), "--seeds", "0", "1"]) == 2
    err = capsys.readouterr().err
    assert "holds another study: its run base-seed1 has lr 0.1 there, 0.05 here" in err and err.count("\n") == 1


def test_the_records_alone_continue_a_study_elsewhere(resumed_study, tmp_path, monkeypatch, capsys):
    out, args, _ = resumed_study
    elsewhere = tmp_path / "elsewhere"  # what comes back from a lent machine: study.json and the runs' records
    for path in [out / "study.json", *(out / "runs").glob("*/repro.json")]:
        target = elsewhere / path.relative_to(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    monkeypatch.setattr(Trainer, "fit", lambda self: pytest.fail(f"{self.run_folder} trained again"))
    assert repro.main([*args[:-1], str(elsewhere), "--seeds", "0", "1"]) == 0
    assert "done earlier" in capsys.readouterr().out
    saved, here = (json.loads((d / "results.json").read_text())["runs"] for d in (out, elsewhere))
    assert here == saved


def test_report_only_reports_a_study_without_training(resumed_study, capsys):
    out, _, _ = resumed_study
    report = (out / "results.md").read_text()
    (out / "results.md").unlink()
    assert repro.main(["--report-only", "--out", str(out)]) == 0
    assert (out / "results.md").read_text() == report


def test_overwrite_replaces_another_study(tmp_path, capsys):
    out = tmp_path / "study"
    (out / "runs" / "old-seed0").mkdir(parents=True)
    (out / "study.json").write_text(json.dumps({"format": 1, "identity": {"epochs": 99}}))
    (out / "notes.txt").write_text("mine")
    args = [*TINY, "--settings", "base", "--seeds", "0", "--out", str(out)]
    assert repro.main(args) == 2 and "--epochs 99 there, 1 here" in capsys.readouterr().err
    assert repro.main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["base-seed0"]
    assert (out / "notes.txt").read_text() == "mine", "only the study's own files are replaced"
    report = (out / "results.md").read_text()
    assert "1 seed (0)" in report and "## Questions" in report  # one setting: nothing to compare, no crash


def test_a_study_of_an_earlier_version_is_reported_and_not_continued(tmp_path, capsys):
    out = tmp_path / "legacy"
    out.mkdir()
    shutil.copy(LEGACY_STUDY / "results.json", out / "results.json")
    assert repro.main(["--report-only", "--out", str(out)]) == 0
    report = (out / "results.md").read_text()
    assert "| online s=2 | 2 |" in report and "| self s=1 vs self s=0 | 2 |" in report
    assert "| online s=0 vs base | 2 |" in report and "Hutchinson, 20 Rademacher probes on 256" in report
    assert repro.main(["--out", str(out), "--device", "cpu"]) == 2
    assert "holds a study without study.json" in capsys.readouterr().err


def test_one_seed_gives_a_report_that_asks_for_more():
    records = [dict(setting=name, family=family, space=space, seed=0, student_acc=acc, teacher_acc=None,
                    hessian_trace=trace, hessian_stderr=1.0)
               for name, family, space, acc, trace in (("base", "base", None, 0.9, 10.0),
                                                       ("online s=0", "online", 0.0, 0.91, 12.0),
                                                       ("online s=1", "online", 1.0, 0.92, 11.0))]
    settings = repro.settings_from_records(records)
    answered = repro.questions(settings, {})
    verdicts = [c["verdict"] for q in answered for c in q["comparisons"]]
    assert verdicts == ["needs ≥ 2 seeds"] * 4
    lines = "\n".join(repro.question_lines(answered))
    assert "| online s=1 vs online s=0 | 1 | 1.00 | – | – | – | needs ≥ 2 seeds |" in lines
    assert "rerun with more `--seeds`" in lines
