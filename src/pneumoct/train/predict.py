"""Batch prediction over a :class:`SliceTable`, with M3Lung-Sys multi-value window-leveling.

M3Lung-Sys Sec. IV-A: "We additionally set the window center as [-700, -600, -500] for multi-scale
window-leveling and average the final predicted features/scores for assessment" (width 1200). With
``window_centers`` given, HU rows are windowed at each centre and the outputs (probabilities, lesion
probability, features) averaged; grey rows (2D images already windowed) have one view only.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .table import SliceTable
from .tasks import task_for_family

__all__ = ["M3LUNG_WINDOW_CENTERS", "predict_table", "table_images"]

M3LUNG_WINDOW_CENTERS = (-700.0, -600.0, -500.0)


def table_images(table: SliceTable, idx: np.ndarray, center: float, width: float, channels: int) -> torch.Tensor:
    """Rows ``idx`` as the evaluation input (B, C, S, S) float32 in [0, 1] (same path as SliceDataset)."""
    from .augment import to_unit

    xs = np.stack([to_unit(table.images[i], bool(table.is_hu[i]), center, width) for i in idx]).astype(np.float32)
    x = torch.from_numpy(xs)[:, None]
    return x.expand(-1, channels, -1, -1).contiguous() if channels > 1 else x


@torch.no_grad()
def predict_table(model: torch.nn.Module, family: str, table: SliceTable, *, batch_size: int = 64,
                  window_centers: Sequence[float] | None = None, window_width: float = 1200.0,
                  window_center: float = -600.0, channels: int = 1, num_classes: int | None = None,
                  device: str | torch.device = "cpu") -> dict[str, np.ndarray | None]:
    """``{"probs" (N, K), "lesion_prob" (N,) or None, "features" (N, D) or None}`` for every row, in order."""
    model.eval()
    task = task_for_family(family, num_classes or 2)
    centers = list(window_centers) if window_centers else [window_center]
    n = len(table)
    acc: dict[str, list] = {"probs": [], "lesion_prob": [], "features": []}
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        hu = table.is_hu[idx].astype(bool)
        sums: dict[str, torch.Tensor | None] = {}
        n_views = 0
        for ci, c in enumerate(centers):
            if ci > 0 and not hu.any():
                break  # grey rows only: one view
            x = table_images(table, idx, c, window_width, channels).to(device)
            out = task.predict(model, x)
            n_views += 1
            for k in acc:
                v = out.get(k)
                if v is None:
                    sums[k] = None
                    continue
                v = v.detach().float().cpu()
                if ci == 0:
                    sums[k] = v.clone()
                else:
                    # grey rows keep their first view (their later views are identical anyway)
                    w = torch.as_tensor(hu)
                    w = w.view(-1, *([1] * (v.dim() - 1)))
                    sums[k] = sums[k] + torch.where(w, v, sums[k] / ci)
        for k in acc:
            acc[k].append(None if sums.get(k) is None else (sums[k] / n_views).numpy())
    res: dict[str, np.ndarray | None] = {}
    for k, parts in acc.items():
        res[k] = None if (not parts or parts[0] is None) else np.concatenate(parts)
    if n == 0:
        res = {"probs": np.zeros((0, num_classes or 2), np.float32), "lesion_prob": None, "features": None}
    return res
