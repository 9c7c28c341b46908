"""M3Lung-Sys slice- and patient-level networks: shapes, ablations, padding invariance, Eq. 4-5, tiny
learnable tasks (CPU, seeded)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pneumoct.models import build_model, list_models
from pneumoct.models.blocks import Bottleneck, BasicBlock, resnet_trunk
from pneumoct.models.m3lung import (M3LungPatientNet, M3LungSliceNet, coordinate_maps, max_pool_assessment,
                                    multiscale_parts, non_parametric_assessment, slice_loss,
                                    slice_probabilities)



@pytest.fixture(autouse=True)
def _one_thread():
    # the CI box has 2 shared cores; intra-op threads under contention are ~50x slower than one thread
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------------------------- blocks
@pytest.mark.parametrize("depth,block,c4", [(10, BasicBlock, 256), (18, BasicBlock, 256), (50, Bottleneck, 1024)])
def test_trunk_stage_shapes(depth, block, c4):
    torch.manual_seed(0)
    t = resnet_trunk(depth, in_channels=1, width_mult=0.5).eval()
    assert t.block is block
    outs = t(torch.randn(1, 1, 64, 96))
    assert [o.shape[-2:] for o in outs] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert [o.shape[1] for o in outs] == t.out_channels and t.out_channels[-1] == c4


def test_resnet50_param_count_matches_reference():
    # torchvision resnet50 without the fc layer has 23,508,032 parameters
    assert n_params(resnet_trunk(50)) == 23_508_032
    assert n_params(resnet_trunk(18)) == 11_176_512  # resnet18 without fc


# ------------------------------------------------------------------------------------------ slice network
def test_registry():
    names = list_models()
    for n in ("m3lung_slice", "m3lung_slice_cpu", "m3lung_patient", "m3lung_patient_cpu"):
        assert n in names


@pytest.mark.parametrize("depth,wm,in_ch,hw", [(10, 0.25, 1, (64, 64)), (18, 0.5, 3, (80, 48)),
                                               (50, 0.125, 3, (64, 64))])
def test_slice_shapes(depth, wm, in_ch, hw):
    torch.manual_seed(0)
    net = M3LungSliceNet(depth=depth, width_mult=wm, in_channels=in_ch).eval()
    x = torch.randn(2, in_ch, *hw)
    with torch.no_grad():
        out = net(x)
    h, w = math.ceil(hw[0] / 16), math.ceil(hw[1] / 16)
    d3, d4 = net.trunk.out_channels[2:]
    assert out["class_logits"].shape == (2, 4)
    assert out["lesion_logits"].shape == (2, 2)
    assert out["location_map"].shape == (2, h, w)
    assert out["location_map_full"].shape == (2, *hw)
    assert out["features"].shape == (2, d3 + d4) == (2, net.feature_dim)
    for k in ("location_map", "location_map_full"):
        m = out[k]
        assert m.min() >= 0 and m.max() <= 1
        # min-max normalised: the closest position is 1, the farthest 0
    assert torch.allclose(out["location_map"].flatten(1).max(1).values, torch.ones(2), atol=1e-3)
    assert torch.allclose(out["location_map"].flatten(1).min(1).values, torch.zeros(2), atol=1e-3)


def test_builders_and_paper_config():
    cpu = build_model("m3lung_slice_cpu")
    assert cpu.trunk.out_channels == [32, 64, 128, 256] and cpu.feature_dim == 384
    full = build_model("m3lung_slice")
    assert full.trunk.out_channels == [256, 512, 1024, 2048] and full.feature_dim == 3072
    assert full.lesion_head.weight.shape == (2, 1024)  # the 2 x D prototypes


def test_location_map_cosine_distance_default():
    torch.manual_seed(0)
    net = M3LungSliceNet(depth=10, width_mult=0.25).eval()
    assert net.map_distance == "cosine"
    f3 = torch.rand(1, net.trunk.out_channels[2], 3, 3)
    proto = net.lesion_head.weight[1]
    f3[0, :, 0, 1] = 7.0 * proto  # same direction as the prototype, far larger norm: still the closest
    with torch.no_grad():
        amap = net.location_map(f3, torch.tensor([[0.0, 5.0]]))
    assert amap[0, 0, 1] == pytest.approx(1.0, abs=1e-3)
    cos = torch.nn.functional.cosine_similarity(f3[0], proto[:, None, None], dim=0)
    assert torch.all(torch.diff(amap.flatten()[torch.argsort(-cos.flatten())]) <= 1e-5)


def test_location_map_follows_prototype_distance():
    torch.manual_seed(0)
    net = M3LungSliceNet(depth=10, width_mult=0.25, map_distance="euclidean").eval()
    f3 = torch.randn(1, net.trunk.out_channels[2], 3, 3)
    logits = torch.tensor([[0.0, 5.0]])  # predicted: with lesion
    proto = net.lesion_head.weight[1]
    f3[0, :, 1, 2] = proto  # exactly at the prototype -> 1
    with torch.no_grad():
        amap = net.location_map(f3, logits)
    assert amap[0, 1, 2] == pytest.approx(1.0)
    d = ((f3[0] - proto[:, None, None]) ** 2).sum(0).sqrt()
    far = torch.nonzero(d == d.max())[0]
    assert amap[0, far[0], far[1]] == pytest.approx(0.0, abs=1e-5)
    # monotone decreasing in the distance: closer -> higher
    assert torch.all(torch.diff(amap.flatten()[torch.argsort(d.flatten())]) <= 1e-6)
    # the prototype follows the predicted class: predicting 'no lesion' uses row 0
    with torch.no_grad():
        amap0 = net.location_map(f3, torch.tensor([[5.0, 0.0]]))
    d0 = ((f3[0] - net.lesion_head.weight[0][:, None, None]) ** 2).sum(0).sqrt()
    assert amap0[0].flatten().argmax() == d0.flatten().argmin()


def test_coordinate_maps():
    c = coordinate_maps(3, 5)
    assert c.shape == (3, 3, 5)
    assert torch.allclose(c[0, 0], torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))
    assert torch.allclose(c[1, :, 0], torch.tensor([-1.0, 0.0, 1.0]))
    assert c[2, 1, 2] == 0 and c[2, 0, 0] == pytest.approx(math.sqrt(2))


def test_ablation_flags():
    torch.manual_seed(0)
    kw = dict(depth=10, width_mult=0.25)
    base = M3LungSliceNet(multitask=False, attention=False, coordinates=False, **kw)
    mt = M3LungSliceNet(multitask=True, attention=False, coordinates=False, **kw)
    mta = M3LungSliceNet(multitask=True, attention=True, coordinates=False, **kw)
    full = M3LungSliceNet(**kw)
    d3 = base.trunk.out_channels[2]
    assert n_params(mt) - n_params(base) == 2 * d3 + 2          # the lesion head
    assert n_params(mta) == n_params(mt)                          # attention is parameter-free
    c4 = full.trunk.stages[3][0]
    # coordinates: 3 extra input channels into ResBlock4's first conv and its projection shortcut
    planes = c4.conv1.out_channels
    down_out = c4.downsample[0].out_channels
    assert n_params(full) - n_params(mta) == 3 * planes * 9 + 3 * down_out
    assert c4.conv1.in_channels == d3 + 3
    with pytest.raises(ValueError):
        M3LungSliceNet(multitask=False, attention=True, **kw)
    x = torch.randn(2, 3, 64, 64)
    for m in (base, mt, mta, full):
        m.eval()
    with torch.no_grad():
        ob = base(x)
        assert ob["lesion_logits"] is None and ob["location_map"] is None
        # same weights, attention switched on/off changes the output (the map is used in the graph)
        mta.load_state_dict(mt.state_dict())
        o1, o2 = mt(x), mta(x)
    assert torch.equal(o1["lesion_logits"], o2["lesion_logits"])
    assert not torch.allclose(o1["class_logits"], o2["class_logits"])


def _blob_images(n: int, gen: torch.Generator, size: int = 64):
    """class 0: no blob (healthy); 1/2/3: a bright Gaussian blob in the left / right / bottom-centre."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    y = torch.randint(0, 4, (n,), generator=gen)
    imgs = 0.3 * torch.randn(n, 1, size, size, generator=gen)
    centres = {1: (0.5, 0.22), 2: (0.5, 0.78), 3: (0.8, 0.5)}
    for i in range(n):
        c = int(y[i])
        if c == 0:
            continue
        cy, cx = centres[c]
        jit = (torch.rand(2, generator=gen) - 0.5) * 0.12
        cy, cx = (cy + jit[0].item()) * size, (cx + jit[1].item()) * size
        r = 4 + 2 * torch.rand(1, generator=gen).item()
        imgs[i, 0] += 2.0 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return imgs, y


