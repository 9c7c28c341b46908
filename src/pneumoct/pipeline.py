"""`diagnose`: study in → lungs, lesions, quantification, patient result, report out.

Stages (each timed): read → lungs → lesions → quantify → classify → write. Outputs are written to temporary
names and renamed; ``result.json`` is written last, so a folder without it is not a finished result.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._version import __version__
from .errors import PneumoctInputError
from .io import read_study
from .io.writers import write_json, write_text, write_volume
from .learned import LearnedOutput, load_bundled_models, prefetch_bundled_models, run_learned_models
from .parallel import Background, Forked, n_threads, thread_budget
from .preprocess.lung_mask import LungMaskParams, segment_lungs
from .preprocess.slice_input import SliceInputs
from .quantify import find_lesions_threshold, lesion_probability_from_area, per_slice_lesion_area_mm2, quantify
from .quantify.coverage import coverage_warning, lung_coverage
from .report.html import build_report
from .rules import classify_by_rule
from .types import CLASS_NAMES, StudyVolume, interpolated_slices

log = logging.getLogger("pneumoct.pipeline")

SCHEMA_VERSION = "1.0"


@dataclass
class DiagnoseOptions:
    peripheral_thickness_mm: float = 10.0
    lung_params: LungMaskParams = field(default_factory=LungMaskParams)
    write_report: bool = True
    write_masks: bool = True
    use_learned_models: bool = True  # the bundled models (pneumoct.learned); False = classical path
    weights_dir: str | None = None   # None = bundled weights (or $PNEUMOCT_WEIGHTS)
    slice_probability: str = "area"  # per-slice lesion_probability: calibrated threshold area, or "model" (CNN)
    # lesion masks: "learned" (bundled lesion_seg segmenter) or "threshold" (baseline); None = learned when
    # use_learned_models, else threshold (so use_learned_models=False alone is the whole classical path); or the
    # name of a 3D system (pneumoct.volumetric.SYSTEMS, e.g. "deepsc"): its 3D lesion mask, which runs that system
    lesions: str | None = None
    # a 3D system (pneumoct.volumetric.SYSTEMS) run after the lungs: a research panel, its maps as NIfTI, never the
    # headline (docs: README "3D systems")
    model: str | None = None
    # JCS joint diagnosis (Wu et al., Fig. 1): "positive" segments only studies the patient classifier calls
    # abnormal (abnormal_probability >= positive_threshold); "always" segments every study (our default: a
    # classifier miss must not hide the lesions from the reader)
    segment_when: str = "always"
    positive_threshold: float = 0.5
    segmenter: str | None = None     # a segmentation checkpoint folder instead of weights/lesion_seg
    # what drives patient.label / abnormal_probability (pneumoct.headline): "auto" = the validated lesion burden
    # when its calibration is installed; "m3lung_patient" for a user who validated their own trained network
    headline: str = "auto"


@dataclass
class DiagnoseOutput:
    result: dict[str, Any]
    study: StudyVolume
    lung_labels: np.ndarray
    lesion_mask: np.ndarray
    learned: LearnedOutput = field(default_factory=LearnedOutput)
    figures: Background | None = None  # the report's images, rendering in a second thread (report_figures)
    volumetric: Any = None  # the 3D system's VolumetricOutput (maps written as <system>_<map>.nii.gz)


def _warm_later_stages(write_report: bool) -> None:
    """Import the modules the stages after the lungs import on first use (explanation maps pull in parts of
    scikit-image, ~0.3 s) and compile the report template, while the process would otherwise only wait for the
    forked lung mask. Nothing is computed; a failure here is left to the stage that needs the module."""
    import importlib

    try:
        for name in ("pneumoct.headline", "pneumoct.quantify.rsna", "pneumoct.fingerprint", "pneumoct.explain"):
            importlib.import_module(name)
        if write_report:
            from .report.html import _ENV

            _ENV.get_template("report.html")
    except Exception:  # noqa: BLE001 - only a head start
        log.debug("warming the later stages failed", exc_info=True)


def analyse_study(study: StudyVolume, options: DiagnoseOptions | None = None,
                  timing: dict[str, float] | None = None) -> DiagnoseOutput:
    """Run lungs → lesions → quantification → classification on a study already read."""
    opts = options or DiagnoseOptions()
    timing = {} if timing is None else timing
    from .volumetric import SYSTEMS

    lesions_mode = opts.lesions or ("learned" if opts.use_learned_models else "threshold")
    if lesions_mode not in ("learned", "threshold", *SYSTEMS) or opts.segment_when not in ("always", "positive"):
        raise ValueError(f"bad lesions / segment_when option: {opts.lesions!r} / {opts.segment_when!r}")
    system = _volumetric_system(opts, lesions_mode)

    t = time.perf_counter()
    # the lungs start first: in the command's own process they run in a forked child (parallel.Forked), which
    # needs a process with no other thread yet; then the networks load here meanwhile
    lungs_job = Forked(segment_lungs, study, opts.lung_params)
    calibration = None
    if opts.use_learned_models:
        from .burden import load_calibration

        prefetch_bundled_models(opts.weights_dir)  # ONNX Runtime sessions (or PyTorch) load while the lungs are found

        calibration = load_calibration(opts.weights_dir)
        if opts.lesions is None and calibration is not None:
            # the headline calibration holds only for the mask it was fitted on
            lesions_mode = calibration.get("mask_method", lesions_mode)
    if lungs_job.forked:  # this process only waits for the child: the later stages' imports load meanwhile
        Background(_warm_later_stages, opts.write_report, name="pneumoct-warm")

    lungs = lungs_job.result()
    timing["lungs"] = time.perf_counter() - t
    if not lungs.labels.any():
        raise PneumoctInputError("no_lungs", "no lungs found in the study (is this a chest CT covering the lungs?)")
    # a slab, or a study that stops above the bases: analysed, but no whole-lung grade (pneumoct.quantify.coverage)
    coverage = lung_coverage(lungs.labels, study.spacing)

    # the threshold baseline always runs (cheap): its per-slice area feeds the calibrated slice probability, the
    # gate's rule when no learned patient model is installed, and it is the fallback without a segmenter. It runs
    # in a second thread while the networks run in this one (SciPy and PyTorch release the GIL).
    t_thr = time.perf_counter()
    networks_busy = threading.Event()  # set while the 2D networks hold the other cores
    if opts.use_learned_models:
        networks_busy.set()
    all_threads = n_threads()

    # with the threshold mask as the lesion mask (the default: the headline calibration's own mask), its
    # quantification needs nothing from the networks: it runs in the same thread, while they may still be busy
    quantify_early = lesions_mode == "threshold"

    def quantify_mask(mask: np.ndarray) -> dict:
        # a lung counts as involved from 1 mL of lesion: specks of a few voxels do not make a case bilateral
        return quantify(mask, lungs.labels, study.spacing, hu=study.hu,
                        peripheral_thickness_mm=opts.peripheral_thickness_mm, bilateral_min_ml=1.0,
                        coverage=coverage)

    def threshold_stage():
        # beside the networks it keeps to one core (they get the others); once they are done (or alone) it may use
        # them all for its remaining steps (same result on any number of threads)
        q_early = None
        with thread_budget(lambda: 1 if networks_busy.is_set() else all_threads):
            finding = drop_lesions_on_interpolated(find_lesions_threshold(study.hu, lungs.labels, study.spacing),
                                                   study)
            timing["threshold_lesions"] = time.perf_counter() - t_thr
            if quantify_early:
                t_q = time.perf_counter()
                q_early = quantify_mask(finding.mask)
                timing["quantify"] = time.perf_counter() - t_q
        return finding, per_slice_lesion_area_mm2(finding.mask, study.spacing), q_early

    threshold_bg = Background(threshold_stage, name="pneumoct-threshold")
    lung_area = per_slice_lesion_area_mm2((lungs.labels > 0).astype(np.uint8), study.spacing)

    learned = LearnedOutput()
    # one 2D input chain (lung boxes, resizes, windows) for every 2D model of this run, built on first use
    slice_inputs: list[SliceInputs] = []

    def shared_inputs() -> SliceInputs:
        if not slice_inputs:
            slice_inputs.append(SliceInputs(study.hu, lungs.labels > 0))
        return slice_inputs[0]

    if opts.use_learned_models:
        t = time.perf_counter()
        models = load_bundled_models(opts.weights_dir)
        timing["load_models"] = time.perf_counter() - t  # the wait for the prefetch started before the lungs
        if models:
            t = time.perf_counter()
            # the threshold baseline holds one core meanwhile: the networks get the others
            learned = run_learned_models(study.hu, lungs.labels, models,
                                         threshold_area_mm2=lambda: (networks_busy.clear(),
                                                                     threshold_bg.result()[1])[1],
                                         slice_probability=opts.slice_probability,
                                         # the other cores while the threshold stage holds one; all once it is
                                         # done (asked again at every batch)
                                         threads=lambda: max(1, all_threads - 1) if threshold_bg.running else None,
                                         inputs=shared_inputs())
            timing["learned_models"] = time.perf_counter() - t
    networks_busy.clear()
    threshold_finding, threshold_area, q_early = threshold_bg.result()
    threshold_prob = lesion_probability_from_area(threshold_area, lung_area)

    volumetric = None
    if system is not None:
        from .volumetric import run_system

        t = time.perf_counter()
        volumetric = run_system(system, study, lungs.labels, weights_dir=opts.weights_dir,
                                lesion_mask=threshold_finding.mask)
        timing["volumetric"] = time.perf_counter() - t

    finding = threshold_finding
    segmentation: dict[str, Any] = {"requested": lesions_mode, "segment_when": opts.segment_when, "ran": False}
    if volumetric is not None and lesions_mode == system:
        finding = drop_lesions_on_interpolated(volumetric_lesions(volumetric, study), study)
        timing["lesions"] = timing["volumetric"]
    if lesions_mode == "learned":
        gate = None
        if opts.segment_when == "positive":
            gate = _classifier_gate(learned, threshold_finding, lungs.labels, study, opts, calibration,
                                    threshold_area, lung_area)
            segmentation["gate"] = gate
        if gate is not None and not gate["positive"]:
            finding = _not_segmented(study, gate)
        else:
            t = time.perf_counter()
            seg_finding = drop_lesions_on_interpolated(
                learned_lesions(study, lungs.labels, opts.weights_dir, segmenter=opts.segmenter,
                                inputs=shared_inputs()), study)
            timing["lesions"] = time.perf_counter() - t
            if seg_finding is None:
                segmentation["fallback"] = "no segmenter installed: threshold baseline used"
            else:
                finding = seg_finding
                segmentation["ran"] = True
                segmentation["timing_s"] = seg_finding.params.get("timing_s", {})
                segmentation["fingerprint"] = _fingerprint_check(
                    study, lungs.labels, (seg_finding.params.get("provenance") or {}).get("checkpoint"), "segmenter")
    segmentation["method"] = finding.method
    if finding is threshold_finding:
        timing["lesions"] = timing["threshold_lesions"]  # "lesions" = the time of the mask used, always present

    t = time.perf_counter()
    lesion_area = per_slice_lesion_area_mm2(finding.mask, study.spacing)
    burden = None
    if calibration is not None:
        from .burden import apply_calibration, slice_probability

        # a 3D research system's mask never drives the headline: the calibration keeps the mask it was fitted on
        burden_area = (threshold_area if lesions_mode in SYSTEMS and calibration.get("mask_method") == "threshold"
                       else lesion_area)
        if burden_area is not lesion_area:
            segmentation["headline_mask"] = "threshold-baseline (the calibration's own mask)"
        burden = apply_calibration(calibration, burden_area, lung_area, float(study.spacing[0]))
        slice_p = slice_probability(calibration, burden_area)
    slices = []
    for k, (info, area, prob) in enumerate(zip(study.slices, lesion_area, threshold_prob)):
        entry = {"index": info.index, "position_mm": round(float(info.position_mm), 3)}
        if info.interpolated:
            entry["interpolated"] = True
        if info.sop_instance_uid:
            entry["sop_instance_uid"] = info.sop_instance_uid
        if info.frame_number is not None:
            entry["frame_number"] = info.frame_number
        if burden is not None:
            has_lung = bool(lung_area[k] > 0)
            entry["lesion_probability"] = round(float(slice_p[k]), 4) if has_lung else 0.0
            entry["lung_in_slice"] = has_lung
            if learned.lesion_probability_model is not None:
                pm = learned.lesion_probability_model[k]
                entry["lesion_model_score"] = None if np.isnan(pm) else round(float(pm), 4)
        elif learned.lesion_probability is not None:
            p = learned.lesion_probability[k]
            entry["lesion_probability"] = 0.0 if np.isnan(p) else round(float(p), 4)  # no lung: no lung lesion
            entry["lung_in_slice"] = bool(not np.isnan(p))
            pm = learned.lesion_probability_model[k]
            entry["lesion_model_score"] = None if np.isnan(pm) else round(float(pm), 4)
        else:
            entry["lesion_probability"] = round(float(prob), 4)
        entry["threshold_lesion_score"] = round(float(prob), 4)
        entry["lesion_area_mm2"] = round(float(area), 2)
        if finding is not threshold_finding:
            entry["threshold_lesion_area_mm2"] = round(float(threshold_area[k]), 2)
        if info.interpolated:  # a slice made up from its neighbours: no lesion is measured or scored on it
            entry["lesion_probability"] = 0.0
        if learned.slice_class_probabilities is not None:
            cp = learned.slice_class_probabilities[k]
            entry["class_probabilities"] = None if np.isnan(cp).any() else {
                name: round(float(v), 4) for name, v in zip(CLASS_NAMES, cp)}
        slices.append(entry)

    figures = None
    if opts.write_report:  # the report's images need only the slices, masks and maps: beside the quantification
        from .report.html import report_figures

        figures = Background(report_figures, slices, study, lungs.labels, finding.mask, learned, volumetric,
                             name="pneumoct-figures")

    if q_early is not None and finding is threshold_finding:
        q = q_early  # quantified in the threshold stage (its own time is timing["quantify"])
    else:
        q = quantify_mask(finding.mask)
        timing["quantify"] = time.perf_counter() - t

    t = time.perf_counter()
    rule = classify_by_rule(q)
    from .headline import patient_block
    from .quantify.rsna import rsna_category

    differential = rsna_category(q, finding.mask, lungs.labels, study.spacing, study.hu,
                                 abnormal=None if burden is None else burden["abnormal_probability"] >= 0.5)
    m3 = learned_patient_result(learned, rule_result=rule) if learned.patient_probabilities is not None else None
    patient = patient_block(mode=opts.headline, q=q, rule=rule, differential=differential, burden=burden,
                            cal=calibration, m3lung=m3)
    timing["classify"] = time.perf_counter() - t

    lesions = q.pop("lesions", [])
    models_used = {
        "lungs": "classical 3D lung segmentation (pneumoct.preprocess.lung_mask, no training)",
        "lesions": finding.method,
        "slice_lesion_probability": "threshold-baseline lesion area per slice mapped to [0, 1] "
        "(not a learned probability)",
        "patient": patient["model"]["name"],
    }
    if burden is not None:
        models_used["slice_lesion_probability"] = (
            "lesion area of the lesion mask per slice through a logistic calibration fitted on the radiologist "
            f"slice labels of 3 real DICOM studies ({calibration.get('candidate')} masks; validated "
            "leave-one-study-out, docs/validation.md); the lesion network's own score is slices[].lesion_model_score")
        models_used["headline"] = patient["headline_source"]
    elif learned.lesion_probability is not None:
        models_used["slice_lesion_probability"] = (
            ("threshold-baseline lesion area through a logistic calibration fitted on the radiologist slice labels "
             "of 3 real DICOM studies (shipped with lesion_presence; it ranked held-out slices better than the "
             "network, docs/models.md)" if learned.lesion_probability_kind == "area"
             else "lesion_presence network (trained on real CT), calibrated on 3 real DICOM studies")
            + "; the network's own score is slices[].lesion_model_score; 0 for slices without lung")
    if learned.slice_class_probabilities is not None:
        models_used["slice_class_probabilities"] = "m3lung_slice (learned, trained on synthetic phantoms only)"
    if learned.provenance:
        models_used["learned"] = dict(learned.provenance)
    if segmentation["ran"] and "provenance" in finding.params:
        models_used.setdefault("learned", {})["lesion_seg"] = finding.params["provenance"]
    if slice_inputs:  # the recorded 2D input chain, as run (pneumoct.preprocess.slice_input.SliceInputs)
        models_used["slice_input_chain"] = slice_inputs[0].record()
    data_note = _data_note(learned, segmentation, patient)
    if volumetric is not None:
        models_used["volumetric"] = volumetric_block(volumetric, timing.get("volumetric"))
        data_note += (f" Research panel: the 3D model {volumetric.system} (trained on "
                      f"{volumetric.info.get('trained_on', 'see models.volumetric')}); research only, never the "
                      "headline" + (", but its lesion mask feeds the measurements (--lesions)."
                                    if lesions_mode == system else "."))
        note = volumetric_consistency(volumetric, patient)
        if note is not None:  # listed with the other disagreements; the headline itself is left as it is
            patient["consistency"].append(note)
    warnings = [w.to_dict() for w in study.warnings]
    if not coverage["complete"]:
        warnings.append(coverage_warning(coverage))
    for w in (segmentation.get("fingerprint") or {}).get("warnings", []):
        warnings.append({"code": w["code"], "message": w["message"]})
    if burden is not None:  # the headline calibration's data (3 real DICOM studies): is this study like them?
        from .burden import BUNDLED_KEY
        from .learned import bundled_weights_dir

        check = _fingerprint_check(study, lungs.labels, Path(opts.weights_dir or bundled_weights_dir()) / BUNDLED_KEY,
                                   "headline calibration")
        for w in check.get("warnings", []):
            warnings.append({"code": w["code"], "message": "headline calibration: " + w["message"]})
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "pneumoct_version": __version__,
        "data_note": data_note,
        "input": {
            "format": study.source_format,
            "warnings": warnings,
            "metadata": study.metadata,
        },
        "volume": study.geometry_dict(),
        "models": models_used,
        "lung_segmentation": lungs.info,
        "coverage": coverage,
        "segmentation": segmentation,
        "slices": slices,
        "patient": patient,
        "quantification": q,
        "lesions": lesions,
        "class_names": list(CLASS_NAMES),
        "timing_s": timing,
    }
    return DiagnoseOutput(result=result, study=study, lung_labels=lungs.labels, lesion_mask=finding.mask,
                          learned=learned, figures=figures, volumetric=volumetric)


def _volumetric_system(opts: DiagnoseOptions, lesions_mode: str) -> str | None:
    """The 3D system to run: ``opts.model``, or the one ``--lesions NAME`` asks for (they must agree)."""
    from .volumetric import SYSTEMS

    if opts.model is not None and opts.model not in SYSTEMS:
        raise PneumoctInputError("bad_argument", f"unknown 3D model {opts.model!r}; choose from {', '.join(SYSTEMS)}")
    if lesions_mode in SYSTEMS:
        if opts.model is not None and opts.model != lesions_mode:
            raise PneumoctInputError("bad_argument", f"--lesions {lesions_mode} takes the mask of the 3D model "
                                     f"{lesions_mode}, but --model is {opts.model}")
        return lesions_mode
    return opts.model


def volumetric_lesions(vol: Any, study: StudyVolume):
    """A 3D system's lesion mask as the lesion finding of the quantification. A binary mask (0 / 1) is split into
    ground-glass / consolidation by HU at -300, the threshold baseline's cut (as for a binary 2D segmenter)."""
    from .quantify.threshold_baseline import LesionFinding
    from .types import LESION_CONSOLIDATION, LESION_GGO

    if vol.lesion_mask is None:
        raise PneumoctInputError("bad_argument", f"the 3D model {vol.system} gives no lesion mask (--lesions)")
    mask = np.asarray(vol.lesion_mask, np.uint8)
    if int(mask.max(initial=0)) <= 1:
        lesion = mask > 0
        mask = np.where(lesion, np.where(study.hu >= -300, LESION_CONSOLIDATION, LESION_GGO), 0).astype(np.uint8)
    first = next(iter(vol.maps.values()), None)
    return LesionFinding(mask=mask, probability_map=first,
                         method=f"3d:{vol.system} (research 3D model, trained on "
                                f"{vol.info.get('trained_on', 'see models.volumetric')}; not validated on patients)",
                         params={"system": vol.system})


