"""The report's "Where the models looked" section: slice choice spread over the evidence, maps restricted to the
lung, boxes from the lesion mask, the CAM-uninformative rule, and the table of past explanation scores."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoct.explain.boxes import (
    Box,
    boxes_from_mask,
    boxes_from_saliency,
    dilate_region_mm,
    map_informativeness,
    overlay_map_rgb,
    rescale_boxes,
    restrict_map_to_region,
)
from pneumoct.report.html import (
    CAM_BOX_RGB,
    EXPLANATION_SCORES,
    MASK_BOX_RGB,
    choose_explanation_slices,
    explanation_context,
    explanation_scores,
    location_map_panels,
)
from pneumoct.types import SliceInfo, StudyVolume

REPO = Path(__file__).resolve().parents[1]


def blob(shape, centre, sigma):
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return np.exp(-((rr - centre[0]) ** 2 + (cc - centre[1]) ** 2) / (2.0 * sigma**2))


def disc(shape, centre, radius):
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius**2


def decode(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def has_colour(rgb: np.ndarray, colour) -> bool:
    return bool((np.abs(rgb.astype(int) - np.asarray(colour)).sum(-1) == 0).any())


# ------------------------------------------------------------------------------------------ slice choice


def test_choice_spread_over_the_study_and_strongest_included():
    z = np.arange(100)
    area = 50.0 + 40.0 * np.sin(z / 7.0) ** 2  # evidence on every slice, several local maxima
    area[63] = 5000.0                           # the strongest slice
    prob = np.full(100, 0.3)
    chosen = choose_explanation_slices(area, prob, 6)
    assert len(chosen) == 6 and chosen == sorted(chosen)
    assert 63 in chosen
    assert min(np.diff(chosen)) >= 2                     # never adjacent
    assert chosen[0] < 25 and chosen[-1] > 75             # from the top and the bottom of the evidence


def test_choice_not_adjacent_when_group_maxima_meet_at_a_boundary():
    area = np.zeros(60)
    area[0:60] = 1.0
    area[29], area[30] = 100.0, 99.0   # two groups' maxima on adjacent slices (groups of 10: 20-29, 30-39)
    chosen = choose_explanation_slices(area, np.zeros(60), 6)
    assert 29 in chosen and 30 not in chosen
    assert min(np.diff(chosen)) >= 2


def test_choice_empty_probability_only_and_nan():
    assert choose_explanation_slices(np.zeros(20), np.full(20, 0.2)) == []
    assert choose_explanation_slices([], []) == []
    assert choose_explanation_slices(np.ones(5), np.ones(5), n=0) == []
    p = np.full(30, np.nan)
    p[12] = 0.7                       # probability alone is evidence; NaN is none
    assert choose_explanation_slices(np.zeros(30), p) == [12]
    area = np.zeros(30)
    area[3] = 10.0
    assert choose_explanation_slices(area, p) == [3, 12]
    with pytest.raises(ValueError):
        choose_explanation_slices(np.zeros(3), np.zeros(4))


def test_choice_where_the_evidence_is():
    """Dense evidence low in the study, one slice high: panels follow the evidence, at most n, all with evidence."""
    area = np.zeros(120)
    area[80:110] = np.linspace(10, 300, 30)
    area[10] = 5.0
    chosen = choose_explanation_slices(area, np.zeros(120), 6)
    assert all(area[c] > 0 for c in chosen) and len(chosen) <= 6
    assert 109 in chosen and 10 in chosen
    assert sum(c >= 80 for c in chosen) >= 4


# ------------------------------------------------------------------------------------------ lung restriction


def test_dilate_region_on_its_box_equals_the_whole_image_transform():
    """dilate_region_mm runs the distance transform on the region's box grown by the radius: the same pixels as on
    the whole image (random regions, anisotropic spacing, regions at the border, a full box)."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(5)
    for k in range(20):
        shape = (40 + k, 60 - k)
        r = ndi.binary_opening(rng.random(shape) > 0.93 - 0.02 * (k % 4), iterations=k % 2)
        if k == 3:
            r[:, :3] = True  # touches the border
        if not r.any():
            continue
        sp = (0.6 + 0.1 * (k % 3), 0.7)
        d = 1.0 + 0.7 * k
        expected = ndi.distance_transform_edt(~r, sampling=sp) <= d if not r.all() else r
        np.testing.assert_array_equal(dilate_region_mm(r, d, sp), expected)
    full = np.zeros((30, 30), bool)
    full[10:20, 10:20] = True
    np.testing.assert_array_equal(dilate_region_mm(full, 0.5, (1.0, 1.0)), full)


