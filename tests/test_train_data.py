"""Slice tables, the M3Lung-Sys slice rule, patient splits, sampling, augmentation and the torch dataset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, require_real_data
from pneumoct.errors import PneumoctInputError
from pneumoct.synth.phantom import PhantomConfig, generate_phantom
from pneumoct.train.augment import AugmentConfig, augment_slice, to_unit
from pneumoct.train.data import (
    build_tables,
    read_manifest,
    table_from_covid19_ct_seg_png,
    table_from_covid_ct_md,
    table_from_manifest,
    table_from_medseg,
    table_from_phantom_cohort,
    table_from_phantoms,
)
from pneumoct.train.sampling import class_balanced_sampler, m3lung_slice_rule, patient_kfold, patient_split
from pneumoct.train.table import SliceTable
from pneumoct.train.torchdata import SliceDataset

torch.set_num_threads(1)

SIZE = 64


@pytest.fixture(scope="module")
def phantoms():
    return [generate_phantom(PhantomConfig(label=lab, seed=i + 1, matrix=96, n_slices=24))
            for i, lab in enumerate(["healthy", "covid19", "cap"])]


@pytest.fixture(scope="module")
def ptable(phantoms):
    return table_from_phantoms(phantoms, SIZE)


def _toy_table(labels_per_patient: dict[str, tuple[int, list[int]]], size: int = 8) -> SliceTable:
    """patient → (patient label, lesion labels of its slices)."""
    rows = [(p, pl, ll) for p, (pl, lls) in labels_per_patient.items() for ll in lls]
    n = len(rows)
    return SliceTable(
        images=np.zeros((n, size, size), np.float32), is_hu=np.ones(n, bool),
        class_label=np.array([r[1] for r in rows], np.int64), lesion_label=np.array([r[2] for r in rows], np.int64),
        lesion_mask=np.zeros((n, size, size), np.uint8), has_mask=np.zeros(n, bool),
        patient_id=np.array([r[0] for r in rows]), patient_label=np.array([r[1] for r in rows], np.int64),
        slice_index=np.arange(n), source=np.full(n, "toy"),
    )


# -- phantom tables ----------------------------------------------------------------------------------------------


def test_phantom_table_shapes_and_labels(ptable, phantoms):
    t = ptable
    assert t.images.shape[1:] == (SIZE, SIZE) and t.images.dtype == np.float32
    assert t.lesion_mask.shape == t.images.shape and t.is_hu.all() and t.has_mask.all()
    assert set(np.unique(t.patient_id)) == {f"phantom/mem-{i:04d}-seed{i + 1}" for i in range(3)}
    assert (t.class_label == t.patient_label).all()
    assert set(np.unique(t.patient_label)) == {0, 1, 3}
    # lesion label agrees with the cropped mask and with the phantom's own per-slice truth
    any_mask = (t.lesion_mask.reshape(len(t), -1) > 0).any(axis=1)
    assert (any_mask.astype(int) == t.lesion_label).all()
    for i, ph in enumerate(phantoms):
        rows = t.patient_id == f"phantom/mem-{i:04d}-seed{i + 1}"
        assert (t.lesion_label[rows] == ph.slice_lesion_labels[t.slice_index[rows]].astype(int)).all()
    assert (t.lesion_label[t.patient_label == 0] == 0).all()
    assert t.lesion_label[t.patient_label != 0].sum() > 0


def test_phantom_masks_registered_with_images(ptable, phantoms):
    t = ptable
    les = t.lesion_mask > 0
    assert les.sum() > 50
    lesion_hu = float(np.median(t.images[les]))
    # aerated lung: the darkest part of the crops with no lesion
    lung_hu = float(np.median(t.images[~les & (t.images < -600)]))
    assert lesion_hu > lung_hu + 200, (lesion_hu, lung_hu)  # lesions are denser than aerated lung
    # each row is exactly the shared crop path applied to the phantom's slice and mask
    from pneumoct.preprocess.slice_input import crop_slice

    ph = phantoms[1]
    rows = np.flatnonzero(t.patient_id == "phantom/mem-0001-seed2")
    r = rows[np.argmax(t.lesion_mask[rows].reshape(len(rows), -1).sum(1))]
    z = int(t.slice_index[r])
    c = crop_slice(ph.study.hu[z], ph.lung_mask[z] > 0, SIZE, mask=ph.lesion_mask[z])
    np.testing.assert_array_equal(c.image, t.images[r])
    np.testing.assert_array_equal(c.mask, t.lesion_mask[r])


def test_phantom_cohort_matches_in_memory(tmp_path):
    from pneumoct.synth.writer import case_seed, synthesize_cohort

    synthesize_cohort(tmp_path, 1, seed=5, labels=["covid19"], matrix=96, n_slices=24, formats=("nifti",))
    tc = table_from_phantom_cohort(tmp_path, SIZE)
    ph = generate_phantom(PhantomConfig(label="covid19", seed=case_seed(5, 0), matrix=96, n_slices=24))
    tm = table_from_phantoms([ph], SIZE)
    assert set(tc.patient_id) == {"phantom/case_0000"}
    assert len(tc) == len(tm) and (tc.slice_index == tm.slice_index).all()
    np.testing.assert_array_equal(tc.lesion_mask, tm.lesion_mask)  # orientation of the NIfTI masks matches
    np.testing.assert_allclose(tc.images, tm.images, atol=1.0)
    assert (tc.lesion_label == tm.lesion_label).all()


# -- M3Lung rule, splits, sampler -----------------------------------------------------------------------------------


def test_m3lung_rule_drops_exactly_lesion_free_diseased_slices():
    t = _toy_table({"h": (0, [0, 0, 1, -1]), "c": (1, [0, 1, 1, -1]), "p": (3, [0, 0, 1])})
    out = m3lung_slice_rule(t)
    # healthy: all 4 kept as class 0; covid: drop the one 0; cap: drop both 0
    assert len(out) == 4 + 3 + 1
    assert (out.class_label[out.patient_id == "h"] == 0).all()
    assert sorted(out.lesion_label[out.patient_id == "c"].tolist()) == [-1, 1, 1]
    assert (out.class_label[out.patient_id == "c"] == 1).all()
    assert out.class_label[out.patient_id == "p"].tolist() == [3]


def _many_patients(n_per_class=(6, 5, 3, 2), slices=3):
    spec = {}
    for c, n in enumerate(n_per_class):
        for j in range(n):
            spec[f"p{c}-{j}"] = (c, [1] * slices)
    return _toy_table(spec)


def test_patient_split_disjoint_and_stratified():
    t = _many_patients()
    tr, va = patient_split(t.patient_id, t.patient_label, val_fraction=0.2, seed=1)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(t)
    assert not set(t.patient_id[tr]) & set(t.patient_id[va])
    for c in range(4):  # every class with >= 2 patients appears on both sides
        assert (t.patient_label[va] == c).any() and (t.patient_label[tr] == c).any()
    tr2, va2 = patient_split(t.patient_id, t.patient_label, val_fraction=0.2, seed=1)
    assert (va == va2).all()


def test_patient_kfold_each_patient_once():
    t = _many_patients()
    folds = patient_kfold(t.patient_id, t.patient_label, k=4, seed=0)
    assert len(folds) == 4
    seen = []
    for tr, va in folds:
        assert not set(t.patient_id[tr]) & set(t.patient_id[va])
        assert len(tr) + len(va) == len(t)
        seen.extend(np.unique(t.patient_id[va]).tolist())
    assert sorted(seen) == sorted(np.unique(t.patient_id).tolist())
    sizes = [len(np.unique(t.patient_id[va])) for _, va in folds]
    assert max(sizes) - min(sizes) <= 1
    # the 6 healthy patients spread over the folds
    assert all((t.patient_label[va] == 0).any() for _, va in folds)


def test_class_balanced_sampler_balances():
    labels = np.array([0] * 900 + [1] * 90 + [3] * 10)
    s = class_balanced_sampler(labels, num_samples=6000, seed=0)
    drawn = labels[np.fromiter(iter(s), dtype=np.int64)]
    freq = np.array([(drawn == c).mean() for c in (0, 1, 3)])
    assert np.abs(freq - 1 / 3).max() < 0.04, freq
    again = labels[np.fromiter(iter(class_balanced_sampler(labels, num_samples=6000, seed=0)), dtype=np.int64)]
    assert (again == drawn).all()


# -- augmentation and dataset ---------------------------------------------------------------------------------------


def _square_slice(size=64):
    img = np.full((size, size), -850.0, np.float32)
    mask = np.zeros((size, size), np.uint8)
    img[20:34, 36:50] = 0.0  # a dense "lesion" off-centre
    mask[20:34, 36:50] = 1
    return img, mask


def test_augment_keeps_mask_aligned():
    img, mask = _square_slice()
    cfg = AugmentConfig(p_flip=0.5, p_rotate=1.0, p_crop=1.0, rotation_deg=25.0)
    moved = 0
    for k in range(30):
        x, m = augment_slice(img, True, mask, np.random.default_rng(k), cfg)
        assert x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1 and m.dtype == np.uint8
        if m.sum() < 10:
            continue
        inside = x[m > 0]
        # bright square stays under the mask: (almost) all masked pixels bright, few bright pixels outside
        assert np.mean(inside > 0.5) > 0.9
        bright = x > 0.6
        assert (bright & (m == 0)).sum() <= 0.15 * bright.sum() + 4
        moved += int(not np.array_equal(m, mask))
    assert moved > 10


def test_augment_window_and_grey_contrast():
    img, _ = _square_slice()
    x, m = augment_slice(img, True, None, np.random.default_rng(0),
                         AugmentConfig(flip=False, rotation_deg=0, crop_scale=(1.0, 1.0)))
    assert m is None
    # centre in [-700, -500], width 1200 → -850 HU maps to (-850 - (c - 600)) / 1200 in [0.125, 0.29]
    v = float(x[0, 0])
    assert 0.12 <= v <= 0.30
    np.testing.assert_allclose(to_unit(img, True)[0, 0], (-850 + 1200) / 1200, atol=1e-5)
    grey = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    xs = [augment_slice(grey, False, None, np.random.default_rng(k), AugmentConfig(p_contrast=1.0))[0].std()
          for k in range(6)]
    assert np.ptp(xs) > 0.01
    np.testing.assert_array_equal(to_unit(grey, False), grey)


def test_slice_dataset_items_and_determinism(ptable):
    ds = SliceDataset(ptable, channels=3, augment=AugmentConfig(), seed=7)
    a = ds[5]
    assert a["image"].shape == (3, SIZE, SIZE) and a["image"].dtype == torch.float32
    assert torch.equal(a["image"][0], a["image"][2])
    assert a["mask"].shape == (SIZE, SIZE) and a["has_mask"].item() is True
    assert a["class_label"].dtype == torch.long and int(a["index"]) == 5
    b = SliceDataset(ptable, channels=3, augment=AugmentConfig(), seed=7)[5]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    ds.set_epoch(1)
    c = ds[5]
    assert not torch.equal(a["image"], c["image"])
    plain = SliceDataset(ptable)
    np.testing.assert_allclose(plain[3]["image"][0].numpy(), to_unit(ptable.images[3], True), atol=1e-6)
    loader = torch.utils.data.DataLoader(plain, batch_size=4)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 1, SIZE, SIZE)


# -- manifests --------------------------------------------------------------------------------------------------------


def _write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(arr.astype(np.uint8)).save(path)


def _fake_slice(size=96):
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size), 20, np.uint8)
    body = ((yy - size / 2) / 44) ** 2 + ((xx - size / 2) / 46) ** 2 < 1
    img[body] = 170
    lung = np.zeros((size, size), bool)
    lung |= ((yy - 48) / 30) ** 2 + ((xx - 30) / 13) ** 2 < 1
    lung |= ((yy - 48) / 30) ** 2 + ((xx - 66) / 13) ** 2 < 1
    img[lung] = 40
    les = np.zeros((size, size), np.uint8)
    les[40:50, 25:35] = 255
    img[les > 0] = 120
    return img, (lung * 255).astype(np.uint8), les


def test_manifest_csv_and_json_2d(tmp_path):
    img, lung, les = _fake_slice()
    (tmp_path / "imgs").mkdir()
    _write_png(tmp_path / "imgs" / "a.png", img)
    _write_png(tmp_path / "imgs" / "a_lung.png", lung)
    _write_png(tmp_path / "imgs" / "a_les.png", les)
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path,label,patient_id,lesion_mask,lung_mask\n"
                        "imgs/a.png,covid19,pat1,imgs/a_les.png,imgs/a_lung.png\n"
                        "imgs/a.png,0,,,imgs/a_lung.png\n", encoding="utf-8")
    rows = read_manifest(csv_path)
    assert [r["label"] for r in rows] == [1, 0]
    assert rows[0]["patient_id"] == "pat1" and rows[1]["patient_id"] == "a"
    assert rows[0]["path"] == (tmp_path / "imgs" / "a.png").resolve()
    t = table_from_manifest(csv_path, 32)
    assert len(t) == 2 and not t.is_hu.any() and t.images.max() <= 1.0
    assert t.has_mask.tolist() == [True, False] and t.lesion_label.tolist() == [1, 0]
    assert t.patient_id.tolist() == ["m/pat1", "m/a"]
    # lesion pixels (grey 120) brighter than the lung (grey 40) under the registered mask
    m = t.lesion_mask[0] > 0
    assert t.images[0][m].mean() > t.images[0][~m & (t.images[0] < 0.3)].mean() + 0.2
    js = tmp_path / "m.json"
    js.write_text(json.dumps([{"path": "imgs/a.png", "label": "cap"}]), encoding="utf-8")
    assert read_manifest(js)[0]["label"] == 3


def test_manifest_bad_rows(tmp_path):
    img, _, _ = _fake_slice()
    _write_png(tmp_path / "a.png", img)
    bad_label = tmp_path / "l.csv"
    bad_label.write_text("path,label\na.png,healthy\na.png,flu\n", encoding="utf-8")
    with pytest.raises(PneumoctInputError, match="row 2") as e:
        read_manifest(bad_label)
    assert "flu" in str(e.value)
    missing = tmp_path / "p.json"
    missing.write_text(json.dumps([{"path": "nope.png", "label": "cap"}]), encoding="utf-8")
    with pytest.raises(PneumoctInputError, match="row 1.*nope.png"):
        read_manifest(missing)
    nolabel = tmp_path / "n.csv"
    nolabel.write_text("path\na.png\n", encoding="utf-8")
    with pytest.raises(PneumoctInputError, match="row 1.*label"):
        read_manifest(nolabel)


def test_manifest_volume_and_cache(tmp_path):
    from pneumoct.synth.writer import synthesize_cohort

    synthesize_cohort(tmp_path / "c", 1, seed=2, labels=["cap"], matrix=96, n_slices=24, formats=("nifti",))
    np.save(tmp_path / "sl.npy", np.ones(24, np.int64))
    (tmp_path / "m.csv").write_text(
        "path,label,lung_mask,lesion_mask,slice_labels\n"
        "c/case_0000/image.nii.gz,cap,c/case_0000/lung_mask.nii.gz,c/case_0000/lesion_mask.nii.gz,sl.npy\n",
        encoding="utf-8")
    # the phantom manifest.json format is read too
    rows = read_manifest(tmp_path / "c" / "manifest.json")
    assert rows[0]["patient_id"] == "case_0000" and rows[0]["label"] == 3
    specs = [{"kind": "manifest", "path": str(tmp_path / "m.csv")},
             {"kind": "phantom_cohort", "path": str(tmp_path / "c")}]
    t = build_tables(specs, SIZE, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    man = t.source == "manifest:m"
    assert man.any() and (t.lesion_label[man] == 1).all() and t.has_mask[man].all()
    np.testing.assert_array_equal(t.images[man], t.images[t.source == "phantom"])
    t2 = build_tables(specs, SIZE, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(t.images, t2.images)
    assert (t.patient_id == t2.patient_id).all()


# -- real data ----------------------------------------------------------------------------------------------------


def test_covid19_ct_seg_png_few_slices():
    require_real_data()
    t = table_from_covid19_ct_seg_png(SHARED_DATA / "covid19-ct-seg-png", SIZE, limit=6)
    assert len(t) >= 4 and not t.is_hu.any() and t.has_mask.all()
    assert t.images.min() >= 0 and t.images.max() <= 1
    assert (t.lesion_label == 1).all() and (t.class_label == 1).all()
    assert all(p.startswith("covid19-ct-seg-png/unknown-") for p in t.patient_id)
    assert set(np.unique(t.lesion_mask)) <= {0, 1}


def test_medseg_few_slices():
    require_real_data()
    t = table_from_medseg(SHARED_DATA / "medseg-semiseg" / "train-multiclass", SIZE, limit=4)
    assert len(t) >= 2 and not t.is_hu.any() and t.has_mask.all()
    assert set(np.unique(t.lesion_mask)) <= {0, 1, 2} and t.lesion_mask.max() >= 1
    assert len(np.unique(t.patient_id)) == len(t)


def test_covid_ct_md_p001_labels():
    require_real_data()
    root = SHARED_DATA / "covid-ct-md"
    t = table_from_covid_ct_md(root, 32, limit=1)  # the COVID-19 study only (P001, Index.csv row 0)
    labels = np.load(root / "Slice-level-labels-updated-1.npy")[0]
    assert set(t.patient_id) == {"covid-ct-md/covid"} and (t.patient_label == 1).all()
    assert t.is_hu.all() and not t.has_mask.any()
    assert len(t) > 100  # most of the 148 slices hold lung
    np.testing.assert_array_equal(t.lesion_label, labels[t.slice_index])
    assert abs(t.lesion_label.mean() - labels[t.slice_index].mean()) < 1e-9
    assert 0.3 < t.lesion_label.mean() < 0.8
