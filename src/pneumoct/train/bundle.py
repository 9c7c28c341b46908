"""Install a finished run's best checkpoint as one of the models ``diagnose`` uses.

    python -m pneumoct.train.bundle RUN_DIR --as m3lung_slice [--weights DIR]

Copies ``RUN_DIR/best`` to ``DIR/<key>/`` (default: the package's ``weights/``), re-saved with provenance in its
meta: ``data_kind`` ("synthetic" when every training source is a phantom, "real+synthetic" when mixed, else
"real"), ``trained_on`` (the
sources), ``validation_summary`` (the run's best validation metrics), and the run's model card and training-data
fingerprint (``best/fingerprint.json``, see :mod:`pneumoct.fingerprint`) beside it.
Write-then-rename: a half-copied model never looks installed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from ..errors import PneumoctInputError

KEYS = ("lesion_presence", "m3lung_slice", "m3lung_patient", "lesion_seg", "deepsc")
ONNX_KEYS = ("lesion_presence", "m3lung_slice", "m3lung_patient", "lesion_seg")  # + an ONNX export (2D heads)


def install_run(run_dir: str | Path, key: str, weights_dir: str | Path | None = None,
                extra_meta: dict | None = None) -> Path:
    from ..learned import bundled_weights_dir
    from .checkpoint import load_checkpoint, save_checkpoint

    if key not in KEYS:
        raise PneumoctInputError("bad_argument", f"--as must be one of {', '.join(KEYS)}")
    run = Path(run_dir)
    if not (run / "best" / "model.json").is_file():
        raise PneumoctInputError("not_found", f"{run} has no best/ checkpoint (is the run finished?)")
    model, info = load_checkpoint(run / "best")
    meta = dict(info.get("meta") or {})
    data = meta.get("data") or {}
    sources = [str(s) for s in data.get("sources") or []]
    synth_sources = sorted({s.split(":")[-1] for s in sources if s.split(":")[-1].startswith("phantom")})
    real_sources = sorted({s.split(":")[-1] for s in sources} - set(synth_sources))
    synthetic = bool(synth_sources) or (bool(data.get("synthetic")) and not real_sources)
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    meta.update({
        # a mixed run says both: its figures must be read as coming from real data only where measured on it
        "data_kind": ("real+synthetic" if synthetic and real_sources else "synthetic" if synthetic else "real"),
        "trained_on": ("synthetic phantoms only (pneumoct.synth)" if synthetic and not real_sources
                       else "real public CT: " + ", ".join(real_sources)
                       + (" + synthetic phantoms (pneumoct.synth)" if synthetic else "")),
        "validation_summary": metrics.get("best"),
        "installed_from_run": run.name,
    })
    meta.update(extra_meta or {})
    dest = Path(weights_dir) if weights_dir else bundled_weights_dir()
    dest = dest / key
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(tmp, model, info["model_name"], info["model_kwargs"], meta)
    if (run / "model_card.md").is_file():
        shutil.copy(run / "model_card.md", tmp / "model_card.md")
    # the training-data fingerprint (pneumoct.fingerprint), stored by train_from_config beside best/
    for fp in (run / "best" / "fingerprint.json", run / "fingerprint.json"):
        if fp.is_file():
            _install_fingerprint(fp, tmp / "fingerprint.json", key, run.name)
            break
    if key in ONNX_KEYS:  # `segment` / `diagnose` then run it without importing PyTorch: models/onnx_runtime.py
        from ..models.onnx_runtime import try_export_onnx

        try_export_onnx(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def _install_fingerprint(src: Path, dst: Path, key: str, run_name: str) -> None:
    """Copy a run's fingerprint, naming the model it now belongs to (its statistics are left as they are)."""
    try:
        fp = json.loads(src.read_text())
        fp.setdefault("model", {}).update({"key": key, "installed_from_run": run_name})
        dst.write_text(json.dumps(fp, indent=1) + "\n")
    except (json.JSONDecodeError, AttributeError):
        shutil.copy(src, dst)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pneumoct.train.bundle", description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--as", dest="key", required=True, choices=KEYS)
    ap.add_argument("--weights", default=None)
    args = ap.parse_args(argv)
    try:
        print(install_run(args.run, args.key, args.weights))
    except PneumoctInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