def test_restrict_map_hides_heat_outside_the_lung():
    shape = (64, 64)
    lung = disc(shape, (32, 20), 10)
    m = 0.4 * blob(shape, (30, 22), 4) + blob(shape, (32, 55), 3)  # maximum on the "chest wall", far from lung
    assert not lung[np.unravel_index(np.argmax(m), shape)]
    shown, reg = restrict_map_to_region(m, lung, dilate_mm=5.0, spacing=(1.0, 1.0))
    assert reg[lung].all() and reg.sum() > lung.sum()                    # grown by ~5 px
    assert not reg[disc(shape, (32, 20), 16) == 0].any()                 # but not more
    assert np.all(shown[~reg] == 0.0)
    assert shown.max() == pytest.approx(1.0) and lung[np.unravel_index(np.argmax(shown), shape)]
    assert tuple(np.unravel_index(np.argmax(shown), shape)) == (30, 22)  # the in-lung peak now leads
    assert 0.0 <= shown.min() and shown[lung].min() == pytest.approx(0.0)
    # the picture: no tint at the former maximum, the in-lung peak tinted
    grey = np.full(shape, 100, np.uint8)
    rgb = overlay_map_rgb(grey, shown)
    assert (rgb[32, 55] == 100).all() and not (rgb[30, 22] == 100).all()
    # and no box outside the lung
    boxes = boxes_from_saliency(shown, region=reg, min_area_px=4)
    assert boxes and all(reg[b.slices].any() and b.c1 <= 40 for b in boxes)


def test_restrict_map_scale_set_by_the_lung_not_the_band_and_edge_cases():
    shape = (40, 40)
    lung = disc(shape, (20, 20), 8)
    m = np.zeros(shape)
    m[lung] = np.linspace(0.0, 0.5, int(lung.sum()))
    m[20, 29] = 5.0                         # hot pixel in the 5 mm band just outside the lung
    shown, reg = restrict_map_to_region(m, lung, dilate_mm=5.0)
    assert reg[20, 29] and shown[20, 29] == 1.0            # clipped, not the scale
    assert shown[lung].max() == pytest.approx(1.0)         # the lung's own maximum is 1
    empty, reg0 = restrict_map_to_region(m, np.zeros(shape, bool), dilate_mm=5.0)
    assert not empty.any() and not reg0.any()
    flat, _ = restrict_map_to_region(np.full(shape, 0.7), lung)
    assert not flat.any()
    with pytest.raises(ValueError):
        restrict_map_to_region(m, lung[:10])
    # anisotropic pixels: 5 mm is 10 rows at 0.5 mm but 2.5 columns at 2 mm
    d = dilate_region_mm(disc(shape, (20, 20), 3), 5.0, spacing=(0.5, 2.0))
    rows, cols = np.nonzero(d)
    assert rows.max() - 20 == 13 and cols.max() - 20 == 5