def test_slice_net_learns_toy_task():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    xtr, ytr = _blob_images(192, gen)
    xte, yte = _blob_images(96, gen)
    net = M3LungSliceNet(depth=10, width_mult=0.25, in_channels=1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for epoch in range(10):
        net.train()
        perm = torch.randperm(len(xtr), generator=gen)
        tot = 0.0
        for b in range(0, len(xtr), 32):
            idx = perm[b:b + 32]
            loss = slice_loss(net(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item() * len(idx)
        losses.append(tot / len(xtr))
    net.eval()
    with torch.no_grad():
        out = net(xte)
    acc = (out["class_logits"].argmax(1) == yte).float().mean().item()
    les_acc = (out["lesion_logits"].argmax(1) == (yte > 0).long()).float().mean().item()
    assert losses[-1] < 0.6 * losses[0], losses
    assert acc > 0.6, acc          # chance 0.25
    assert les_acc > 0.9, les_acc  # majority baseline ~0.75 (3/4 positives)
    assert out["location_map"].min() >= 0 and out["location_map"].max() <= 1


# ---------------------------------------------------------------------------------------- patient network
def test_multiscale_parts():
    parts = multiscale_parts(torch.tensor([8, 1, 2]), 8, (1, 2, 3, 4))
    assert parts.shape == (3, 10, 8)
    p8 = parts[0].int()
    # s=3 over 8 slices: [0,2), [2,5), [5,8)
    assert p8[3].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert p8[4].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert p8[5].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    # every part non-empty and inside the valid prefix
    assert (parts.sum(-1) >= 1).all()
    assert not parts[1, :, 1:].any() and not parts[2, :, 2:].any()
    # each scale partitions the valid slices exactly when n >= s
    for s0, s in zip((0, 1, 3, 6), (1, 2, 3, 4)):
        assert (parts[0, s0:s0 + s].sum(0) == 1).all()


@pytest.mark.parametrize("n", [1, 2, 5, 37])
def test_patient_shapes_any_n(n):
    torch.manual_seed(0)
    net = M3LungPatientNet(24, heads=3, inner_dim=8).eval()
    out = net(torch.randn(2, n, 24))
    assert out["logits"].shape == (2, 4) and out["features"].shape == (2, 24)
    assert torch.isfinite(out["logits"]).all()


def test_patient_padding_invariance():
    torch.manual_seed(0)
    net = M3LungPatientNet(16, heads=2, inner_dim=8).eval()
    a, b = torch.randn(1, 7, 16), torch.randn(1, 37, 16)
    c = torch.randn(1, 1, 16)
    batch = torch.zeros(3, 37, 16)
    batch[0, :7], batch[1], batch[2, :1] = a[0], b[0], c[0]
    batch[0, 7:] = 1e3 * torch.randn(30, 16)  # garbage padding must not matter
    mask = torch.zeros(3, 37, dtype=torch.bool)
    mask[0, :7] = True
    mask[1] = True
    mask[2, :1] = True
    with torch.no_grad():
        padded = net(batch, mask)["logits"]
        single = torch.cat([net(a)["logits"], net(b)["logits"], net(c)["logits"]])
    torch.testing.assert_close(padded, single, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        net(batch, torch.zeros(3, 37, dtype=torch.bool))


def test_patient_ablation_variants_and_builders():
    full = M3LungPatientNet(16, heads=2, inner_dim=8)
    ahead = M3LungPatientNet(16, heads=2, inner_dim=8, refine=False)
    single = M3LungPatientNet(16, heads=2, inner_dim=8, refine=False, scales=(3,))
    assert len(full.refine) == 2 and len(ahead.refine) == 0
    assert n_params(full) - n_params(ahead) == 2 * (3 * (16 * 16 + 16) + (16 * 16 + 16))
    assert single.reduce.in_features == 3 * 16 and full.reduce.in_features == 10 * 16
    assert single(torch.randn(2, 2, 16))["logits"].shape == (2, 4)
    cpu = build_model("m3lung_patient_cpu")
    assert cpu.feature_dim == build_model("m3lung_slice_cpu").feature_dim
    assert cpu(torch.randn(1, 3, cpu.feature_dim))["logits"].shape == (1, 4)


def test_patient_net_learns_bags():
    """Label = which of 3 directions a few 'positive' slices are shifted along; 0 = none shifted."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    D = 16
    dirs = torch.eye(D)[:3] * 4.0

    def make(n_bags):
        ys, bags = [], []
        for _ in range(n_bags):
            n = int(torch.randint(3, 25, (1,), generator=gen))
            y = int(torch.randint(0, 4, (1,), generator=gen))
            f = torch.randn(n, D, generator=gen)
            if y:
                k = int(torch.randint(1, 4, (1,), generator=gen))
                idx = torch.randperm(n, generator=gen)[:k]
                f[idx] += dirs[y - 1]
            bags.append(f)
            ys.append(y)
        nmax = max(len(b) for b in bags)
        x = torch.zeros(n_bags, nmax, D)
        m = torch.zeros(n_bags, nmax, dtype=torch.bool)
        for i, b in enumerate(bags):
            x[i, :len(b)] = b
            m[i, :len(b)] = True
        return x, m, torch.tensor(ys)

    xtr, mtr, ytr = make(256)
    xte, mte, yte = make(128)
    net = M3LungPatientNet(D, heads=2, inner_dim=8)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    first = last = None
    for epoch in range(20):
        perm = torch.randperm(256, generator=gen)
        for b in range(0, 256, 64):
            i = perm[b:b + 64]
            loss = F.cross_entropy(net(xtr[i], mtr[i])["logits"], ytr[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            first = loss.item() if first is None else first
            last = loss.item()
    with torch.no_grad():
        acc = (net(xte, mte)["logits"].argmax(1) == yte).float().mean().item()
    assert last < 0.5 * first, (first, last)
    assert acc > 0.7, acc  # chance 0.25


# ------------------------------------------------------------------------------ non-parametric (Eq. 4-5)
def test_slice_probabilities_eq4():
    pl = torch.tensor([[0.8, 0.2], [0.1, 0.9]])
    pm = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1]])
    p = slice_probabilities(pl, pm)
    exp = torch.tensor([[0.8 + 0.2 * 0.5, 0.04, 0.04, 0.02], [0.1 + 0.09, 0.54, 0.18, 0.09]])
    torch.testing.assert_close(p, exp)
    torch.testing.assert_close(p.sum(1), torch.ones(2))


def test_non_parametric_assessment_eq5():
    H = [0.9, 0.05, 0.03, 0.02]
    C = [0.1, 0.7, 0.1, 0.1]
    N1 = [0.1, 0.1, 0.7, 0.1]
    A = [0.1, 0.1, 0.1, 0.7]
    # 100 slices, all healthy -> healthy
    assert non_parametric_assessment(torch.tensor([H] * 100)) == 0
    # 99 healthy + 1 CAP: 99/100 >= 0.99 -> healthy; 98 + 2 -> diseased (most frequent: CAP)
    assert non_parametric_assessment(torch.tensor([H] * 99 + [A])) == 0
    assert non_parametric_assessment(torch.tensor([H] * 98 + [A, A])) == 3
    # diseased: counts COVID 3, H1N1 2, CAP 1 -> COVID even though healthy is the majority
    assert non_parametric_assessment(torch.tensor([H] * 10 + [C] * 3 + [N1] * 2 + [A])) == 1
    assert non_parametric_assessment(torch.tensor([H] * 10 + [C] * 3 + [N1] * 2 + [A]), T=0.6) == 0
    assert non_parametric_assessment(torch.tensor([N1])) == 2
    # Eq. 4 path: lesion + multi-class probabilities
    pl = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    pm = torch.tensor([[0.1, 0.8, 0.05, 0.05], [0.1, 0.1, 0.1, 0.7]])
    # slice 0 -> p0 = 0.9 + 0.01 -> healthy; slice 1 -> p3 = 0.56 -> CAP; 1/2 < T -> CAP
    assert non_parametric_assessment(pl, class_probs=pm) == 3


def test_max_pool_assessment():
    p = torch.tensor([[0.9, 0.05, 0.03, 0.02], [0.3, 0.65, 0.03, 0.02], [0.2, 0.1, 0.95, 0.0]])
    assert max_pool_assessment(p) == 2
    assert max_pool_assessment(p[:2]) == 0
