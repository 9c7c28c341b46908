"""Lesion segmentation with a trained 2D segmenter (``pneumoct segment``; see docs/segment.md).

    seg = load_segmenter()                      # bundled weights/lesion_seg, or None when absent
    out = segment_volume(hu, lung_labels, seg)  # (Z, Y, X) mask 0/1/2 (or 0/1) + float16 lesion probability
    mask = segment_image(grey8, seg)            # one 8-bit 2D image -> (Y, X) uint8
    segment_path(input, out_dir)                # a study -> lesion_mask.nii.gz; 2D image(s) -> PNG masks

Every slice goes through :mod:`pneumoct.preprocess.slice_input` (the same lung box, resize and window the
training tables use), the network runs on the crops, and its probabilities are resized back onto the crop's lung
box of the slice (bilinear, as :func:`~pneumoct.preprocess.slice_input.map_back_to_slice`), thresholded, and kept
only inside the lung mask dilated by a few pixels (``lung_margin_px``; 5 mm on CT): a lesion is never reported in
the chest wall, the mediastinum or outside the body, while consolidation against the pleura that the lung mask
missed by a pixel or two is kept. Slices with too little lung are not offered to the network and stay empty.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .errors import PneumoctInputError
from .parallel import run_chunks
from .preprocess.resample import resize_bilinear
from .preprocess.slice_input import (
    LESION_MODEL_WINDOW,
    SliceInputs,
    crop_slice,
    grey_to_unit,
    harmonise,
)
from .types import LESION_CONSOLIDATION, LESION_GGO

log = logging.getLogger("pneumoct.segmentation")

__all__ = ["Segmenter", "SegmentationOutput", "load_segmenter", "segment_volume", "segment_image",
           "segment_path", "BUNDLED_KEY", "MASK_NAME", "JSON_NAME"]

BUNDLED_KEY = "lesion_seg"
MASK_NAME = "lesion_mask.nii.gz"
JSON_NAME = "segment.json"
DEFAULT_LUNG_MARGIN_MM = 5.0
DEFAULT_LUNG_MARGIN_PX_2D = 3  # 2D images carry no pixel size
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class Segmenter:
    """A loaded segmentation network and its checkpoint info (``meta`` from ``model.json``): ``onnx`` (an
    :class:`~pneumoct.models.onnx_runtime.OnnxNet`) when the checkpoint carries a current ONNX export and ONNX
    Runtime is installed — no PyTorch is imported then — else ``model``, the PyTorch network."""

    model: Any
    info: dict
    path: Path
    onnx: Any = None

    @property
    def backend(self) -> str:
        return "onnxruntime" if self.onnx is not None else "torch"

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """``x`` (B, S, S) network inputs in [0, 1] (the model's input transform applied) → (B, K', S, S) float32
        probabilities: K' = 1 (sigmoid) for a one-output model, K (softmax) otherwise."""
        x = np.ascontiguousarray(x, dtype=np.float32)[:, None]
        if self.channels > 1:
            x = np.ascontiguousarray(np.broadcast_to(x, (x.shape[0], self.channels) + x.shape[2:]))
        if self.onnx is not None:
            return self.onnx(x)
        from .models.inference_heads import SegmentationHead, run_head

        return run_head(SegmentationHead(self.model), {"x": x})["probabilities"]

    @property
    def meta(self) -> dict:
        return dict(self.info.get("meta") or {})

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes", 1))

    @property
    def input_size(self) -> int:
        return int(self.meta.get("input_size", 128))

    @property
    def channels(self) -> int:
        return int(self.meta.get("channels", 1))

    @property
    def window(self) -> tuple[float, float]:
        w = self.meta.get("window") or list(LESION_MODEL_WINDOW)
        return float(w[0]), float(w[1])

    def provenance(self) -> dict:
        m = self.meta
        return {
            "architecture": self.info.get("model_name"),
            "checkpoint": str(self.path),
            "backend": self.backend,
            "sha256": self.info.get("sha256"),
            "num_classes": self.num_classes,
            "classes": m.get("classes"),
            "input_size": self.input_size,
            "window": list(self.window),
            "trained_on": m.get("trained_on", "unknown"),
            "data_kind": m.get("data_kind", "unknown"),
            "validation": m.get("validation_summary"),
        }


