"""pneumoct: explainable pneumonia screening from chest CT (research use only, not a medical device).

Python API (``pneumoct.api``): ``pneumoct.diagnose(source)`` → a :class:`~pneumoct.api.Diagnosis`,
``pneumoct.lung_mask(image)`` → lung labels and ``pneumoct.segment(image)`` → the lesion mask, both in the image's
geometry. Imported lazily so ``import pneumoct`` stays light.
"""
from ._version import __version__

__all__ = ["diagnose", "lung_mask", "segment", "Diagnosis", "__version__"]


def __getattr__(name: str):
    if name in ("diagnose", "lung_mask", "segment", "Diagnosis"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'pneumoct' has no attribute {name!r}")