def volumetric_maps_files(vol: Any) -> dict[str, str]:
    """Map name -> file name written beside the masks: ``<system>_<map>.nii.gz``."""
    return {name: f"{vol.system}_{name}.nii.gz" for name in vol.maps}


def stale_volumetric_maps(out_dir: Path) -> list[Path]:
    """Files of ours from 3D systems in ``out_dir``: ``<system>_*.nii.gz`` for every registered system."""
    from .volumetric import SYSTEMS

    return sorted(p for name in SYSTEMS for p in out_dir.glob(f"{name}_*.nii.gz") if p.is_file())


def map_to_percent(m: np.ndarray) -> np.ndarray:
    """A [0, 1] map -> uint8 0..100 (how the maps are stored as NIfTI)."""
    return np.rint(np.clip(np.nan_to_num(np.asarray(m, np.float32)), 0.0, 1.0) * 100.0).astype(np.uint8)


def volumetric_block(vol: Any, seconds: float | None) -> dict[str, Any]:
    """``result["models"]["volumetric"]``: what the 3D system said, for the research panel only."""
    probs = {k: round(float(v), 4) for k, v in vol.probabilities.items()}
    label = max(probs, key=lambda k: probs[k]) if probs else None
    info = {k: v for k, v in vol.info.items() if k not in ("timing_s",)}
    return {
        "system": vol.system, "research_only": True, "class_names": list(vol.class_names), "probabilities": probs,
        "label": label, "trained_on": vol.info.get("trained_on"), "data_kind": vol.info.get("data_kind"),
        "note": "research panel: a 3D model trained on the data named in trained_on; never the headline",
        "maps": volumetric_maps_files(vol), "maps_encoding": "uint8 percent (value / 100 = map value in [0, 1])",
        "lesion_mask_voxels": None if vol.lesion_mask is None else int(np.count_nonzero(vol.lesion_mask)),
        "timing_s": {**(vol.info.get("timing_s") or {}), **({"total": round(seconds, 3)} if seconds else {})},
        "info": _json_safe(info),
    }


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.ndarray):  # a system's info is for reading: small arrays as lists, big ones described
        return _json_safe(x.tolist()) if x.size <= 64 else f"<array {list(x.shape)} {x.dtype}>"
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


