"""Hutchinson Hessian trace: against the exact trace of a tiny network, its contract (eval mode, .grad, seeds,
batching, multi-exit), and ``python -m spacedkd_fast.hessian`` on a real engine checkpoint."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from spacedkd_fast.config import TrainConfig
from spacedkd_fast.engine import Trainer
from spacedkd_fast.engine.roles import FeatureForward
from spacedkd_fast.hessian import TraceEstimate, _load_target, _quadratic_forms, hessian_trace, main
from spacedkd_fast.models import build_model

# One thread: these are small tensors, and on a busy machine OpenMP's threads wait on each other (10x slower).
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
RESULT_LINE = re.compile(r"^tr\(H\) = (-?[0-9.]+) ± ([0-9.]+) \(standard error, (\d+) probes, (\d+) samples, "
                         r"(\w+) of (.+)\)$")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---- a tiny network whose Hessian can be formed ------------------------------------------------------------------

def tiny_problem(samples: int = 128) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 2-layer MLP with BatchNorm (358 float64 parameters), briefly trained on a fixed random batch.

    Near a minimum the Hessian is dominated by its positive Gauss-Newton part, as for the trained networks the tool
    is for; there Hutchinson's relative standard error at 1,000 probes is ~0.5 %, so the 5 % bound is ~10 of them.
    """
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 10)).double()
    x = torch.randn(samples, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 10, (samples,))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.2)
    for _ in range(30):  # in train mode: the running statistics move away from (0, 1) too
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    net.zero_grad(set_to_none=True)
    return net, x, y