def test_region_threshold_gives_the_blob_not_the_lung():
    shape = (64, 64)
    lung = disc(shape, (32, 32), 20)
    m = (0.2 + blob(shape, (25, 38), 3)) * lung   # zero outside the lung, a lesion-like blob inside
    plain = boxes_from_saliency(m)
    assert plain and plain[0].box_area > 1000           # whole-image threshold: "lung vs not lung"
    boxes = boxes_from_saliency(m, region=lung)
    assert boxes and boxes[0].box_area < 300
    assert boxes[0].r0 <= 25 < boxes[0].r1 and boxes[0].c0 <= 38 < boxes[0].c1
    assert boxes_from_saliency(m, region=np.zeros(shape, bool)) == []
    assert boxes_from_saliency(np.where(lung, 0.3, 0.0), region=lung) == []  # constant in the lung
    # without region the result is unchanged (float threshold too)
    assert boxes_from_saliency(m, threshold=0.5) == boxes_from_saliency(m, threshold=0.5, region=None)


# ------------------------------------------------------------------------------------------ boxes from the mask


def test_boxes_from_mask_components_specks_and_labels():
    mask = np.zeros((50, 60), np.uint8)
    mask[5:15, 10:30] = 1                 # 200 px, GGO
    mask[30:38, 40:45] = 2                # 40 px, consolidation
    mask[45, 2] = 1                       # a 1 px speck
    boxes = boxes_from_mask(mask, min_area_px=20)
    assert [(b.r0, b.r1, b.c0, b.c1) for b in boxes] == [(5, 15, 10, 30), (30, 38, 40, 45)]
    assert [b.area for b in boxes] == [200, 40] and all(isinstance(b, Box) and b.score == 1.0 for b in boxes)
    assert len(boxes_from_mask(mask)) == 3
    assert boxes_from_mask(np.zeros((8, 8))) == []
    diag = np.eye(6, dtype=bool)
    assert len(boxes_from_mask(diag, connectivity=2)) == 1 and len(boxes_from_mask(diag, connectivity=1)) == 6
    with pytest.raises(ValueError):
        boxes_from_mask(np.zeros((2, 3, 4)))


def test_rescale_boxes():
    b = Box(r0=10, r1=20, c0=4, c1=5, score=0.5, peak=0.9, area=7)
    (s,) = rescale_boxes([b], (100, 100), (50, 200))
    assert (s.r0, s.r1, s.c0, s.c1) == (5, 10, 8, 10) and (s.score, s.peak, s.area) == (0.5, 0.9, 7)
    (t,) = rescale_boxes([Box(0, 1, 0, 1, 1.0, 1.0, 1)], (512, 512), (256, 256))
    assert t.r1 > t.r0 and t.c1 > t.c0


def test_map_informativeness():
    shape = (64, 64)
    lung = disc(shape, (32, 32), 24)
    focal = blob(shape, (20, 30), 4)
    info = map_informativeness(focal, lung, boxes_from_saliency(focal, region=lung))
    assert info["informative"] and info["reason"] == "" and info["spread"] > 0.15
    flat = 0.8 + 0.01 * np.random.default_rng(0).random(shape)
    info = map_informativeness(flat, lung)
    assert not info["informative"] and "nearly flat" in info["reason"]
    whole = [Box(0, 64, 0, 64, 1.0, 1.0, 4096)]
    info = map_informativeness(focal, lung, whole)
    assert not info["informative"] and info["box_cover"] == 1.0 and "cover" in info["reason"]
    assert not map_informativeness(focal, np.zeros(shape, bool))["informative"]


# ------------------------------------------------------------------------------------------ the report section


class FakeLearned:
    """Stand-in for LearnedOutput: maps already on the slice grid."""

    def __init__(self, cam: dict, proto: dict, provenance: dict | None = None):
        self.cam_maps, self.prototype_maps = cam, proto
        self.provenance = provenance or {}
        self.lesion_probability = None

    def slice_map(self, kind, z):
        return (self.cam_maps if kind == "cam" else self.prototype_maps).get(z)


def small_study(nz=12, n=64, px=1.0):
    hu = np.full((nz, n, n), 40, np.int16)
    lung = np.zeros((nz, n, n), np.uint8)
    for z in range(nz):
        lung[z][disc((n, n), (32, 18), 10)] = 1
        lung[z][disc((n, n), (32, 46), 10)] = 2
    hu[lung > 0] = -850
    study = StudyVolume(hu, (5.0, px, px), (0.0, 0.0, 0.0), np.diag([1.0, 1.0, -1.0]),
                        [SliceInfo(i, -5.0 * i) for i in range(nz)], "nifti")
    return study, lung


