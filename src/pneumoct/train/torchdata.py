"""``SliceDataset``: a torch ``Dataset`` over a :class:`SliceTable`, with deterministic per-item augmentation.

Randomness of item ``i`` in epoch ``e`` comes only from ``np.random.default_rng([seed, e, i])``, so results do
not depend on the number of DataLoader workers or the order items are asked for; call ``set_epoch`` each epoch
(in the main process before iterating; workers get a copy of the dataset when the iterator starts).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..preprocess.slice_input import LESION_MODEL_WINDOW
from .augment import AugmentConfig, augment_slice, to_unit
from .table import SliceTable

__all__ = ["SliceDataset"]


class SliceDataset(Dataset):
    """Items: ``image`` (C, S, S) float32 in [0, 1] (grey replicated to C channels), ``class_label`` long,
    ``lesion_label`` long, ``mask`` (S, S) float32 (lesion > 0; zeros where there is no mask), ``has_mask``
    bool, ``index`` long (row in the table). Without ``augment``, HU rows use the fixed ``window``."""

    def __init__(self, table: SliceTable, *, channels: int = 1, augment: AugmentConfig | None = None,
                 seed: int = 0, window: tuple[float, float] = LESION_MODEL_WINDOW) -> None:
        if channels < 1:
            raise ValueError("channels must be at least 1")
        self.table = table
        self.channels = int(channels)
        self.augment = augment
        self.seed = int(seed)
        self.window = (float(window[0]), float(window[1]))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        i = int(index)
        if i < 0:
            i += len(self)
        t = self.table
        img = t.images[i]
        is_hu = bool(t.is_hu[i])
        has_mask = bool(t.has_mask[i])
        mask = t.lesion_mask[i] if has_mask else None
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            x, mask = augment_slice(img, is_hu, mask, rng, self.augment)
        else:
            x = to_unit(img, is_hu, *self.window)
        m = np.zeros(x.shape, np.float32) if mask is None else (mask > 0).astype(np.float32)
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
        if self.channels > 1:
            xt = xt.expand(self.channels, -1, -1).contiguous()
        return {
            "image": xt,
            "class_label": torch.tensor(int(t.class_label[i]), dtype=torch.long),
            "lesion_label": torch.tensor(int(t.lesion_label[i]), dtype=torch.long),
            "mask": torch.from_numpy(m),
            "has_mask": torch.tensor(has_mask, dtype=torch.bool),
            "index": torch.tensor(i, dtype=torch.long),
        }