@dataclass
class SegmentationOutput:
    """``mask`` (Z, Y, X) uint8: 0 background, 1 GGO, 2 consolidation (multi-class) or 0/1 (binary model);
    ``probability`` (Z, Y, X) float16 lesion probability on the slices where it reaches the threshold somewhere
    (0 outside the lung boxes and on the other slices, which are not mapped back); ``timing`` seconds."""

    mask: np.ndarray
    probability: np.ndarray
    timing: dict[str, float] = field(default_factory=dict)
    slices_run: np.ndarray | None = None  # z indices offered to the network


def load_segmenter(path: str | Path | None = None) -> Segmenter | None:
    """A checkpoint folder, or the bundled ``weights/lesion_seg`` (``$PNEUMOCT_WEIGHTS`` honoured) when None.

    Returns None when no path is given and no bundled segmenter exists. A given path that is not a finished
    segmentation checkpoint is a :class:`PneumoctInputError`. The network runs with ONNX Runtime when the folder
    holds a current ONNX export (:mod:`pneumoct.models.onnx_runtime`; PyTorch is then never imported), else with
    PyTorch (``PNEUMOCT_BACKEND=torch`` forces it)."""
    from .models.checkpoint_info import read_checkpoint_info
    from .models.onnx_runtime import load_onnx

    if path is None:
        from .learned import bundled_weights_dir

        d = bundled_weights_dir() / BUNDLED_KEY
        if not (d / "model.json").is_file():
            return None
    else:
        d = Path(path)
        if not d.exists():
            raise PneumoctInputError("bad_checkpoint", f"{d}: model folder does not exist")
    info = read_checkpoint_info(d)
    family = (info.get("meta") or {}).get("family")
    if family != "segmentation":
        raise PneumoctInputError("bad_checkpoint", f"{d}: not a segmentation model (meta.family = {family!r})")
    net = load_onnx(d, info)
    if net is not None:
        return Segmenter(model=None, info=info, path=d, onnx=net)
    from .models.checkpoint import for_cpu_inference, load_checkpoint

    model, info = load_checkpoint(d)
    return Segmenter(model=for_cpu_inference(model), info=info, path=d)


def _lung_limit(lung2d: np.ndarray, margin_px: int) -> np.ndarray:
    lung2d = np.asarray(lung2d) > 0
    if margin_px <= 0 or not lung2d.any():
        return lung2d
    return ndi.binary_dilation(lung2d, structure=ndi.generate_binary_structure(2, 1), iterations=int(margin_px))


def _prepared_batches(x: np.ndarray, batch_size: int, transform: str):
    """Batches of ``x`` with the model's input ``transform`` applied, the next batch's transform (CLAHE: Python and
    NumPy, ~3 ms a slice) computed in a second thread while the network runs on this one (PyTorch releases the
    GIL). The same arrays as transforming everything first."""
    from .parallel import Background

    bs = max(1, int(batch_size))
    starts = list(range(0, len(x), bs))
    if transform in (None, "none"):
        yield from (x[s:s + bs] for s in starts)
        return
    nxt = Background(harmonise, x[:bs], transform, name="pneumoct-inputs") if starts else None
    for i, s in enumerate(starts):
        cur = nxt.result()
        nxt = (Background(harmonise, x[starts[i + 1]:starts[i + 1] + bs], transform, name="pneumoct-inputs")
               if i + 1 < len(starts) else None)
        yield cur


def _probabilities(segmenter: Segmenter, x: np.ndarray, batch_size: int, transform: str = "none") -> np.ndarray:
    """(N, S, S) network inputs in [0, 1] (before the model's input ``transform``) → (N, K', S, S) probabilities;
    K' = 1 (lesion) for a binary model, K classes (softmax) otherwise."""
    out = [segmenter.probabilities(xb) for xb in _prepared_batches(x, batch_size, transform)]
    return np.concatenate(out) if out else np.zeros((0, 1) + tuple(x.shape[-2:]), np.float32)