#: a 3D system's class that means "no pneumonia" (its "abnormal" call is any other class)
_NORMAL = ("healthy", "non_pneumonia")


def volumetric_consistency(vol: Any, patient: dict[str, Any]) -> dict[str, str] | None:
    """A consistency note when the 3D system's class call disagrees with the headline: its label differs from the
    headline label when both speak of the product's classes (``non_pneumonia`` = healthy), or, for a COVID-vs-rest
    head, its COVID call differs from the headline's."""
    if not vol.probabilities:
        return None
    label = max(vol.probabilities, key=lambda k: vol.probabilities[k])
    head = patient.get("label")
    mine = "healthy" if label in _NORMAL else label
    if mine in CLASS_NAMES:
        disagree = mine != head
    elif label == "non_covid":
        disagree = head == "covid19"
    else:
        return None
    if not disagree:
        return None
    return {"code": "volumetric_disagrees",
            "message": f"The 3D research model {vol.system} calls the study {label} "
                       f"({float(vol.probabilities[label]):.2f}); the headline says {head}. Its output is research "
                       "only (see its training data in the research panel)."}


def drop_lesions_on_interpolated(finding, study: StudyVolume):
    """Zero the lesion mask (and voxel probability) on slices the reader inserted to fill a gap of missing slices.

    An inserted slice is a linear blend of its two real neighbours, not an image: lesion found there would be
    invented, so lesion volume and per-slice areas count real slices only. The lung mask is left as computed so
    that lung volume still spans the gap. ``finding`` None (no segmenter) passes through."""
    if finding is None:
        return None
    inserted = interpolated_slices(study)
    if inserted.any():
        finding.mask[inserted] = 0
        if finding.probability_map is not None:
            finding.probability_map[inserted] = 0
        finding.params["interpolated_slices_zeroed"] = int(inserted.sum())
    return finding


