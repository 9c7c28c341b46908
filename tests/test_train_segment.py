"""Segmentation training (``task: segmentation``, pneumoct.train.segment) on tiny synthetic tables (CPU, seconds)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pneumoct.train.config import load_config, parse_config
from pneumoct.train.table import SliceTable

torch.set_num_threads(1)

S = 32
REPO = Path(__file__).resolve().parents[1]


def disc_table(n_patients: int = 12, per_patient: int = 4, size: int = S, seed: int = 0, source: str = "phantom",
               multiclass: bool = False, hu: bool = False, empty_every: int = 6) -> SliceTable:
    """Bright discs (the lesions) on noisy lungs; every ``empty_every``-th slice has no lesion. ``multiclass``:
    half the discs are label 2 (brighter, "consolidation"), the rest 1 (fainter, "GGO")."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    imgs, masks, pids = [], [], []
    for p in range(n_patients):
        for s in range(per_patient):
            k = p * per_patient + s
            m = np.zeros((size, size), np.uint8)
            grey = 0.25 + 0.05 * rng.standard_normal((size, size))
            if k % empty_every:
                cy, cx = rng.integers(9, size - 9, 2)
                r = rng.uniform(4, 7)
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                lab = 2 if (multiclass and k % 2) else 1
                m[disc] = lab
                grey = grey + (0.65 if lab == 2 else 0.4) * disc
            grey = np.clip(grey, 0, 1).astype(np.float32)
            # HU rows: grey -> HU so that the -600/1200 window maps it back (to_unit)
            imgs.append((grey * 1200.0 - 1200.0).astype(np.float32) if hu else grey)
            masks.append(m)
            pids.append(f"{source}/case{p:03d}")
    n = len(imgs)
    les = np.asarray([int(m.any()) for m in masks], np.int64)
    return SliceTable(images=np.stack(imgs), is_hu=np.full(n, hu), class_label=np.ones(n, np.int64),
                      lesion_label=les, lesion_mask=np.stack(masks), has_mask=np.ones(n, bool),
                      patient_id=np.asarray(pids, "<U64"), patient_label=np.ones(n, np.int64),
                      slice_index=np.arange(n, dtype=np.int64) % per_patient, source=np.asarray([source] * n, "<U32"))


def seg_raw(model: str, target: str = "lesion_binary", **over) -> dict:
    raw = {
        "name": f"tiny_{model}",
        "model": {"name": model, "kwargs": {}},
        "task": "segmentation",
        "data": {"tables": [], "size": S, "channels": 1, "target": target},
        "split": {"val_fraction": 0.25, "seed": 0},
        "train": {"epochs": 4, "batch_size": 8, "lr": 3e-3, "optimizer": "adam", "seed": 0, "threads": 1,
                  "scheduler": "poly", "monitor": "val_dice", "bn_recalibrate": "epoch",
                  "bn_recalibrate_batches": 2},
        "augment": {"rotation_deg": 10, "crop_scale": [0.8, 1.0], "contrast": [0.8, 1.2]},
    }
    for key, val in over.items():
        sec, _, k = key.partition("__")
        if k:
            raw.setdefault(sec, {})[k] = val
        else:
            raw[sec] = val
    return raw


def trivial_dice(table: SliceTable, idx: np.ndarray) -> tuple[float, float]:
    from pneumoct.evaluate.segmentation import dice

    zero = np.mean([dice(np.zeros_like(m), m > 0) for m in table.lesion_mask[idx]])
    one = np.mean([dice(np.ones_like(m), m > 0) for m in table.lesion_mask[idx]])
    return float(zero), float(one)


@pytest.mark.parametrize("model,lr", [("jcs_seg_cpu", 3e-3), ("unet_cpu", 3e-3)])
def test_binary_segmentation_learns(tmp_path, model, lr):
    from pneumoct.train.checkpoint import load_checkpoint
    from pneumoct.train.loop import split_indices
    from pneumoct.train.segment import fit_segmentation

    table = disc_table(hu=(model == "unet_cpu"))
    cfg = parse_config(seg_raw(model, train__lr=lr))
    assert cfg.family == "segmentation" and cfg.num_classes == 1
    m = fit_segmentation(cfg, tmp_path / "run", progress=False, table=table)
    hist = m["history"]
    assert len(hist) == 4
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    # the same split the trainer used (one source -> one stratum)
    _, va = split_indices(table, np.zeros(len(table), np.int64), cfg.split)
    zero, one = trivial_dice(table, va)
    assert m["best"]["val_dice"] > max(zero, one) + 0.05, (m["best"], zero, one)
    run = tmp_path / "run"
    for name in ("config.yaml", "data_summary.json", "metrics.json", "best/model.safetensors", "best/model.json",
                 "model_card.md", "train.log", "DONE"):
        assert (run / name).is_file(), name
    assert "synthetic phantoms — not clinical accuracy" in (run / "model_card.md").read_text()
    assert "case0" not in (run / "train.log").read_text()
    assert json.loads((run / "metrics.json").read_text())["status"] == "done"
    net, info = load_checkpoint(run / "best", expected_name=model)
    meta = info["meta"]
    assert meta["family"] == "segmentation" and meta["task"] == "segmentation"
    assert meta["target"] == "lesion_binary" and meta["num_classes"] == 1
    assert meta["classes"] == ["background", "lesion"]
    assert meta["input_size"] == S and meta["channels"] == 1 and meta["window"] == [-600.0, 1200.0]
    assert meta["data"]["synthetic"] is True
    x = torch.rand(2, 1, S, S)
    with torch.no_grad():
        out = net(x)
    assert out["logits"].shape == (2, 1, S, S)
    # the finished run carries an ONNX export `pneumoct segment --model RUN/best` uses, giving the same probabilities
    import importlib.util

    from pneumoct.segmentation import load_segmenter

    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        seg = load_segmenter(run / "best")
        assert seg.backend == "onnxruntime"
        got = seg.probabilities(x[:, 0].numpy())
        # float rounding only (batch norms folded into the convolutions, amplified by this toy net's small
        # variances: PyTorch's own folded inference path is as far from the unfolded one)
        assert np.abs(got - torch.sigmoid(out["logits"]).numpy()).max() < 5e-3


