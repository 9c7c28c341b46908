"""The explicit patient-level rule used until a trained classifier is shipped.

It is a rule, not a model: it reads the quantification (lesion volume ratio, count, sides, peripheral lesion
ratio, ground-glass/consolidation mix) and encodes the papers' descriptive findings:

* DeepSC-COVID Sec. III-B, Findings 1–4: COVID-19 has more lesions, larger lesion volume, mainly ground-glass,
  scattered and peripheral; CAP has ~1–2 lesions, denser (consolidation), more central.
* M3Lung-Sys Sec. I / Fig. 1: H1N1 shows peribronchovascular consolidation with small nodules.

Its ``probabilities`` are normalised rule scores, **not calibrated probabilities**; every output names the rule.
"""
from __future__ import annotations

import math
from typing import Any

from .types import CLASS_NAMES

RULE_NAME = "rule:quantification-v1"

#: lesion volume ratio (percent of lung) at which the rule's abnormal score is 0.5
ABNORMAL_LVR_PERCENT = 1.0
#: logistic slope (percent of lung) of the abnormal score around that point
ABNORMAL_LVR_SCALE = 0.25


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def classify_by_rule(q: dict[str, Any]) -> dict[str, Any]:
    """Patient label from a quantification dict (``pneumoct.quantify.quantify`` output)."""
    lvr_pct = 100.0 * float(q.get("lesion_volume_ratio") or 0.0)
    abnormal = _sigmoid((lvr_pct - ABNORMAL_LVR_PERCENT) / ABNORMAL_LVR_SCALE)
    plr = q.get("peripheral_lesion_ratio")
    plr = 0.0 if plr is None else float(plr)
    ggo = float(q.get("ggo_fraction") or 0.0)
    cons = float(q.get("consolidation_fraction") or 0.0)
    lesions = q.get("lesions") or []
    volumes = sorted((float(les.get("volume_ml", 0.0)) for les in lesions), reverse=True)
    total = sum(volumes)
    # specks below 1 mL are counted apart: the baseline's false positives are mostly that small
    significant = sum(1 for v in volumes if v >= 1.0)
    # components below quantify()'s size floor (0.2 mL) are not listed but counted apart: H1N1-like small nodules
    small = sum(1 for v in volumes if v < 1.0) + int(q.get("lesion_components_below_min") or 0)
    largest_share = volumes[0] / total if total > 0 else 0.0
    in_lung = q.get("lesion_volume_in_lung_ml") or {}
    right, left = float(in_lung.get("right") or 0.0), float(in_lung.get("left") or 0.0)
    both = right + left
    # each side holds a real share of the disease (and the quantification's own >= 1 mL per lung, when given)
    bilateral = both > 0 and min(right, left) >= 0.15 * both and q.get("bilateral_involvement", True) is not False

    reasons: dict[str, list[str]] = {"covid19": [], "cap": [], "other_viral": []}
    scores = {"covid19": 0.0, "cap": 0.0, "other_viral": 0.0}

    def add(label: str, points: float, why: str) -> None:
        scores[label] += points
        reasons[label].append(why)

    # DeepSC-COVID Finding 4: COVID-19 peripheral, CAP central; H1N1 peribronchovascular (central)
    if plr >= 0.4:
        add("covid19", 1.5, f"peripheral lesion ratio {plr:.2f} >= 0.4")
    else:
        add("cap", 0.5, f"peripheral lesion ratio {plr:.2f} < 0.4")
        add("other_viral", 1.0, f"central distribution (peripheral lesion ratio {plr:.2f} < 0.4)")
    # Finding 3: COVID-19 mainly ground-glass; CAP also dense consolidation
    if ggo >= 0.85:
        add("covid19", 1.0, f"ground-glass fraction {ggo:.2f} >= 0.85")
    elif ggo >= 0.6:
        add("other_viral", 1.0, f"mixed ground-glass/consolidation (ground-glass {ggo:.2f})")
    if cons >= 0.45:
        add("cap", 1.0, f"consolidation fraction {cons:.2f} >= 0.45")
    # Finding 1: COVID-19 many lesions, CAP one dominant lesion
    if largest_share >= 0.6:
        add("cap", 1.5, f"one dominant lesion ({100 * largest_share:.0f}% of lesion volume)")
    else:
        add("other_viral", 0.5, "no dominant lesion")
    if significant >= 3:
        add("covid19", 0.5, f"{significant} lesions >= 1 mL")
    if bilateral:
        add("covid19", 1.0, "bilateral")
        add("other_viral", 0.5, "bilateral")
    else:
        add("cap", 1.0, "unilateral (one lung holds > 85% of the lesion volume)")
    if small >= 5:
        add("other_viral", 1.0, f"{small} small (< 1 mL) nodular lesions")

    exp = {k: math.exp(v) for k, v in scores.items()}
    total = sum(exp.values())
    probabilities = {"healthy": 1.0 - abnormal}
    for k in ("covid19", "other_viral", "cap"):
        probabilities[k] = abnormal * exp[k] / total
    label = max(CLASS_NAMES, key=lambda k: probabilities[k])
    return {
        "label": label,
        "probabilities": {k: round(probabilities[k], 4) for k in CLASS_NAMES},
        "abnormal_probability": round(abnormal, 4),
        "model": {
            "name": RULE_NAME,
            "kind": "rule",
            "trained_on": None,
            "calibrated": False,
            "description": "explicit rule on the quantification (see docs/diagnosis_rule.md); scores are "
            "normalised rule points, not calibrated probabilities",
        },
        "rule_evidence": {k: v for k, v in reasons.items() if v},
    }
