"""Broken images in a streamed folder: dropped from their batch with one warning per file (identically on replay,
regeneration and resume), or with strict_data a one-line stop that loses no step."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from test_engine import assert_bit_identical, read_jsonl, run, tiny, weights

from spacedkd_fast import backends
from spacedkd_fast.config import cli_names
from spacedkd_fast.data.files import BrokenFilesError, BrokenImageWarning, scan_folder_dataset
from spacedkd_fast.data.pipeline import FileBatchSource
from spacedkd_fast.engine import Trainer
from spacedkd_fast.train import main

BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not backends.dali().available,
                                                                     reason="nvidia.dali is not installed"))]


def make_folder(root, classes=3, per_class=12, test_per_class=4, size=40):
    """root/train/<class>/*.png and root/val/<class>/*.png, random pixels (PNG: lossless)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", test_per_class)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                image = (rng.integers(0, 64, (size, size + 8, 3)) + 60 * c).astype(np.uint8)
                Image.fromarray(image).save(folder / f"{i:02d}.png")
    return root


def break_file(path) -> str:
    path.write_bytes(b"\x89PNG\r\n\x1a\n but not an image")
    return str(path)


@pytest.fixture
def folders(tmp_path):
    """The same folder twice: intact, and with one training and one test image broken."""
    intact = make_folder(tmp_path / "intact")
    broken = tmp_path / "broken"
    shutil.copytree(intact, broken)
    train_file = break_file(broken / "train" / "class1" / "05.png")
    test_file = break_file(broken / "val" / "class2" / "01.png")
    return intact, broken, train_file, test_file


def source(folder, backend="torch", batch_size=6) -> FileBatchSource:
    return FileBatchSource(scan_folder_dataset("imagefolder", folder, image_size=16), batch_size=batch_size, seed=0,
                           device=torch.device("cpu"), backend=backend)


def holding(src: FileBatchSource, path: str, epoch: int = 0) -> int:
    """The iteration of ``epoch`` whose batch holds ``path``."""
    index = src.dataset.train_files.index(path)
    for i in range(epoch * src.iters_per_epoch, (epoch + 1) * src.iters_per_epoch):
        if index in src.plan(i).indices.tolist():
            return i
    raise AssertionError(path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_broken_sample_is_dropped_and_the_rest_of_its_batch_is_unchanged(folders, backend):
    intact, broken, train_file, test_file = folders
    good, bad = source(intact, backend), source(broken, backend)
    i = holding(bad, train_file)
    plan = bad.plan(i)
    position = [bad.dataset.train_files[k] for k in plan.indices.tolist()].index(train_file)
    with pytest.warns(BrokenImageWarning) as record:
        images, labels = bad.render(plan)
    messages = [str(w.message) for w in record if issubclass(w.category, BrokenImageWarning)]
    assert len(messages) == 1 and train_file in messages[0] and "\n" not in messages[0]
    full_images, full_labels = good.render(good.plan(i))
    keep = [k for k in range(len(plan.indices)) if k != position]
    assert images.shape[0] == labels.shape[0] == len(plan.indices) - 1
    assert torch.equal(images, full_images[keep]) and torch.equal(labels, full_labels[keep])

    # Its regeneration, another source over the same files (a resumed run), and a batch of another epoch that holds
    # the file: the same bytes, and no second warning for this source.
    with warnings.catch_warnings():
        warnings.simplefilter("error", BrokenImageWarning)
        assert all(torch.equal(a, b) for a, b in zip(bad.regenerate(plan), (images, labels)))
        later = holding(bad, train_file, epoch=1)
        assert bad.render(bad.plan(later))[0].shape[0] == len(bad.plan(later).indices) - 1
    with pytest.warns(BrokenImageWarning):
        resumed = source(broken, backend)
        assert all(torch.equal(a, b) for a, b in zip(resumed.regenerate(plan), (images, labels)))
        assert all(torch.equal(a, b) for a, b in zip(resumed.render(plan), (images, labels)))
    # Plans without the file render as if nothing were broken.
    other = next(j for j in range(bad.iters_per_epoch) if j != i)
    assert torch.equal(bad.render(bad.plan(other))[0], good.render(good.plan(other))[0])
    assert bad.skipped_samples == 2 and bad.skipped_files == (train_file,)  # fresh renders of epochs 0 and 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_broken_test_image_is_left_out_of_the_evaluation(folders, backend):
    intact, broken, _, test_file = folders
    good, bad = source(intact, backend), source(broken, backend)
    with pytest.warns(BrokenImageWarning, match="01.png"):
        got = list(bad.test_batches(5))
    expected = list(good.test_batches(5))
    lost = bad.dataset.test_files.index(test_file)
    assert sum(len(labels) for _, labels in got) == len(bad.dataset.test_files) - 1
    images = torch.cat([x for x, _ in expected])
    keep = [k for k in range(images.shape[0]) if k != lost]
    assert torch.equal(torch.cat([x for x, _ in got]), images[keep])
    assert torch.equal(torch.cat([y for _, y in got]), torch.cat([y for _, y in expected])[keep])
    assert bad.skipped_samples == 0 and bad.skipped_files == (test_file,)  # training samples only are counted


@pytest.mark.parametrize("backend", BACKENDS)
def test_strict_data_stops_with_one_line_naming_the_file(folders, backend):
    _, broken, train_file, _ = folders
    with cli_names():
        bad = source(broken, backend)
    bad.strict_data = True
    with warnings.catch_warnings():
        warnings.simplefilter("error", BrokenImageWarning)
        with pytest.raises(BrokenFilesError) as info:
            bad.render(bad.plan(holding(bad, train_file)))
    message = str(info.value)
    assert message.startswith(f"cannot decode image {train_file!r}") and "\n" not in message
    assert "stopped because --strict-data is set: replace the file with a readable image and resume" in message
    assert bad.skipped_samples == 0 and bad.skipped_files == ()


def test_a_batch_left_with_one_readable_sample_stops(tmp_path):
    folder = make_folder(tmp_path / "data", classes=2, per_class=2, test_per_class=1)
    broken = [break_file(p) for p in sorted((folder / "train").glob("*/*.png"))[:3]]
    src = source(folder, batch_size=4)
    with pytest.warns(BrokenImageWarning), pytest.raises(BrokenFilesError, match=r"^training batch 0: 3 of its 4 "
                                                                                   r"files are broken \("):
        src.render(src.plan(0))
    assert set(src.skipped_files) == set(broken)


