"""safetensors + JSON checkpoints: round trip, tamper detection, architecture mismatches, no pickle."""
from __future__ import annotations

import json

import pytest
import torch

from pneumoct.errors import PneumoctInputError
from pneumoct.models import build_model
from pneumoct.train.checkpoint import (load_checkpoint, load_training_state, save_checkpoint,
                                       save_training_state)

torch.set_num_threads(1)

KW = {"num_classes": 2, "in_channels": 1}


def _model():
    torch.manual_seed(0)
    return build_model("multiscale_cam_cpu", **KW).eval()


def test_round_trip_identical_outputs(tmp_path):
    m = _model()
    out = save_checkpoint(tmp_path / "ck", m, "multiscale_cam_cpu", KW, {"classes": ["a", "b"], "synthetic": True})
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]
    info = json.loads((out / "model.json").read_text())
    assert info["model_name"] == "multiscale_cam_cpu" and info["parameters"] > 0 and len(info["sha256"]) == 64
    assert info["meta"]["synthetic"] is True
    m2, info2 = load_checkpoint(out, expected_name="multiscale_cam_cpu")
    assert not m2.training
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x)["logits"], m2(x)["logits"])
    assert info2["tensors"] == info["tensors"]


def test_tampered_weights_refused(tmp_path):
    out = save_checkpoint(tmp_path / "ck", _model(), "multiscale_cam_cpu", KW, {})
    w = out / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(PneumoctInputError, match="SHA-256"):
        load_checkpoint(out)


def test_wrong_kwargs_and_missing_key(tmp_path):
    out = save_checkpoint(tmp_path / "ck", _model(), "multiscale_cam_cpu", KW, {})
    info = json.loads((out / "model.json").read_text())
    info["model_kwargs"]["num_classes"] = 3
    (out / "model.json").write_text(json.dumps(info))
    with pytest.raises(PneumoctInputError, match="another shape"):
        load_checkpoint(out)
    info["model_kwargs"]["num_classes"] = 2
    name = next(iter(info["tensors"]))
    del info["tensors"][name]
    (out / "model.json").write_text(json.dumps(info))
    with pytest.raises(PneumoctInputError, match="missing"):
        load_checkpoint(out)
    with pytest.raises(PneumoctInputError, match="expected"):
        load_checkpoint(out, expected_name="m3lung_slice_cpu")
    (out / "model.json").unlink()
    with pytest.raises(PneumoctInputError, match="not a finished checkpoint"):
        load_checkpoint(out)


def test_no_pickle_used(tmp_path, monkeypatch):
    import pickle

    def boom(*a, **k):
        raise AssertionError("pickle/torch.load must not be used")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    m = _model()
    out = save_checkpoint(tmp_path / "ck", m, "multiscale_cam_cpu", KW, {})
    load_checkpoint(out)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    m.train()
    m(torch.rand(2, 1, 32, 32))["logits"].sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, 3)
    save_training_state(tmp_path / "st", opt, sched, epoch=4, best={"val_acc": 0.5})
    opt2 = torch.optim.Adam(m.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 3)
    st = load_training_state(tmp_path / "st", opt2, sched2)
    assert st["epoch"] == 4 and st["best"] == {"val_acc": 0.5}
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        for n in s1[k]:
            assert torch.equal(torch.as_tensor(s1[k][n]), torch.as_tensor(s2[k][n]))
    for f in (tmp_path / "ck").iterdir():
        assert not f.read_bytes().startswith(b"\x80")  # no pickle stream


def test_fold_batch_norms_keeps_outputs_and_removes_every_norm():
    import torch

    from pneumoct.models.blocks import resnet_trunk
    from pneumoct.models.checkpoint import fold_batch_norms, for_cpu_inference

    torch.manual_seed(0)
    net = resnet_trunk(18, in_channels=1, width_mult=0.25)
    for m in net.modules():  # non-trivial running statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    net.eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        before = [t.clone() for t in net(x)]
        n = fold_batch_norms(net)
        after = net(x)
    assert n > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    for a, b in zip(before, after):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    # a network in training mode is left alone (its statistics still move)
    net2 = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)).train()
    assert fold_batch_norms(net2) == 0
    assert getattr(for_cpu_inference(net2), "_pneumoct_folded_bn") == 1
