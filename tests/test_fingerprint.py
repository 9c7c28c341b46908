"""Training-data fingerprints (pneumoct.fingerprint): build, store, load, and check a study against one."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pneumoct.fingerprint import (FORMAT, NOTE_CODE, WARNING_CODE, check_study, dataset_fingerprint,
                                  fingerprint_from_tables, fingerprint_notes, hu_case_properties,
                                  image_case_properties, load_fingerprint, write_fingerprint)
from pneumoct.learned import bundled_weights_dir
from pneumoct.types import SliceInfo, StudyVolume

BUNDLED = ("lesion_presence", "lesion_seg", "m3lung_patient", "m3lung_slice")


def tiny_study(seed: int = 0, *, slice_mm: float = 2.0, pixel_mm: float = 0.7, kernel: str | None = "B30f",
               shift: float = 0.0, nz: int = 6, size: int = 48) -> tuple[StudyVolume, np.ndarray]:
    """A toy chest: body at 40 HU, two elliptic lungs at about -850 HU (+ ``shift``), air outside."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) / (0.42 * size)) ** 2 + ((xx - size / 2) / (0.46 * size)) ** 2 <= 1
    right = ((yy - size / 2) / (0.28 * size)) ** 2 + ((xx - 0.32 * size) / (0.12 * size)) ** 2 <= 1
    left = ((yy - size / 2) / (0.28 * size)) ** 2 + ((xx - 0.68 * size) / (0.12 * size)) ** 2 <= 1
    lung2d = np.where(right, 1, np.where(left, 2, 0)).astype(np.uint8)
    hu = np.full((nz, size, size), -1000.0)
    hu[:, body] = 40.0
    lung = np.repeat(lung2d[None], nz, axis=0)
    hu[lung > 0] = -850.0 + 25.0 * rng.standard_normal(int((lung > 0).sum()))
    hu = hu + 10.0 * rng.standard_normal(hu.shape) + np.where(lung > 0, shift, 0.0)
    meta = {"manufacturer": "ACME", "slice_thickness_mm": slice_mm}
    if kernel:
        meta["convolution_kernel"] = kernel
    study = StudyVolume(hu=np.round(hu).astype(np.int16), spacing=(slice_mm, pixel_mm, pixel_mm),
                        origin=(0.0, 0.0, 0.0), direction=np.diag([1.0, 1.0, -1.0]),
                        slices=[SliceInfo(index=k, position_mm=-k * slice_mm) for k in range(nz)],
                        source_format="nifti", metadata=meta)
    return study, lung


@pytest.fixture(scope="module")
def fp():
    cases = []
    for i, (sm, pm) in enumerate([(2.0, 0.7), (1.5, 0.62)]):
        study, lung = tiny_study(i, slice_mm=sm, pixel_mm=pm)
        cases.append(hu_case_properties(study, lung, "toy-ct", seed=i))
    return dataset_fingerprint(cases, model={"key": "toy_model"})


def outside(warnings):
    return [w for w in warnings if w["code"] == WARNING_CODE]


def test_fingerprint_records_spacing_kernel_and_lung_hu(fp):
    src = fp["sources"]["toy-ct"]
    assert fp["format"] == FORMAT and src["kind"] == "hu_volume" and src["n_studies"] == 2
    assert src["spacing_mm"]["slice"]["min"] == 1.5 and src["spacing_mm"]["slice"]["max"] == 2.0
    assert src["kernels"] == {"B30F": 2} and src["manufacturers"] == {"ACME": 2}
    assert -870 < src["lung_hu"]["p50"] < -830 and src["lung_hu"]["p00_5"] < src["lung_hu"]["p99_5"]
    assert set(src["lung_hu"]) >= {"mean", "std", "p00_5", "p50", "p99_5"}
    assert fp["summary"]["saw_real_hu_volumes"] and not fp["summary"]["saw_8bit_images"]


def test_study_inside_passes(fp):
    study, lung = tiny_study(7, slice_mm=1.8, pixel_mm=0.66)
    assert check_study(study, lung, fp) == []