def learned_lesions(study: StudyVolume, lung_labels: np.ndarray, weights_dir: str | None = None, *,
                    segmenter: str | None = None, inputs: SliceInputs | None = None):
    """Lesion mask from the bundled segmenter (``weights/lesion_seg``), or None when it is not installed.

    A binary segmenter's lesion voxels are split into ground-glass / consolidation by HU with the threshold
    baseline's cut (-300 HU), so the quantification keeps both fractions."""
    import os

    from .quantify.threshold_baseline import LesionFinding
    from .segmentation import load_segmenter, segment_volume
    from .types import LESION_CONSOLIDATION, LESION_GGO

    path = None
    if segmenter:
        path = Path(segmenter)
        if not (path / "model.json").is_file():
            raise PneumoctInputError("bad_checkpoint", f"{path}: not a model folder (no model.json)")
    elif weights_dir:
        path = Path(weights_dir) / "lesion_seg"
    elif os.environ.get("PNEUMOCT_WEIGHTS"):
        path = Path(os.environ["PNEUMOCT_WEIGHTS"]) / "lesion_seg"
    if path is not None and not (path / "model.json").is_file():
        return None
    seg = load_segmenter(path)
    if seg is None:
        return None
    margin = max(1, int(round(5.0 / float(study.spacing[2]))))
    out = segment_volume(study.hu, lung_labels, seg, lung_margin_px=margin, inputs=inputs)
    mask = out.mask.astype(np.uint8)
    if seg.num_classes == 1:
        lesion = mask > 0
        mask = np.where(lesion, np.where(study.hu >= -300, LESION_CONSOLIDATION, LESION_GGO), 0).astype(np.uint8)
    prov = seg.provenance()
    return LesionFinding(mask=mask, probability_map=out.probability,  # float16: 2 bytes a voxel is plenty
                         method=f"learned:lesion_seg ({prov.get('architecture', 'segmenter')}, trained on "
                         f"{prov.get('trained_on', 'real 2D sets')})",
                         params={"timing_s": {k: round(float(v), 3) for k, v in out.timing.items()},
                                 "lung_margin_px": margin, "provenance": prov})


