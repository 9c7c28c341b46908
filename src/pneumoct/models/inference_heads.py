"""What inference needs from each shipped 2D network, as a small PyTorch wrapper with named array outputs.

The same wrapper runs in PyTorch and is what :mod:`pneumoct.models.onnx_runtime` exports, so both backends give
``diagnose`` / ``segment`` the same named outputs (the probabilities, not logits; the displayed CAM already
upsampled and normalised):

=====================  ===========================  =============================================================
head                   input                        outputs
=====================  ===========================  =============================================================
``segmentation``       ``x`` (B, C, S, S) in [0, 1]  ``probabilities`` (B, K', S, S): sigmoid (1 channel) or softmax
``lesion_presence``    ``x`` (B, C, S, S)            ``probability`` (B,) P(lesion); ``cam`` (B, S, S) in [0, 1]
``m3lung_slice``       ``x`` (B, C, S, S)            ``class_probabilities`` (B, 4), ``features`` (B, D), and
                                                     when the net is multi-task ``lesion_probability`` (B,),
                                                     ``location_map`` (B, S, S)
``m3lung_patient``     ``features`` (1, N, D)        ``probabilities`` (1, K)
=====================  ===========================  =============================================================
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checkpoint import channels_last_input

__all__ = ["HEADS", "head_for", "build_head", "example_inputs", "DISPLAY_CAM_SCALE"]

HEADS = ("segmentation", "lesion_presence", "m3lung_slice", "m3lung_patient")

#: the CAM scale shown: on real lesion masks Conv4 pointed at lesions most often (0.85 vs 0.67 for the joint
#: product, which is too peaky to read; benchmarks/RESULTS.md); without Conv4, the joint product (Hu et al.)
DISPLAY_CAM_SCALE = "conv4"


#: the inference head of each model family that has one (the 3D families run in PyTorch, see volumetric.py)
HEAD_OF_FAMILY = {"segmentation": "segmentation", "multiscale_cam": "lesion_presence",
                  "m3lung_slice": "m3lung_slice", "m3lung_patient": "m3lung_patient"}


def head_for(info: dict) -> str | None:
    """The head a checkpoint's ``model.json`` calls for (None: no 2D inference head, e.g. a 3D network)."""
    from ..errors import PneumoctInputError
    from . import family_of

    family = (info.get("meta") or {}).get("family")
    try:
        family = family or family_of(str(info.get("model_name", "")))
    except PneumoctInputError:
        return None
    return HEAD_OF_FAMILY.get(family)


def example_inputs(head: str, info: dict, batch: int = 2) -> dict[str, torch.Tensor]:
    """Seeded example inputs of the head's shapes (for export and its check)."""
    meta = info.get("meta") or {}
    g = torch.Generator().manual_seed(0)
    if head == "m3lung_patient":
        dim = int(info["model_kwargs"].get("feature_dim", 384))
        return {"features": torch.randn(1, 7, dim, generator=g)}
    size, ch = int(meta.get("input_size", 128)), int(meta.get("channels", 1))
    return {"x": torch.rand(batch, ch, size, size, generator=g)}


class _Head(torch.nn.Module):
    outputs: tuple[str, ...] = ()

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net.eval()


class SegmentationHead(_Head):
    outputs = ("probabilities",)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        res = self.net(channels_last_input(self.net, x))
        logits = (res["logits"] if isinstance(res, dict) else res).float()
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        return (torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, 1),)


class LesionPresenceHead(_Head):
    outputs = ("probability", "cam")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        res = self.net(channels_last_input(self.net, x))
        maps = res["maps"]
        if DISPLAY_CAM_SCALE in maps:
            maps = {DISPLAY_CAM_SCALE: maps[DISPLAY_CAM_SCALE]}
        joint = None
        for m in maps.values():  # the lesion class's map, upsampled to the input and min-max normalised
            up = F.interpolate(m[:, 1:2].float(), size=tuple(x.shape[-2:]), mode="bilinear",
                               align_corners=False)[:, 0]
            lo = up.flatten(1).amin(1)[:, None, None]
            hi = up.flatten(1).amax(1)[:, None, None]
            up = (up - lo) / (hi - lo).clamp_min(1e-8)
            joint = up if joint is None else joint * up
        return torch.softmax(res["logits"], 1)[:, 1], joint


class M3LungSliceHead(_Head):
    def __init__(self, net: torch.nn.Module, multitask: bool):
        super().__init__(net)
        self.multitask = bool(multitask)
        self.outputs = ("class_probabilities", "features") + (
            ("lesion_probability", "location_map") if self.multitask else ())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        res = self.net(channels_last_input(self.net, x))
        out = (torch.softmax(res["class_logits"], 1), res["features"])
        if self.multitask:
            out += (torch.softmax(res["lesion_logits"], 1)[:, 1], res["location_map_full"])
        return out


class M3LungPatientHead(_Head):
    outputs = ("probabilities",)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (torch.softmax(self.net(features)["logits"], 1),)


def build_head(head: str, net: torch.nn.Module, info: dict) -> _Head:
    """Wrap a loaded network (eval mode) in its head; ``head`` from :func:`head_for`."""
    if head == "segmentation":
        return SegmentationHead(net).eval()
    if head == "lesion_presence":
        return LesionPresenceHead(net).eval()
    if head == "m3lung_slice":
        with torch.inference_mode():  # which optional outputs this network has (multi-task or not)
            res = net(example_inputs(head, info, batch=1)["x"])
        return M3LungSliceHead(net, res.get("lesion_logits") is not None
                               and res.get("location_map_full") is not None).eval()
    if head == "m3lung_patient":
        return M3LungPatientHead(net).eval()
    raise ValueError(f"unknown inference head {head!r}; known: {', '.join(HEADS)}")


def run_head(head: _Head, inputs: dict) -> dict:
    """Run a head in PyTorch on NumPy inputs → ``{output name: float32 array}``."""
    import numpy as np

    with torch.inference_mode():
        # writeable C-contiguous float32 (a broadcast view is read-only: PyTorch warns on those)
        res = head(**{k: torch.from_numpy(np.require(v, np.float32, ["C", "W"])) for k, v in inputs.items()})
    return {name: t.float().numpy() for name, t in zip(head.outputs, res)}