def _label_slice(probs: np.ndarray, crop, lung2d: np.ndarray, margin_px: int,
                 threshold: float) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """(K', S, S) crop probabilities → ``(box, mask, lesion probability)``, the last two on the slice pixels of the
    crop's box ``box`` (outside it the map is 0: no lesion there). The lesion limit (lung dilated by ``margin_px``)
    is computed on the box grown by the margin, which gives the box the same pixels as the whole slice would.

    Multi-class: bilinear interpolation is linear, so mapping back P(lesion) = 1 - P(background) and
    P(consolidation) - P(ground-glass) (two maps instead of three) gives exactly the interpolated lesion
    probability and the sign of the interpolated class difference: same mask, a third less resampling."""
    r0, r1, c0, c1 = (int(v) for v in crop.box)
    h, w = lung2d.shape
    gr, gc = max(r0 - margin_px, 0), max(c0 - margin_px, 0)  # the box grown by the margin starts here
    grown = lung2d[gr:min(r1 + margin_px, h), gc:min(c1 + margin_px, w)]
    limit = _lung_limit(grown, margin_px)[r0 - gr:r1 - gr, c0 - gc:c1 - gc]
    if probs.shape[0] <= 2:  # sigmoid lesion map, or a 2-way softmax (background / lesion)
        full = resize_bilinear(probs[-1:], (r1 - r0, c1 - c0))
        lesion = np.clip(full[0], 0.0, 1.0)
        mask = ((lesion >= threshold) & limit).astype(np.uint8)
    else:
        two = np.stack([1.0 - probs[0], probs[2] - probs[1]]).astype(np.float32)
        full = resize_bilinear(two, (r1 - r0, c1 - c0))
        lesion = np.clip(full[0], 0.0, 1.0)
        cls = np.where(full[1] > 0, LESION_CONSOLIDATION, LESION_GGO).astype(np.uint8)
        mask = np.where((lesion >= threshold) & limit, cls, 0).astype(np.uint8)
    lesion = np.where(limit, lesion, 0.0)
    return (slice(r0, r1), slice(c0, c1)), mask, lesion


def segment_volume(hu: np.ndarray, lung_labels: np.ndarray, segmenter: Segmenter, *, batch_size: int = 16,
                   threshold: float = 0.5, lung_margin_px: int = 2, is_hu: bool = True,
                   inputs: SliceInputs | None = None) -> SegmentationOutput:
    """Segment lesions in a (Z, Y, X) volume (HU, canonical; ``is_hu=False`` for a stack of 8-bit images).

    Each slice with lung is cropped to its lung box, windowed with the model's ``meta.window`` (or scaled
    /255 for 8-bit grey), run through the network in batches, and its probabilities put back on the slice grid
    (bilinear). Lesions are kept only inside the lung mask dilated by ``lung_margin_px`` pixels. ``inputs``: the
    study's shared :class:`~pneumoct.preprocess.slice_input.SliceInputs` (built here when not given)."""
    hu = np.asarray(hu)
    lung_labels = np.asarray(lung_labels)
    if hu.ndim != 3 or lung_labels.shape != hu.shape:
        raise ValueError(f"need a (Z, Y, X) volume and lung labels of the same shape, got {hu.shape} / "
                         f"{lung_labels.shape}")
    timing: dict[str, float] = {}
    t = time.perf_counter()
    size = segmenter.input_size
    inputs = inputs if inputs is not None else SliceInputs(hu, lung_labels > 0)
    z_idx = inputs.z
    mask = np.zeros(hu.shape, np.uint8)
    prob = np.zeros(hu.shape, np.float16)
    timing["crop"] = time.perf_counter() - t
    if z_idx.size == 0:
        return SegmentationOutput(mask, prob, timing, z_idx)
    t = time.perf_counter()
    transform = segmenter.meta.get("input_transform", "none")
    x = inputs.inputs(size, *segmenter.window, transform, is_hu=is_hu, model="lesion_seg", defer_transform=True)
    timing["inputs"] = time.perf_counter() - t
    t = time.perf_counter()
    probs = _probabilities(segmenter, x, batch_size, transform)  # the transform beside the network
    timing["network"] = time.perf_counter() - t
    t = time.perf_counter()
    # bilinear interpolation never exceeds the crop's maximum, so a slice whose crop-level lesion probability stays
    # below the threshold has an empty mask: it is not mapped back (its probability stays 0 in ``probability``)
    crop_lesion = probs[:, 0] if probs.shape[1] == 1 else 1.0 - probs[:, 0]
    if probs.shape[1] == 2:
        crop_lesion = probs[:, 1]
    reaches = crop_lesion.reshape(len(probs), -1).max(1) >= threshold
    todo = [(i, int(k)) for i, k in enumerate(z_idx) if reaches[i]]

    def map_back(r: range) -> None:  # slices are independent: threads split them (same result)
        for j in r:
            i, k = todo[j]
            box, m, p = _label_slice(probs[i], inputs.crop(k), lung_labels[k] > 0, lung_margin_px, threshold)
            mask[k][box] = m  # outside the crop's box: no lesion (the arrays start at 0)
            prob[k][box] = p

    run_chunks(map_back, len(todo), min_chunk=4)
    timing["map_back"] = time.perf_counter() - t
    return SegmentationOutput(mask, prob, timing, z_idx)


