"""Models from the ecosystem (timm:NAME, torchvision:NAME) and trained teacher weights from local files."""

from __future__ import annotations

import json

import pytest
import torch
from test_engine import run, tiny

from spacedkd_fast.models import build_model
from spacedkd_fast.models.weights import load_weights, read_state_dict

timm = pytest.importorskip("timm", reason="timm is an optional extra (pip install 'spacedkd_fast[timm]')")


@pytest.mark.parametrize("name", ["timm:resnet10t", "torchvision:resnet18", "torchvision:mobilenet_v3_small"])
def test_ecosystem_models_follow_the_single_exit_contract(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=1, image_size=32).eval()
    x = torch.randn(3, 1, 32, 32)
    logits, features = model.forward_features(x)
    assert logits.shape == (3, 7) and features.shape == (3, model.feature_dim)
    torch.testing.assert_close(logits, model(x))
    assert model.num_exits == 1 and model.num_classes == 7


def test_unknown_or_missing_models_say_what_to_do(monkeypatch):
    with pytest.raises(ValueError, match=r"timm has no model 'resnet7' \(timm.list_models\('\*resnet7\*'\)"):
        build_model("timm:resnet7", num_classes=10)
    with pytest.raises(ValueError, match="torchvision has no model 'resnet7'; torchvision.models.list_models()"):
        build_model("torchvision:resnet7", num_classes=10)
    with pytest.raises(ValueError, match="give the timm model's name after the colon"):
        build_model("timm:", num_classes=10)
    import importlib

    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: (_ for _ in ()).throw(ModuleNotFoundError(name)) if name == "timm"
                        else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"needs timm, which is not installed: pip install timm"):
        build_model("timm:resnet18", num_classes=10)


def test_training_timm_and_torchvision_models_with_the_feature_term(tmp_path):
    trainer = run(tiny(teacher_model="timm:resnet10t", student_model="torchvision:resnet18", subset=64, epochs=1,
                       space=0.5, beta=0.03, out=str(tmp_path)))
    assert trainer.student.head is not None and 0 <= trainer.history[-1]["student_acc"] <= 1
    assert json.loads((tmp_path / "config.json").read_text())["teacher_model"] == "timm:resnet10t"


def test_teacher_weights_from_a_file_a_run_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    net = build_model("resnet8", num_classes=10, in_channels=1)
    torch.save(net.state_dict(), tmp_path / "plain.pth")
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, tmp_path / "ddp.pt")
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    for path in ("plain.pth", "ddp.pt", "w.safetensors"):
        fresh = build_model("resnet8", num_classes=10, in_channels=1)
        load_weights(fresh, str(tmp_path / path))
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values()))

    base = tmp_path / "base"
    trained = run(tiny(mode="base", epochs=1, out=str(base)))  # a teacher trained on its own, then offline KD
    offline = run(tiny(mode="offline", epochs=1, teacher_weights=str(base), out=str(tmp_path / "offline")))
    assert all(torch.equal(a, b) for a, b in zip(offline.teacher.net.inner.state_dict().values(),
                                                  trained.student.net.inner.state_dict().values()))
    assert offline.teacher.steps == 0  # offline KD from a trained teacher skips training it
    assert [r["epoch"] for r in offline.history] == [1]
    assert offline.history[0]["teacher_acc"] == trained.history[-1]["student_acc"]
    online = run(tiny(epochs=1, teacher_weights=str(base / "last.pt")))  # and as an online teacher's start
    assert online.teacher.steps > 0


def test_teacher_weights_that_do_not_fit_name_the_parameters(tmp_path):
    torch.save(build_model("resnet20", num_classes=10, in_channels=1).state_dict(), tmp_path / "r20.pt")
    torch.save(build_model("resnet8", num_classes=100, in_channels=1).state_dict(), tmp_path / "c100.pt")
    net = build_model("resnet8", num_classes=10, in_channels=1)
    with pytest.raises(ValueError, match=r"does not fit the teacher model: \d+ of its parameters are not in the "
                                         r"file .* in the file are not in the model \(e.g. \['layer1.1"):
        load_weights(net, str(tmp_path / "r20.pt"))
    with pytest.raises(ValueError, match=r"shapes differ for fc.weight: file \(100, 64\), model \(10, 64\)"):
        load_weights(net, str(tmp_path / "c100.pt"))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read junk.pt"):
        read_state_dict(str(tmp_path / "junk.pt"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_state_dict(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="mode= self trains no separate teacher"):
        run(tiny(mode="self", model="byot_resnet10", teacher_weights=str(tmp_path / "c100.pt")))
