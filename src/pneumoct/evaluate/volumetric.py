"""``pneumoct evaluate --checkpoint DIR --data KIND:PATH`` for the 3D systems: a trained DeepSC-COVID run, or ONE
dual-sampling network (US or SS run), scored at patient level on a data set of studies.

Every study goes through the code ``diagnose`` runs: read (:func:`pneumoct.io.read_study`), lungs
(:func:`pneumoct.preprocess.lung_mask.segment_lungs`), then the system's own input chain and network
(:func:`pneumoct.models.deepsc_system.analyse` with the checkpoint; for one dual-sampling network
:func:`pneumoct.models.dual_sampling_system.predict_network`). Data: ``phantom_cohort:DIR`` (a cohort written by
``pneumoct synth``; each case's lesion volume ratio from its voxel truth gives the dual-sampling paper's group-wise
table) or ``covid_ct_md[:ROOT]`` (the three real DICOM studies; patient labels only). The dual-sampling networks
answer COVID-19 vs CAP only: studies of other classes are left out (counted in the note).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import PneumoctInputError
from .run import Predictions

VOLUME_FAMILIES = ("deepsc", "dual_sampling")


def iter_studies(spec: dict) -> Iterator[tuple[str, Any, np.ndarray, str, float | None, str]]:
    """(case id, study, lung labels by ``segment_lungs``, class label, lesion volume ratio or None, data kind)."""
    from ..io import read_study
    from ..preprocess.lung_mask import segment_lungs
    from ..train.data import _read_label_volume as _read_labels  # a cohort's masks, in read_study's orientation

    kind = spec["kind"]
    if kind == "phantom_cohort":
        root = Path(spec["path"])
        manifest = root / "manifest.json"
        if not manifest.is_file():
            raise PneumoctInputError("missing_manifest", f"no manifest.json in {root}")
        for row in json.loads(manifest.read_text(encoding="utf-8")):
            study = read_study(root / (row.get("image") or row.get("dicom_dir")))
            truth = json.loads((root / row["truth"]).read_text(encoding="utf-8"))
            lung_true = _read_labels(root / row["lung_mask"]) > 0
            lesion = _read_labels(root / row["lesion_mask"]) > 0
            n_lung = int(np.count_nonzero(lung_true))
            ratio = float(np.count_nonzero(lesion & lung_true)) / n_lung if n_lung else 0.0
            yield (f"phantom/{row['case_id']}", study, segment_lungs(study).labels,
                   str(truth.get("label", row.get("label"))), ratio, "synthetic")
    elif kind == "covid_ct_md":  # read, lungs and labels as every 3D task gets them (hu and spacing are all the
        from ..train.volumes import real_ctmd_volumes  # systems use of a study)

        for c in real_ctmd_volumes(root=spec.get("path")):
            yield c.case_id, c, c.lung, c.label, None, "real"
    else:
        raise PneumoctInputError("bad_arguments", f"3D checkpoints take --data phantom_cohort:DIR or covid_ct_md, "
                                 f"not {kind}")


def predict_volumes(checkpoint: str | Path, family: str, model: Any, info: dict,
                    spec: dict) -> tuple[Predictions, str]:
    """Patient-level predictions of a 3D checkpoint (``model``, ``info``: already loaded from ``checkpoint``) on a
    data set (module docstring)."""
    meta = info.get("meta") or {}
    if family == "deepsc":
        from ..models.deepsc_system import analyse

        names = list(meta.get("classes") or [])
    else:
        from ..models.dual_sampling_system import predict_network

        names = ["cap", "covid19"]  # positive class last: P(COVID-19) is the score
        net = (model.float().eval(), info)  # bundled networks may be stored in half precision
    from ..train.task_deepsc import target_index  # product label -> the head's class (e.g. healthy -> non_covid)

    ids, y, probs, ratios, kinds, skipped = [], [], [], [], set(), 0
    for case_id, study, lung, label, ratio, data_kind in iter_studies(spec):
        k = target_index(label, names) if family == "deepsc" else (names.index(label) if label in names else None)
        if k is None:
            skipped += 1
            continue
        if family == "deepsc":
            out = analyse(study, lung, weights_dir=str(checkpoint))
            p = [out.probabilities[n] for n in names]
        else:
            pc = predict_network(net, study, lung)
            p = [1.0 - pc, pc]
        ids.append(case_id)
        y.append(k)
        probs.append(p)
        ratios.append(ratio)
        kinds.add(data_kind)
    if not ids:
        raise PneumoctInputError("bad_input", f"no study of the classes {names} in {spec.get('path', spec['kind'])}")
    what = " + ".join(sorted({"synthetic": "synthetic phantoms", "real": "real data"}[k] for k in kinds))
    note = (f"{spec['kind']} ({what}); 3D model {info.get('model_name')} from {Path(checkpoint).name}; patient level"
            f" (whole studies through read -> segment_lungs -> the system's input chain)"
            + (f"; {skipped} studies of other classes left out" if skipped else ""))
    use_ratio = all(r is not None for r in ratios)
    return Predictions(ids, y, np.asarray(probs), names, ratios if use_ratio else None), note
