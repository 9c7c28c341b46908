"""The volumetric (3D) systems `pneumoct diagnose --model NAME` can run beside the 2D pipeline.

Each system is a function ``analyse(study, lung_labels, weights_dir=None) -> VolumetricOutput`` living with its
model (``pneumoct.models.<family>_system``), looked up by name in :data:`SYSTEMS` and imported only when asked for
(so `diagnose` without ``--model`` never imports them). Its class probabilities go to a research panel of the
report, never to the headline (nothing validated only on phantoms may drive it); its maps are written as NIfTI in
the study's geometry and drawn in the report; its lesion mask, if any, can feed the quantification
(``--lesions NAME``) like the 2D masks.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

#: system name → "module:function"
SYSTEMS: dict[str, str] = {
    "deepsc": "pneumoct.models.deepsc_system:analyse",
    "dual-sampling": "pneumoct.models.dual_sampling_system:analyse",
}


@dataclass
class VolumetricOutput:
    """What one 3D system says about a study. Arrays are on the study grid, canonical (Z, Y, X)."""

    system: str
    class_names: tuple[str, ...]  # the classes its head predicts, in output order
    probabilities: dict[str, float]  # class name → probability (sums to 1)
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # name → (Z, Y, X) float32 in [0, 1]
    lesion_mask: np.ndarray | None = None  # (Z, Y, X) uint8, 0 none / 1 lesion (or 1 GGO / 2 consolidation)
    info: dict[str, Any] = field(default_factory=dict)  # weights, their training data, validation, timings

    def check(self, shape: tuple[int, int, int]) -> "VolumetricOutput":
        """Raise ValueError unless every array has the study's shape and the probabilities are a distribution."""
        for name, m in self.maps.items():
            if m.shape != shape:
                raise ValueError(f"{self.system}: map {name!r} has shape {m.shape}, study {shape}")
        if self.lesion_mask is not None and self.lesion_mask.shape != shape:
            raise ValueError(f"{self.system}: lesion mask shape {self.lesion_mask.shape}, study {shape}")
        total = sum(self.probabilities.values())
        if set(self.probabilities) != set(self.class_names) or abs(total - 1.0) > 1e-3:
            raise ValueError(f"{self.system}: probabilities {self.probabilities} do not match {self.class_names}")
        return self


def system_function(name: str) -> Callable[..., VolumetricOutput]:
    if name not in SYSTEMS:
        raise ValueError(f"unknown 3D model {name!r}; choose from {', '.join(SYSTEMS)}")
    module, func = SYSTEMS[name].split(":")
    return getattr(importlib.import_module(module), func)


def run_system(name: str, study: Any, lung_labels: np.ndarray, weights_dir: str | None = None, *,
               lesion_mask: np.ndarray | None = None) -> VolumetricOutput:
    """Run the 3D system ``name`` on a study (a :class:`~pneumoct.types.StudyVolume`) and its lung labels.
    ``lesion_mask``: a lesion mask the caller already has (e.g. the threshold baseline's), handed to systems that
    take one (the dual-sampling ensemble's infection ratio) so they need not find the lesions again."""
    func = system_function(name)
    extra = {"lesion_mask": lesion_mask} if (lesion_mask is not None
                                             and "lesion_mask" in inspect.signature(func).parameters) else {}
    return func(study, lung_labels, weights_dir=weights_dir, **extra).check(tuple(study.hu.shape))