def _fingerprint_check(study: StudyVolume, lung_labels: np.ndarray, model_dir: str | Path | None,
                       what: str) -> dict[str, Any]:
    """Is the study inside the training-data fingerprint kept in ``model_dir`` (docs/fingerprint.md)? Warnings go to
    ``input.warnings``; study-independent notes (e.g. "trained on 8-bit images only") stay here."""
    from .fingerprint import check_study, fingerprint_notes, load_fingerprint

    try:
        fp = load_fingerprint(model_dir) if model_dir else None
    except ValueError as exc:
        return {"checked": False, "why": f"unreadable fingerprint: {exc}"}
    if not fp:
        return {"checked": False, "why": f"the {what} has no fingerprint.json"}
    warnings = check_study(study, lung_labels, fp, include_notes=False)
    return {"checked": True, "warnings": warnings, "notes": [n["message"] for n in fingerprint_notes(fp)]}


def _classifier_gate(learned: LearnedOutput, threshold_finding, lung_labels: np.ndarray, study: StudyVolume,
                     opts: DiagnoseOptions, calibration: dict | None = None,
                     threshold_area: np.ndarray | None = None, lung_area: np.ndarray | None = None) -> dict[str, Any]:
    """JCS joint diagnosis (Wu et al., Fig. 1): is the study positive for the classifier, so it gets segmented?

    The classifier is the validated one when installed: the lesion burden of the threshold baseline's mask through
    the headline calibration (docs/headline.md; fitted on real studies); else the patient network (abnormal =
    1 - P(healthy); the bundled one is phantom-trained); else the explicit rule on the threshold measurements."""
    if calibration is not None and threshold_area is not None and lung_area is not None:
        from .burden import apply_calibration

        abnormal = float(apply_calibration(calibration, threshold_area, lung_area,
                                           float(study.spacing[0]))["abnormal_probability"])
        source = "lesion_burden on the threshold baseline"
    elif learned.patient_probabilities is not None:
        abnormal = 1.0 - float(learned.patient_probabilities[CLASS_NAMES.index("healthy")])
        source = "m3lung_patient"
    else:
        q = quantify(threshold_finding.mask, lung_labels, study.spacing, hu=study.hu,
                     peripheral_thickness_mm=opts.peripheral_thickness_mm, bilateral_min_ml=1.0)
        abnormal = float(classify_by_rule(q)["abnormal_probability"])
        source = "rule on the threshold baseline"
    return {"classifier": source, "abnormal_probability": round(abnormal, 4),
            "threshold": float(opts.positive_threshold), "positive": bool(abnormal >= opts.positive_threshold)}


