"""Self-contained HTML report (M3Lung-Sys Fig. 11 style: slice sequence with overlays and the lesion curve)."""
from __future__ import annotations

from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape

from .._version import __version__
from ..types import StudyVolume
from .render import curve_svg, overlay_slice, png_data_uri

_ENV = Environment(loader=PackageLoader("pneumoct", "report/templates"),
                   autoescape=select_autoescape(["html"]))

_DISPLAY = {"healthy": "Healthy (no pneumonia pattern)", "covid19": "COVID-19 pattern",
            "other_viral": "Other viral pneumonia pattern (H1N1/influenza)", "cap": "Community-acquired pneumonia pattern"}


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def gallery_indices(n_slices: int, lung_slices: np.ndarray, max_images: int = 16) -> tuple[list[int], int]:
    """Every k-th slice across the lungs' craniocaudal extent (the whole study when no lung was found)."""
    zs = np.nonzero(lung_slices)[0]
    lo, hi = (int(zs[0]), int(zs[-1])) if zs.size else (0, n_slices - 1)
    span = hi - lo + 1
    step = max(1, int(np.ceil(span / max_images)))
    return list(range(lo, hi + 1, step)), step


#: Scores of the explanation maps against lesion masks, copied from a past measurement (documentation, not
#: computed here): ``benchmarks/explain_eval.py`` run on 2026-11-22 (commit f60a567) on the shipped checkpoints,
#: results in ``benchmarks/results/explain_lesion_presence_real_val.json`` (real masks: 150 lesion slices of
#: COVID-19-CT-Seg belonging to the lesion network's validation patients, 96x96 lung crops, pointing tolerance
#: 15 px) and ``benchmarks/results/explain_m3lung_phantoms.json`` (synthetic: 120 lesion slices of the held-out
#: phantom cohort, 128x128 crops, tolerance 8 px); summarised in benchmarks/RESULTS.md and docs/explanations.md.
#: ``tests/test_report_explanations.py`` checks these numbers against those JSON files. The maps were scored as
#: the networks give them (whole crop), before the report's restriction to the lung.
EXPLANATION_SCORES: dict[str, Any] = {
    "source": "benchmarks/explain_eval.py, 2026-11-22 (benchmarks/results/explain_lesion_presence_real_val.json, "
              "benchmarks/results/explain_m3lung_phantoms.json)",
    "data": {
        "real": {"text": "COVID-19-CT-Seg slices with radiologist lesion masks, 150 lesion slices of the "
                         "lesion network's validation patients (2 patients, not trained on; the set's patient "
                         "mapping is approximate), 96×96 lung crops, pointing tolerance 15 px",
                 "chance_energy": 0.057, "n": 150, "model": "lesion_presence",
                 "checkpoint_sha256": "23bca989c4a3bc2010eaea78ab48ef6e985c41ff8d9edaaa4977786e5ecb7d49",
                 "file": "explain_lesion_presence_real_val.json"},
        "synthetic": {"text": "our phantoms (held-out cohort) with their lesion masks, 120 lesion "
                              "slices of 5 phantoms, 128×128 crops, pointing tolerance 8 px",
                      "chance_energy": 0.018, "n": 120, "model": "m3lung_slice",
                      "checkpoint_sha256": "3502ff340eb369b6db9a7217ac9e58cb66018a8d373a26b4b366babdee09b71d",
                      "file": "explain_m3lung_phantoms.json"},
    },
    # key = method name in the result file's "methods"; shown = drawn in this report
    "rows": [
        {"name": "CAM Conv4, lesion network", "key": "cam/conv4", "data": "real", "shown": True,
         "pointing_game": 0.85, "energy_inside": 0.068, "dice": 0.15, "lesion_recall": 0.26, "box_precision": 0.28},
        {"name": "CAM joint (Conv3·4·5 product), lesion network", "key": "cam", "data": "real", "shown": False,
         "pointing_game": 0.67, "energy_inside": 0.081, "dice": 0.12, "lesion_recall": 0.16, "box_precision": 0.43},
        {"name": "Grad-CAM (last block), lesion network", "key": "gradcam", "data": "real", "shown": False,
         "pointing_game": 0.69, "energy_inside": 0.091, "dice": 0.12, "lesion_recall": 0.15, "box_precision": 0.45},
        {"name": "Integrated gradients (joint), lesion network", "key": "integrated_gradients", "data": "real",
         "shown": False, "pointing_game": 0.65, "energy_inside": 0.058, "dice": 0.00, "lesion_recall": 0.03,
         "box_precision": 0.08},
        {"name": "random map (control)", "key": "random", "data": "real", "shown": False,
         "pointing_game": 0.44, "energy_inside": 0.057, "dice": 0.10, "lesion_recall": 0.08, "box_precision": 0.26},
        {"name": "M3Lung-Sys prototype map", "key": "prototype", "data": "synthetic", "shown": True,
         "pointing_game": 0.39, "energy_inside": 0.027, "dice": 0.08, "lesion_recall": 0.14, "box_precision": 0.11},
        {"name": "Grad-CAM, M3Lung-Sys slice network", "key": "gradcam", "data": "synthetic", "shown": False,
         "pointing_game": 0.21, "energy_inside": 0.035, "dice": 0.08, "lesion_recall": 0.19, "box_precision": 0.22},
        {"name": "Integrated gradients, M3Lung-Sys slice network", "key": "integrated_gradients",
         "data": "synthetic", "shown": False, "pointing_game": 0.04, "energy_inside": 0.027, "dice": 0.03,
         "lesion_recall": 0.19, "box_precision": 0.02},
        {"name": "random map (control)", "key": "random", "data": "synthetic", "shown": False,
         "pointing_game": 0.09, "energy_inside": 0.018, "dice": 0.03, "lesion_recall": 0.00, "box_precision": 0.00},
    ],
}

