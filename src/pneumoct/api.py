"""The Python API: small functional entry points that return results instead of writing files.

    import pneumoct
    dx = pneumoct.diagnose("study_folder/")          # a path, a SimpleITK image, or a canonical HU array + spacing
    dx.label, dx.abnormal_probability, dx.headline   # the same content as result.json: dx.result
    dx.save("out/")                                  # result.json, report.html, lung/lesion masks (write, then rename)
    labels = pneumoct.lung_mask(image)               # lungmask-style: image in, labels in the same geometry out

The command line (``pneumoct diagnose``) runs the same code (:func:`pneumoct.pipeline.analyse_study` and
:func:`pneumoct.pipeline.write_outputs`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Diagnosis", "diagnose", "lung_mask", "as_study"]


@dataclass
class Diagnosis:
    """An analysed study. ``result``: the ``result.json`` content (no files written until :meth:`save`)."""

    output: Any  # pneumoct.pipeline.DiagnoseOutput

    @property
    def result(self) -> dict[str, Any]:
        return self.output.result

    @property
    def label(self) -> str:
        return self.result["patient"]["label"]

    @property
    def abnormal_probability(self) -> float:
        return float(self.result["patient"]["abnormal_probability"])

    @property
    def headline(self) -> str:
        return self.result["patient"].get("headline", self.label)

    @property
    def lung_labels(self) -> np.ndarray:
        """(Z, Y, X) uint8, canonical orientation: 0 background, 1 right lung, 2 left lung."""
        return self.output.lung_labels

    @property
    def lesion_mask(self) -> np.ndarray:
        """(Z, Y, X) uint8, canonical orientation: 0 none, 1 ground-glass, 2 consolidation."""
        return self.output.lesion_mask

    def save(self, out_dir: str | Path, *, report: bool = True, masks: bool = True) -> dict[str, Any]:
        """Write result.json (last), report.html and the masks into ``out_dir``, as ``pneumoct diagnose`` does."""
        from .pipeline import write_outputs

        return write_outputs(self.output, out_dir, report=report, masks=masks)


def as_study(source: Any, spacing: tuple[float, float, float] | None = None):
    """A path (anything ``diagnose`` reads), a SimpleITK image (HU), a :class:`~pneumoct.types.StudyVolume`, or a
    (Z, Y, X) HU array already in canonical orientation (slices superior→inferior, rows anterior→posterior, columns
    patient right→left) with ``spacing`` (z, y, x) mm → a StudyVolume."""
    from .errors import PneumoctInputError
    from .types import SliceInfo, StudyVolume

    if isinstance(source, StudyVolume):
        return source
    if isinstance(source, (str, Path)):
        from .io import read_study

        return read_study(source)
    import SimpleITK as sitk

    if isinstance(source, sitk.Image):
        from .io.volume_files import study_from_image

        return study_from_image(source, label="SimpleITK image", fmt="image")
    arr = np.asarray(source)
    if arr.ndim != 3:
        raise PneumoctInputError("bad_image", f"expected a (Z, Y, X) HU array, got shape {arr.shape}")
    if spacing is None or len(spacing) != 3:
        raise PneumoctInputError("bad_argument", "an array needs spacing=(z, y, x) in mm")
    from .io import check_hounsfield

    check_hounsfield(arr, what="the array")
    hu = np.ascontiguousarray(np.clip(np.round(arr), -32768, 32767).astype(np.int16))
    # canonical orientation in LPS: columns +x (left), rows +y (posterior), slices toward the feet (-z)
    direction = np.diag([1.0, 1.0, -1.0])
    sz = float(spacing[0])
    slices = [SliceInfo(index=k, position_mm=-k * sz, source="array") for k in range(hu.shape[0])]
    return StudyVolume(hu=hu, spacing=tuple(float(s) for s in spacing), origin=(0.0, 0.0, 0.0),  # type: ignore
                       direction=direction, slices=slices, source_format="array")


def diagnose(source: Any, *, spacing: tuple[float, float, float] | None = None, **options: Any) -> Diagnosis:
    """Analyse a study without writing files. ``options``: any :class:`~pneumoct.pipeline.DiagnoseOptions` field
    (e.g. ``headline="rule"``, ``lesions="learned"``, ``use_learned_models=False``)."""
    import time

    from .pipeline import DiagnoseOptions, analyse_study

    timing: dict[str, float] = {}
    t = time.perf_counter()
    study = as_study(source, spacing)
    timing["read"] = time.perf_counter() - t
    # no file is written here: the report's images are rendered by save(), not in advance
    options.setdefault("write_report", False)
    out = analyse_study(study, DiagnoseOptions(**options), timing)
    timing["total"] = time.perf_counter() - t
    out.result["timing_s"] = {k: round(v, 3) for k, v in timing.items()}
    return Diagnosis(out)


def lung_mask(image: Any, *, spacing: tuple[float, float, float] | None = None):
    """Lung labels (0 background, 1 right, 2 left) in the input's own geometry: a SimpleITK image in → a SimpleITK
    label image on the same grid out; a path → a SimpleITK label image on the file's grid; a canonical array (with
    ``spacing``) → an array."""
    import SimpleITK as sitk

    from .preprocess.lung_mask import segment_lungs

    if isinstance(image, (str, Path)):
        from .io import read_study

        study = read_study(image)
        return _labels_image(segment_lungs(study).labels, study)
    study = as_study(image, spacing)
    labels = segment_lungs(study).labels.astype(np.uint8)
    if not isinstance(image, sitk.Image):
        return labels
    # back from the canonical (LPI) grid to the input's axis order, then the exact geometry of the input
    return _to_input_geometry(_labels_image(labels, study), image)


_SEGMENTERS: dict[str, Any] = {}


def segment(source: Any, *, spacing: tuple[float, float, float] | None = None, segmenter: str | Path | None = None,
            threshold: float = 0.5, binary: bool = False):
    """Lesion mask (0 background, 1 ground-glass, 2 consolidation; 0/1 with ``binary``) of a HU study in the
    input's own geometry, by the learned segmenter (bundled ``lesion_seg`` or the checkpoint folder
    ``segmenter``) — the code of ``pneumoct segment`` on a study. A SimpleITK image or a path in → a SimpleITK
    label image on the same grid; a canonical array (with ``spacing``) → an array. The segmenter is loaded once
    per process and folder. 8-bit 2D images: ``pneumoct segment`` / :func:`pneumoct.segmentation.segment_path`."""
    import SimpleITK as sitk

    from .errors import PneumoctInputError
    from .segmentation import load_segmenter, segment_study

    key = str(Path(segmenter).resolve()) if segmenter is not None else ""
    if key not in _SEGMENTERS:
        seg = load_segmenter(segmenter)
        if seg is None:
            raise PneumoctInputError("no_model", "no lesion segmenter installed (weights/lesion_seg); pass segmenter=")
        _SEGMENTERS[key] = seg
    if isinstance(source, (str, Path)):
        from .io import read_study

        study = read_study(source)
    else:
        study = as_study(source, spacing)
    if study.is_2d_image:
        raise PneumoctInputError("bad_input", "pneumoct.segment takes a HU study; use pneumoct.segmentation."
                                 "segment_path for 8-bit 2D images")
    mask = segment_study(study, _SEGMENTERS[key], binary=binary, threshold=threshold)[0]
    if isinstance(source, (str, Path)):
        return _labels_image(mask, study)
    if not isinstance(source, sitk.Image):
        return mask
    return _to_input_geometry(_labels_image(mask, study), source)


def _to_input_geometry(out, image):
    """A label image on the canonical (LPI) grid → the input image's axis order and exact geometry."""
    import SimpleITK as sitk

    out = sitk.DICOMOrient(out, sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection()))
    out.CopyInformation(image)
    return out


def _labels_image(labels: np.ndarray, study):
    from .io.writers import array_to_image

    return array_to_image(np.asarray(labels, np.uint8), study)