def _not_segmented(study: StudyVolume, gate: dict[str, Any]):
    """The lesion finding of a study the classifier called negative in JCS joint mode: no lesion mask."""
    from .quantify.threshold_baseline import LesionFinding

    return LesionFinding(mask=np.zeros(study.shape, np.uint8), probability_map=None,
                         method="not segmented: the classifier called the study negative (JCS joint mode, "
                         f"abnormal probability {gate['abnormal_probability']:.2f} < {gate['threshold']:.2f})",
                         params={"gate": gate})


def _data_note(learned: LearnedOutput, segmentation: dict[str, Any] | None = None,
               patient: dict[str, Any] | None = None) -> str:
    seg_ran = bool(segmentation and segmentation.get("ran"))
    if not learned.provenance and not seg_ran:
        return ("No learned model was used: lungs by a classical algorithm, lesions by the HU threshold baseline, "
                "diagnosis by an explicit rule on the measurements.")
    if seg_ran:
        parts = ["Lungs by a classical algorithm; lesion masks and measurements by the learned segmenter "
                 "(trained on real public 2D CT slices plus synthetic phantoms; validated on real held-out slices, "
                 "not clinically validated)."]
    elif segmentation and segmentation.get("gate") and not segmentation["gate"]["positive"]:
        parts = ["Lungs by a classical algorithm; no lesion segmentation: the classifier called the study negative "
                 "(JCS joint mode)."]
    else:
        parts = ["Lungs by a classical algorithm; lesion masks and measurements by the HU threshold baseline."]
    if learned.lesion_probability is not None:
        parts.append("Per-slice lesion probability and CAM maps: a network trained on real public CT data "
                     "(few patients; validation figures in its model card), not clinically validated.")
    source = (patient or {}).get("headline_source")
    if source == "burden":
        parts.append("Headline (healthy vs pneumonia): the measured lesion burden calibrated on 3 real DICOM studies "
                     "(held-out figures in docs/validation.md); the pneumonia pattern from the explicit RSNA-category "
                     "rule (docs/differential.md).")
    if learned.patient_probabilities is not None:
        parts.append(("Research panel: " if source != "m3lung_patient" else "Patient class: ")
                     + "the M3Lung-Sys networks (patient class, per-slice class probabilities) trained on "
                     "SYNTHETIC phantoms only; their output on real scans is not a clinical diagnosis.")
    return " ".join(parts)


