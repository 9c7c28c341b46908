"""Shared fixtures. Real data lives in ../shared/data beside the checkout; tests that need it skip without it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CTMD = SHARED_DATA / "covid-ct-md" / "dicom"
REAL_STUDIES = {"covid19": CTMD / "covid-P001", "cap": CTMD / "cap-cap001", "healthy": CTMD / "normal-normal001"}


def require_real_data() -> None:
    if not CTMD.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (clone the project beside ../shared)")

import sys  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ helpers (toy.py, dicom_factory.py)
