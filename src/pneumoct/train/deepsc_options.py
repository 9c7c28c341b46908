"""The ``deepsc:`` section of a training config (:mod:`pneumoct.train.task_deepsc`), checked when the config is
loaded. Kept apart from the task so that :mod:`pneumoct.train.config` can check it without importing training code.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import PneumoctInputError

__all__ = ["DeepSCOptions"]


@dataclass
class DeepSCOptions:
    """The ``deepsc:`` section of a config (unknown keys refused)."""

    phantoms: dict | None = field(default_factory=lambda: {"n_per_class": 6, "seed": 1000, "matrix": 96,
                                                           "n_slices": 32, "difficulty": 0.0})
    val_phantoms: dict | None = field(default_factory=lambda: {"n_per_class": 2, "seed": 2000, "matrix": 96,
                                                               "n_slices": 32, "difficulty": 0.0})
    real_ctmd: list = field(default_factory=list)   # covid-ct-md keys (covid, cap, normal) added to training
    input: dict = field(default_factory=dict)        # DeepSCInputSpec fields
    lambda_seg: float = 1.0
    lambda_cls: float = 1.0
    lambda_ta: float = 10.0                          # paper's best of {0, 1, 10, 100}
    lambda_dice: float = 1.0
    lambda_focal: float = 1.0
    focal_alpha: float = 0.75
    focal_gamma: float = 2.0
    weak_slice_weight: float = 1.0
    multi_scale_ta: bool = True
    class_weights: bool = True                       # Eq. (9) inverse class frequency
    pretrain_epochs: int = 4
    finetune_epochs: int = 4
    pretrain_lr: float = 1e-3
    finetune_lr: float = 1e-4

    @classmethod
    def from_config(cls, raw: dict | None) -> "DeepSCOptions":
        raw = dict(raw or {})
        known = {f.name for f in dataclasses.fields(cls)}
        for k in raw:
            if k not in known:
                raise PneumoctInputError("bad_config", f"unknown config key 'deepsc.{k}' (known: {', '.join(sorted(known))})")
        opts = cls(**raw)
        from ..preprocess.volume_deepsc import DeepSCInputSpec

        try:
            spec = opts.spec()
        except (TypeError, ValueError) as exc:
            raise PneumoctInputError("bad_config", f"deepsc.input: {exc}") from None
        if any(s % 8 for s in spec.patch) or spec.cls_slices % 8:
            raise PneumoctInputError("bad_config", "deepsc.input: patch sizes and cls_slices must be multiples of 8")
        assert isinstance(spec, DeepSCInputSpec)
        if opts.pretrain_epochs < 0 or opts.finetune_epochs < 0 or opts.pretrain_epochs + opts.finetune_epochs < 1:
            raise PneumoctInputError("bad_config", "deepsc: pretrain_epochs + finetune_epochs must be >= 1")
        if opts.lambda_ta < 0:
            raise PneumoctInputError("bad_config", "deepsc.lambda_ta must be >= 0")
        from .ctmd import _CTMD_STUDIES

        for k in opts.real_ctmd:
            if k not in _CTMD_STUDIES:
                raise PneumoctInputError("bad_config", f"deepsc.real_ctmd: unknown study {k!r} "
                                         f"(known: {', '.join(_CTMD_STUDIES)})")
        return opts

    def spec(self):
        from ..preprocess.volume_deepsc import DeepSCInputSpec

        return DeepSCInputSpec.from_dict(self.input)
