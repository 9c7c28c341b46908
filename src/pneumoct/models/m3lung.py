"""M3Lung-Sys (Qian et al., "M3Lung-Sys: A Deep Learning System for Multi-Class Lung Pneumonia Screening
from CT Imaging"): slice-level and patient-level classification networks.

Slice level (Sec. III-B, Fig. 5) -- :class:`M3LungSliceNet`
    ResNet trunk (ResNet-50 in the paper). After ResBlock3 an extra 2-way head (lesion / no lesion) is
    trained jointly with the 4-way head after ResBlock4 (multi-task). The 2 x D3 weights of that head are
    two class prototypes; the distance between the prototype of the *predicted* lesion class and every
    position of the ResBlock3 feature map gives the weakly-supervised lesion location map, which is used as
    attention on the ResBlock3 features; 3 coordinate channels (x, y in [-1, 1], distance to the centre)
    are concatenated before ResBlock4.

Patient level (Sec. III-C, Fig. 6) -- :class:`M3LungPatientNet`
    Input: per-slice features (ResBlock3 (+) ResBlock4, pooled). Multi-scale splitting of the slice
    sequence (S = [1, 2, 3, 4]); a shared feature refinement (2 multi-head self-attention layers with skip
    connections, Eq. 1-3) and aggregation (a learnable query ``k``) head on every part; concatenation,
    one FC back to D, and a classifier.

Non-parametric baselines (Appendix, Eq. 4-5): :func:`non_parametric_assessment`, :func:`max_pool_assessment`.

Readings of the paper where the text is ambiguous (the OCR of Eq. 2 and Eq. 4-5 is damaged):

* Location map: "calculate the distance between [the predicted class's prototype] and each point of the
  image feature". We use the cosine distance ``d(p) = 1 - cos(f(p), w_c)`` by default (``map_distance=
  "euclidean"`` gives ``||f(p) - w_c||``, which on our toy test was ruled by the feature norm and pointed away
  from the evidence; see docs/explanations.md) and turn it into a map in
  [0, 1] by per-image min-max normalisation: ``A = 1 - (d - min d) / (max d - min d)`` (closest = 1), as
  CAM maps are usually normalised. The prototype follows the predicted class as the paper says (option
  ``map_prototype="lesion"`` always uses the 'with lesion' prototype instead). The map keeps its gradient
  w.r.t. features and prototypes; only the class selection (argmax) is discrete.
* Attention use: the paper only says the map is "regarded as an attention map" and fed to ResBlock4
  "together with the image feature". We apply it multiplicatively in residual form, ``f * (1 + A)``
  (Residual Attention Network style), so regions far from the prototype are not zeroed.
* Coordinate maps: x, y normalised to [-1, 1] (``2 i / (W - 1) - 1``), ``d = sqrt(x^2 + y^2)`` not
  normalised (range [0, sqrt 2]), as in the text.
* Refinement (Eq. 1-3): slice-to-slice attention. ``H`` is computed between slices (per head, an
  N x N matrix), row-normalised over j (Eq. 2 divides by the sum over j; we normalise exponentiated
  scaled dot products, i.e. a softmax, since raw dot products can be negative), ``F_out = f4(H F3) + F``.
  (The damaged Eq. 2 could also be read as a D' x D' channel attention; we chose slice attention because
  the aggregation module, "similar to the refinement module", must mix *slices* to reduce N to 1.)
  Each head has its own D'-dim subspace (the paper uses D'=512, h=12, which is not divisible), so
  f1..f3 map D -> h*D' and f4 maps h*D' -> D.
* "Learnable k" in the aggregation module: the paper says the first FC layer is *replaced by a learnable
  parameter k in R^{1 x D}*; i.e. ``k`` is a learned query vector (not a top-k count):
  ``H = softmax(k F2^T / sqrt(D))`` in R^{1 x N}, ``out = H F3`` in R^{1 x D``; single head, no last FC.
  This is differentiable by construction.
* Multi-scale splitting: a sequence of n valid slices is cut into s contiguous parts
  ``[floor(i n / s), floor((i+1) n / s))``; when n < s an empty part takes the single slice
  ``floor(i n / s)`` so any n >= 1 works. Refinement attention is restricted to the part (the head is
  "applied to each part"). Padded slices (mask False) are never attended to, so padding does not change
  the output.
* Eq. 4: ``p0 = P_l^0 + P_l^1 * P_m^0`` and ``pk = P_l^1 * P_m^k`` (k = 1..3), with P_l^0 = no lesion,
  P_l^1 = lesion. Eq. 5: ``N^k`` = number of slices whose argmax of p is k; Healthy if N^0 / N >= T,
  else argmax_{k in 1..3} N^k (first on ties).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import register
from .blocks import resnet_trunk

__all__ = [
    "M3LungSliceNet", "M3LungPatientNet", "coordinate_maps", "non_parametric_assessment",
    "max_pool_assessment", "slice_probabilities", "multiscale_parts",
]


# --------------------------------------------------------------------------------------------- slice level
def coordinate_maps(h: int, w: int, device=None, dtype=None) -> torch.Tensor:
    """(3, h, w): x and y normalised to [-1, 1] and the distance to the centre (Sec. III-B-3)."""
    xs = torch.arange(w, device=device, dtype=dtype or torch.float32)
    ys = torch.arange(h, device=device, dtype=dtype or torch.float32)
    xs = 2 * xs / (w - 1) - 1 if w > 1 else torch.zeros_like(xs)
    ys = 2 * ys / (h - 1) - 1 if h > 1 else torch.zeros_like(ys)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    d = torch.sqrt(xx ** 2 + yy ** 2)
    return torch.stack([xx, yy, d], 0)


class M3LungSliceNet(nn.Module):
    """Slice-level classifier (M3Lung-Sys Sec. III-B, Fig. 5).

    Forward ``x: (B, C, H, W)`` -> dict with ``class_logits (B, num_classes)``, ``lesion_logits (B, 2)``,
    ``location_map (B, h, w)`` in [0, 1] (ResBlock3 resolution, stride 16), ``location_map_full
    (B, H, W)`` (bilinearly registered to the input) and ``features (B, D3 + D4)`` (GAP of ResBlock3 and
    ResBlock4, the patient network's input). ``lesion_logits``/``location_map*`` are ``None`` when
    ``multitask=False``.

    Ablation flags (Table V): ``multitask`` (the ResBlock3 lesion head), ``attention`` (needs
    ``multitask``: the prototypes come from that head), ``coordinates``.
    """

    def __init__(self, depth: int = 50, num_classes: int = 4, in_channels: int = 3, width_mult: float = 1.0,
                 multitask: bool = True, attention: bool = True, coordinates: bool = True,
                 map_prototype: str = "predicted", map_distance: str = "cosine") -> None:
        super().__init__()
        if attention and not multitask:
            raise ValueError("attention needs multitask=True (the prototypes are the lesion head's weights)")
        if map_prototype not in ("predicted", "lesion"):
            raise ValueError("map_prototype must be 'predicted' or 'lesion'")
        self.multitask, self.attention, self.coordinates = multitask, attention, coordinates
        self.map_prototype = map_prototype
        if map_distance not in ("cosine", "euclidean"):
            raise ValueError("map_distance must be 'cosine' or 'euclidean'")
        self.map_distance = map_distance
        self.trunk = resnet_trunk(depth, in_channels, width_mult,
                                  extra_in_channels=(0, 0, 0, 3 if coordinates else 0))
        d3, d4 = self.trunk.out_channels[2], self.trunk.out_channels[3]
        self.feature_dim = d3 + d4
        # the 2 x D3 weights are the two prototypes ('without lesion' = 0, 'with lesion' = 1)
        self.lesion_head = nn.Linear(d3, 2) if multitask else None
        self.classifier = nn.Linear(d4, num_classes)

    def location_map(self, f3: torch.Tensor, lesion_logits: torch.Tensor) -> torch.Tensor:
        """(B, h, w) in [0, 1]: 1 = closest to the selected prototype (see module docstring)."""
        assert self.lesion_head is not None
        w = self.lesion_head.weight  # (2, D3)
        if self.map_prototype == "predicted":
            idx = lesion_logits.argmax(1)
        else:
            idx = torch.ones(f3.shape[0], dtype=torch.long, device=f3.device)
        proto = w[idx]  # (B, D3)
        if self.map_distance == "cosine":
            # cosine distance: the prototypes (classifier weights) and the ReLU features live at very different
            # scales, and the Euclidean distance is then ruled by the feature norm (strongly activated = far),
            # which inverted the map on our toy localisation test; the angle keeps "closer = more like the class"
            dist = 1 - F.cosine_similarity(f3, proto[:, :, None, None].expand_as(f3), dim=1, eps=1e-6)
        else:
            dist = torch.sqrt(((f3 - proto[:, :, None, None]) ** 2).sum(1) + 1e-12)  # (B, h, w)
        flat = dist.flatten(1)
        lo = flat.min(1, keepdim=True).values
        hi = flat.max(1, keepdim=True).values
        amap = 1 - (flat - lo) / (hi - lo + 1e-6)
        return amap.clamp(0, 1).view_as(dist)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        H, W = x.shape[-2:]
        t = self.trunk
        f = t.stem(x)
        f1 = t.stages[0](f)
        f2 = t.stages[1](f1)
        f3 = t.stages[2](f2)                                   # ResBlock3 output
        g3 = f3.mean((2, 3))
        lesion_logits = amap = amap_full = None
        z = f3
        if self.multitask:
            lesion_logits = self.lesion_head(g3)               # multi-task head after ResBlock3
            amap = self.location_map(f3, lesion_logits)
            amap_full = F.interpolate(amap[:, None], size=(H, W), mode="bilinear",
                                      align_corners=False)[:, 0].clamp(0, 1)
            if self.attention:
                z = f3 * (1 + amap[:, None])                   # map used as (residual) attention
        if self.coordinates:
            h, w = f3.shape[-2:]
            coords = coordinate_maps(h, w, f3.device, f3.dtype).expand(f3.shape[0], -1, -1, -1)
            z = torch.cat([z, coords], 1)                      # concatenated before ResBlock4
        f4 = t.stages[3](z)
        g4 = f4.mean((2, 3))
        return {
            "class_logits": self.classifier(g4),
            "lesion_logits": lesion_logits,
            "location_map": amap,
            "location_map_full": amap_full,
            "features": torch.cat([g3, g4], 1),
        }


def slice_loss(out: dict, class_target: torch.Tensor, lesion_target: torch.Tensor | None = None,
               lesion_weight: float = 1.0) -> torch.Tensor:
    """Standard cross-entropy on both tasks (Sec. IV-A). ``lesion_target`` defaults to ``class != 0``."""
    loss = F.cross_entropy(out["class_logits"], class_target)
    if out.get("lesion_logits") is not None:
        if lesion_target is None:
            lesion_target = (class_target != 0).long()
        loss = loss + lesion_weight * F.cross_entropy(out["lesion_logits"], lesion_target)
    return loss


@register("m3lung_slice")
def m3lung_slice(num_classes: int = 4, in_channels: int = 3, **kw) -> M3LungSliceNet:
    """The paper's configuration: ResNet-50 (no pretrained weights are fetched here)."""
    kw.setdefault("depth", 50)
    return M3LungSliceNet(num_classes=num_classes, in_channels=in_channels, **kw)


@register("m3lung_slice_cpu")
def m3lung_slice_cpu(num_classes: int = 4, in_channels: int = 3, **kw) -> M3LungSliceNet:
    """Light CPU variant: ResNet-18 with halved widths."""
    kw.setdefault("depth", 18)
    kw.setdefault("width_mult", 0.5)
    return M3LungSliceNet(num_classes=num_classes, in_channels=in_channels, **kw)


# ------------------------------------------------------------------------------------------- patient level
def multiscale_parts(lengths: torch.Tensor, n_max: int, scales: Sequence[int]) -> torch.Tensor:
    """Membership mask (B, P, n_max), P = sum(scales): part (s, i) of sample b holds its slices
    ``[floor(i n / s), floor((i+1) n / s))`` (n = valid length); an empty part takes slice floor(i n / s)."""
    B = lengths.shape[0]
    j = torch.arange(n_max, device=lengths.device)[None, :]
    rows = []
    for s in scales:
        for i in range(s):
            start = (i * lengths) // s
            end = ((i + 1) * lengths) // s
            end = torch.maximum(end, start + 1)
            rows.append((j >= start[:, None]) & (j < end[:, None]))
    return torch.stack(rows, 1).view(B, len(rows), n_max)


class RefinementLayer(nn.Module):
    """One feature refinement layer: multi-head slice self-attention + FC back to D + skip (Eq. 1-3)."""

    def __init__(self, dim: int, inner_dim: int, heads: int) -> None:
        super().__init__()
        self.h, self.dk = heads, inner_dim
        self.f1 = nn.Linear(dim, heads * inner_dim)  # Eq. (1): three parallel FC layers (D -> D')
        self.f2 = nn.Linear(dim, heads * inner_dim)
        self.f3 = nn.Linear(dim, heads * inner_dim)
        self.f4 = nn.Linear(heads * inner_dim, dim)  # Eq. (3): expand back to D

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D); key_mask: (B, N) bool, every row with >= 1 True."""
        B, N, _ = x.shape
        q = self.f1(x).view(B, N, self.h, self.dk).transpose(1, 2)  # (B, h, N, D')
        k = self.f2(x).view(B, N, self.h, self.dk).transpose(1, 2)
        v = self.f3(x).view(B, N, self.h, self.dk).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) / math.sqrt(self.dk)       # M3Lung-Sys Eq. (2): F1 F2^T ...
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        H = logits.softmax(-1)                                       # ... normalised over j
        out = (H @ v).transpose(1, 2).reshape(B, N, self.h * self.dk)
        return x + self.f4(out)                                      # Eq. (3) + skip connection


class AggregationLayer(nn.Module):
    """Aggregation: Eq. 1-2 with the first FC replaced by a learnable query k in R^{1 x D}, no multi-head,
    no last FC: N x D -> 1 x D."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.randn(dim) / math.sqrt(dim))    # learnable k (replaces f_theta1)
        self.f2 = nn.Linear(dim, dim)
        self.f3 = nn.Linear(dim, dim)
        self.scale = 1 / math.sqrt(dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        logits = (self.f2(x) @ self.k) * self.scale                  # (B, N): k F2^T, Eq. (2)
        H = logits.masked_fill(~key_mask, float("-inf")).softmax(-1)
        return (H[:, :, None] * self.f3(x)).sum(1)                   # H F3 -> (B, D)


class M3LungPatientNet(nn.Module):
    """Patient-level classifier (M3Lung-Sys Sec. III-C, Fig. 6).

    ``forward(feats (B, N, D), mask (B, N) bool | None)`` -> dict ``logits (B, num_classes)`` and
    ``features (B, D)``. ``refine=False`` gives the 'A. Head' ablation (Table IV); ``scales=(3,)`` the
    single-scale one.
    """

    def __init__(self, feature_dim: int, num_classes: int = 4, heads: int = 12, inner_dim: int = 512,
                 scales: Sequence[int] = (1, 2, 3, 4), refine_layers: int = 2, refine: bool = True) -> None:
        super().__init__()
        if not scales or any(int(s) < 1 for s in scales):
            raise ValueError("scales must be positive integers")
        self.scales = tuple(int(s) for s in scales)
        self.feature_dim = feature_dim
        self.refine = nn.ModuleList(
            [RefinementLayer(feature_dim, inner_dim, heads) for _ in range(refine_layers if refine else 0)])
        self.aggregate = AggregationLayer(feature_dim)
        self.reduce = nn.Linear(sum(self.scales) * feature_dim, feature_dim)  # sum_k s_k D -> D
        self.classifier = nn.Linear(feature_dim, num_classes)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if feats.dim() != 3:
            raise ValueError("feats must be (B, N, D)")
        B, N, D = feats.shape
        if N == 0:
            raise ValueError("need at least one slice")
        if mask is None:
            mask = torch.ones(B, N, dtype=torch.bool, device=feats.device)
        mask = mask.bool()
        lengths = mask.sum(1)
        if (lengths == 0).any():
            raise ValueError("every sample needs at least one valid slice")
        if not bool((mask == (torch.arange(N, device=feats.device)[None] < lengths[:, None])).all()):
            raise ValueError("mask must mark a prefix of valid slices (pad at the end)")
        parts = multiscale_parts(lengths, N, self.scales)          # (B, P, N), subsets of the valid prefix
        P = parts.shape[1]
        x = feats[:, None].expand(B, P, N, D).reshape(B * P, N, D)  # the shared head runs on every part
        km = parts.reshape(B * P, N)
        for layer in self.refine:
            x = layer(x, km)
        agg = self.aggregate(x, km).view(B, P * D)                 # concat over parts of all scales
        z = self.reduce(agg)
        return {"logits": self.classifier(F.relu(z)), "features": z}


@register("m3lung_patient")
def m3lung_patient(feature_dim: int = 1024 + 2048, num_classes: int = 4, **kw) -> M3LungPatientNet:
    """Paper configuration: D' = 512, h = 12, S = [1, 2, 3, 4]; D = ResNet-50 ResBlock3 + ResBlock4."""
    return M3LungPatientNet(feature_dim, num_classes, **kw)


@register("m3lung_patient_cpu")
def m3lung_patient_cpu(feature_dim: int = 128 + 256, num_classes: int = 4, **kw) -> M3LungPatientNet:
    """Light variant matching ``m3lung_slice_cpu`` features (D = 128 + 256): D' = 64, h = 4."""
    kw.setdefault("heads", 4)
    kw.setdefault("inner_dim", 64)
    return M3LungPatientNet(feature_dim, num_classes, **kw)


# ------------------------------------------------------------------------------- non-parametric baselines
def slice_probabilities(lesion_probs: torch.Tensor, class_probs: torch.Tensor) -> torch.Tensor:
    """M3Lung-Sys Eq. (4): (N, 2) lesion and (N, 4) class probabilities -> (N, 4) slice probabilities
    ``p0 = P_l^0 + P_l^1 P_m^0``, ``pk = P_l^1 P_m^k``."""
    pl0, pl1 = lesion_probs[..., :1], lesion_probs[..., 1:2]
    p = pl1 * class_probs
    return torch.cat([pl0 + p[..., :1], p[..., 1:]], -1)


def non_parametric_assessment(slice_probs: torch.Tensor, T: float = 0.99,
                              class_probs: torch.Tensor | None = None) -> int:
    """M3Lung-Sys Eq. (5). ``slice_probs``: (N, 4) final slice probabilities (or (N, 2) lesion
    probabilities together with ``class_probs`` (N, 4), combined by Eq. (4)). Returns the class index:
    0 (Healthy) if the fraction of slices whose argmax is 0 is >= T, else the most frequent of 1..3."""
    p = torch.as_tensor(slice_probs, dtype=torch.float64)
    if class_probs is not None:
        p = slice_probabilities(p, torch.as_tensor(class_probs, dtype=torch.float64))
    if p.dim() != 2 or p.shape[0] == 0:
        raise ValueError("slice_probs must be (N, K) with N >= 1")
    # N^k = sum_i delta(max p_i - p_i^k)
    counts = (p == p.max(1, keepdim=True).values).sum(0)
    if counts[0].item() / p.shape[0] >= T:
        return 0
    return 1 + int(torch.argmax(counts[1:]).item())


def max_pool_assessment(slice_probs: torch.Tensor) -> int:
    """Ablation baseline (Table IV 'Max pooling' pools features; this is its probability analogue):
    max-pool the (N, K) slice probabilities over slices and return the argmax of the pooled vector."""
    p = torch.as_tensor(slice_probs, dtype=torch.float64)
    if p.dim() != 2 or p.shape[0] == 0:
        raise ValueError("slice_probs must be (N, K) with N >= 1")
    return int(torch.argmax(p.max(0).values).item())
