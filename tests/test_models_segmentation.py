"""JCS segmentation branch (§III-B: VGG-16 encoder, EFM/GAM, AFF decoder, Fig. 4 combination, deep supervision
Eq. (6)) and the plain U-Net baseline (JCS Table VII)."""
from __future__ import annotations

import io

import pytest
import torch

from pneumoct.models import build_model, list_models
from pneumoct.models.jcs import JCSClassifier
from pneumoct.models.jcs_seg import (GroupedAtrousModule, JCSSegNet, deep_supervision_loss, jcs_seg,
                                     soft_dice_loss)
from pneumoct.models.unet import UNet

torch.set_num_threads(1)

TINY = (4, 8, 16, 16, 16)


def _jcs(num_classes=1, **kw) -> JCSSegNet:
    torch.manual_seed(0)
    return JCSSegNet(in_channels=1, num_classes=num_classes, widths=TINY, **kw)


def _unet(num_classes=1, base=4) -> UNet:
    torch.manual_seed(0)
    return UNet(in_channels=1, num_classes=num_classes, base=base, depth=3)


@pytest.mark.parametrize("k", [1, 3])
def test_jcs_shapes(k):
    net = _jcs(k).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, 64, 32))
    assert out["logits"].shape == (2, k, 64, 32)
    assert len(out["side_logits"]) == 5
    assert all(s.shape == (2, k, 64, 32) for s in out["side_logits"])
    assert out["logits"] is out["side_logits"][-1]  # final prediction = finest side-output
    feats = net.encode(torch.randn(1, 1, 64, 64))
    assert [f.shape[-1] for f in feats] == [64, 32, 16, 8, 4, 2]  # strides 1..32 (six levels)


@pytest.mark.parametrize("k", [1, 3])
def test_unet_shapes(k):
    net = _unet(k).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 1, 32, 64))["logits"].shape == (2, k, 32, 64)
    net = UNet(1, k, base=4, depth=2, bilinear=True).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 12, 8))["logits"].shape == (1, k, 12, 8)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="divisible by 32"):
        _jcs()(torch.randn(1, 1, 48, 64))
    with pytest.raises(ValueError, match="divisible by 8"):
        _unet()(torch.randn(1, 1, 36, 32))
    with pytest.raises(ValueError):
        _unet()(torch.randn(1, 3, 32, 32))


def test_gam_keeps_shape():
    gam = GroupedAtrousModule(8, (1, 3, 6, 9)).eval()
    x = torch.randn(2, 8, 5, 7)
    assert gam(x).shape == x.shape
    assert [b[0].dilation for b in gam.branches] == [(1, 1), (3, 3), (6, 6), (9, 9)]


def test_combination_with_classifier_features():
    torch.manual_seed(0)
    cls = JCSClassifier(in_channels=1, layers=(1, 1, 1, 1), widths_divisor=8).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        stages = cls(x)["stages"]
    net = _jcs(1, extra_channels=[s.shape[1] for s in stages]).eval()
    with torch.no_grad():
        out = net(x, extra_features=stages)
        assert out["logits"].shape == (2, 1, 64, 64)
        # the classifier features actually change the prediction
        out2 = net(x, extra_features=[torch.zeros_like(s) for s in stages])
    assert not torch.allclose(out["logits"], out2["logits"])
    with pytest.raises(ValueError):
        net(x)
    with pytest.raises(ValueError):
        _jcs()(x, extra_features=stages)


def _outputs(logit_maps):
    return {"logits": logit_maps[-1], "side_logits": list(logit_maps)}


@pytest.mark.parametrize("k", [1, 3])
def test_deep_supervision_loss_values(k):
    torch.manual_seed(0)
    if k == 1:
        target = (torch.rand(2, 16, 16) > 0.7).float()
        perfect = 30.0 * (2 * target - 1)[:, None]
    else:
        target = torch.randint(0, 3, (2, 16, 16))
        perfect = 30.0 * torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
    rand = torch.randn(2, k, 16, 16)
    l_rand = deep_supervision_loss(_outputs([rand] * 5), target)
    l_half = deep_supervision_loss(_outputs([0.5 * (rand + perfect / 30 * 4)] * 5), target)
    l_perf = deep_supervision_loss(_outputs([perfect] * 5), target)
    assert torch.isfinite(l_rand) and l_rand > l_half > l_perf
    assert l_perf < 1e-3
    # a single tensor / U-Net-style dict: one term; weights scale the terms
    one = deep_supervision_loss(rand, target)
    assert torch.allclose(deep_supervision_loss({"logits": rand}, target), one)
    assert torch.allclose(l_rand, 5 * one, rtol=1e-5)
    w = deep_supervision_loss(_outputs([rand] * 5), target, weights=[1, 0, 0, 0, 0])
    assert torch.allclose(w, one, rtol=1e-5)
    with pytest.raises(ValueError):
        deep_supervision_loss(_outputs([rand] * 5), target, weights=[1, 1])
    # low-resolution side-outputs are upsampled to the ground-truth size
    assert torch.isfinite(deep_supervision_loss(torch.randn(2, k, 8, 8), target))
    # binary target as (B, 1, H, W) is accepted too
    if k == 1:
        assert torch.allclose(deep_supervision_loss(rand, target[:, None]), one)