def learned_patient_result(learned: LearnedOutput, rule_result: dict[str, Any]) -> dict[str, Any]:
    """The patient block from the M3Lung-Sys patient network, with the rule's result kept beside it."""
    probs = {name: round(float(p), 4) for name, p in zip(CLASS_NAMES, learned.patient_probabilities)}
    label = max(CLASS_NAMES, key=lambda k: probs[k])
    prov = learned.provenance.get("m3lung_patient", {})
    return {
        "label": label,
        "probabilities": probs,
        "abnormal_probability": round(1.0 - probs["healthy"], 4),
        "model": {
            "name": "m3lung_patient",
            "kind": "learned (M3Lung-Sys patient-level network on M3Lung-Sys slice-network features)",
            "trained_on": prov.get("trained_on", "synthetic phantoms"),
            "calibrated": False,
            "note": "trained on synthetic phantoms only: not clinical accuracy",
        },
        "rule_result": {k: rule_result[k] for k in ("label", "probabilities", "abnormal_probability", "model")
                        if k in rule_result},
    }


def diagnose(input_path: str | Path, out_dir: str | Path, options: DiagnoseOptions | None = None, *,
             run_key: str | None = None) -> dict[str, Any]:
    """Read ``input_path``, analyse it and write result.json, report.html, lung_mask.nii.gz, lesion_mask.nii.gz.
    ``run_key`` (:func:`run_key`) is recorded in ``result.json`` (``input.run_key``) so a resumed batch can
    recognise the finished study."""
    opts = options or DiagnoseOptions()
    timing: dict[str, float] = {}
    t_total = time.perf_counter()
    t = time.perf_counter()
    # (torch is not prefetched during the read: tried, the read slowed by more than the import saved — A/B on
    # covid-P001, 4 alternating runs, median 11.0 s vs 10.5 s)
    study = read_study(input_path)
    timing["read"] = time.perf_counter() - t
    log.info("read %s study: %d slices", study.source_format, study.shape[0])
    out = analyse_study(study, opts, timing)
    if run_key is not None:
        out.result["input"]["run_key"] = run_key
    return write_outputs(out, out_dir, report=opts.write_report, masks=opts.write_masks, timing=timing,
                         t_start=t_total)