def segment_image(image8bit: np.ndarray, segmenter: Segmenter, lung: np.ndarray | None = None, *,
                  threshold: float = 0.5, lung_margin_px: int = DEFAULT_LUNG_MARGIN_PX_2D) -> np.ndarray:
    """One 8-bit 2D image (Y, X) (already windowed by its exporter) → (Y, X) uint8 lesion mask. Lungs from
    :func:`~pneumoct.preprocess.lung_mask.segment_lungs_2d` unless ``lung`` is given. Too little lung → empty."""
    img = np.asarray(image8bit)
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        img = img[..., :3].astype(np.float32).mean(-1)
    if img.ndim != 2:
        raise PneumoctInputError("bad_image", f"expected a 2D grey image, got shape {img.shape}")
    if lung is None:
        from .preprocess.lung_mask import segment_lungs_2d

        lung = segment_lungs_2d(img.astype(np.float32))
    lung = np.asarray(lung) > 0
    if lung.shape != img.shape:
        raise ValueError(f"lung mask shape {lung.shape} differs from image shape {img.shape}")
    crop = crop_slice(img.astype(np.float32), lung, segmenter.input_size)
    if crop is None:
        return np.zeros(img.shape, np.uint8)
    probs = _probabilities(segmenter, harmonise(grey_to_unit(crop.image)[None],
                                                segmenter.meta.get("input_transform", "none")), 1)
    box, m, _ = _label_slice(probs[0], crop, lung, lung_margin_px, threshold)
    out = np.zeros(img.shape, np.uint8)
    out[box] = m
    return out


