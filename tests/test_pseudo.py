"""Pseudo-labels for real positive slices (pneumoct.train.pseudo): the rules that decide which voxels become labels."""
import numpy as np
import pytest

from pneumoct.errors import PneumoctInputError
from pneumoct.train.config import parse_config
from pneumoct.train.pseudo import pseudo_masks_for_study
from pneumoct.types import LUNG_LEFT, LUNG_RIGHT


def _study(nz=4):
    lung = np.zeros((nz, 20, 40), np.uint8)
    lung[:, 2:18, 2:18] = LUNG_RIGHT
    lung[:, 2:18, 22:38] = LUNG_LEFT
    thr = np.zeros_like(lung)
    thr[:, 5:12, 5:12] = 1  # 49 px in the right lung
    thr[:, 5:12, 25:32] = 2  # 49 px in the left lung
    return lung, thr


def test_only_positive_slices_and_lobe_negative_side_emptied():
    lung, thr = _study()
    slices = np.array([0, 1, 1, 1])
    lobes = np.zeros((4, 5), int)
    lobes[1] = [1, 0, 0, 0, 0]  # LLL only: the right lung must be empty
    lobes[2] = [0, 0, 0, 1, 0]  # RML only: the left lung must be empty
    # slice 3: lobe labels not filled in -> both sides kept
    out = pseudo_masks_for_study(thr, lung, slices, lobes, None)
    assert sorted(out) == [1, 2, 3]
    assert not out[1][lung[1] == LUNG_RIGHT].any() and (out[1] == 2).sum() == 49
    assert not out[2][lung[2] == LUNG_LEFT].any() and (out[2] == 1).sum() == 49
    assert (out[3] > 0).sum() == 98


def test_network_must_agree_in_the_slice_and_small_masks_are_dropped():
    lung, thr = _study()
    slices = np.array([1, 1, 1, 0])
    net = np.zeros_like(thr)
    net[0, 6, 6] = 1  # overlaps the threshold mask
    net[1, 15, 15] = 1  # lesion elsewhere: no agreement
    out = pseudo_masks_for_study(thr, lung, slices, None, net)
    assert sorted(out) == [0]
    tiny = np.zeros_like(thr)
    tiny[:, 5:7, 5:7] = 1  # 4 px < min_pixels
    assert pseudo_masks_for_study(tiny, lung, slices, None, None, min_pixels=20) == {}
    # voxels outside the lung never become labels
    outside = np.zeros_like(thr)
    outside[:, 0:2, :] = 1
    assert pseudo_masks_for_study(outside, lung, slices, None, None, min_pixels=1) == {}


def test_config_accepts_the_pseudo_table_and_rejects_unknown_keys(tmp_path):
    base = {"name": "x", "model": {"name": "jcs_seg_cpu", "kwargs": {"num_classes": 3, "in_channels": 1}},
            "task": "segmentation", "data": {"tables": [{"kind": "covid_ct_md_pseudo", "studies": ["cap"],
                                                         "min_pixels": 10}], "size": 64,
                                               "target": "lesion_multiclass"},
            "train": {"epochs": 1}}
    cfg = parse_config(base, base_dir=tmp_path)
    assert cfg.data.tables[0]["kind"] == "covid_ct_md_pseudo"
    base["data"]["tables"][0]["bogus"] = 1
    with pytest.raises(PneumoctInputError, match="bogus"):
        parse_config(base, base_dir=tmp_path)
