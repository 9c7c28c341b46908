"""Slice-level commands. These accept 2D images (PNG/JPG, no HU) as well as studies, and say which they got."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .io import read_study
from .io.writers import atomic_path, write_json
from .preprocess.lung_crop import m3lung_crop_volume, m3lung_lung_crop_8bit
from .preprocess.windowing import apply_preset


def _png(path: Path, image01: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray((np.clip(image01, 0, 1) * 255).astype(np.uint8)).save(tmp, format="PNG")


def crop_lungs(input_path: str | Path, out_dir: str | Path, size: int = 224) -> dict[str, Any]:
    """M3Lung-Sys 6-step lung crop of every slice; writes one PNG per slice and ``crops.json`` (written last).

    Studies (HU): one box for the whole study (union of the slices with lung) so crops stay registered, crops
    shown in the M3Lung-Sys window (centre -600, width 1200). 2D images: the 8-bit variant (Otsu threshold)
    per image, flagged ``hounsfield: false``.
    """
    study = read_study(input_path, allow_2d=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = out_dir / "crops.json"
    if stale.exists():
        stale.unlink()
    entries = []
    if study.is_2d_image:
        for info, image in zip(study.slices, study.hu):
            crop = m3lung_lung_crop_8bit(image.astype(np.float32), out_size=(size, size))
            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(info.source or f"image_{info.index:04d}").stem)
            name = f"{stem}_lungcrop.png"
            _png(out_dir / name, crop.image / 255.0 if crop.image.max() > 1.0 else crop.image)
            entries.append({"index": info.index, "source": info.source, "file": name,
                            "bbox_r0_r1_c0_c1": [int(v) for v in crop.bbox], "lung_found": not crop.fallback})
    else:
        vol = m3lung_crop_volume(study.hu, out_size=(size, size))
        for info, image, has_lung in zip(study.slices, vol.image, vol.slice_has_lung):
            name = f"slice_{info.index:04d}.png"
            _png(out_dir / name, apply_preset(image, "m3lung"))
            entry = {"index": info.index, "position_mm": round(float(info.position_mm), 3), "file": name,
                     "lung_found": bool(has_lung)}
            if info.sop_instance_uid:
                entry["sop_instance_uid"] = info.sop_instance_uid
            entries.append(entry)
        entries_box = [int(v) for v in vol.bbox]
    result = {
        "method": "M3Lung-Sys Sec. III-A-1 six-step lung crop",
        "input": {"format": study.source_format, "hounsfield": not study.is_2d_image,
                  "input_is_2d_image": study.is_2d_image, "warnings": [w.to_dict() for w in study.warnings]},
        "crop_size": [size, size],
        "slices": entries,
    }
    if not study.is_2d_image:
        result["study_bbox_r0_r1_c0_c1"] = entries_box
    write_json(out_dir / "crops.json", result)
    return result
