"""Training configuration: YAML -> typed dataclasses, with every unknown key refused by name.

    cfg = load_config("configs/m3lung_slice_cpu.yaml", overrides=["train.epochs=2"])
    config_to_dict(cfg)  # the resolved config, as written to the run folder

Schema (defaults in the dataclasses below; see ``docs/training.md``)::

    model:   {name: multiscale_cam_cpu, kwargs: {num_classes: 4}}
    task:    slice | patient | segmentation | deepsc
    family:  multiscale_cam | m3lung_slice | jcs | m3lung_patient | segmentation | deepsc   (derived from model.name
             when omitted; jcs_seg* and unet* -> segmentation; deepsc* -> deepsc)
    data:    {tables: [{kind, path, limit}], size, channels, target, m3lung_rule, cache_dir, window_center,
              window_width}
    split:   {val_fraction, seed, kfold, fold}
    train:   {epochs, batch_size, lr, optimizer, momentum, weight_decay, betas, scheduler, step_size, lr_gamma,
              balanced_sampling, early_stopping_patience, monitor, seed, max_batches_per_epoch, threads,
              bn_recalibrate, bn_recalibrate_batches, device}
    loss:    {focal_gamma, class_weights, lesion_weight, mixup_alpha, lseg_weight}
    augment: null | {AugmentConfig fields}
    patient: {slice_checkpoint, window_centers, max_slices, feature_batch_size}
    deepsc:  the 3D DeepSC-COVID task's own section (volumes, input sizes, losses, two-stage schedule), checked by
             pneumoct.train.task_deepsc.DeepSCOptions
    dual:    {sampling, attention, lambda_ex, size, factor, crop_to_lungs, cohort, real_ctmd}   (task dual_sampling)
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import PneumoctInputError
from ..models import family_of
from ..types import CLASS_NAMES

__all__ = ["TrainConfig", "ModelSpec", "DataConfig", "SplitConfig", "TrainOptions", "LossConfig", "PatientConfig",
           "load_config", "parse_config", "config_to_dict", "apply_overrides", "family_of", "class_names_for",
           "TARGETS", "SEG_TARGETS", "FAMILIES", "DualConfig", "DUAL_CLASSES"]

FAMILIES = ("multiscale_cam", "m3lung_slice", "jcs", "m3lung_patient", "segmentation", "deepsc",
            "dual_sampling")
# what a row's training label is, from the SliceTable columns
TARGETS = {
    "class": None,                                   # class_label as is (CLASS_NAMES order, first K)
    "lesion": ("no_lesion", "lesion"),               # lesion_label
    "abnormal": ("healthy", "abnormal"),             # class_label != 0
    "covid": ("non_covid", "covid19"),               # class_label == 1 (JCS: COVID vs rest)
    "covid_cap_np": ("non_pneumonia", "covid19", "cap"),  # Hu et al.: other_viral rows dropped
}
# segmentation task (pneumoct.train.segment): what the pixel target is, and the class names of the mask
SEG_TARGETS = {
    "lesion_binary": ("background", "lesion"),                              # lesion_mask > 0; one sigmoid logit
    "lesion_multiclass": ("background", "ground_glass", "consolidation"),   # lesion_mask 0/1/2; softmax over 3
}
#: dual-sampling task: the paper's two classes, in logit order (0 = CAP, 1 = COVID-19)
DUAL_CLASSES = ("cap", "covid19")
TABLE_KINDS = ("phantom_cohort", "manifest", "covid_ct_md", "covid19_ct_seg_png", "medseg", "covid_ct_md_hybrid",
               "covid_ct_md_pseudo")


@dataclass
class ModelSpec:
    name: str = "multiscale_cam_cpu"
    kwargs: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    tables: list = field(default_factory=list)
    size: int = 64
    channels: int = 1
    target: str = "class"
    m3lung_rule: bool = False
    cache_dir: str | None = None
    window_center: float = -600.0
    window_width: float = 1200.0
    input_transform: str = "none"  # none | clahe (preprocess.slice_input.harmonise; segmentation task)


@dataclass
class SplitConfig:
    val_fraction: float = 0.2
    seed: int = 0
    kfold: int | None = None
    fold: int = 0
    # patients kept out of training AND validation (exact ids or "prefix/*"): a held-out test patient, e.g. for
    # leave-one-study-out validation; it must never steer early stopping or checkpoint choice
    exclude_patients: list | None = None
    # patients always in training, never in validation (same pattern syntax): e.g. the real DICOM studies' weak
    # negatives and hybrids, whose few patients would otherwise land in validation by chance
    train_only_patients: list | None = None


@dataclass
class TrainOptions:
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    scheduler: str = "none"
    step_size: int = 30
    lr_gamma: float = 0.1
    poly_power: float = 0.9  # scheduler "poly" (segmentation task): lr * (1 - iter / max_iter) ** poly_power
    balanced_sampling: bool = True
    balance_by: str = "class"  # class | class_and_look (class x {HU-windowed, 8-bit export})
    early_stopping_patience: int | None = None
    monitor: str = "val_auc"
    seed: int = 0
    max_batches_per_epoch: int | None = None
    threads: int | None = None
    bn_recalibrate: str = "epoch"
    bn_recalibrate_batches: int = 8
    device: str = "cpu"
    # segmentation task: start from this checkpoint folder's weights (same architecture), e.g. to fine-tune the
    # shipped segmenter on new data; None = random initialisation
    init_from: str | None = None


@dataclass
class LossConfig:
    focal_gamma: float = 1.0
    class_weights: bool = True
    lesion_weight: float = 1.0
    mixup_alpha: float = 0.5
    lseg_weight: float = 0.0


@dataclass
class PatientConfig:
    slice_checkpoint: str | None = None
    window_centers: list | None = field(default_factory=lambda: [-700.0, -600.0, -500.0])
    max_slices: int | None = 64
    feature_batch_size: int = 64


@dataclass
class DualConfig:
    """Dual-sampling attention network (task ``dual_sampling``, see ``pneumoct.train.task_dual_sampling``).

    ``real_ctmd``: covid-ct-md study keys (``covid``, ``cap``) added to the training cases, never to validation;
    ``normal`` is refused (no class of COVID-19 vs CAP). Their infection mask (Eq. 3's M, and the ratio of the size
    groups) is weak: the threshold-baseline lesion mask on the radiologist-positive slices, lung sides whose lobes
    are all labelled negative emptied; the lung voxels of those slices when that is empty."""

    sampling: str = "uniform"          # uniform | size_balanced (Sec. III-C)
    attention: bool = True             # online attention module + L_ex; false = the plain RN34 baseline
    lambda_ex: float = 0.5             # Eq. 4
    size: list = field(default_factory=lambda: [138, 256, 256])   # network grid (Z, Y, X), Sec. IV-B
    factor: float = 2.0                # common shrink factor after resampling to 0.7168 x 0.7168 x 1.25 mm
    crop_to_lungs: bool = False        # not in the paper; the CPU setting spends its few voxels on the lungs
    # synthetic training cohort (pneumoct.train.volumes.phantom_volume_cohort), one chunk per difficulty
    cohort: dict = field(default_factory=lambda: {"n_per_class": 40, "seed": 7000, "matrix": 128, "n_slices": 48,
                                                  "difficulties": [0.0, 0.5, 1.0]})
    # real covid-ct-md studies added to the TRAINING cases (keys of pneumoct.train.ctmd: covid -> COVID-19, cap ->
    # CAP; "normal" is refused: no class of the COVID-19-vs-CAP task). They have no voxel masks: the infection mask
    # M of L_ex (Eq. 3) and the size group come from a weak mask, pneumoct.train.task_dual_sampling.
    # weak_infection_mask: the threshold-baseline lesion mask on the radiologist-positive slices only, emptied on a
    # lung side whose lobes are all labelled negative there; the lung voxels of those slices if that is empty.
    # Always on the training side of the split (validation stays phantoms).
    real_ctmd: list = field(default_factory=list)


@dataclass
class TrainConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    task: str = "slice"
    family: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    train: TrainOptions = field(default_factory=TrainOptions)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: dict | None = None
    patient: PatientConfig = field(default_factory=PatientConfig)
    deepsc: dict | None = None
    dual: DualConfig = field(default_factory=DualConfig)
    name: str | None = None
    notes: str | None = None

    @property
    def num_classes(self) -> int:
        return int(self.model.kwargs.get("num_classes", _default_classes(self.model.name)))

    @property
    def class_names(self) -> list[str]:
        if self.task == "segmentation":
            return list(SEG_TARGETS[self.data.target])
        if self.task == "dual_sampling":
            return list(DUAL_CLASSES)
        return class_names_for(self.data.target, self.num_classes)


def _default_classes(model_name: str) -> int:
    if model_name.startswith("jcs"):
        return 2
    if model_name.startswith("multiscale_cam"):
        return 3
    return 4


def class_names_for(target: str, k: int) -> list[str]:
    names = TARGETS.get(target)
    if names is None:
        if k > len(CLASS_NAMES):
            raise PneumoctInputError("bad_config", f"target 'class' has at most {len(CLASS_NAMES)} classes, not {k}")
        return list(CLASS_NAMES[:k])
    if len(names) != k:
        raise PneumoctInputError("bad_config", f"target {target!r} has {len(names)} classes but the model has "
                                 f"num_classes={k}")
    return list(names)


def _bad(msg: str) -> PneumoctInputError:
    return PneumoctInputError("bad_config", msg)


def _coerce(value: Any, ftype: Any, where: str) -> Any:
    t = ftype if isinstance(ftype, str) else getattr(ftype, "__name__", str(ftype))
    if value is None:
        if "None" in t:
            return None
        raise _bad(f"{where} must not be empty")
    base = t.replace(" | None", "").strip()
    try:
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if base == "str":
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if base == "list":
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return list(value)
        if base == "dict":
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        raise _bad(f"{where} must be {base}, got {value!r}") from None
    return value


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise _bad(f"{where} must be a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    for k in raw:
        if k not in known:
            raise _bad(f"unknown config key '{where + '.' if where else ''}{k}' (known: {', '.join(known)})")
    kw = {}
    for name, f in known.items():
        if name not in raw:
            continue
        v = raw[name]
        if dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING else None):
            kw[name] = _build(type(f.default_factory()), v, f"{where + '.' if where else ''}{name}")
        else:
            kw[name] = _coerce(v, f.type, f"{where + '.' if where else ''}{name}")
    return cls(**kw)


def _choice(value: Any, options: tuple, where: str) -> None:
    if value not in options:
        raise _bad(f"{where} must be one of {', '.join(map(str, options))}, got {value!r}")


def _validate(cfg: TrainConfig) -> TrainConfig:
    _choice(cfg.task, ("slice", "patient", "segmentation", "deepsc", "dual_sampling"), "task")
    fam = cfg.family or family_of(cfg.model.name)
    _choice(fam, FAMILIES, "family")
    cfg.family = fam
    if (cfg.task == "patient") != (fam == "m3lung_patient"):
        raise _bad(f"task {cfg.task!r} does not fit family {fam!r} (patient task = m3lung_patient)")
    if (cfg.task == "segmentation") != (fam == "segmentation"):
        raise _bad(f"task {cfg.task!r} does not fit family {fam!r} (segmentation task = segmentation family: "
                   "jcs_seg*, unet*)")
    if (cfg.task == "deepsc") != (fam == "deepsc"):
        raise _bad(f"task {cfg.task!r} does not fit family {fam!r} (deepsc task = deepsc family)")
    if cfg.task != "deepsc" and cfg.deepsc is not None:
        raise _bad("the deepsc: section belongs to task: deepsc")
    if (cfg.task == "dual_sampling") != (fam == "dual_sampling"):
        raise _bad(f"task {cfg.task!r} does not fit family {fam!r} (dual_sampling task = dual_sampling_* models)")
    if cfg.task == "dual_sampling":
        _validate_dual(cfg)
    from ..models import list_models

    if cfg.model.name not in list_models():
        raise _bad(f"unknown model {cfg.model.name!r}; known: {', '.join(list_models())}")
    d = cfg.data
    seg = cfg.task == "segmentation"
    if seg:
        _choice(d.target, tuple(SEG_TARGETS), "data.target")
        want = 1 if d.target == "lesion_binary" else len(SEG_TARGETS[d.target])
        k = cfg.model.kwargs.setdefault("num_classes", want)
        if k != want:
            raise _bad(f"data.target {d.target!r} needs model.kwargs.num_classes={want}, got {k}")
        if cfg.train.monitor == "val_auc":  # the slice-task default; segmentation monitors Dice
            cfg.train.monitor = "val_dice"
    else:
        _choice(d.target, tuple(TARGETS), "data.target")
    if d.size < 16:
        raise _bad("data.size must be at least 16")
    _choice(d.channels, (1, 3), "data.channels")
    _choice(d.input_transform, ("none", "clahe"), "data.input_transform")
    for i, spec in enumerate(d.tables):
        if not isinstance(spec, dict) or "kind" not in spec:
            raise _bad(f"data.tables[{i}] must be a mapping with 'kind' and 'path'")
        for k in spec:
            if k not in ("kind", "path", "limit", "per_lung", "studies", "seed", "copies", "agree_with", "min_pixels"):
                raise _bad(f"unknown config key 'data.tables[{i}].{k}' (known: kind, path, limit, per_lung; "
                           "studies, seed, copies for covid_ct_md_hybrid; studies, agree_with, min_pixels for "
                           "covid_ct_md_pseudo)")
        _choice(spec["kind"], TABLE_KINDS, f"data.tables[{i}].kind")
        if not spec.get("path") and spec["kind"] in ("phantom_cohort", "manifest"):
            raise _bad(f"data.tables[{i}].path is missing")
    if fam != "m3lung_patient":
        ic = cfg.model.kwargs.setdefault("in_channels", d.channels)
        if ic != d.channels:
            raise _bad(f"model.kwargs.in_channels={ic} but data.channels={d.channels}")
    if not seg and cfg.task != "dual_sampling":
        class_names_for(d.target, cfg.num_classes)
    s = cfg.split
    if not 0.0 < s.val_fraction < 1.0 and s.kfold is None:
        raise _bad("split.val_fraction must be in (0, 1)")
    if s.kfold is not None and (s.kfold < 2 or not 0 <= s.fold < s.kfold):
        raise _bad("split.kfold must be >= 2 and 0 <= split.fold < split.kfold")
    t = cfg.train
    _choice(t.optimizer, ("adam", "sgd"), "train.optimizer")
    _choice(t.scheduler, ("none", "step", "cosine", "poly") if seg else ("none", "step", "cosine"),
            "train.scheduler")
    monitors = (("val_dice", "val_loss") if seg else ("val_auc", "val_acc", "val_loss", "val_dice", "val_score")
                if cfg.task == "deepsc" else ("val_auc", "val_acc", "val_loss"))
    _choice(t.monitor, monitors, "train.monitor")
    _choice(t.bn_recalibrate, ("off", "end", "epoch"), "train.bn_recalibrate")
    _choice(t.device, ("cpu", "cuda", "auto"), "train.device")
    _choice(t.balance_by, ("class", "class_and_look"), "train.balance_by")
    if t.epochs < 1 or t.batch_size < 1 or t.lr <= 0:
        raise _bad("train.epochs and train.batch_size must be >= 1 and train.lr > 0")
    if len(t.betas) != 2:
        raise _bad("train.betas must be two numbers")
    if cfg.augment is not None:
        try:
            from .augment import AugmentConfig
        except ImportError:  # pragma: no cover - augment module not present
            AugmentConfig = None
        if AugmentConfig is not None:
            known = {f.name for f in fields(AugmentConfig)}
            for k in cfg.augment:
                if k not in known:
                    raise _bad(f"unknown config key 'augment.{k}' (known: {', '.join(sorted(known))})")
    if cfg.task == "deepsc":
        from .deepsc_options import DeepSCOptions

        DeepSCOptions.from_config(cfg.deepsc)
    if cfg.task == "patient" and not cfg.patient.slice_checkpoint:
        raise _bad("the patient task needs patient.slice_checkpoint (a trained m3lung_slice checkpoint folder)")
    return cfg


def _validate_dual(cfg: TrainConfig) -> None:
    du = cfg.dual
    _choice(du.sampling, ("uniform", "size_balanced"), "dual.sampling")
    if len(du.size) != 3 or any(int(v) < 16 for v in du.size):
        raise _bad(f"dual.size must be three sizes >= 16 (Z, Y, X; features at ceil(size / 16)), got {du.size}")
    if du.factor <= 0 or du.lambda_ex < 0:
        raise _bad("dual.factor must be > 0 and dual.lambda_ex >= 0")
    known = {"n_per_class", "seed", "matrix", "n_slices", "difficulties"}
    for k in du.cohort:
        if k not in known:
            raise _bad(f"unknown config key 'dual.cohort.{k}' (known: {', '.join(sorted(known))})")
    from .ctmd import _CTMD_STUDIES

    if not isinstance(du.real_ctmd, (list, tuple)):
        raise _bad(f"dual.real_ctmd must be a list of covid-ct-md study keys, got {du.real_ctmd!r}")
    for k in du.real_ctmd:
        if k not in _CTMD_STUDIES:
            raise _bad(f"dual.real_ctmd: unknown study {k!r} (known: {', '.join(_CTMD_STUDIES)})")
        if _CTMD_STUDIES[k][1] not in DUAL_CLASSES:
            ok = ", ".join(s for s, v in _CTMD_STUDIES.items() if v[1] in DUAL_CLASSES)
            raise _bad(f"dual.real_ctmd: study {k!r} is {_CTMD_STUDIES[k][1]}, outside the dual-sampling task "
                       f"(COVID-19 vs CAP only); use {ok}")
    if len(set(du.real_ctmd)) != len(du.real_ctmd):
        raise _bad(f"dual.real_ctmd lists a study twice: {du.real_ctmd}")
    # the variant keys live in dual; the network must agree (one place to switch attention on/off)
    att = cfg.model.kwargs.setdefault("attention", du.attention)
    if bool(att) != du.attention:
        raise _bad(f"model.kwargs.attention={att} but dual.attention={du.attention}")
    if cfg.model.kwargs.setdefault("num_classes", 1) != 1:
        raise _bad("the dual-sampling network has one logit: model.kwargs.num_classes must be 1")


def parse_config(raw: Any, base_dir: str | Path | None = None) -> TrainConfig:
    """Dict (parsed YAML) -> validated :class:`TrainConfig`. Relative data/checkpoint paths resolve against
    ``base_dir`` when they do not exist relative to the working directory."""
    if not isinstance(raw, dict):
        raise _bad("a training config must be a YAML mapping")
    raw = copy.deepcopy(raw)
    cfg = _build(TrainConfig, raw, "")
    if isinstance(raw.get("model"), dict) and "name" not in raw["model"]:
        raise _bad("model.name is missing")
    if base_dir is not None:
        base = Path(base_dir)

        def fix(p: str | None) -> str | None:
            if p is None or Path(p).is_absolute() or Path(p).exists():
                return p
            alt = base / p
            return str(alt) if alt.exists() else p

        for spec in cfg.data.tables:
            if isinstance(spec, dict) and "path" in spec:
                spec["path"] = fix(str(spec["path"]))
        cfg.patient.slice_checkpoint = fix(cfg.patient.slice_checkpoint)
        cfg.train.init_from = fix(cfg.train.init_from)
    return _validate(cfg)


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """``["train.epochs=2", "model.kwargs.num_classes=2"]`` -> nested dict updates (values parsed as YAML)."""
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        if "=" not in item:
            raise _bad(f"--set needs key=value, got {item!r}")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise _bad(f"--set needs key=value, got {item!r}")
        try:
            val = yaml.safe_load(value)
        except yaml.YAMLError:
            val = value
        node = raw
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise _bad(f"--set {key}: '{p}' is not a section")
            node = node[p]
        node[parts[-1]] = val
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    p = Path(path)
    if not p.is_file():
        raise _bad(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise _bad(f"{p}: not valid YAML ({' '.join(str(exc).split())})") from None
    if raw is None:
        raise _bad(f"{p}: empty config")
    if not isinstance(raw, dict):
        raise _bad(f"{p}: a training config must be a YAML mapping")
    raw = apply_overrides(raw, overrides)
    return parse_config(raw, base_dir=p.parent.parent if p.parent.name == "configs" else p.parent)


def config_to_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