def exact_hessian(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The full Hessian ``(n, n)`` of the eval-mode mean cross-entropy w.r.t. the flattened parameters."""
    names = [name for name, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss(theta):
        pieces = dict(zip(names, (t.view(s) for t, s in zip(theta.split([s.numel() for s in shapes]), shapes))))
        return F.cross_entropy(functional_call(net, pieces, (x,)), y)

    was_training = net.training
    net.eval()
    try:
        return torch.autograd.functional.hessian(loss, flat, vectorize=True)
    finally:
        net.train(was_training)


@pytest.fixture(scope="module")
def tiny():
    net, x, y = tiny_problem()
    return net, x, y, exact_hessian(net, x, y)


def test_hessian_vector_product_is_exact(tiny):
    """vᵀHv for fixed (non-Rademacher) vectors against the full Hessian: the HVP itself, without sampling."""
    net, x, y, hessian = tiny
    generator = torch.Generator().manual_seed(1)
    vectors = [torch.randn(hessian.shape[0], generator=generator, dtype=torch.float64) for _ in range(3)]
    values, samples = _quadratic_forms(net, [(x, y)], lambda: iter(vectors), len(vectors))
    assert samples == len(y)
    expected = [float(v @ hessian @ v) for v in vectors]
    assert values == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_hutchinson_matches_the_exact_trace(tiny):
    net, x, y, hessian = tiny
    exact = float(hessian.trace())
    estimate = hessian_trace(net, [(x, y)], probes=1000)
    assert isinstance(estimate, TraceEstimate) and estimate.probes == 1000 and len(estimate.values) == 1000
    assert estimate.samples == len(y)
    error = abs(estimate.trace - exact)
    print(f"\nexact tr(H) = {exact:.4f}; Hutchinson (1000 probes) = {estimate.trace:.4f} ± {estimate.stderr:.4f}; "
          f"relative error {error / exact:.3%} ({error / estimate.stderr:.2f} standard errors)")
    assert error < 0.05 * abs(exact)
    assert error < 4 * estimate.stderr
    # The standard error is the one Hutchinson's variance predicts: Var(vᵀHv) = 2 Σ_{i≠j} H_ij².
    predicted = (2 * ((hessian ** 2).sum() - (hessian.diagonal() ** 2).sum()) / 1000).sqrt().item()
    assert estimate.stderr == pytest.approx(predicted, rel=0.15)
    assert estimate.trace == pytest.approx(sum(estimate.values) / 1000, rel=1e-12)


def test_several_batches_are_the_sample_weighted_mean(tiny):
    net, x, y, _ = tiny
    whole = hessian_trace(net, [(x, y)], probes=5)
    # Unequal batches: a plain mean of the batch means would weight the 16 samples like the 112.
    split = hessian_trace(net, [(x[:16], y[:16]), (x[16:], y[16:])], probes=5)
    assert split.samples == whole.samples == len(y)
    assert split.values == pytest.approx(whole.values, rel=1e-10)


def test_eval_mode_grads_and_modes_are_left_alone(tiny):
    net, x, y, _ = tiny
    bn = net[2]
    net.eval()
    in_eval = hessian_trace(net, [(x, y)], probes=4)
    net.train()
    net[3].eval()  # a submodule the caller froze stays frozen
    grads = [torch.full_like(p, 7.0) if i % 2 else None for i, p in enumerate(net.parameters())]
    for p, g in zip(net.parameters(), grads):
        p.grad = g
    statistics = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    in_train = hessian_trace(net, [(x, y)], probes=4)
    assert in_train.values == in_eval.values  # BatchNorm used its running statistics both times
    assert net.training and net[1].training and bn.training and not net[3].training
    assert all(torch.equal(a, b) for a, b in zip(statistics, (bn.running_mean, bn.running_var,
                                                               bn.num_batches_tracked)))
    for p, g in zip(net.parameters(), grads):
        assert p.grad is g and (g is None or bool((g == 7.0).all()))
    net.zero_grad(set_to_none=True)
    net[3].train()


def test_seed_reproducibility(tiny):
    net, x, y, _ = tiny
    a = hessian_trace(net, [(x, y)], probes=6, seed=3)
    b = hessian_trace(net, [(x, y)], probes=6, seed=3)
    c = hessian_trace(net, [(x, y)], probes=6, seed=4)
    assert a == b
    assert a.values != c.values
    # The probes are a prefix-stable sequence: fewer probes give the first values.
    assert hessian_trace(net, [(x, y)], probes=2, seed=3).values == a.values[:2]


class TwoExits(nn.Module):
    """``(logits (2, B, C), features)``: exit 0 is ``head0``; exit 1 is ``head1``, which must not count."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.head0, self.head1 = nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        h = self.body(x)
        return torch.stack([self.head0(h), self.head1(h)]), h


class ExitZero(nn.Module):
    def __init__(self, model: TwoExits) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.head0(self.model.body(x))


def test_multi_exit_and_tuple_outputs_use_exit_zero():
    model = TwoExits().double()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    # ExitZero holds the same parameters in the same order (head1 unused), so both draw the same probes.
    got = hessian_trace(model, [(x, y)], probes=8)
    expected = hessian_trace(ExitZero(model), [(x, y)], probes=8)
    assert got.values == pytest.approx(expected.values, rel=1e-12)
    shapes = []  # a custom loss_fn sees the selected (B, C) logits as well

    def loss_fn(logits, labels):
        shapes.append(tuple(logits.shape))
        return F.cross_entropy(logits, labels)

    assert hessian_trace(model, [(x, y)], probes=8, loss_fn=loss_fn).values == got.values
    assert shapes == [(10, 3)]


def test_custom_loss_matches_its_exact_hessian():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64)
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    names, shapes = [n for n, _ in net.named_parameters()], [p.shape for p in net.parameters()]

    def loss(theta):
        pieces = dict(zip(names, (t.view(s) for t, s in zip(theta.split([s.numel() for s in shapes]), shapes))))
        return F.mse_loss(functional_call(net, pieces, (x,)), y)

    hessian = torch.autograd.functional.hessian(loss, flat)
    v = torch.linspace(-1, 1, flat.numel(), dtype=torch.float64)
    values, _ = _quadratic_forms(net, [(x, y)], lambda: iter([v]), 1, loss_fn=F.mse_loss)
    assert values[0] == pytest.approx(float(v @ hessian @ v), rel=1e-10)


@pytest.mark.parametrize("kwargs, message", [
    (dict(probes=0), "probes must be an integer >= 1"),
    (dict(batches=[]), "batches is empty"),
    (dict(batches=[(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))]), "batches[0] must hold B >= 1"),
    (dict(params=[torch.zeros(3)]), "params[0] must be a floating tensor that requires grad"),
    (dict(loss_fn=lambda logits, labels: F.cross_entropy(logits, labels, reduction="none")),
     "loss_fn must return a scalar"),
])
def test_bad_arguments_are_named(kwargs, message):
    model = nn.Linear(6, 3)
    args = dict(batches=[(torch.randn(4, 6), torch.randint(0, 3, (4,)))], probes=2) | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        hessian_trace(model, args.pop("batches"), **args)


# ---- the command line on an engine checkpoint --------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-epoch online run of resnet8 on 128 embedded digits: its folder and its trained student's weights."""
    folder = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(dataset="embedded", subset=128, batch_size=32, epochs=1, space=0.5, model="resnet8",
                      out=str(folder), progress=False, threads=1)
    trainer = Trainer(cfg, log=lambda *a: None)
    trainer.fit()
    weights = {k: v.clone() for k, v in trainer.student.net.state_dict().items()}
    return folder, weights