# ---- through the engine ------------------------------------------------------------------------------------------

def streamed(folder, out, **extra):
    return tiny(dataset="imagefolder", data_dir=str(folder), stream=True, image_size=16, subset=None, batch_size=6,
                epochs=2, space=0.5, eval_batch_size=8, trace_batches=True, out=str(out), **extra)


def test_training_goes_on_without_the_broken_sample_identically_in_every_tier_and_after_a_resume(folders, tmp_path):
    _, broken, train_file, test_file = folders
    with pytest.warns(BrokenImageWarning) as record:
        reference = Trainer(streamed(broken, tmp_path / "device"), log=lambda *a: None)
        summary = reference.fit()
    named = sorted(str(w.message).split("'")[1] for w in record if issubclass(w.category, BrokenImageWarning))
    assert named == sorted([train_file, test_file]), "one warning per broken file, whatever the epochs and replays"
    assert summary.skipped_samples == 2 and "skipped samples (broken files)" in summary.table()
    trace = read_jsonl(tmp_path / "device" / "batches.jsonl")
    teacher = [r["batch"] for r in trace if r["role"] == "teacher"]
    assert [r["batch"] for r in trace if r["role"] == "student"] == teacher and len(teacher) == 12

    # Regenerated from plans instead of kept: the same batches. Stopped mid-run and resumed: the same run.
    with pytest.warns(BrokenImageWarning):
        regenerated = run(streamed(broken, tmp_path / "regenerate", window_budget=0.0, host_budget=0.0))
    assert read_jsonl(tmp_path / "regenerate" / "batches.jsonl") == trace
    out = tmp_path / "resumed"
    with pytest.warns(BrokenImageWarning), pytest.raises(Exception, match="stopped by test"):
        run(streamed(broken, out, window_budget=0.0, host_budget=0.0), stop_after=9)
    with pytest.warns(BrokenImageWarning):
        resumed = run(streamed(broken, out, resume=str(out)))
    assert read_jsonl(out / "batches.jsonl") == trace
    for other in (regenerated, resumed):
        assert_bit_identical(weights(reference), weights(other))
    assert resumed.history[-1]["student_acc"] == reference.history[-1]["student_acc"]


def test_strict_data_stops_at_the_last_whole_step_and_a_resume_after_the_repair_loses_nothing(folders, tmp_path,
                                                                                              capsys):
    intact, broken, train_file, _ = folders
    reference = run(streamed(intact, tmp_path / "reference"))
    out = tmp_path / "strict"
    argv = ["--dataset", "imagefolder", "--data-dir", str(broken), "--stream", "--image-size", "16", "--batch-size",
            "6", "--epochs", "2", "--space", "0.5", "--eval-batch-size", "8", "--threads", "2", "--trace-batches",
            "--no-progress", "--strict-data", "--out", str(out)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", BrokenImageWarning)  # strict: no warning, a stop
        assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot decode image {train_file!r}") and "\n" not in err
    assert "--strict-data is set" in err
    state = torch.load(out / "last.pt", weights_only=True)
    first = holding(source(broken), train_file)
    assert state["position"]["t_iter"] == first, "saved at the last whole step before the broken batch"

    shutil.copy(intact / "train" / "class1" / "05.png", train_file)  # the repair
    shutil.copy(intact / "val" / "class2" / "01.png", broken / "val" / "class2" / "01.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error", BrokenImageWarning)
        resumed = run(streamed(broken, out, resume=str(out), strict_data=True))
    assert_bit_identical(weights(reference), weights(resumed))
    assert read_jsonl(out / "batches.jsonl") == read_jsonl(tmp_path / "reference" / "batches.jsonl")


@pytest.mark.skipif(not backends.dali().available, reason="nvidia.dali is not installed")
def test_dali_reader_path_drops_the_broken_sample_as_its_regeneration_does(folders, tmp_path):
    _, broken, train_file, _ = folders
    traces = []
    for name, budgets in (("device", {}), ("regenerate", dict(window_budget=0.0, host_budget=0.0))):
        with pytest.warns(BrokenImageWarning):
            trainer = run(streamed(broken, tmp_path / name, data_backend="dali", **budgets))
        assert trainer.data_backend == "dali" and trainer.source.skipped_files[0] == train_file
        traces.append(read_jsonl(tmp_path / name / "batches.jsonl"))
    assert traces[0] == traces[1]
    teacher = [r["batch"] for r in traces[0] if r["role"] == "teacher"]
    assert [r["batch"] for r in traces[0] if r["role"] == "student"] == teacher
