"""`python -m spacedkd_fast.train` as a user runs it: help, a run, bad input, SIGTERM + --resume, torchrun/gloo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from spacedkd_fast.train import build_parser, config_from_args, main

TINY = ["--subset", "256", "--batch-size", "32", "--eval-batch-size", "64", "--threads", "1"]


def cli(*args, timeout=300, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spacedkd_fast.train", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_help_reads_well():
    result = cli("--help")
    assert result.returncode == 0
    for text in ("what to train", "distillation", "--space S", "--no-overlap", "--recipe {paper,paper-vit}", "--resume",
                 "--trace-batches", "online KD (default: 1.0)", "Precedence", "byot_resnet10"):
        assert text in result.stdout, text


def test_flags_map_onto_the_config():
    cfg = config_from_args(["--space", "1.5", "--no-replay-tail", "--lr-milestones", "30", "60",
                            "--lr-schedule", "step", "--teacher-model", "resnet20", "--epochs", "80"])
    assert cfg.space == 1.5 and cfg.replay_tail is False and cfg.lr_milestones == (30, 60)
    assert cfg.teacher_arch == "resnet20" and cfg.student_arch == "resnet8"
    paper = config_from_args(["--recipe", "paper", "--epochs", "3"])
    assert paper.kd_objective == "paper" and paper.lr == 0.01 and paper.epochs == 3 and not paper.replay_tail
    # Every config field has exactly one flag.
    flags = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert flags == set(config_from_args([]).to_dict())


def test_a_run_writes_its_outputs_and_a_summary(tmp_path):
    result = cli(*TINY, "--epochs", "2", "--space", "0.5", "--out", str(tmp_path), "--trace-batches",
                 "--no-progress")
    assert result.returncode == 0, result.stderr
    for text in ("teacher test accuracy", "student test accuracy", "training images/s", "wall time"):
        assert text in result.stdout
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "metrics.jsonl", "curves.png", "last.pt",
                                                     "batches.jsonl"}
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet19"], "--model must be a model name (one of: byot_resnet10"),
    (["--dataset", "svhn"], "svhn"),
    (["--space", "-1"], "--space must be a finite number of epochs >= 0"),
    (["--dataset", "cifar100", "--data-dir", "/nonexistent"], "cifar-100-python"),
    (["--batch-size", "100000"], "larger than the training set"),
    (["--threads", "-1"], "--threads must be an integer >= 1, or None (torch's choice), got -1"),  # was a traceback
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),  # trained to NaN
])
def test_bad_input_exits_2_with_the_reason(args, message):
    result = cli(*args, "--no-progress")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


# (flags, the whole message, without "error: "): every rule the command line can reach (argparse refuses wrong
# types and choices itself), each named by its flag. Python's twin: tests/test_engine.py::BAD_CONFIG_VALUES.
CLI_BAD_VALUES = [
    (["--model", "resnet19"], "--model must be a model name (one of: byot_resnet10, "),
    (["--space", "inf"], "--space must be a finite number of epochs >= 0, got inf"),
    (["--start-epoch", "9"], "--start-epoch must be an integer epoch in [0, epochs=8], got 9"),
    (["--teacher-model", "resnet19"], "--teacher-model must be a model name as for --model, or None (the same), "
                                      "got 'resnet19'"),
    (["--student-model", "vit_huge"], "--student-model must be a model name as for --model"),
    (["--teacher-weights", ""], "--teacher-weights must be a non-empty path"),
    (["--dataset", "svhn"], "--dataset must be a dataset name (one of embedded, cifar10, cifar100, tiny-imagenet, "
                            "imagefolder, synthetic), got 'svhn'"),
    (["--data-dir", ""], "--data-dir must be a non-empty folder path, or None, got ''"),
    (["--image-size", "0"], "--image-size must be an integer >= 1 (px), or None, got 0"),
    (["--val-fraction", "1"], "--val-fraction must be a finite number in (0, 1), or None, got 1.0"),
    (["--split-seed", "-3"], "--split-seed must be an integer >= 0, got -3"),
    (["--subset", "1"], "--subset must be an integer >= 2 images, or None, got 1"),
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--eval-batch-size", "-5"], "--eval-batch-size must be an integer >= 1, got -5"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--momentum", "nan"], "--momentum must be a finite number in [0, 1), got nan"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0, got -1.0"),
    (["--warmup-epochs", "nan"], "--warmup-epochs must be a finite number of epochs in [0, epochs=8], got nan"),
    (["--warmup-epochs", "20"], "--warmup-epochs must be a finite number of epochs in [0, epochs=8], got 20.0"),
    (["--min-lr", "1"], "--min-lr must be a finite number in [0, lr=0.05], got 1.0"),
    (["--lr-schedule", "step", "--lr-milestones", "-1"],
     "--lr-milestones must be at least one epoch with --lr-schedule step, each in (0, epochs=8], strictly "
     "increasing, got (-1,)"),
    (["--lr-schedule", "step", "--lr-milestones", "6", "3"], "strictly increasing, got (6, 3)"),
    (["--lr-schedule", "step"], "--lr-milestones must be at least one epoch with --lr-schedule step"),
    (["--lr-milestones", "3"], "--lr-milestones must be empty without --lr-schedule step (the cosine schedule has "
                               "no milestones), got (3,)"),
    (["--lr-gamma", "-0.1"], "--lr-gamma must be a finite number > 0, got -0.1"),
    (["--alpha", "1.5"], "--alpha must be a finite number in [0, 1], got 1.5"),
    (["--temperature", "inf"], "--temperature must be a finite number > 0, got inf"),
    (["--beta", "nan"], "--beta must be a finite number >= 0, got nan"),
    (["--label-smoothing", "1"], "--label-smoothing must be a finite number in [0, 1), got 1.0"),
    (["--mode", "self", "--model", "byot_resnet10", "--self-kd-weight", "5"],
     "--self-kd-weight must be a finite number in [0, 1], got 5.0"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--prefetch", "-1"], "--prefetch must be an integer >= 0, or None, got -1"),
    (["--window-budget", "inf"], "--window-budget must be a finite number >= 0 (GB), or None, got inf"),
    (["--host-budget", "-2"], "--host-budget must be a finite number >= 0 (GB), or None, got -2.0"),
    (["--seed", "-1"], "--seed must be an integer >= 0, got -1"),
    (["--threads", "0"], "--threads must be an integer >= 1, or None (torch's choice), got 0"),
    (["--dist-timeout", "0"], "--dist-timeout must be a finite number of seconds > 0, got 0.0"),
    (["--out", ""], "--out must be a non-empty folder path, or None, got ''"),
    (["--resume", ""], "--resume must be a non-empty run folder path, or None, got ''"),
    (["--log-every", "-1"], "--log-every must be an integer >= 0 steps (0: no step records), got -1"),
]


@pytest.mark.parametrize("args, message", CLI_BAD_VALUES, ids=[" ".join(a) for a, _ in CLI_BAD_VALUES])
def test_bad_values_are_refused_before_any_work(args, message, tmp_path, capsys):
    """``main`` (the process's own code, in this process for speed) refuses with one line naming the flag, exit
    status 2, before it creates the run folder."""
    out = tmp_path / "run"
    argv = args if "--out" in args or "--resume" in args else [*args, "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_bad_flag_value_is_an_argparse_error():
    result = cli("--mode", "mutual")
    assert result.returncode == 2 and "invalid choice: 'mutual'" in result.stderr


def _final_weights(folder):
    state = torch.load(folder / "last.pt", weights_only=True)
    return state["roles"]["student"]["model"], state["roles"]["teacher"]["model"]


def test_sigterm_writes_a_checkpoint_and_resume_finishes_bit_identically(tmp_path):
    args = ["--subset", "512", "--batch-size", "32", "--epochs", "3", "--space", "0.75", "--threads", "1",
            "--no-progress", "--eval-batch-size", "128"]
    reference = tmp_path / "reference"
    assert cli(*args, "--out", str(reference)).returncode == 0

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "spacedkd_fast.train", *args, "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or not metrics.read_text().strip()):
        time.sleep(0.05)  # wait for the first epoch, then interrupt inside the second
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr  # a requested stop is a clean exit (status.json says "stopped")
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr
    stopped_at = torch.load(run / "last.pt", weights_only=True)["position"]["t_iter"]
    assert 0 < stopped_at < 48

    resumed = cli("--resume", str(run), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    for a, b in zip(_final_weights(reference), _final_weights(run)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_resume_with_conflicting_flags_is_refused(tmp_path):
    assert cli(*TINY, "--epochs", "1", "--out", str(tmp_path), "--no-progress").returncode == 0
    result = cli("--resume", str(tmp_path), "--alpha", "0.9", "--no-progress")
    assert result.returncode == 2 and "alpha: last.pt was saved with 0.3, --alpha asks for 0.9" in result.stderr


def test_torchrun_two_cpu_processes_with_gloo(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "spacedkd_fast.train", *TINY, "--epochs", "2", "--space", "0.5", "--device", "cpu", "--out", str(tmp_path),
         "--no-progress"],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("student test accuracy") == 1, "only rank 0 reports"
    assert "x2 ranks" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(0 <= r["student_acc"] <= 1 for r in records)


def test_a_torchvision_style_folder_trains_with_a_recorded_split(tmp_path):
    from test_files import make_class_folders

    make_class_folders(tmp_path / "data", per_class=(12, 12, 12))
    out = tmp_path / "run"
    result = cli("--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"), "--val-fraction", "0.25",
                 "--image-size", "16", "--batch-size", "9", "--epochs", "1", "--space", "0.5", "--threads", "1",
                 "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["val_fraction"] == 0.25 and config["split_seed"] == 0
    assert "27 train / 9 test images" in result.stdout
    missing = cli("--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"), "--no-progress")
    assert missing.returncode == 2 and "pass --val-fraction" in missing.stderr