def test_multiclass_mixed_binary_rows(tmp_path):
    """Multi-class target on medseg-like (0/1/2) + covid19-ct-seg-png-like (0/1 = any lesion) rows: one epoch runs,
    the binary-only rows are detected and supervised on lesion-vs-background only."""
    from pneumoct.train.segment import (binary_only_rows, fit_segmentation, segmentation_loss)

    mc = disc_table(n_patients=6, multiclass=True, source="medseg")
    bi = disc_table(n_patients=6, multiclass=False, source="covid19-ct-seg-png", seed=1)
    table = SliceTable.concat([mc, bi])
    bo = binary_only_rows(table)
    assert bo.sum() == len(bi) and not bo[: len(mc)].any()
    # a multi-class source without consolidation in it would also count as binary-only; a phantom-named binary
    # source too (max label 1)
    assert binary_only_rows(disc_table(n_patients=2, source="phantom")).all()

    cfg = parse_config(seg_raw("jcs_seg_cpu", "lesion_multiclass", train__epochs=1))
    assert cfg.num_classes == 3 and cfg.class_names == ["background", "ground_glass", "consolidation"]
    m = fit_segmentation(cfg, tmp_path / "run", progress=False, table=table)
    rec = m["history"][0]
    assert np.isfinite(rec["train_loss"]) and rec["val_dice"] is not None
    assert "val_dice_ground_glass" in rec and "val_dice_consolidation" in rec
    assert json.loads((tmp_path / "run" / "data_summary.json").read_text())["binary_only_rows"] == len(bi)

    # the rule: for a binary-only row, a prediction that puts all lesion mass in "consolidation" where the mask
    # says 1 is as good as one that puts it in "GGO"; for a multi-class row it is not
    tgt = torch.zeros(1, 8, 8, dtype=torch.long)
    tgt[0, 2:6, 2:6] = 1

    def logits(c: int) -> torch.Tensor:
        lg = torch.full((1, 3, 8, 8), -5.0)
        lg[:, 0] = 5.0
        lg[0, c, 2:6, 2:6] = 10.0
        return lg

    yes, no = torch.tensor([True]), torch.tensor([False])
    a = segmentation_loss({"logits": logits(1)}, tgt, yes)
    b = segmentation_loss({"logits": logits(2)}, tgt, yes)
    assert float(a) == pytest.approx(float(b), rel=1e-5)
    assert float(segmentation_loss({"logits": logits(2)}, tgt, no)) > float(
        segmentation_loss({"logits": logits(1)}, tgt, no)) + 0.5


def test_config_parsing(tmp_path):
    from pneumoct.errors import PneumoctInputError

    cfg = parse_config(seg_raw("unet_cpu", train__monitor="val_auc"))
    assert cfg.train.monitor == "val_dice"  # the slice default is mapped
    with pytest.raises(PneumoctInputError, match="num_classes"):
        parse_config(seg_raw("jcs_seg_cpu", model__kwargs={"num_classes": 3}))
    with pytest.raises(PneumoctInputError, match="data.target"):
        parse_config(seg_raw("jcs_seg_cpu", "lesion"))
    with pytest.raises(PneumoctInputError, match="does not fit family"):
        parse_config(seg_raw("jcs_seg_cpu", task="slice"))
    with pytest.raises(PneumoctInputError, match="train.scheduler"):  # poly is for the segmentation task only
        parse_config({**seg_raw("jcs_classifier_cpu", task="slice"), "data": {"size": S, "target": "covid"},
                      "model": {"name": "jcs_classifier_cpu", "kwargs": {"num_classes": 2}}})
    for name in ("lesion_seg_real_cpu", "unet_seg_real_cpu", "jcs_seg_paper"):
        c = load_config(REPO / "configs" / f"{name}.yaml")
        assert c.task == "segmentation" and c.family == "segmentation"
    paper = load_config(REPO / "configs" / "jcs_seg_paper.yaml")
    assert paper.data.size == 512 and paper.train.lr == pytest.approx(2.5e-5) and paper.train.batch_size == 4
    assert paper.train.scheduler == "poly" and paper.train.poly_power == pytest.approx(0.9)


def test_cli_train_segmentation(tmp_path):
    from pneumoct.cli import main

    table = disc_table(n_patients=6, per_patient=2)
    cache = tmp_path / "cache"
    cache.mkdir()
    # a manifest table kind needs image files; instead put the table in the SliceTable cache under its key
    from pneumoct.train.data import table_cache_key

    spec = {"kind": "manifest", "path": str(tmp_path / "m.csv")}
    (tmp_path / "m.csv").write_text("path,label\n")
    table.save(cache / f"manifest-{table_cache_key(spec, S)}.npz")
    raw = seg_raw("unet_cpu", train__epochs=1, augment=None)
    raw["data"].update({"tables": [spec], "cache_dir": str(cache)})
    raw["model"]["kwargs"] = {"base": 8, "depth": 2}
    cfg_path = tmp_path / "seg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    rc = main(["train", str(cfg_path), "--out", str(tmp_path / "run"), "--no-progress"])
    assert rc == 0
    assert (tmp_path / "run" / "DONE").is_file()
    raw["train"]["bogus"] = 1
    cfg_path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(cfg_path), "--out", str(tmp_path / "run2")]) == 2