def test_cli_end_to_end(run, tmp_path):
    folder, _ = run
    out = tmp_path / "hessian.json"
    result = subprocess.run([sys.executable, "-m", "spacedkd_fast.hessian", "--checkpoint", str(folder / "last.pt"),
                             "--model", "student", "--samples", "64", "--probes", "3", "--batch-size", "40",
                             "--json", str(out)], capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    match = RESULT_LINE.match(result.stdout.strip())
    assert match, result.stdout
    assert match.group(3, 4, 5, 6) == ("3", "64", "student", str(folder))
    assert "hvp" in result.stderr  # the progress bar
    record = json.loads(out.read_text())
    assert record["probes"] == 3 and record["samples"] == 64 and len(record["values"]) == 3
    assert record["trace"] == pytest.approx(sum(record["values"]) / 3)
    assert float(match.group(1)) == pytest.approx(record["trace"], abs=record["stderr"] / 100)
    assert float(match.group(2)) == pytest.approx(record["stderr"], rel=0.01)
    assert record["stderr"] > 0 and record["role"] == "student" and record["arch"] == "resnet8"
    assert record["checkpoint"] == str(folder / "last.pt") and record["exit"] is None and record["seed"] == 0
    assert record["config"]["subset"] == 128 and record["config"]["mode"] == "online"

    # The CLI measured the trained student on 64 un-augmented training images, split by --batch-size.
    target = _load_target(str(folder), "student", 64, 40, torch.device("cpu"))
    state = target.model.state_dict()
    assert state.keys() == run[1].keys() and all(torch.equal(state[k], run[1][k]) for k in state)
    assert [len(labels) for _, labels in target.batches] == [40, 24]
    assert all(x.dtype == torch.float32 and x.shape[1:] == (1, 32, 32) for x, _ in target.batches)
    # The probe sequence is prefix-stable: one probe in-process reproduces the subprocess's first value.
    first = hessian_trace(target.model, target.batches, probes=1).values[0]
    assert first == pytest.approx(record["values"][0], rel=1e-5)


def test_cli_self_mode_uses_the_multi_exit_student(tmp_path, capsys):
    """A self-mode checkpoint holds one BYOT network, as "student" only (written here: no training needed)."""
    cfg = TrainConfig(mode="self", model="byot_resnet10", dataset="embedded", subset=64)
    torch.manual_seed(0)
    net = FeatureForward(build_model("byot_resnet10", num_classes=10, in_channels=1, image_size=32))
    path = tmp_path / "last.pt"
    torch.save({"format": 1, "config": cfg.to_dict(), "roles": {"student": {"model": net.state_dict(), "steps": 0}}},
               path)
    out = tmp_path / "h.json"
    assert main(["--checkpoint", str(path), "--model", "student", "--samples", "8", "--probes", "1",
                 "--no-progress", "--json", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("tr(H) = ") and "(no standard error, 1 probe, 8 samples, student of" in line
    record = json.loads(out.read_text())
    assert record["exit"] == 0 and record["stderr"] is None and record["arch"] == "byot_resnet10"

    assert main(["--checkpoint", str(path), "--model", "teacher", "--samples", "8", "--probes", "1"]) == 2
    assert "--model teacher: this checkpoint (mode 'self') has no teacher; available: student" in \
        capsys.readouterr().err


def test_cli_bad_input(run, tmp_path, capsys):
    folder, _ = run
    checkpoint = str(folder / "last.pt")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    cases = [
        (["--checkpoint", str(tmp_path / "missing.pt")], "missing.pt: no such file"),
        (["--checkpoint", str(text)], "notes.pt: not a spacedkd_fast checkpoint"),
        (["--checkpoint", str(other)], "other.pt: not a spacedkd_fast checkpoint"),
        (["--checkpoint", checkpoint, "--samples", "0"], "--samples must be >= 1, got 0"),
        (["--checkpoint", checkpoint, "--probes", "0"], "--probes must be >= 1, got 0"),
        (["--checkpoint", checkpoint, "--samples", "129"], "--samples 129 is larger than the run's training set"),
        (["--checkpoint", checkpoint, "--json", str(tmp_path / "nowhere" / "h.json")], "does not exist"),
    ]
    for argv, message in cases:
        full = ["--model", "student", "--samples", "8", "--probes", "1", "--no-progress", *argv]
        assert main(full) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: "), (argv, err)
    with pytest.raises(SystemExit) as exc:  # argparse: an unknown role
        main(["--checkpoint", checkpoint, "--model", "projector", "--samples", "8", "--probes", "1"])
    assert exc.value.code == 2 and "invalid choice: 'projector'" in capsys.readouterr().err

    # As a process: exit code 2, the message, no traceback.
    result = subprocess.run([sys.executable, "-m", "spacedkd_fast.hessian", "--checkpoint", str(text), "--model",
                             "student", "--samples", "8", "--probes", "1"], capture_output=True, text=True, timeout=120,
                            env=ONE_THREAD)
    assert result.returncode == 2 and "not a spacedkd_fast checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
