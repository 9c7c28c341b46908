"""The COVID-CT-MD studies in ../shared/data: which folder is which class and where its radiologist slice labels
are (shared by :mod:`pneumoct.train.data` and :mod:`pneumoct.train.hybrid`)."""
from __future__ import annotations

import csv
from pathlib import Path

COVID_CT_MD_ROOT = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "covid-ct-md"

#: covid-ct-md study folder → (class, row of Slice-level-labels in Index.csv or None = no labels, all 0)
_CTMD_STUDIES = {
    "covid": ("covid-P001", "covid19", "P001"),
    "cap": ("cap-cap001", "cap", "cap001"),
    "normal": ("normal-normal001", "healthy", None),
}


def _ctmd_label_rows(root: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(root / "Index.csv", newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            out[str(r["Folder/ID"]).strip()] = int(r["Label Index"])
    return out
