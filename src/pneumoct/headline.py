"""The patient block of ``result.json``: a validated headline that explains itself and never silently
contradicts the measurements (issue 9, section 2).

Sources, in order of ``DiagnoseOptions.headline``:

* ``"burden"`` (default when ``weights/lesion_burden/calibration.json`` is installed): the abnormal probability is
  the lesion burden calibrated on the real studies (:mod:`pneumoct.burden`), with its bootstrap range; the
  pneumonia class comes from the explicit RSNA-category differential (:mod:`pneumoct.quantify.rsna`: typical →
  COVID-19 pattern, atypical → CAP pattern, indeterminate → the explicit rule's choice, flagged as such);
* ``"m3lung_patient"``: the M3Lung-Sys patient network (for a user who trained and validated it on real data; the
  bundled one is phantom-trained and stays in the research panel otherwise);
* ``"rule"``: the explicit rule on the measurements (``rules.py``).

Whatever drives the headline, the other outputs are kept beside it (``research_panel``, ``rule_result``) and
``consistency`` lists every disagreement (headline vs measured lesion volume, vs severity, vs the other methods),
shown in the report's headline box.
"""
from __future__ import annotations

from typing import Any

from .errors import PneumoctInputError
from .types import CLASS_NAMES

__all__ = ["patient_block", "HEADLINE_MODES", "LESION_CONTRADICTION_ML"]

HEADLINE_MODES = ("auto", "burden", "m3lung_patient", "rule")
#: a "no pneumonia" headline beside this much lesion in the lungs is called out as a contradiction (issue 9)
LESION_CONTRADICTION_ML = 10.0
_DISPLAY = {"healthy": "No pneumonia pattern", "covid19": "COVID-19 pattern", "other_viral":
            "Other viral pneumonia pattern (H1N1/influenza)", "cap": "Community-acquired pneumonia pattern"}


def _abnormal_of(block: dict | None) -> bool | None:
    """A method's healthy-vs-abnormal call: its label (its abnormal score can pass 0.5 while "healthy" is still
    the most probable single class)."""
    if not block:
        return None
    if block.get("label"):
        return block["label"] != "healthy"
    return bool(float(block.get("abnormal_probability", 0.0)) >= 0.5)


def _burden_block(burden: dict, cal: dict, rule: dict, differential: dict) -> dict[str, Any]:
    p = float(burden["abnormal_probability"])
    abnormal = p >= 0.5
    rule_probs = rule.get("probabilities") or {}
    pneu = {k: float(rule_probs.get(k, 0.0)) for k in CLASS_NAMES if k != "healthy"}
    tot = sum(pneu.values())
    share = {k: (v / tot if tot > 0 else 1.0 / 3) for k, v in pneu.items()}
    probs = {"healthy": round(1.0 - p, 4), **{k: round(p * share[k], 4) for k in share}}
    if not abnormal:
        label, basis = "healthy", "lesion burden below the calibrated 0.5 point"
    else:
        suggested = differential.get("suggested_class")
        if suggested in ("covid19", "cap"):
            label = suggested
            basis = f"RSNA category suggestion: {differential.get('label')} (rule {differential.get('rule')})"
        else:
            label = max(share, key=share.get)
            basis = ("RSNA category indeterminate: the class is the explicit rule's choice on the measurements "
                     "(not validated)")
    return {
        "label": label, "label_basis": basis, "probabilities": probs,
        "abnormal_probability": round(p, 4), "abnormal_interval_90": burden["interval_90"],
        "model": {
            "name": "lesion_burden",
            "kind": "lesion burden of the lesion mask, calibrated (logistic on the lesion volume of the most involved "
                    f"{int(cal.get('slab_mm', 40))} mm slab)",
            "trained_on": cal.get("fitted_on"),
            "calibrated": True,
            "mask": cal.get("candidate"),
            "validation": cal.get("validation_summary") or cal.get("validation"),
            "description": "abnormal probability from the measured lesion burden, calibrated on real studies with "
                           "radiologist labels; class split among the pneumonia patterns from the explicit rule "
                           "(uncalibrated shares)",
        },
        "evidence": {"max_slab": burden.get("max_slab"), "slab_ml_at_half": burden.get("slab_ml_at_half"),
                     "n_slabs": len(burden.get("slabs") or [])},
    }


