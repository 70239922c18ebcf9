"""The logic of the CUDA-only branches, run without a GPU: device indices, the role's generator swap, TF32, the
replay window's budgets per rank, evaluation without per-batch host transfers.

``torch.cuda`` is replaced by recording fakes where a branch would need a device; what cannot run here (streams,
events, NCCL) is covered by the GPU tests and ``bench/gpu_check.sh``.
"""

import re

import pytest
import torch

from spacedkd_fast.config import TrainConfig
from spacedkd_fast.engine import roles as R
from spacedkd_fast.engine import runtime as T


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two CUDA devices, device 1 current; records set_device and generator calls."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": calls.append(("get", device)) or
                        torch.zeros(8, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append(("set", device)))
    return calls


def test_cuda_devices_always_carry_their_index(fake_cuda):
    assert T.resolve_device("auto") == torch.device("cuda", 1)  # was "cuda" with no index: the prefetcher failed
    assert T.resolve_device("cuda") == torch.device("cuda", 1)
    assert T.resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="this machine has 2 CUDA device"):
        T.resolve_device("cuda:5")
    with pytest.raises(ValueError, match="device= must be auto, cpu, cuda or cuda:N"):
        T.resolve_device("tpu")


def test_no_cuda_refuses_a_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert T.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        T.resolve_device("cuda:1")


def test_the_training_device_becomes_current(fake_cuda):
    """--device cuda:1 in one process: Triton launches and torch.cuda calls without a device follow the current
    device, so it is set to the training device (it stayed 0)."""
    T.bind_device(torch.device("cuda", 1))
    T.bind_device(torch.device("cpu"))
    assert fake_cuda == [("set_device", torch.device("cuda", 1))]


def test_role_swaps_the_generator_of_its_own_device(fake_cuda):
    role = R.Role(name="student", model=torch.nn.Linear(2, 2), optimizer=None,
                  rng_state={"cpu": torch.get_rng_state(), "cuda": torch.zeros(8, dtype=torch.uint8)},
                  device=torch.device("cuda", 1))
    with role.context():
        pass
    devices = {device for kind, device in fake_cuda if kind in ("get", "set")}
    assert devices == {torch.device("cuda", 1)}, fake_cuda  # never the current device by default
    assert [kind for kind, _ in fake_cuda] == ["get", "set", "get", "set"]


@pytest.mark.parametrize("tf32", [True, False])
def test_tf32_follows_the_config_on_cuda_only(tf32):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
        T.configure_math(TrainConfig(tf32=tf32), torch.device("cpu"))
        assert torch.backends.cuda.matmul.allow_tf32 == (not tf32)  # CPU runs are left alone
        T.configure_math(TrainConfig(tf32=tf32), torch.device("cuda", 0))
        assert torch.backends.cuda.matmul.allow_tf32 == tf32 and torch.backends.cudnn.allow_tf32 == tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_window_budgets_share_host_memory_between_local_ranks(monkeypatch):
    monkeypatch.setattr(T, "_available_host_memory", lambda: 64 * 10**9)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 10**9, 96 * 10**9))
    cfg = TrainConfig()
    cuda = torch.device("cuda", 0)
    assert T.window_budgets(cfg, cuda, local_world=1) == (20e9, 16e9)
    assert T.window_budgets(cfg, cuda, local_world=8) == (20e9, 2e9)  # was 16 GB per rank: 200 % of the host
    assert T.window_budgets(cfg, torch.device("cpu"), local_world=4) == (4e9, 0.0)
    explicit = TrainConfig(window_budget=1.5, host_budget=3.0)  # explicit budgets are per process
    assert T.window_budgets(explicit, cuda, local_world=8) == (1.5e9, 3e9)


def test_evaluation_reads_nothing_back_per_batch():
    """Counts stay on the device until the caller reads them once; no host→device copy per batch either."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Net(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :3], x

    batches = [(torch.randint(0, 255, (5, 1, 2, 2), dtype=torch.uint8).float(), torch.randint(0, 3, (5,)))
               for _ in range(4)]

    class Recorder(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recorder() as rec:
        counts = R.evaluate(Net(), batches, multi_exit=False)
    host = [op for op in rec.ops if re.match(r"aten\.(_local_scalar_dense|lift_fresh)", op)]  # item(), new_tensor
    assert host == [], host
    expected = sum(int((Net()(x)[0].argmax(-1) == labels).sum()) for x, labels in batches)
    assert counts.tolist() == [expected, 20]