# ------------------------------------------------------------------------------------------------ files
def _is_2d_input(path: Path) -> tuple[bool, list[Path]]:
    """(True, images) for a 2D image or a folder holding 2D images and no DICOM; (False, []) otherwise."""
    from .io import IMAGE2D_SUFFIXES, _is_dicom_file, suffix_of

    if path.is_file():
        return (suffix_of(path) in IMAGE2D_SUFFIXES, [path] if suffix_of(path) in IMAGE2D_SUFFIXES else [])
    if not path.is_dir():
        return False, []
    from .io.dicom import looks_like_raw_dicom

    images, other = [], []
    for p in sorted(path.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        (images if suffix_of(p) in IMAGE2D_SUFFIXES else other).append(p)
    if not images:
        return False, []
    if any(_is_dicom_file(p) or looks_like_raw_dicom(p) for p in other):
        return False, []
    return True, images


def _stem(path: Path, used: set[str]) -> str:
    from .io.writers import unique_safe_name

    return unique_safe_name(path.stem, used, "image")


def _prepare_out(out: Path) -> None:
    """The output folder, emptied of a previous run's files of ours — only once the model is loaded and the
    input read, so a refused run loses nothing."""
    out.mkdir(parents=True, exist_ok=True)
    _clear_stale(out)


def _clear_stale(out_dir: Path) -> None:
    """A rerun into the same folder must not leave the old ``segment.json`` looking like it describes new masks."""
    (out_dir / JSON_NAME).unlink(missing_ok=True)


def segment_path(input_path: str | Path, out_dir: str | Path, *, segmenter_path: str | Path | None = None,
                 binary: bool = False, threshold: float = 0.5, segmenter: Segmenter | None = None) -> dict:
    """Segment a study or 2D image(s) from disk; writes masks and ``segment.json`` (last). Returns the JSON dict.

    Study (any format ``diagnose`` reads) → ``out_dir/lesion_mask.nii.gz`` in the study's geometry (values
    0/1/2, or 0/1 with ``binary`` or a binary model). A 2D image, or a folder of them → ``<stem>.png`` per image
    (values 0/1/2, or 0/255 with ``binary``); an unreadable image in a folder is recorded as failed."""
    t0 = time.perf_counter()
    src = Path(input_path)
    if not src.exists():
        raise PneumoctInputError("not_found", "input path does not exist")
    if not 0.0 < float(threshold) < 1.0:
        raise PneumoctInputError("bad_argument", f"--threshold must be between 0 and 1, got {threshold}")
    if segmenter is None:
        if segmenter_path is None:
            from .learned import bundled_weights_dir

            if not (bundled_weights_dir() / BUNDLED_KEY / "model.json").is_file():
                raise PneumoctInputError("no_model", "no lesion segmentation model: none is bundled "
                                         "(weights/lesion_seg); give one with --model CHECKPOINT_DIR")
        elif not Path(segmenter_path).exists():
            raise PneumoctInputError("bad_checkpoint", f"{segmenter_path}: model folder does not exist")
        # the model loads in another thread while the lungs are found: started once the study is read (the pixel
        # decode already uses every core; a PyTorch import beside it made the read ~1 s slower, measured), or
        # at the first call for 2D images
        from .parallel import Background

        loading: list[Background] = []

        def start_loading() -> None:
            if not loading:
                loading.append(Background(load_segmenter, segmenter_path, name="pneumoct-segmenter"))

        def get_segmenter() -> Segmenter:
            start_loading()
            return loading[0].result()
    else:
        get_segmenter = lambda: segmenter  # noqa: E731
        start_loading = lambda: None  # noqa: E731
    out = Path(out_dir)
    is2d, images = _is_2d_input(src)
    if is2d:
        seg = get_segmenter()
        _prepare_out(out)
        result = _segment_images(images, out, seg, binary=binary, threshold=threshold)
    else:
        result = _segment_study(src, out, get_segmenter, binary=binary, threshold=threshold,
                                after_read=start_loading)
        seg = get_segmenter()
    result["model"] = seg.provenance()
    result["threshold"] = float(threshold)
    result["binary"] = bool(binary)
    result["timing"]["total"] = round(time.perf_counter() - t0, 3)
    result["note"] = ("Research use only; not a medical device. Lesions are kept only inside the lung mask "
                      "dilated by a small margin (see docs/segment.md).")
    from .io.writers import write_json

    write_json(out / JSON_NAME, result)
    return result


def _class_names(segmenter: Segmenter, binary: bool) -> dict[str, str]:
    if binary or segmenter.num_classes == 1:
        return {"0": "background", "1": "lesion"}
    return {"0": "background", str(LESION_GGO): "ggo", str(LESION_CONSOLIDATION): "consolidation"}


def lung_margin_px(spacing) -> int:
    """``DEFAULT_LUNG_MARGIN_MM`` in in-plane pixels of a study with ``spacing`` (z, y, x) mm (at least 1)."""
    pixel_mm = float(min(spacing[1], spacing[2]))
    return max(1, int(round(DEFAULT_LUNG_MARGIN_MM / max(pixel_mm, 1e-3))))


def segment_study(study, segmenter: Segmenter | Any, *, binary: bool = False, threshold: float = 0.5,
                  timing: dict[str, float] | None = None, lungs_started: Any = None):
    """Lungs, then lesions inside them (lung limit ``DEFAULT_LUNG_MARGIN_MM``), for a HU study already read: the
    one code path of ``pneumoct segment`` on a study and of ``pneumoct.segment``.

    Returns ``(mask, lung_labels, SegmentationOutput, lung_margin_px)``; ``mask`` is (Z, Y, X) uint8 on the
    study grid (0/1 when ``binary``). ``segmenter`` may be a callable returning it (still loading elsewhere: it is
    waited for after the lungs). ``lungs_started``: called once the lung mask is under way (it may then start
    loading the model: in the command's process the lungs run in a forked child, see
    :class:`~pneumoct.parallel.Forked`)."""
    from .parallel import Forked
    from .preprocess.lung_mask import segment_lungs

    timing = {} if timing is None else timing
    t = time.perf_counter()
    lungs_job = Forked(segment_lungs, study)
    if lungs_started is not None:
        lungs_started()
    lungs = lungs_job.result().labels
    timing["lung_mask"] = time.perf_counter() - t
    if not isinstance(segmenter, Segmenter):
        t = time.perf_counter()
        segmenter = segmenter()
        timing["wait_model"] = time.perf_counter() - t
    margin = lung_margin_px(study.spacing)
    seg = segment_volume(study.hu, lungs, segmenter, threshold=threshold, lung_margin_px=margin)
    timing.update({k: v for k, v in seg.timing.items()})
    mask = seg.mask
    if binary:
        mask = (mask > 0).astype(np.uint8)
    return mask, lungs, seg, margin


def _segment_study(src: Path, out: Path, get_segmenter: Any, *, binary: bool, threshold: float,
                   after_read: Any = None) -> dict:
    from .io import read_study
    from .io.writers import write_volume

    timing: dict[str, float] = {}
    t = time.perf_counter()
    study = read_study(src)
    timing["read"] = time.perf_counter() - t
    mask, lungs, seg, margin = segment_study(study, get_segmenter, binary=binary, threshold=threshold, timing=timing,
                                             lungs_started=after_read)
    segmenter = get_segmenter()
    _prepare_out(out)
    t = time.perf_counter()
    write_volume(out / MASK_NAME, mask, study)
    timing["write"] = time.perf_counter() - t
    px_mm2 = float(study.spacing[1] * study.spacing[2])
    voxel_ml = float(np.prod(study.spacing)) / 1000.0
    run = set(int(k) for k in (seg.slices_run if seg.slices_run is not None else []))
    per_slice = []
    # per-slice class counts in two vectorised passes (a bincount per slice converts every slice to int64)
    n_ggo = np.count_nonzero(mask == LESION_GGO, axis=(1, 2))
    n_any = np.count_nonzero(mask, axis=(1, 2))
    for k, info in enumerate(study.slices):
        entry = {"index": int(k), "position_mm": round(float(info.position_mm), 3), "segmented": k in run,
                 "lesion_pixels": int(n_any[k]), "lesion_area_mm2": round(float(n_any[k]) * px_mm2, 2)}
        if not binary and segmenter.num_classes > 1:
            entry["ggo_area_mm2"] = round(float(n_ggo[k]) * px_mm2, 2)
            entry["consolidation_area_mm2"] = round(float(n_any[k] - n_ggo[k]) * px_mm2, 2)
        per_slice.append(entry)
    counts = np.array([0, int(n_any.sum())], np.int64)
    return {
        "input": {"kind": "study", "format": study.source_format, "shape_zyx": list(study.shape),
                  "spacing_zyx_mm": [float(s) for s in study.spacing],
                  "warnings": [w.to_dict() for w in study.warnings]},
        "outputs": {"mask": MASK_NAME, "values": _class_names(segmenter, binary)},
        "lung_margin_px": margin,
        "lesion_volume_ml": round(float(counts[1:].sum()) * voxel_ml, 3),
        "lung_volume_ml": round(float(np.count_nonzero(lungs)) * voxel_ml, 3),
        "slices": per_slice,
        "timing": {k: round(v, 3) for k, v in timing.items()},
    }


def _segment_images(images: list[Path], out: Path, segmenter: Segmenter, *, binary: bool, threshold: float) -> dict:
    from PIL import Image

    from .io.images2d import _load_grey, _natural_key
    from .io.writers import atomic_path

    single = len(images) == 1
    used: set[str] = set()
    records = []
    t = time.perf_counter()
    for p in sorted(images, key=_natural_key):
        name = _stem(p, used) + ".png"
        try:
            grey, _, _ = _load_grey(p)
            mask = segment_image(grey, segmenter, threshold=threshold)
        except PneumoctInputError as exc:
            if single:
                raise
            records.append({"input": p.name, "status": "failed", "code": exc.code, "error": str(exc)})
            continue
        if binary:
            mask = np.where(mask > 0, 255, 0).astype(np.uint8)
        with atomic_path(out / name) as tmp:
            Image.fromarray(mask).save(tmp, format="PNG")
        counts = np.bincount(mask.ravel() if not binary else (mask > 0).ravel().astype(np.uint8), minlength=3)
        rec = {"input": p.name, "status": "ok", "mask": name, "shape_yx": list(mask.shape),
               "lesion_pixels": int(counts[1:].sum())}
        if not binary and segmenter.num_classes > 1:
            rec["ggo_pixels"] = int(counts[LESION_GGO])
            rec["consolidation_pixels"] = int(counts[LESION_CONSOLIDATION])
        records.append(rec)
    n_ok = sum(r["status"] == "ok" for r in records)
    if n_ok == 0:
        raise PneumoctInputError("unreadable_file", f"none of the {len(records)} 2D image(s) could be read")
    values = ({"0": "background", "255": "lesion"} if binary else _class_names(segmenter, binary))
    return {
        "input": {"kind": "image2d", "hounsfield": False, "n_images": len(records), "n_ok": n_ok,
                  "n_failed": len(records) - n_ok,
                  "warnings": [{"code": "2d_image_no_hu", "message": "8-bit images without Hounsfield units: "
                                "the network input is grey/255, not the HU window"}]},
        "outputs": {"values": values},
        "lung_margin_px": DEFAULT_LUNG_MARGIN_PX_2D,
        "images": records,
        "timing": {"images": round(time.perf_counter() - t, 3)},
    }
