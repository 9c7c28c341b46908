"""Self-contained HTML report (M3Lung-Sys Fig. 11 style: slice sequence with overlays and the lesion curve)."""
from __future__ import annotations

from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape

from .. import __version__
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


def location_map_panels(result: dict[str, Any], study: StudyVolume, learned, max_slices: int = 6) -> list[dict]:
    """The slices the lesion model is most sure about, each drawn plain, with the CAM of the real-data lesion
    model (+ boxes from it, Hu et al. box extraction) and with the M3Lung-Sys prototype map (synthetic-trained)."""
    if learned is None or learned.lesion_probability is None:
        return []
    from ..explain.boxes import boxes_from_saliency, draw_boxes_rgb, overlay_map_rgb
    from .render import window_to_uint8

    p = np.nan_to_num(learned.lesion_probability, nan=-1.0)
    order = [int(z) for z in np.argsort(-p, kind="stable") if p[z] >= 0.5][:max_slices]
    aspect = float(study.spacing[1]) / float(study.spacing[2])
    panels = []
    for z in sorted(order):
        grey = window_to_uint8(study.hu[z])
        images = []
        cam = learned.slice_map("cam", z)
        if cam is not None:
            rgb = overlay_map_rgb(grey, cam)
            boxes = boxes_from_saliency(cam)
            rgb = draw_boxes_rgb(rgb, boxes, colour=(0, 255, 0), thickness=2)
            images.append({"uri": png_data_uri(_resize_rgb(rgb, aspect)),
                           "caption": f"CAM (Conv4), lesion network (real-data), {len(boxes)} box(es)"})
        proto = learned.slice_map("prototype", z)
        if proto is not None:
            images.append({"uri": png_data_uri(_resize_rgb(overlay_map_rgb(grey, proto), aspect)),
                           "caption": "M3Lung-Sys prototype map (synthetic-trained)"})
        if images:
            panels.append({"index": z, "position_mm": result["slices"][z]["position_mm"],
                           "lesion_probability": float(p[z]), "images": images})
    return panels


def _resize_rgb(rgb: np.ndarray, aspect: float, max_size: int = 256) -> np.ndarray:
    from PIL import Image

    h, w = rgb.shape[:2]
    scale = max_size / max(h * aspect, w)
    size = (max(1, int(round(w * scale))), max(1, int(round(h * aspect * scale))))
    return np.asarray(Image.fromarray(rgb.astype(np.uint8)).resize(size, Image.BILINEAR))


def build_report(result: dict[str, Any], study: StudyVolume, lung_labels: np.ndarray,
                 lesion_mask: np.ndarray, learned=None) -> str:
    slices = result["slices"]
    q = result["quantification"]
    idx, step = gallery_indices(study.shape[0], lung_labels.any(axis=(1, 2)))
    aspect = float(study.spacing[1]) / float(study.spacing[2])
    gallery = []
    for i in idx:
        rgb = overlay_slice(study.hu[i], lung_labels[i], lesion_mask[i], aspect=aspect)
        s = slices[i]
        gallery.append({"uri": png_data_uri(rgb), "index": i, "position_mm": s["position_mm"],
                        "lesion_area_mm2": s["lesion_area_mm2"], "lesion_probability": s["lesion_probability"]})
    probs = [float(s["lesion_probability"]) for s in slices]
    patient = dict(result["patient"])
    patient["label_display"] = _DISPLAY.get(patient["label"], patient["label"])
    sev = q.get("severity") or {}
    severity = {"grade": f"{sev.get('mosmed_grade', '—')} ({sev.get('mosmed_description', '')})",
                "percent": _fmt(sev.get("percent_lung_involved")),
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
        map_panels=location_map_panels(result, study, learned), learned_models=(result["models"].get("learned") or {}),
        rule_result=patient.get("rule_result"),
    )