@pytest.mark.parametrize("change,check,words", [
    ({"slice_mm": 5.0}, "slice_spacing", "slice spacing 5.00 mm"),
    ({"pixel_mm": 1.4}, "in_plane_spacing", "in-plane pixel spacing 1.40 mm"),
    ({"kernel": "B70f"}, "kernel", "kernel B70f was not seen"),
    ({"shift": 300.0}, "lung_hu", "lung HU unlike its training data"),
])
def test_study_outside_warns(fp, change, check, words):
    study, lung = tiny_study(3, **change)
    w = outside(check_study(study, lung, fp))
    assert [x["details"]["check"] for x in w] == [check], w
    assert words in w[0]["message"] and w[0]["message"].startswith("toy_model:")
    assert w[0]["severity"] == "warning"


def test_unknown_kernel_and_no_lung_are_not_checked(fp):
    study, _ = tiny_study(4, kernel=None)
    assert check_study(study, None, fp) == []
    assert check_study(study, None, None) == []


def test_json_round_trip(fp, tmp_path):
    path = write_fingerprint(fp, tmp_path / "model")
    back = load_fingerprint(tmp_path / "model")
    assert back == json.loads(json.dumps(fp)) and path.name == "fingerprint.json"
    study, lung = tiny_study(5, slice_mm=5.0)
    assert check_study(study, lung, back) == check_study(study, lung, fp)
    assert load_fingerprint(tmp_path / "nothing-here") is None
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError):
        load_fingerprint(tmp_path / "bad.json")


def test_8bit_only_model_gives_one_note_not_alarms(tmp_path):
    study, lung = tiny_study(0)
    img = np.clip((study.hu[2].astype(float) + 1000) / 4, 0, 255).astype(np.uint8)
    fp = dataset_fingerprint([image_case_properties(img, lung[2], "toy-png")], model={"key": "png_model"})
    assert fp["sources"]["toy-png"]["kind"] == "image_8bit" and fp["sources"]["toy-png"]["lung_grey"]
    for change in ({}, {"slice_mm": 5.0, "kernel": "B70f", "shift": 300.0}):
        s, lg = tiny_study(1, **change)
        res = check_study(s, lg, fp)
        assert len(res) == 1 and res[0]["code"] == NOTE_CODE and res[0]["severity"] == "info"
        assert res[0]["details"]["check"] == "no_hu_training_data" and "8-bit 2D images only" in res[0]["message"]
        assert check_study(s, lg, fp, include_notes=False) == []


def test_synthetic_hu_only_is_noted(fp):
    study, lung = tiny_study(0)
    fp_syn = dataset_fingerprint([hu_case_properties(study, lung, "phantom")])
    assert fp_syn["sources"]["phantom"]["synthetic"] and fp_syn["sources"]["phantom"]["kernels"] == {"B30F": 1}
    notes = fingerprint_notes(fp_syn)
    assert [n["details"]["check"] for n in notes] == ["synthetic_hu_only"]
    assert fingerprint_notes(fp) == []


def test_unreadable_table_is_recorded_not_raised(tmp_path):
    fp = fingerprint_from_tables([{"kind": "manifest", "path": str(tmp_path / "missing.csv")},
                                  {"kind": "phantom_cohort", "path": str(tmp_path / "no-cohort")}])
    assert {v["kind"] for v in fp["sources"].values()} == {"unavailable"}
    assert fp["summary"]["unavailable_sources"] == ["manifest:missing", "phantom"]
    notes = fingerprint_notes(fp)
    assert [n["details"]["check"] for n in notes] == ["incomplete_fingerprint"] and "manifest:missing" in notes[0]["message"]
    study, lung = tiny_study(0)
    assert check_study(study, lung, fp) == notes


