"""python -m spacedkd_fast.repro end to end on a tiny budget: every setting runs and the report answers."""

import json

import pytest

from spacedkd_fast import repro


def test_repro_runs_every_setting_and_writes_the_report(tmp_path):
    out = tmp_path / "study"
    code = repro.main(["--subset", "128", "--epochs", "1", "--batch-size", "32", "--seeds", "0", "1", "--spaces",
                       "0.5", "--self-space", "0.5", "--hessian-samples", "16", "--hessian-probes", "2",
                       "--out", str(out), "--device", "cpu"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    settings = {r["setting"] for r in results["runs"]}
    assert settings == {"base", "online s=0", "online s=0.5", "self s=0", "self s=0.5"}
    assert len(results["runs"]) == 10 and all(r["hessian_trace"] == r["hessian_trace"] for r in results["runs"])
    report = (out / "results.md").read_text()
    assert "| online s=0.5 |" in report and "Hessian trace" in report and "student accuracy" in report
    assert (out / "accuracy_vs_space.png").read_bytes()[:4] == b"\x89PNG"


def test_dry_run_lists_the_configs(capsys):
    assert repro.main(["--dry-run", "--seeds", "0", "--spaces", "1.5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and lines[2].startswith("online s=1.5 0")


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
    (["--self-space", "0"], "--self-space must be a number of epochs > 0"),
    (["--self-model", "resnet8"], "--self-model must be a multi-exit (byot_*) model for the self-KD runs, got "
                                  "'resnet8'"),
    (["--self-model", "resnet19"], "--self-model must be a model name (one of: byot_resnet10"),
    (["--model", "byot_resnet10"], "--model must be a single-exit model for the base and online runs"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),  # TrainConfig's rule, named by this flag
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--subset", "1"], "--subset must be an integer >= 2 images, or None, got 1"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--out", ""], "--out must be a non-empty folder path, or None, got ''"),
    (["--report-only"], "--report-only: there is no "),
])
def test_bad_arguments_are_refused_before_the_first_run(args, message, tmp_path, capsys):
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