def batch_folder_name(path: str | Path, used: set[str]) -> str:
    """A safe, unique output folder name for one study of a batch (its file or folder name, extensions off)."""
    from .io.writers import unique_safe_name

    stem = Path(str(path).rstrip("/")).name
    for suffix in (".nii.gz", ".zip", ".nii", ".nrrd", ".mha", ".mhd", ".dcm"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return unique_safe_name(stem, used, "study")


def input_fingerprint(path: str | Path) -> str:
    """A cheap fingerprint of an input on disk: sha256 over the relative path, size and modification time of every
    file under it (a file: itself). Changes when a file is added, removed, replaced or touched."""
    import hashlib

    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    for f in files:
        st = f.stat()
        rel = f.name if f == p else str(f.relative_to(p))
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def run_key(path: str | Path, options: DiagnoseOptions) -> str:
    """What a finished result must match to be reused by a resumed batch: the input's fingerprint, the options and
    the pneumoct version."""
    import dataclasses
    import hashlib

    blob = json.dumps({"input": input_fingerprint(path), "options": dataclasses.asdict(options),
                       "version": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _finished(folder: Path, key: str) -> dict[str, Any] | None:
    """The complete result.json of an earlier run of the same input and options in ``folder``, else None."""
    try:
        res = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(res, dict) or (res.get("input") or {}).get("run_key") != key:
        return None
    if any(not (folder / name).is_file() for name in res.get("outputs") or []):
        return None
    return res


def diagnose_batch(inputs: list[str | Path], out_dir: str | Path, options: DiagnoseOptions | None = None, *,
                   on_study: Any = None, resume: bool = True) -> list[dict[str, Any]]:
    """Diagnose several studies, each into ``out_dir/<name>``; a refused or failed study is recorded and the batch
    goes on. The models are loaded once for the whole batch (cached per process). ``out_dir/batch.json`` is
    rewritten after every study (so an interrupted batch shows how far it got); with ``resume`` a study whose
    folder already holds a complete result of the same input (fingerprint: files, sizes, times) and options is
    not run again (status ``done_before``), and a half-finished one is redone. ``on_study(record, result_or_None,
    position, total, seconds_per_study)`` is called after each study. Returns the records."""
    opts = options or DiagnoseOptions()
    out_dir = Path(out_dir)
    used: set[str] = set()
    records: list[dict[str, Any]] = []
    run_times: list[float] = []
    for i, path in enumerate(inputs):
        name = batch_folder_name(path, used)
        result = None
        t0 = time.perf_counter()
        try:
            key = run_key(path, opts) if Path(path).exists() else None
            done = _finished(out_dir / name, key) if (resume and key) else None
            if done is not None:
                result = done
                rec = {"input": str(path), "output": name, "status": "done_before", "label": done["patient"]["label"]}
            else:
                result = diagnose(path, out_dir / name, opts, run_key=key)
                rec = {"input": str(path), "output": name, "status": "ok", "label": result["patient"]["label"]}
                run_times.append(time.perf_counter() - t0)
        except PneumoctInputError as exc:
            rec = {"input": str(path), "output": name, "status": "refused", "code": exc.code, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a batch must go on and record what failed
            rec = {"input": str(path), "output": name, "status": "failed",
                   "error": " ".join(f"{type(exc).__name__}: {exc}".split())}
        records.append(rec)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "batch.json", {"studies": records, "done": len(records), "total": len(inputs),
                                            "complete": len(records) == len(inputs)})
        if on_study is not None:
            per = sum(run_times) / len(run_times) if run_times else None
            on_study(rec, result, i + 1, len(inputs), per)
    if not inputs:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "batch.json", {"studies": [], "done": 0, "total": 0, "complete": True})
    return records


def write_outputs(out: DiagnoseOutput, out_dir: str | Path, *, report: bool = True, masks: bool = True,
                  timing: dict[str, float] | None = None, t_start: float | None = None) -> dict[str, Any]:
    """Write an analysed study's files into ``out_dir``: the masks (NIfTI, the study's geometry), report.html and,
    last, result.json (a folder without it is not a finished result; an older one is removed first)."""
    out_dir = Path(out_dir)
    timing = dict(out.result.get("timing_s") or {}) if timing is None else timing
    t_total = time.perf_counter() if t_start is None else t_start
    study = out.study
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = out_dir / "result.json"
    if stale.exists():  # a previous run's result must not sit beside this run's half-written files
        stale.unlink()
    # a rerun with fewer outputs (--no-report, --no-masks) must not leave an earlier run's file of ours beside the
    # new result.json; files that are not ours are never touched
    for name, kept in (("report.html", report), ("lung_mask.nii.gz", masks), ("lesion_mask.nii.gz", masks)):
        if not kept:
            (out_dir / name).unlink(missing_ok=True)
    map_files = volumetric_maps_files(out.volumetric) if (masks and out.volumetric is not None) else {}
    for old in stale_volumetric_maps(out_dir):  # an earlier run's 3D maps that this run does not rewrite
        if old.name not in map_files.values():
            old.unlink(missing_ok=True)

    t_masks = time.perf_counter()
    written = []

    def write_masks() -> float:  # beside the report (gzip and the file writes release the GIL)
        write_volume(out_dir / "lung_mask.nii.gz", out.lung_labels, study)
        write_volume(out_dir / "lesion_mask.nii.gz", out.lesion_mask, study)
        for name, fname in map_files.items():  # uint8 percent: 4x smaller and faster to compress than float32
            write_volume(out_dir / fname, map_to_percent(out.volumetric.maps[name]), study)
        return time.perf_counter() - t_masks

    masks_bg = Background(write_masks, name="pneumoct-masks") if masks else None
    if masks:
        written += ["lung_mask.nii.gz", "lesion_mask.nii.gz", *map_files.values()]
    else:
        timing["write_masks"] = 0.0
    try:
        if report:
            t = time.perf_counter()
            if t_start is not None:
                timing["total"] = time.perf_counter() - t_total  # provisional, for the report
            out.result["timing_s"] = {k: round(v, 3) for k, v in timing.items()}
            html = build_report(out.result, study, out.lung_labels, out.lesion_mask, learned=out.learned,
                                figures=out.figures.result() if out.figures is not None else None,
                                volumetric=out.volumetric)
            write_text(out_dir / "report.html", html)
            written.append("report.html")
            timing["report"] = time.perf_counter() - t
    finally:
        # the masks are on disk (or their error raised) before result.json; if the report failed, the mask thread
        # still finishes (or removes its partial file) before the error leaves this function
        masks_done = masks_bg.result() if masks_bg is not None else None
    if masks_done is not None:
        timing["write_masks"] = masks_done
    if t_start is not None:
        timing["total"] = time.perf_counter() - t_total
    out.result["outputs"] = written + ["result.json"]
    out.result["timing_s"] = {k: round(v, 3) for k, v in timing.items()}
    write_json(out_dir / "result.json", out.result)
    return out.result