def test_dice_empty_masks():
    empty = torch.zeros(2, 16, 16)
    assert soft_dice_loss(torch.full((2, 1, 16, 16), -30.0), empty) < 1e-3
    assert soft_dice_loss(torch.full((2, 1, 16, 16), 30.0), empty) > 0.99


def _discs(n: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    cy = torch.randint(8, size - 8, (n, 1, 1), generator=gen).float()
    cx = torch.randint(8, size - 8, (n, 1, 1), generator=gen).float()
    r = torch.randint(3, 7, (n, 1, 1), generator=gen).float()
    mask = (((yy - cy) ** 2 + (xx - cx) ** 2) <= r ** 2).float()
    img = 0.8 * mask + 0.3 * torch.randn(n, size, size, generator=gen)
    return img[:, None], mask


def _dice(pred: torch.Tensor, g: torch.Tensor) -> float:
    inter = (pred * g).sum(dim=(1, 2))
    return float((2 * inter / (pred.sum(dim=(1, 2)) + g.sum(dim=(1, 2))).clamp_min(1e-8)).mean())


@pytest.mark.parametrize("name", ["jcs", "unet"])
def test_learns_synthetic_discs(name):
    gen = torch.Generator().manual_seed(1)
    x_tr, y_tr = _discs(64, 32, gen)
    x_te, y_te = _discs(32, 32, gen)
    net = _jcs() if name == "jcs" else _unet(base=8)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    net.train()
    for step in range(40):
        idx = torch.arange(16) + 16 * (step % 4)
        loss = deep_supervision_loss(net(x_tr[idx]), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    net.eval()
    with torch.no_grad():
        pred = (net(x_te)["logits"][:, 0] > 0).float()
    d = _dice(pred, y_te)
    trivial = max(_dice(torch.zeros_like(y_te), y_te), _dice(torch.ones_like(y_te), y_te))
    assert d > trivial + 0.3, (d, trivial)


@pytest.mark.parametrize("name", ["jcs", "unet"])
def test_state_dict_roundtrip(name):
    net = (_jcs(3) if name == "jcs" else _unet(3))
    x = torch.randn(2, 1, 32, 32)
    net.train()
    net(x)  # move BN running stats away from their init
    net.eval()
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    other = JCSSegNet(1, 3, widths=TINY) if name == "jcs" else UNet(1, 3, base=4, depth=3)
    other.load_state_dict(torch.load(buf, weights_only=True))
    other.eval()
    with torch.no_grad():
        assert torch.equal(net(x)["logits"], other(x)["logits"])


def test_registry():
    assert {"jcs_seg", "jcs_seg_cpu", "unet", "unet_cpu"} <= set(list_models())
    for name in ("jcs_seg_cpu", "unet_cpu"):
        net = build_model(name, num_classes=3).eval()
        with torch.no_grad():
            assert net(torch.randn(1, 1, 32, 32))["logits"].shape == (1, 3, 32, 32)
    assert build_model("jcs_seg_cpu").widths == (8, 16, 32, 64, 64)


def _count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_parameter_counts():
    net = jcs_seg(num_classes=1, in_channels=3)
    vgg = _count(net.encoder)
    assert 14.7e6 < vgg < 14.8e6          # VGG-16 conv part ~14.71M (+ BN affine)
    total = _count(net)
    assert 40e6 < total < 55e6, total     # EFM (2 GAMs ~13M) + AFF decoder (~20M) on top; 47.5M here
    assert 25e6 < _count(build_model("unet")) < 40e6  # classic U-Net ~31M
    assert _count(build_model("jcs_seg_cpu")) < 1e6