def slices_result(area, prob):
    return {"slices": [{"index": i, "position_mm": -5.0 * i, "lesion_area_mm2": float(a),
                        "lesion_probability": float(p)} for i, (a, p) in enumerate(zip(area, prob))]}


def test_panels_restrict_maps_draw_mask_boxes_and_flag_uninformative_cam():
    study, lung = small_study()
    nz, n = study.shape[0], study.shape[1]
    lesion = np.zeros(lung.shape, np.uint8)
    lesion[3][24:32, 12:20] = 1            # 64 mm² lesion at slice 3 (left image lung)
    lesion[8][30:36, 42:50] = 2            # 48 mm² at slice 8
    lesion[8][40, 40] = 1                  # 1 mm² speck: no box
    area = lesion.reshape(nz, -1).astype(bool).sum(1).astype(float)
    prob = np.where(area > 0, 0.6, 0.1)
    chest_wall = blob((n, n), (3, 32), 2) * 3.0    # hot spot outside both lungs (anterior chest wall)
    focal = blob((n, n), (27, 15), 3.5)             # informative CAM at slice 3
    flat = np.full((n, n), 0.6) + 0.01 * blob((n, n), (32, 46), 6)  # uninformative CAM at slice 8
    learned = FakeLearned(cam={3: focal + chest_wall, 8: flat + chest_wall},
                          proto={3: chest_wall + 0.2 * focal, 8: chest_wall + 0.2 * focal})
    panels = location_map_panels(slices_result(area, prob), study, learned, lung_labels=lung, lesion_mask=lesion)
    assert [p["index"] for p in panels] == [3, 8]
    p3, p8 = panels
    cam3, proto3 = p3["images"]
    assert "green: " in cam3["caption"] and "from the lesion mask" in cam3["caption"] and cam3["informative"]
    img = decode(cam3["uri"])
    assert has_colour(img, CAM_BOX_RGB) and has_colour(img, MASK_BOX_RGB)
    # heat outside the lung never shows: the chest-wall hot spot stays grey
    h, w = img.shape[:2]
    r, c = int(3 * h / n), int(32 * w / n)
    patch = img[r - 1:r + 2, c - 1:c + 2].astype(int)
    assert (patch.max(-1) - patch.min(-1) <= 2).all()
    patch = decode(proto3["uri"])[r - 1:r + 2, c - 1:c + 2].astype(int)
    assert (patch.max(-1) - patch.min(-1) <= 2).all()
    cam8 = p8["images"][0]
    assert "uninformative" in cam8["caption"] and "nearly flat" in cam8["caption"] and not cam8["informative"]
    assert "1 box(es) from the lesion mask" in cam8["caption"]      # the speck got none
    img8 = decode(cam8["uri"])
    assert has_colour(img8, MASK_BOX_RGB) and not has_colour(img8, CAM_BOX_RGB)


def test_context_no_evidence_sentence_and_no_models():
    study, lung = small_study()
    nz = study.shape[0]
    learned = FakeLearned(cam={z: np.zeros(study.shape[1:]) for z in range(nz)}, proto={})
    ctx = explanation_context(slices_result(np.zeros(nz), np.full(nz, 0.2)), study, learned, lung,
                              np.zeros(lung.shape, np.uint8))
    assert ctx["map_section"] and ctx["map_panels"] == []
    assert "No slice reached the evidence threshold" in ctx["map_note"]
    assert ctx["explanation_scores"]
    ctx = explanation_context(slices_result(np.ones(nz), np.ones(nz)), study, None, lung, None)
    assert not ctx["map_section"] and ctx["map_panels"] == [] and ctx["map_note"] == ""


