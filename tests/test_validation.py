"""Settings are checked up front, by one rule per TrainConfig field, and named the caller's way."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from test_engine import BAD_CONFIG_VALUES
from test_train_cli import CLI_BAD_VALUES

from spacedkd_fast.config import (
    _RULES,
    SettingError,
    SettingTypeError,
    TrainConfig,
    check_setting,
    cli_names,
    config_fields,
    setting_name,
)
from spacedkd_fast.engine import Trainer
from spacedkd_fast.train import main

FIELDS = {f.name: f for f in config_fields()}


def test_every_setting_has_one_rule_and_a_refused_value():
    assert set(_RULES) == set(FIELDS), "a new TrainConfig field needs its rule in config._RULES"
    assert {case[0] for case in BAD_CONFIG_VALUES} == set(FIELDS), "and a case in test_engine.BAD_CONFIG_VALUES"
    # From the command line: every rule argparse does not settle itself (types, bools, choices).
    reachable = {name for name, f in FIELDS.items() if "choices" not in f.metadata
                 and "bool" not in TrainConfig.__dataclass_fields__[name].type}
    flags = {arg for args, _ in CLI_BAD_VALUES for arg in args if arg.startswith("--")}
    assert {"--" + name.replace("_", "-") for name in reachable} <= flags


def test_a_rule_reads_only_settings_checked_before_it():
    order = list(_RULES)
    for name, rule in _RULES.items():
        assert all(order.index(dep) < order.index(name) for dep in rule.depends), name


BOUNDARIES = dict(space=0.0, start_epoch=2, momentum=0.0, weight_decay=0.0, warmup_epochs=2.0, min_lr=0.05,
                  alpha=1.0, temperature=1e-3, beta=0.0, label_smoothing=0.0, self_kd_weight=1.0, prefetch=0,
                  window_budget=0.0, host_budget=0.0, seed=0, split_seed=0, threads=1, log_every=0, image_size=1,
                  subset=2, val_fraction=0.5, epochs=2, lr=0.05, device="cuda:3", recipe="paper-vit")


def test_the_ends_of_every_range_are_accepted():
    cfg = TrainConfig(**BOUNDARIES)
    assert all(getattr(cfg, k) == v for k, v in BOUNDARIES.items())
    assert TrainConfig(alpha=0.0, self_kd_weight=0.0, lr_schedule="step", lr_milestones=(1, 2), epochs=2,
                       start_epoch=0).lr_milestones == (1, 2)
    assert TrainConfig(threads=None, prefetch=None, window_budget=None, out=None).threads is None


def test_accepted_values_are_normalized():
    """numpy scalars, ints for floats, Paths and lists become the plain types config.json writes (before, a Path
    or a numpy float was accepted and config.json failed later with a TypeError)."""
    cfg = TrainConfig(lr=np.float32(0.5), epochs=np.int64(4), momentum=0, out=Path("/tmp/x"), lr_schedule="step",
                      lr_milestones=[1, np.int64(3)])
    assert type(cfg.lr) is float and type(cfg.epochs) is int and type(cfg.momentum) is float
    assert cfg.out == "/tmp/x" and cfg.lr_milestones == (1, 3)
    assert json.loads(cfg.to_json())["lr_milestones"] == [1, 3]
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_a_wrong_type_is_a_type_error_and_a_value_error():
    with pytest.raises(TypeError, match=r"^lr= must be a finite number > 0, got '0\.1' \(str\)$"):
        TrainConfig(lr="0.1")
    with pytest.raises(ValueError, match=r"^replay_tail= must be True or False, got 1 \(int\)$"):
        TrainConfig(replay_tail=1)
    assert issubclass(SettingTypeError, SettingError) and issubclass(SettingError, ValueError)


def test_every_way_of_building_a_config_is_checked(tmp_path):
    with pytest.raises(SettingError, match="temperature= must be a finite number > 0, got inf"):
        dataclasses.replace(TrainConfig(), temperature=float("inf"))
    with pytest.raises(SettingError, match="beta= must be a finite number >= 0, got nan"):
        TrainConfig.from_dict({"beta": float("nan")})
    out = tmp_path / "run"
    with pytest.raises(SettingError, match="momentum= must be a finite number in \\[0, 1\\), got nan"):
        Trainer(momentum=float("nan"), out=str(out), log=lambda *a: None)
    with pytest.raises(SettingError, match="lr= must be a finite number > 0, got inf"):
        Trainer(TrainConfig(out=str(out)), lr=float("inf"), log=lambda *a: None)
    assert not out.exists(), "refused before any work: no run folder"


def test_setting_names_follow_the_caller():
    assert setting_name("batch_size") == "batch_size="
    with cli_names():
        assert setting_name("batch_size") == "--batch-size" and setting_name("role", flag="model") == "--model"
        seen = []
        thread = threading.Thread(target=lambda: seen.append(setting_name("lr")))
        thread.start()
        thread.join()
        assert seen == ["lr="], "a thread starts outside the block: resolve names before handing work to one"
    assert setting_name("role", flag="model") == "role="


@pytest.mark.parametrize("settings, python, flag", [
    (dict(device="cuda:7"), "device= cuda:7", "--device cuda:7"),
    (dict(mode="base", teacher_weights="t.pt"), "teacher_weights=: mode= base", "--teacher-weights: --mode base"),
    (dict(subset=10**7), "subset= 10000000", "--subset 10000000"),
])
def test_errors_found_while_building_name_keywords_from_python_and_flags_from_the_cli(tmp_path, capsys, settings,
                                                                                      python, flag):
    """Errors that only the parts' construction can find (a CUDA device, a teacher the mode lacks, a subset larger
    than the data) name the setting as the caller gave it."""
    if "device" in settings and __import__("torch").cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(ValueError) as raised:
        Trainer(out=str(tmp_path / "py"), log=lambda *a: None, **settings)
    assert str(raised.value).startswith(python), str(raised.value)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    assert main([*argv, "--out", str(tmp_path / "cli"), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {flag}")


def test_a_hand_edited_config_json_is_refused_on_resume_naming_the_flag(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(TrainConfig(out=str(run)).to_dict() | {"lr": "0.1"}))
    assert main(["--resume", str(run), "--no-progress"]) == 2
    assert capsys.readouterr().err == "error: --lr must be a finite number > 0, got '0.1' (str)\n"


def test_check_setting_reuses_a_rule_under_another_name():
    assert check_setting("seed", np.int64(3)) == 3 and check_setting("space", 2) == 2.0
    with pytest.raises(SettingError, match=r"^--seeds must be an integer >= 0, got -1$"):
        check_setting("seed", -1, shown="--seeds")
    with pytest.raises(ValueError, match="the rule of 'min_lr' reads lr; build a TrainConfig"):
        check_setting("min_lr", 0.1)


def test_hessian_counts_are_refused_before_loading_anything(capsys):
    from spacedkd_fast import hessian

    with pytest.raises(ValueError, match=r"^samples= must be >= 1, got 0$"):
        hessian.hessian_trace_of_checkpoint("/nonexistent/last.pt", samples=0)
    with pytest.raises(TypeError, match=r"^probes= must be an integer >= 1, got 2\.0 \(float\)$"):
        hessian.hessian_trace_of_checkpoint("/nonexistent/last.pt", probes=2.0)
    argv = ["--checkpoint", "/nonexistent/last.pt", "--model", "student", "--samples", "8", "--probes", "0"]
    assert hessian.main(argv) == 2
    assert capsys.readouterr().err == "error: --probes must be >= 1, got 0\n"
    with pytest.raises(FileNotFoundError, match=r"^checkpoint= /nonexistent/last.pt: no such file$"):
        hessian.hessian_trace_of_checkpoint("/nonexistent/last.pt", samples=8, probes=1)
