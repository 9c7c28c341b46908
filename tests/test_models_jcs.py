"""JCS explainable classification branch (§III-A): Res2Net, Grad-CAM Eq. (1)-(2), mixing Eq. (3), L_seg Eq. (4),
patient-level count threshold and its sensitivity/specificity trade-off."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pneumoct.models import build_model, list_models
from pneumoct.models.jcs import (JCSClassifier, Res2Net, Res2NetBottle2neck, jcs_classification_loss, l_seg,
                                 mixup, patient_positive, soft_cross_entropy, threshold_tradeoff)

torch.set_num_threads(2)


def _tiny(**kw) -> JCSClassifier:
    torch.manual_seed(0)
    kw.setdefault("widths_divisor", 8)
    return JCSClassifier(in_channels=1, layers=(1, 1, 1, 1), **kw)


def test_registry_and_shapes():
    assert {"jcs_classifier", "jcs_classifier_cpu"} <= set(list_models())
    net = build_model("jcs_classifier_cpu").eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, 64, 64))
    assert out["logits"].shape == (2, 2)
    assert out["features"].shape == (2, 512, 2, 2)
    assert [s.shape[-1] for s in out["stages"]] == [32, 16, 8, 4, 2]


def test_res2net50_structure():
    bb = Res2Net(layers=(3, 4, 6, 3), in_channels=3)
    assert bb.out_channels == [64, 256, 512, 1024, 2048]
    assert [len(l) for l in (bb.layer1, bb.layer2, bb.layer3, bb.layer4)] == [3, 4, 6, 3]
    blk = bb.layer1[1]
    assert blk.width == 26 and blk.scale == 4 and len(blk.convs) == 3  # 26w4s: 3 hierarchical 3x3 convs
    n = sum(p.numel() for p in bb.parameters())
    assert 23.0e6 < n < 24.2e6  # Res2Net-50 v1b 26w4s backbone ~23.6 M (25.7 M with the 1000-way FC)


def test_hierarchical_split_grows_receptive_field():
    torch.manual_seed(0)
    res2 = Res2NetBottle2neck(16, 4, base_width=64, scale=4).eval()   # width 4 per split, 3 chained 3x3 convs
    plain = Res2NetBottle2neck(16, 4, base_width=256, scale=1).eval()  # single 3x3 conv (ResNet bottleneck)
    assert len(res2.convs) == 3 and len(plain.convs) == 1
    assert sum(p.numel() for p in res2.parameters()) != sum(p.numel() for p in plain.parameters())

    def reach(block: torch.nn.Module) -> int:
        x = torch.randn(1, 16, 21, 21).abs().requires_grad_(True)
        block(x)[0, :, 10, 10].sum().backward()
        g = x.grad.abs().sum(dim=(0, 1)) > 0
        rows = torch.nonzero(g.any(dim=1)).flatten()
        return int(rows.max() - rows.min() + 1)

    assert reach(plain) == 3
    assert reach(res2) == 7  # x_2 -> 3, x_3 -> 5, x_4 -> 7: multi-scale within one block


def test_activation_map_range_size_and_gradient():
    net = _tiny(stage_strides=(1, 2, 1, 1))
    x = torch.randn(3, 1, 64, 64)
    am = net.activation_map(x)
    assert am.shape == (3, 64, 64)
    assert float(am.detach().min()) >= 0.0 and float(am.detach().max()) <= 1.0 + 1e-6
    assert torch.allclose(am.flatten(1).max(1).values, torch.ones(3), atol=1e-4)
    mask = torch.zeros(3, 64, 64)
    mask[:, 20:40, 20:40] = 1
    loss = jcs_classification_loss(torch.zeros(3, 2), torch.tensor([1, 1, 0]), am, mask, lambda_seg=1.0)
    w0 = net.backbone.layer4[0].conv3.weight
    before = w0.detach().clone()
    opt = torch.optim.SGD(net.parameters(), lr=10.0)
    opt.zero_grad()
    loss.backward()  # logits are constants here: all gradient comes through L_seg and the Grad-CAM
    assert w0.grad is not None and float(w0.grad.abs().sum()) > 0
    assert net.backbone.stem[0].weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(before, w0.detach())
    # without create_graph the map is detached (inference use)
    assert not net.activation_map(x, create_graph=False).requires_grad


def test_l_seg_hand_checked():
    am = torch.tensor([[[1.0, 0.5], [0.0, 0.25]]])
    s = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    # ||AM - S||_2 = sqrt(0 + .25 + 0 + .0625) = sqrt(.3125); / (H W = 4)
    expect = math.sqrt(0.3125) / 4
    assert l_seg(am, s).item() == pytest.approx(expect, rel=1e-5)
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    ce = torch.nn.functional.cross_entropy(logits, labels).item()
    am2 = torch.cat([am, torch.zeros_like(am)])
    s2 = torch.cat([s, torch.ones_like(s)])
    # only the first sample is annotated: the second's huge error is ignored
    tot = jcs_classification_loss(logits, labels, am2, s2, lambda_seg=2.0, has_mask=torch.tensor([True, False]))
    assert tot.item() == pytest.approx(ce + 2.0 * expect, rel=1e-5)
    both = jcs_classification_loss(logits, labels, am2, s2, lambda_seg=2.0)
    assert both.item() == pytest.approx(ce + 2.0 * (expect + 2.0 / 4) / 2, rel=1e-5)  # ||-1||_2 over 4 px = 2
    assert jcs_classification_loss(logits, labels, None, None).item() == pytest.approx(ce, rel=1e-6)


def test_mixup_reproducible_and_soft_targets():
    x = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 1, 2, 2).contiguous()
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    a = mixup(x, y, alpha=0.5, generator=torch.Generator().manual_seed(3))
    b = mixup(x, y, alpha=0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    xm, ym, lam, idx = a
    assert 0.0 <= lam <= 1.0
    assert torch.all(idx != torch.arange(6))  # i != j
    assert sorted(idx.tolist()) == list(range(6))
    assert torch.allclose(ym.sum(1), torch.ones(6))
    onehot = torch.nn.functional.one_hot(y, 2).float()
    assert torch.allclose(ym, lam * onehot + (1 - lam) * onehot[idx])
    assert torch.allclose(xm, lam * x + (1 - lam) * x[idx])
    # Beta(0.5, 0.5) is U-shaped: most draws near 0 or 1
    g = np.random.default_rng(0)
    lams = np.array([mixup(x, y, rng=g)[2] for _ in range(400)])
    assert abs(lams.mean() - 0.5) < 0.06 and ((lams < 0.1) | (lams > 0.9)).mean() > 0.35
    logits = torch.tensor([[1.0, -1.0]])
    t = torch.tensor([[0.25, 0.75]])
    ls = torch.log_softmax(logits, 1)[0]
    assert soft_cross_entropy(logits, t).item() == pytest.approx(-(0.25 * ls[0] + 0.75 * ls[1]).item())


def test_patient_positive_and_tradeoff_table():
    p = [0.9, 0.6, 0.5, 0.2]           # 2 slices strictly above 0.5
    assert patient_positive(p, count_threshold=1)
    assert not patient_positive(p, count_threshold=2)  # "larger than" the threshold
    assert patient_positive(np.array([[0.1, 0.9], [0.3, 0.7], [0.8, 0.2]]), count_threshold=1)
    pats = [np.array([0.9, 0.9, 0.9]),     # pos, 3 positive slices
            np.array([0.9, 0.1, 0.1]),     # pos, 1
            np.array([0.1, 0.2]),          # neg, 0
            np.array([0.7, 0.8, 0.1])]     # neg, 2
    rows = threshold_tradeoff(pats, [1, 1, 0, 0], [0, 1, 2])
    assert [r["count_threshold"] for r in rows] == [0, 1, 2]
    assert [(r["sensitivity"], r["specificity"]) for r in rows] == [(1.0, 0.5), (0.5, 0.5), (0.5, 1.0)]
    assert (rows[1]["tp"], rows[1]["fn"], rows[1]["tn"], rows[1]["fp"]) == (1, 1, 1, 1)


# ------------------------------------------------------------------------------------------- tiny learnable task
def _blobs(n: int, seed: int, size: int = 64):
    g = np.random.default_rng(seed)
    x = g.normal(0, 0.3, (n, 1, size, size)).astype(np.float32)
    y = np.arange(n) % 2
    masks = np.zeros((n, size, size), np.float32)
    yy, xx = np.mgrid[:size, :size]
    for i in np.flatnonzero(y):
        cy, cx = g.integers(12, size - 12, 2)
        r = g.uniform(5, 8)
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        x[i, 0] += 2.0 * np.exp(-d2 / (2 * (r / 1.5) ** 2))
        masks[i] = d2 <= r * r
    return torch.tensor(x), torch.tensor(y), torch.tensor(masks)


def _train(lambda_seg: float, epochs: int = 5):
    torch.manual_seed(0)
    x, y, mk = _blobs(200, seed=0)
    net = _tiny(stage_strides=(1, 2, 1, 1))  # 8x8 final map at 64x64
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(epochs):
        perm, tot = torch.randperm(len(x), generator=gen), 0.0
        net.train()
        for b in range(0, len(x), 20):
            i = perm[b:b + 20]
            if lambda_seg > 0:
                am, logits = net.activation_map(x[i], return_logits=True)
                loss = jcs_classification_loss(logits, y[i], am, mk[i], lambda_seg, has_mask=y[i] == 1)
            else:
                loss = jcs_classification_loss(net(x[i])["logits"], y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item()
        losses.append(tot)
    net.eval()
    xt, yt, mt = _blobs(60, seed=1)
    with torch.no_grad():
        acc = (net(xt)["logits"].argmax(1) == yt).float().mean().item()
    am = net.activation_map(xt[yt == 1], create_graph=False)
    frac = ((am * mt[yt == 1]).flatten(1).sum(1) / am.flatten(1).sum(1)).mean().item()
    return losses, acc, frac


@pytest.fixture(scope="module")
def trained():
    return {"plain": _train(0.0), "seg": _train(300.0)}  # L_seg is O(1/sqrt(HW)): large weight


def test_tiny_task_learns(trained):
    losses, acc, _ = trained["plain"]
    assert losses[-1] < 0.3 * losses[0]
    assert acc > 0.8


def test_map_supervision_concentrates_activation(trained):
    _, acc, frac_plain = trained["plain"]
    losses, acc_seg, frac_seg = trained["seg"]
    assert losses[-1] < losses[0]
    assert acc_seg > 0.7
    blob_area = 0.03  # ~pi * 6.5^2 / 64^2: a uniform map would put ~3 % of its energy in the blob
    assert frac_seg > 5 * blob_area
    assert frac_seg > frac_plain