def test_manifest_table_and_run_hook(tmp_path):
    """A run's tables are fingerprinted from disk; store_fingerprint writes best/fingerprint.json after DONE and
    install_run carries it into the installed model folder."""
    import SimpleITK as sitk
    import yaml

    from pneumoct.train.config import parse_config
    from pneumoct.train.entry import store_fingerprint

    study, lung = tiny_study(0, nz=24, size=64)
    for name, arr in (("ct.nii.gz", study.hu), ("lung.nii.gz", lung)):
        im = sitk.GetImageFromArray(arr)
        im.SetSpacing((0.7, 0.7, 2.0))
        sitk.WriteImage(im, str(tmp_path / name))
    (tmp_path / "m.csv").write_text("path,label,lung_mask\nct.nii.gz,healthy,lung.nii.gz\n")
    cfg = parse_config({"model": {"name": "multiscale_cam_cpu", "kwargs": {"num_classes": 2}},
                        "data": {"tables": [{"kind": "manifest", "path": str(tmp_path / "m.csv")}], "size": 32}})
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    assert store_fingerprint(cfg, run) is None  # not finished: nothing written
    (run / "DONE").write_text("ok\n")
    (run / "data_summary.json").write_text(json.dumps({"train": {"by_source": {"manifest:m": 20}}}))
    path = store_fingerprint(cfg, run)
    assert path == run / "best" / "fingerprint.json"
    fp = load_fingerprint(run / "best")
    src = fp["sources"]["manifest:m"]
    assert src["kind"] == "hu_volume" and src["spacing_mm"]["slice"]["p50"] == pytest.approx(2.0)
    assert src["lung_hu"]["n"] > 1000 and fp["training_rows"]["train"] == {"manifest:m": 20}
    assert fp["model"]["config_name"] is None and yaml.safe_dump(fp)  # plain types only


def test_install_run_copies_fingerprint(tmp_path, fp):
    import torch

    from pneumoct.models import build_model
    from pneumoct.train.bundle import install_run
    from pneumoct.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    kwargs = {"num_classes": 4}
    run = tmp_path / "run"
    save_checkpoint(run / "best", build_model("m3lung_patient_cpu", **kwargs), "m3lung_patient_cpu", kwargs,
                    {"family": "m3lung_patient", "data": {"sources": ["toy-ct"], "synthetic": False}})
    write_fingerprint(fp, run / "best")
    dest = install_run(run, "m3lung_patient", tmp_path / "w")
    got = load_fingerprint(dest)
    assert got["model"]["key"] == "m3lung_patient" and got["sources"] == json.loads(json.dumps(fp["sources"]))


@pytest.mark.parametrize("key", BUNDLED)
def test_bundled_fingerprints_load(key):
    path = bundled_weights_dir() / key / "fingerprint.json"
    assert path.is_file() and path.stat().st_size < 20_000
    fp = load_fingerprint(path.parent)
    assert fp["model"]["key"] == key and not fp["summary"]["unavailable_sources"]
    meta = json.loads((path.parent / "model.json").read_text())["meta"]
    assert fp["tables"] == meta["data"]["tables"]
    names = {s.split(":")[-1] for s in meta["data"]["sources"]}
    assert set(fp["sources"]) == names - {"lung-crop"}
    for src in fp["sources"].values():
        if src["kind"] == "hu_volume":
            assert src["spacing_mm"]["slice"] and src["lung_hu"] and src["kernels"]
        else:
            assert src["kind"] == "image_8bit" and src["lung_grey"]
    study, lung = tiny_study(0)
    assert isinstance(check_study(study, lung, fp), list)


def test_2d_image_study_checked_against_8bit_sources():
    study, lung = tiny_study(0, size=64)
    grey = lambda s: np.clip((s.hu[2:3].astype(float) + 1000) / 4, 0, 255).astype(np.int16)  # noqa: E731
    fp = dataset_fingerprint([image_case_properties(grey(study)[0], lung[2], "toy-png")], model={"key": "png"})

    def as_2d(s):
        return StudyVolume(hu=grey(s), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3),
                           slices=[SliceInfo(index=0, position_mm=0.0)], source_format="image2d", is_2d_image=True)

    same, lg = tiny_study(1, size=64)
    assert check_study(as_2d(same), lg[2], fp) == []  # a 2D lung mask of a one-slice study is accepted
    bright, lg = tiny_study(1, size=64, shift=300.0)
    w = check_study(as_2d(bright), lg[2:3], fp)
    assert [x["details"]["check"] for x in w] == ["lung_grey"] and "grey levels" in w[0]["message"]
    hu_only = dataset_fingerprint([hu_case_properties(same, lg, "toy-ct")])
    assert [x["details"]["check"] for x in check_study(as_2d(same), lg[2], hu_only)] == ["no_8bit_training_data"]