def patient_block(*, mode: str, q: dict, rule: dict, differential: dict, burden: dict | None,
                  cal: dict | None, m3lung: dict | None) -> dict[str, Any]:
    """Assemble ``result["patient"]``. ``rule``: :func:`pneumoct.rules.classify_by_rule` output; ``burden``:
    :func:`pneumoct.burden.apply_calibration` output (None without a calibration); ``m3lung``: the M3Lung-Sys
    patient block (None without the networks)."""
    if mode not in HEADLINE_MODES:
        raise ValueError(f"headline must be one of {HEADLINE_MODES}, got {mode!r}")
    if mode == "auto":
        mode = "burden" if burden is not None else ("m3lung_patient" if m3lung is not None else "rule")
    if mode == "burden" and burden is None:
        raise PneumoctInputError("bad_argument", "--headline burden needs weights/lesion_burden/calibration.json "
                                 "(experiments/real_validation.py --install)")
    if mode == "m3lung_patient" and m3lung is None:
        raise PneumoctInputError("bad_argument", "--headline m3lung_patient needs the M3Lung-Sys networks "
                                 "(weights/m3lung_slice, weights/m3lung_patient)")
    rule_brief = {k: rule[k] for k in ("label", "probabilities", "abnormal_probability", "model") if k in rule}
    if mode == "burden":
        out = _burden_block(burden, cal or {}, rule, differential)
    elif mode == "m3lung_patient":
        out = {k: v for k, v in m3lung.items() if k != "rule_result"}
        out["label_basis"] = "M3Lung-Sys patient network (argmax)"
    else:
        out = {k: v for k, v in rule.items()}
        out["label_basis"] = "explicit rule on the measurements"
    out["headline_source"] = mode
    out["differential"] = differential
    out["rule_result"] = rule_brief
    if m3lung is not None and mode != "m3lung_patient":
        out["research_panel"] = {"m3lung_patient": {k: v for k, v in m3lung.items() if k != "rule_result"},
                                 "note": "research panel: trained on SYNTHETIC phantoms only, not validated on "
                                         "real studies; never the headline unless --headline m3lung_patient"}
    out["consistency"] = _consistency(out, q, rule_brief, m3lung if mode != "m3lung_patient" else None, mode)
    out["headline"] = _headline_text(out)
    return out


def _consistency(out: dict, q: dict, rule: dict, m3lung: dict | None, mode: str) -> list[dict[str, str]]:
    msgs: list[dict[str, str]] = []
    abnormal = out["label"] != "healthy"
    in_lung = float(((q.get("lesion_volume_in_lung_ml") or {}).get("total")) or 0.0)
    sev = q.get("severity") or {}
    if not abnormal and in_lung >= LESION_CONTRADICTION_ML:
        msgs.append({"code": "headline_vs_lesion_volume",
                     "message": f"The headline says no pneumonia pattern, but the lesion mask holds {in_lung:.1f} mL "
                                f"inside the lungs (>= {LESION_CONTRADICTION_ML:g} mL): check the marked slices."})
    if q.get("partial"):  # a slab or a study stopping above the bases: the call rests on the lung seen
        msgs.append({"code": "partial_coverage",
                     "message": f"Partial lung coverage: {q.get('partial_note', 'the lung is not fully scanned')}; "
                                "the headline and the RSNA category are from the scanned lung only, and no CT grade "
                                "is given for unseen lung."})
    # a withheld grade (None, partial coverage) is no grade, not CT-0
    if abnormal and sev.get("mosmed_level", 0) is not None and int(sev.get("mosmed_level", 0) or 0) == 0:
        msgs.append({"code": "headline_vs_severity",
                     "message": "The headline says abnormal, but the measured involvement is below the severity "
                                "noise floor (CT-0): the call rests on little lesion."})
    interval = out.get("abnormal_interval_90")
    if interval and interval[0] < 0.5 <= interval[1]:
        msgs.append({"code": "uncertain",
                     "message": f"The calibration's 90 % range ({interval[0]:.2f}-{interval[1]:.2f}) spans 0.5: "
                                "the call is uncertain."})
    for name, other in (("explicit rule", rule), ("M3Lung-Sys research network", m3lung)):
        o = _abnormal_of(other)
        if o is not None and o != abnormal:
            msgs.append({"code": "methods_disagree",
                         "message": f"The {name} calls the study {'abnormal' if o else 'healthy'} "
                                    f"({other.get('label')}, {float(other.get('abnormal_probability', 0)):.2f}); "
                                    "the headline does not."})
    return msgs


def _headline_text(out: dict) -> str:
    p = float(out.get("abnormal_probability", 0.0))
    label = out["label"]
    rng = out.get("abnormal_interval_90")
    pr = f"abnormal probability {p:.2f}" + (f", 90 % range {rng[0]:.2f}-{rng[1]:.2f}" if rng else "")
    if label == "healthy":
        text = f"{_DISPLAY['healthy']} ({pr})"
    else:
        diff = out.get("differential") or {}
        cat = f"; RSNA: {diff.get('label')}" if diff.get("label") and out["headline_source"] == "burden" else ""
        text = f"Pneumonia: {_DISPLAY.get(label, label)} ({pr}{cat})"
    codes = {c["code"] for c in out.get("consistency") or []}
    if codes - {"partial_coverage"}:
        text += " — see the notes below: the outputs do not all agree"
    elif codes:
        text += " — partial lung coverage: see the notes below"
    return text

