"""A small hand-built chest volume for fast unit tests (no phantom generator needed)."""
import numpy as np

from pneumoct.types import SliceInfo, StudyVolume


def toy_chest(nz=40, n=128, px=2.5, sz=5.0, consolidation=True, seed=0):
    """Body ellipse, two lungs (-850), trachea at the top, a table below, optional subpleural consolidation."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:nz, 0:n, 0:n].astype(np.float32)
    cy, cx = n * 0.48, n / 2
    hu = np.full((nz, n, n), -1000.0, np.float32)
    body = ((y - cy) / (n * 0.30)) ** 2 + ((x - cx) / (n * 0.42)) ** 2 <= 1
    hu[body] = 40.0
    table = (y > n * 0.82) & (y < n * 0.86) & (np.abs(x - cx) < n * 0.45)
    hu[table] = 200.0
    zf = z / nz
    for sign in (-1, 1):  # image-left lung first (patient right), then image-right
        lx = cx + sign * n * 0.20
        rad = 1.0 - 0.6 * np.clip((0.25 - zf) / 0.25, 0, 1)  # tapered apex
        lung = (((y - cy) / (n * 0.22 * rad)) ** 2 + ((x - lx) / (n * 0.14 * rad)) ** 2 <= 1) & (zf > 0.12) & (zf < 0.92)
        hu[lung] = -850.0
    trachea = ((y - cy + n * 0.08) ** 2 + (x - cx) ** 2 <= (n * 0.04) ** 2) & (zf <= 0.45)
    hu[trachea] = -1000.0
    truth_cons = np.zeros(hu.shape, bool)
    if consolidation:
        # dense lesion against the lateral chest wall of the patient's left lung (image right)
        lx = cx + n * 0.20
        truth_cons = (((y - cy) ** 2 + (x - (lx + n * 0.11)) ** 2 + ((z - nz * 0.6) * sz / px) ** 2) <= (n * 0.06) ** 2)
        lung_left = ((y - cy) / (n * 0.22)) ** 2 + ((x - lx) / (n * 0.14)) ** 2 <= 1
        truth_cons &= lung_left & (zf > 0.12) & (zf < 0.92)
        hu[truth_cons] = 20.0
    hu += rng.normal(0, 10, hu.shape)
    study = StudyVolume(hu.astype(np.int16), (sz, px, px), (0.0, 0.0, 0.0), np.diag([1.0, 1.0, -1.0]),
                        [SliceInfo(i, -i * sz) for i in range(nz)], "nifti")
    return study, truth_cons, trachea