def test_build_report_renders_the_section(tmp_path):
    from pneumoct.pipeline import DiagnoseOptions, analyse_study
    from pneumoct.report.html import build_report

    from toy import toy_chest

    study, _, _ = toy_chest()
    out = analyse_study(study, DiagnoseOptions(use_learned_models=False, write_report=False))
    cam = {z: blob(study.shape[1:], (60, 90), 6) for z in range(study.shape[0])}
    html = build_report(out.result, study, out.lung_labels, out.lesion_mask, learned=FakeLearned(cam, {}))
    assert "Where the models looked" in html and "How well each map matched lesion masks" in html
    assert "Magenta boxes: from the lesion mask" in html
    assert "CAM Conv4, lesion network" in html and "0.85" in html
    has_evidence = any(s["lesion_area_mm2"] > 0 or s["lesion_probability"] >= 0.5 for s in out.result["slices"])
    assert has_evidence  # the toy chest has a consolidation
    assert "map slice" in html and "No slice reached the evidence threshold" not in html
    assert 1 <= html.count('alt="map slice') <= 6


# ------------------------------------------------------------------------------------------ the score table


def test_explanation_scores_match_the_benchmark_files():
    """The constant copied into the report equals benchmarks/results (2-decimal scores, 3-decimal energy)."""
    checked = 0
    for r in EXPLANATION_SCORES["rows"]:
        d = EXPLANATION_SCORES["data"][r["data"]]
        f = REPO / "benchmarks" / "results" / d["file"]
        if not f.is_file():
            continue
        rep = json.loads(f.read_text())
        got = rep["methods"][r["key"]]
        for k, tol in (("pointing_game", 0.005), ("dice", 0.005), ("lesion_recall", 0.005),
                       ("box_precision", 0.005), ("energy_inside", 0.0005)):
            assert abs(got[k] - r[k]) <= tol + 1e-9, (r["name"], r["data"], k, got[k], r[k])
        assert got["n"] == d["n"]
        assert abs(rep["chance_energy"] - d["chance_energy"]) <= 0.0005
        checked += 1
    if not checked:
        pytest.skip("benchmarks/results not in this checkout")


def test_explanation_scores_note_another_checkpoint():
    rows = explanation_scores(None)
    assert len(rows) == len(EXPLANATION_SCORES["rows"]) and not any(r["note"] for r in rows)
    same = FakeLearned({}, {}, {"lesion_presence": {"sha256": EXPLANATION_SCORES["data"]["real"]["checkpoint_sha256"]},
                                "m3lung_slice": {"sha256": "f" * 64}})
    rows = explanation_scores(same)
    assert all(r["note"] == "" for r in rows if r["data"] == "real")
    assert all("measured on checkpoint" in r["note"] for r in rows if r["data"] == "synthetic")


def test_bundled_checkpoints_are_the_ones_scored():
    """When the bundled weights change, the copied scores are stale: re-run benchmarks/explain_eval.py."""
    from pneumoct.learned import bundled_weights_dir

    d = bundled_weights_dir()
    for kind in ("real", "synthetic"):
        meta = EXPLANATION_SCORES["data"][kind]
        f = d / meta["model"] / "model.json"
        if not f.is_file():
            pytest.skip("no bundled weights in this checkout")
        assert json.loads(f.read_text())["sha256"] == meta["checkpoint_sha256"]


def test_explain_eval_summary_table_rounds_like_the_report():
    import importlib.util

    spec = importlib.util.spec_from_file_location("explain_eval", REPO / "benchmarks" / "explain_eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rep = {"chance_energy": 0.05731, "methods": {
        "cam/conv4": {"pointing_game": 0.84666, "energy_inside": 0.067924, "dice": 0.14771, "lesion_recall": 0.25898,
                      "box_precision": None, "iou": 0.08, "n": 150}}}
    table = mod.summary_table(rep)
    assert "| cam/conv4 | 0.85 | 0.068 (0.057) | 0.15 | 0.26 | — | 150 |" in table