#: lung mask grown by this much before a map is restricted to it (keeps subpleural lesions the mask may cut)
MAP_LUNG_DILATION_MM = 5.0
#: lesion-mask components smaller than this (on the slice) get no box
MASK_BOX_MIN_AREA_MM2 = 20.0
#: colours of the boxes: from the CAM (Hu et al. extraction) and from the lesion mask
CAM_BOX_RGB = (0, 255, 0)
MASK_BOX_RGB = (255, 0, 255)
#: evidence bar for a slice to be explained (besides a lesion area > 0)
EVIDENCE_PROBABILITY = 0.5


def choose_explanation_slices(lesion_area, probability, n: int = 6, *,
                              p_min: float = EVIDENCE_PROBABILITY) -> list[int]:
    """Up to ``n`` slices to explain, spread over the craniocaudal extent of the evidence.

    Evidence slices: lesion area > 0 or ``probability >= p_min`` (NaN counts as none). They are split, in z order,
    into ``min(n, count)`` groups of about equal size, so more panels go where more slices carry evidence; each
    group gives its strongest slice (largest lesion area, then highest probability, then the lower index).
    Groups are visited from the strongest down, so the study's strongest slice is always chosen; a group's next
    strongest slice is taken instead when its best lies closer than ``max(2, extent // (2 n))`` slices to one
    already chosen (extent = first to last evidence slice), so no two chosen slices are adjacent. Returns the
    chosen indices sorted; ``[]`` when no slice has evidence.
    """
    area = np.nan_to_num(np.asarray(lesion_area, np.float64).ravel(), nan=0.0)
    prob = np.nan_to_num(np.asarray(probability, np.float64).ravel(), nan=0.0)
    if area.shape != prob.shape:
        raise ValueError(f"lesion_area and probability differ in length: {area.size} vs {prob.size}")
    ev = np.flatnonzero((area > 0) | (prob >= p_min))
    if n <= 0 or ev.size == 0:
        return []
    ranked = []
    for g in np.array_split(ev, min(int(n), ev.size)):
        ranked.append(g[np.lexsort((g, -prob[g], -area[g]))])  # last key first: area, then probability, then z
    min_gap = max(2, int(ev[-1] - ev[0] + 1) // (2 * int(n)))
    chosen: list[int] = []
    for g in sorted(ranked, key=lambda r: (-area[r[0]], -prob[r[0]], int(r[0]))):
        for z in g:
            if all(abs(int(z) - c) >= min_gap for c in chosen):
                chosen.append(int(z))
                break
    return sorted(chosen)


def _slice_values(result: dict[str, Any], key: str, n: int) -> np.ndarray:
    vals = [(s.get(key) if isinstance(s, dict) else None) for s in (result.get("slices") or [])][:n]
    out = np.array([np.nan if v is None else float(v) for v in vals] + [np.nan] * (n - len(vals)), np.float64)
    return out


def _map_image(grey: np.ndarray, map2d: np.ndarray, region: np.ndarray | None, spacing_yx, aspect: float,
               grown: np.ndarray | None = None):
    """A location map restricted to the (dilated) lung → (display RGB without boxes, in-lung map, region).
    ``grown``: the lung region already dilated by ``MAP_LUNG_DILATION_MM`` (both maps of a slice share it)."""
    from ..explain.boxes import overlay_map_rgb, restrict_map_to_region

    if region is None:
        region = np.ones(map2d.shape, bool)
        grown = None
    shown, reg = restrict_map_to_region(map2d, region, dilate_mm=MAP_LUNG_DILATION_MM, spacing=spacing_yx,
                                        grown=grown)
    return _resize_rgb(overlay_map_rgb(grey, shown), aspect), shown, reg


def _draw(rgb: np.ndarray, boxes, full_shape, colour) -> np.ndarray:
    from ..explain.boxes import draw_boxes_rgb, rescale_boxes

    if not boxes:
        return rgb
    return draw_boxes_rgb(rgb, rescale_boxes(boxes, full_shape, rgb.shape[:2]), colour=colour, thickness=2)


def location_map_panels(result: dict[str, Any], study: StudyVolume, learned, max_slices: int = 6, *,
                        lung_labels: np.ndarray | None = None, lesion_mask: np.ndarray | None = None) -> list[dict]:
    """Slices chosen by :func:`choose_explanation_slices` (evidence from ``result["slices"]``: lesion area of the
    lesion mask, lesion probability), each with the CAM (Conv4) of the real-data lesion network and the M3Lung-Sys
    prototype map (synthetic-trained), both restricted to the slice's lung mask grown by 5 mm and rescaled inside
    it. On both, magenta boxes outline the lesion mask's 2D components on that slice (≥ 20 mm²). Green boxes are
    extracted from the in-lung CAM (Hu et al.; threshold computed inside the lung) and drawn only where the CAM is
    informative (:func:`pneumoct.explain.boxes.map_informativeness`); otherwise the caption says why."""
    if learned is None or not (getattr(learned, "cam_maps", None) or getattr(learned, "prototype_maps", None)):
        return []
    from ..explain.boxes import boxes_from_mask, boxes_from_saliency, dilate_region_mm, map_informativeness
    from ..parallel import run_chunks
    from .render import window_to_uint8

    n = study.shape[0]
    area = _slice_values(result, "lesion_area_mm2", n)
    prob = _slice_values(result, "lesion_probability", n)
    aspect = float(study.spacing[1]) / float(study.spacing[2])
    spacing_yx = (float(study.spacing[1]), float(study.spacing[2]))
    min_mask_px = int(np.ceil(MASK_BOX_MIN_AREA_MM2 / (spacing_yx[0] * spacing_yx[1])))

    def panel(z: int) -> dict:
        grey = window_to_uint8(study.hu[z])
        lung = (lung_labels[z] > 0) if lung_labels is not None else None
        grown = None if lung is None else dilate_region_mm(lung, MAP_LUNG_DILATION_MM, spacing_yx)
        mask_boxes = boxes_from_mask(lesion_mask[z], min_mask_px) if lesion_mask is not None else []
        mask_text = (f"magenta: {len(mask_boxes)} box(es) from the lesion mask" if mask_boxes
                     else "no lesion-mask component ≥ 20 mm² on this slice")
        images = []
        cam = learned.slice_map("cam", z)
        if cam is not None:
            rgb, shown, reg = _map_image(grey, cam, lung, spacing_yx, aspect, grown)
            cam_boxes = boxes_from_saliency(shown, region=reg, min_area_px=max(20, min_mask_px))
            info = map_informativeness(cam, reg, cam_boxes)
            if info["informative"]:
                rgb = _draw(rgb, cam_boxes, grey.shape, CAM_BOX_RGB)
                cap = (f"CAM (Conv4), lesion network (real-data), inside the lung; green: {len(cam_boxes)} box(es) "
                       f"from the CAM; {mask_text}")
            else:
                cap = (f"CAM (Conv4), lesion network (real-data), inside the lung. The CAM is uninformative here "
                       f"({info['reason']}): its boxes are not drawn; {mask_text}")
            images.append({"uri": png_data_uri(_draw(rgb, mask_boxes, grey.shape, MASK_BOX_RGB)), "caption": cap,
                           "informative": bool(info["informative"])})
        proto = learned.slice_map("prototype", z)
        if proto is not None:
            rgb, _, reg = _map_image(grey, proto, lung, spacing_yx, aspect, grown)
            info = map_informativeness(proto, reg)
            flat = "" if info["informative"] else f" Nearly flat inside the lung ({info['reason']})."
            images.append({"uri": png_data_uri(_draw(rgb, mask_boxes, grey.shape, MASK_BOX_RGB)),
                           "caption": f"M3Lung-Sys prototype map (synthetic-trained), inside the lung; "
                                      f"{mask_text}.{flat}", "informative": bool(info["informative"])})
        if not images:  # no map for this slice (too little lung for the models): the findings alone
            rgb = _draw(_resize_rgb(np.repeat(grey[..., None], 3, axis=2), aspect), mask_boxes, grey.shape,
                        MASK_BOX_RGB)
            images.append({"uri": png_data_uri(rgb), "caption": f"no model map for this slice; {mask_text}",
                           "informative": False})
        return {"index": int(z), "position_mm": float(result["slices"][z]["position_mm"]),
                "lesion_probability": float(np.nan_to_num(prob[z])),
                "lesion_area_mm2": float(np.nan_to_num(area[z])), "images": images}

    chosen = list(choose_explanation_slices(area, prob, max_slices))
    # panels are independent: threads take runs of them (in order; the report waits for them after quantify)
    runs = run_chunks(lambda r: [panel(chosen[i]) for i in r], len(chosen), min_chunk=1)
    return [p for run in runs for p in run]


def explanation_scores(learned=None) -> list[dict]:
    """The rows of :data:`EXPLANATION_SCORES` for the report, each with its data description, chance level, and a
    note when the checkpoint that ran differs from the one measured."""
    prov = (getattr(learned, "provenance", None) or {}) if learned is not None else {}
    rows = []
    for r in EXPLANATION_SCORES["rows"]:
        d = EXPLANATION_SCORES["data"][r["data"]]
        ran = (prov.get(d["model"]) or {}).get("sha256")
        note = ""
        if ran and ran != d["checkpoint_sha256"]:
            note = f"measured on checkpoint {d['checkpoint_sha256'][:12]}, not the {ran[:12]} that ran here"
        rows.append({**r, "data_kind": r["data"], "data_text": d["text"], "n": d["n"],
                     "chance_energy": d["chance_energy"], "note": note})
    return rows


def explanation_context(result: dict[str, Any], study: StudyVolume, learned, lung_labels: np.ndarray | None,
                        lesion_mask: np.ndarray | None) -> dict[str, Any]:
    """Template variables of the "Where the models looked" section."""
    panels = location_map_panels(result, study, learned, lung_labels=lung_labels, lesion_mask=lesion_mask)
    has_maps = learned is not None and bool(getattr(learned, "cam_maps", None)
                                            or getattr(learned, "prototype_maps", None))
    note = ""
    if has_maps and not panels:
        note = (f"No slice reached the evidence threshold (lesion area > 0 in the lesion mask or lesion probability "
                f"≥ {EVIDENCE_PROBABILITY:g}), so no location map is shown.")
    return {"map_panels": panels, "map_section": has_maps, "map_note": note,
            "map_dilation_mm": MAP_LUNG_DILATION_MM, "mask_box_min_mm2": MASK_BOX_MIN_AREA_MM2,
            "explanation_scores": explanation_scores(learned) if has_maps else [],
            "explanation_scores_source": EXPLANATION_SCORES["source"]}


def _resize_rgb(rgb: np.ndarray, aspect: float, max_size: int = 256) -> np.ndarray:
    from PIL import Image

    h, w = rgb.shape[:2]
    scale = max_size / max(h * aspect, w)
    size = (max(1, int(round(w * scale))), max(1, int(round(h * aspect * scale))))
    return np.asarray(Image.fromarray(rgb.astype(np.uint8)).resize(size, Image.BILINEAR))


def volumetric_panels(vol, study: StudyVolume, lung_labels: np.ndarray, max_slices: int = 4) -> list[dict]:
    """The 3D system's research panel: up to ``max_slices`` slices (:func:`choose_explanation_slices` on the
    per-slice area of its first map >= 0.5 and the per-slice maximum of that map), each with every map overlaid
    as it is (values in [0, 1], not rescaled: a weak map stays faint), inside the lung."""
    from ..explain.boxes import overlay_map_rgb
    from .render import window_to_uint8

    if vol is None or not vol.maps:
        return []
    first = next(iter(vol.maps.values()))
    lung = lung_labels > 0
    inside = np.where(lung, first, 0.0)
    area = (inside >= 0.5).sum(axis=(1, 2)).astype(np.float64)
    peak = inside.max(axis=(1, 2)).astype(np.float64)
    zs = choose_explanation_slices(area, peak, max_slices, p_min=0.25)
    if not zs:  # nothing stands out: the slices with the most lung, so the reader still sees the maps
        zs = sorted(np.argsort(-lung.sum(axis=(1, 2)))[:1].tolist())
    aspect = float(study.spacing[1]) / float(study.spacing[2])
    panels = []
    for z in zs:
        grey = window_to_uint8(study.hu[z])
        images = [{"uri": png_data_uri(_resize_rgb(overlay_map_rgb(grey, np.where(lung[z], m[z], 0.0)), aspect)),
                   "caption": f"{vol.system} {name} (max {float(np.where(lung[z], m[z], 0).max()):.2f})"}
                  for name, m in vol.maps.items()]
        panels.append({"index": int(z), "images": images})
    return panels


def report_figures(slices: list[dict], study: StudyVolume, lung_labels: np.ndarray, lesion_mask: np.ndarray,
                   learned=None, volumetric=None) -> dict[str, Any]:
    """The report's images: the slice gallery, the "where the models looked" panels and the 3D system's research
    panel. They need only the per-slice results (``result["slices"]``), the masks and the model maps, so
    ``diagnose`` renders them in a second thread while the quantification runs (:func:`build_report` takes them
    ready-made)."""
    idx, step = gallery_indices(study.shape[0], lung_labels.any(axis=(1, 2)))
    aspect = float(study.spacing[1]) / float(study.spacing[2])
    gallery = []
    for i in idx:
        rgb = overlay_slice(study.hu[i], lung_labels[i], lesion_mask[i], aspect=aspect)
        s = slices[i]
        gallery.append({"uri": png_data_uri(rgb), "index": i, "position_mm": s["position_mm"],
                        "lesion_area_mm2": s["lesion_area_mm2"], "lesion_probability": s["lesion_probability"]})
    return {"gallery": gallery, "gallery_indices": list(idx), "step": step,
            "explanation": explanation_context({"slices": slices}, study, learned, lung_labels, lesion_mask),
            "volumetric_panels": volumetric_panels(volumetric, study, lung_labels)}


def build_report(result: dict[str, Any], study: StudyVolume, lung_labels: np.ndarray,
                 lesion_mask: np.ndarray, learned=None, figures: dict[str, Any] | None = None,
                 volumetric=None) -> str:
    """The self-contained HTML report. ``figures``: :func:`report_figures` of the same result, when already
    rendered (computed here otherwise, with the 3D system's output ``volumetric``)."""
    slices = result["slices"]
    q = result["quantification"]
    if figures is None:
        figures = report_figures(slices, study, lung_labels, lesion_mask, learned, volumetric)
    gallery, idx, step = figures["gallery"], figures["gallery_indices"], figures["step"]
    probs = [float(s["lesion_probability"]) for s in slices]
    patient = dict(result["patient"])
    patient["label_display"] = _DISPLAY.get(patient["label"], patient["label"])
    sev = q.get("severity") or {}
    grade = (f"{sev.get('mosmed_grade', '—')} ({sev.get('mosmed_description', '')})"
             if sev.get("mosmed_grade") is not None else f"— ({sev.get('withheld_reason', 'not given')})")
    severity = {"grade": grade,
                "percent": _fmt(sev.get("percent_lung_involved"))
                + (" (of the scanned lung)" if sev.get("partial") else ""),
                "ctss": f"{_fmt(sev.get('ctss_zones_total'))} / {sev.get('ctss_zones_max', 30)}"}
    lung_ml = q.get("lung_volume_ml") or {}
    spread = q.get("lesion_centre_spread_mm") or {}
    measure_keys = [
        ("Lung volume (mL)", lung_ml.get("total")), ("Right lung (mL)", lung_ml.get("right")),
        ("Left lung (mL)", lung_ml.get("left")), ("Lesion volume (mL)", q.get("lesion_volume_ml")),
        ("Lesion volume ratio", q.get("lesion_volume_ratio")), ("Lesion count (3D components)", q.get("lesion_count")),
        ("Ground-glass fraction", q.get("ggo_fraction")), ("Consolidation fraction", q.get("consolidation_fraction")),
        (f"Peripheral lesion ratio (σ = {q.get('peripheral_thickness_mm', '—')} mm)", q.get("peripheral_lesion_ratio")),
        ("Spread of lesion centres (SD, mm)", spread.get("overall") if isinstance(spread, dict) else spread),
        ("Bilateral involvement", q.get("bilateral_involvement")),
    ]
    measurements = [(name, _fmt(v)) for name, v in measure_keys]
    zones = []
    for name, z in (q.get("zones_not_lobes") or {}).items():
        zones.append({"name": name, "lung_ml": _fmt(z.get("lung_ml")), "lesion_ml": _fmt(z.get("lesion_ml")),
                      "percent": _fmt(z.get("percent_involved")), "score": _fmt(z.get("ctss"))})
    all_lesions = sorted(result.get("lesions") or [], key=lambda l: -float(l.get("volume_ml", 0)))
    lesions = []
    for les in all_lesions[:30]:
        size_d = les.get("bbox_size_mm") or {}
        size = [size_d.get(k) for k in ("height_z", "length_y", "width_x")] if size_d else []
        lesions.append({"id": les.get("id"), "side": les.get("side"), "zone": les.get("zone", "—"),
                        "volume_ml": _fmt(les.get("volume_ml")),
                        "size": " × ".join(f"{float(v):.0f}" for v in size) if size else "—",
                        "mean_hu": _fmt(les.get("mean_hu")), "ggo_fraction": _fmt(les.get("ggo_fraction"))})
    inp = result["input"]
    input_rows = [("Format", inp.get("format")), ("Slices", result["volume"]["shape_zyx"][0]),
                  ("Spacing z/y/x (mm)", " / ".join(f"{v:.3g}" for v in result["volume"]["spacing_mm_zyx"]))]
    for key in ("series_description", "series_instance_uid", "study_instance_uid", "manufacturer",
                "convolution_kernel", "slice_thickness"):
        if inp.get("metadata", {}).get(key) not in (None, ""):
            input_rows.append((key.replace("_", " "), inp["metadata"][key]))
    others = inp.get("metadata", {}).get("other_series") or []
    if others:
        input_rows.append(("Other series (not used)", f"{len(others)}: see result.json input.metadata.other_series"))
    template = _ENV.get_template("report.html")
    return template.render(
        data_note=result.get("data_note", ""), patient=patient, severity=severity, measurements=measurements,
        zones=zones, lesions=lesions, lesions_truncated=len(all_lesions) > len(lesions),
        lesion_method=result["models"]["lesions"], lung_method=result["models"]["lungs"],
        curve_svg=curve_svg(probs, marks=idx, y_max=1.0), slice_prob_source=result["models"]["slice_lesion_probability"],
        step=step, gallery=gallery, warnings=inp.get("warnings") or [], input_rows=input_rows,
        timing=result["timing_s"], version=__version__, schema_version=result["schema_version"],
        **figures["explanation"],
        learned_models=(result["models"].get("learned") or {}),
        rule_result=patient.get("rule_result"), differential=patient.get("differential"),
        research=(patient.get("research_panel") or {}).get("m3lung_patient"),
        research_note=(patient.get("research_panel") or {}).get("note", ""),
        headline_validation=_validation_text(patient), slab_mm=40,
        coverage_banner=coverage_banner(result.get("coverage")), partial_note=q.get("partial_note"),
        volumetric=result["models"].get("volumetric"), volumetric_panels=figures.get("volumetric_panels") or [],
    )


def coverage_banner(cov: dict[str, Any] | None) -> str | None:
    """The text after "Partial lung coverage:" at the top of the report, or None when the lung is fully scanned."""
    if not cov or cov.get("complete", True):
        return None
    ends = " and ".join(w for w, cut in (("top (apices not scanned)", cov.get("cut_superior")),
                                         ("bottom (bases not scanned)", cov.get("cut_inferior"))) if cut)
    return (f"the scan covers {cov['scan_extent_mm']:g} mm and the lung is cut at the {ends}. Volumes and "
            "percentages are of the scanned lung only; no CT grade or zone score total is given for unseen lung; "
            "the headline and RSNA category are from what is seen.")


def _validation_text(patient: dict[str, Any]) -> str:
    v = (patient.get("model") or {}).get("validation")
    if isinstance(v, dict):
        def show(val: Any) -> str:
            if isinstance(val, dict):
                return ", ".join(f"{k} {_fmt(x)}" for k, x in val.items())
            return _fmt(val)
        return "; ".join(f"{k.replace('_', ' ')}: {show(val)}" for k, val in v.items())
    return str(v) if v else ""
