"""A checkpoint's network as an ONNX graph run by ONNX Runtime: inference without importing PyTorch.

    export_onnx(ckpt_dir)                 # writes model.onnx + model.onnx.json beside model.safetensors (PyTorch)
    net = load_onnx(ckpt_dir, info)       # OnnxNet, or None when absent / stale / ONNX Runtime missing (no PyTorch)
    outputs = net.run({"x": x})           # named float32 arrays, as pneumoct.models.inference_heads defines them

Why: importing PyTorch costs ~1.5 s of CPU on the project's 2-core machines, as much as the networks themselves
take on a 150-slice study; ONNX Runtime imports in ~0.05-0.15 s and runs the bundled segmenter as fast as PyTorch
(REAL covid-P001's 138 lung crops: 1.0-1.2 s either way, largest probability difference 1.5e-5). With every
bundled 2D model exported, neither `segment` nor `diagnose` (without ``--model``) imports PyTorch.

The graph is the network inside its inference head (:mod:`pneumoct.models.inference_heads`): it returns what
inference uses (probabilities, the displayed CAM ...), the same wrapper PyTorch runs when there is no export. It
holds no copy of the weights: its initializers point into ``model.safetensors`` (ONNX external data at each
tensor's offset). ``model.onnx.json`` (written last) records the SHA-256 of the graph, of the weights it was
exported from, and the largest difference from PyTorch measured at export. A graph exported from other weights
than ``model.json`` declares (retrained since), or whose graph or weights file fails its hash, is not used: the
loader falls back to PyTorch. ``PNEUMOCT_BACKEND=torch`` forces PyTorch.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PneumoctInputError
from .checkpoint_info import INFO, WEIGHTS, _write_json_atomic, read_checkpoint_info, sha256_file

log = logging.getLogger("pneumoct.models.onnx_runtime")

__all__ = ["ONNX_FILE", "ONNX_INFO", "OnnxNet", "export_onnx", "try_export_onnx", "load_onnx", "onnx_backend_wanted"]

ONNX_FILE, ONNX_INFO = "model.onnx", "model.onnx.json"
OPSET = 17
#: the largest |ONNX - PyTorch| output accepted at export. Float32 rounding differs (ONNX Runtime folds batch norms
#: into the convolutions, as PyTorch's inference path does): the bundled models agree to <= 5e-5, a briefly trained
#: test network with small batch-norm variances to ~5e-4 — as far as PyTorch's folded path is from its unfolded one
EXPORT_TOLERANCE = 5e-3


def onnx_backend_wanted() -> bool:
    """False when the user asked for PyTorch (``PNEUMOCT_BACKEND=torch``)."""
    return os.environ.get("PNEUMOCT_BACKEND", "").strip().lower() not in ("torch", "pytorch")


class OnnxNet:
    """ONNX Runtime sessions on ``model.onnx``: ``net.run({"x": x})`` → ``{output name: float32 array}``;
    ``net(x)`` → the first output. Intra-op threads: the cores pneumoct uses (``PNEUMOCT_THREADS``), or
    ``threads`` per call (one session per thread count, made at first use: ~30 ms); idle threads sleep instead of
    spinning (as ``OMP_WAIT_POLICY=PASSIVE`` does for PyTorch in the command: with another process or stage on a
    core, spinning threads wait for a descheduled partner)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        from ..parallel import _n_threads_configured

        self.path = Path(path)
        self.default_threads = int(threads or _n_threads_configured())
        self._sessions: dict[int, Any] = {}
        sess = self._session(self.default_threads)
        self.input_names = [i.name for i in sess.get_inputs()]
        self.output_names = [o.name for o in sess.get_outputs()]

    def _session(self, threads: int):
        if threads not in self._sessions:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.log_severity_level = 3  # warnings about unused initialisers etc. are not the user's business
            self._sessions[threads] = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        return self._sessions[threads]

    def prepare(self, threads: int) -> None:
        """Make the session for ``threads`` now (e.g. while the lungs are found) rather than at its first call."""
        self._session(max(1, int(threads)))

    def run(self, inputs: dict[str, np.ndarray], threads: int | None = None) -> dict[str, np.ndarray]:
        feed = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()}
        res = self._session(max(1, int(threads or self.default_threads))).run(None, feed)
        return dict(zip(self.output_names, res))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run({self.input_names[0]: x})[self.output_names[0]]


def _onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def load_onnx(ckpt_dir: str | Path, info: dict | None = None) -> OnnxNet | None:
    """The checkpoint's ONNX graph when it may be used: ``model.onnx`` and ``model.onnx.json`` present, exported
    from exactly the weights ``model.json`` declares (SHA-256), the graph's own hash intact, ONNX Runtime
    importable and ``PNEUMOCT_BACKEND`` not ``torch``. Otherwise None (the caller uses PyTorch); a stale or
    damaged graph is logged. Never imports PyTorch."""
    d = Path(ckpt_dir)
    if not onnx_backend_wanted() or not (d / ONNX_FILE).is_file() or not (d / ONNX_INFO).is_file():
        return None
    if not _onnx_available():
        log.info("onnxruntime not installed: %s runs with PyTorch", d.name)
        return None
    info = info if info is not None else read_checkpoint_info(d)
    try:
        import json

        record = json.loads((d / ONNX_INFO).read_text())
    except (OSError, ValueError):
        log.warning("%s: unreadable %s: using PyTorch", d, ONNX_INFO)
        return None
    if record.get("source_sha256") != info.get("sha256"):
        log.warning("%s: %s was exported from other weights than model.json declares (stale): using PyTorch",
                    d, ONNX_FILE)
        return None
    if sha256_file(d / ONNX_FILE) != record.get("sha256"):
        log.warning("%s: %s does not match its recorded SHA-256 (changed or corrupt): using PyTorch", d, ONNX_FILE)
        return None
    weights = d / Path(str(record.get("weights_in") or info.get("weights_file", WEIGHTS))).name  # in this folder
    if record.get("initializers_in_weights_file") and (
            not weights.is_file() or sha256_file(weights) != info.get("sha256")):
        log.warning("%s: %s is missing or does not match model.json's SHA-256 (changed or corrupt)", d, weights.name)
        return None
    try:
        return OnnxNet(d / ONNX_FILE)
    except Exception as exc:  # noqa: BLE001 - an unloadable graph: PyTorch still works
        log.warning("%s: ONNX Runtime cannot load %s (%s): using PyTorch", d, ONNX_FILE, exc)
        return None


def _share_safetensors_weights(onnx_path: Path, weights: Path, prefix: str = "") -> int:
    """Rewrite the graph's initializers that are byte-for-byte a tensor of ``weights`` (safetensors: an 8-byte
    header length, a JSON header, then the raw little-endian tensors) as ONNX external data at that tensor's
    offset in the file: the export adds a ~0.1 MB graph instead of a second copy of the weights (the bundled
    four: ~25 MB). Anything else stays inside the graph. Returns how many initializers now point into the file."""
    import json
    import struct

    import onnx
    from onnx import numpy_helper

    raw = weights.read_bytes()
    n_header = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n_header])
    base = 8 + n_header
    dtypes = {"F32": "<f4", "F64": "<f8", "I64": "<i8", "I32": "<i4", "F16": "<f2"}
    model = onnx.load(str(onnx_path))
    shared = 0
    for init in model.graph.initializer:
        entry = header.get(init.name[len(prefix):] if init.name.startswith(prefix) else init.name)
        if not isinstance(entry, dict) or entry.get("dtype") not in dtypes:
            continue
        arr = numpy_helper.to_array(init)
        start, end = (int(v) for v in entry["data_offsets"])
        if list(arr.shape) != list(entry["shape"]) or arr.astype(dtypes[entry["dtype"]]).tobytes() != \
                raw[base + start:base + end]:
            continue
        for field in ("raw_data", "float_data", "double_data", "int32_data", "int64_data"):
            init.ClearField(field)
        init.data_location = onnx.TensorProto.EXTERNAL
        del init.external_data[:]
        for key, value in (("location", weights.name), ("offset", str(base + start)), ("length", str(end - start))):
            item = init.external_data.add()
            item.key, item.value = key, value
        shared += 1
    onnx.save(model, str(onnx_path))
    return shared


def export_onnx(ckpt_dir: str | Path) -> dict:
    """Export a finished checkpoint with a 2D inference head (:func:`~pneumoct.models.inference_heads.head_for`)
    to ``model.onnx`` and check it with ONNX Runtime against PyTorch on seeded example inputs (batch and slice
    count dynamic); ``model.onnx.json`` is written last (a folder with only ``model.onnx`` is never used). Needs
    PyTorch, ``onnx`` and ``onnxruntime``. Returns the record. An export that differs from PyTorch by more than
    ``EXPORT_TOLERANCE`` is removed and an error raised."""
    import warnings

    import torch

    from .checkpoint import load_checkpoint
    from .inference_heads import build_head, example_inputs, head_for, run_head

    d = Path(ckpt_dir)
    model, info = load_checkpoint(d)
    head_name = head_for(info)
    if head_name is None:
        raise PneumoctInputError("bad_checkpoint", f"{d}: {info['model_name']} has no 2D inference head to export")
    head = build_head(head_name, model, info)
    example = example_inputs(head_name, info)
    dynamic = {name: ({1: "slices"} if name == "features" else {0: "batch"}) for name in example}
    if head_name != "m3lung_patient":
        dynamic.update({name: {0: "batch"} for name in head.outputs})
    for name in (ONNX_INFO, ONNX_FILE):
        (d / name).unlink(missing_ok=True)  # a half-replaced export must not look complete
    tmp = d / (ONNX_FILE + ".tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings on shape checks: the input size is fixed by meta
        # no constant folding: every weight stays the checkpoint's own tensor, so the graph can point into
        # model.safetensors instead of holding a second copy (ONNX Runtime folds batch norms etc. at load itself:
        # same speed, measured)
        torch.onnx.export(head, tuple(example.values()), str(tmp), input_names=list(example),
                          output_names=list(head.outputs), dynamic_axes=dynamic, opset_version=OPSET, dynamo=False,
                          do_constant_folding=False)
    n_shared = _share_safetensors_weights(tmp, d / info.get("weights_file", WEIGHTS), prefix="net.")
    diff = 0.0
    # the export's check: the example it was traced on, and another batch / slice count (dynamic axes)
    for ex in (example, example_inputs(head_name, info, batch=3)):
        feed = {k: v.numpy() for k, v in ex.items()}
        if "features" in feed:
            feed["features"] = np.concatenate([feed["features"]] * 3, 1)[:, :-1]
        want, got = run_head(head, feed), OnnxNet(tmp).run(feed)
        for name in head.outputs:
            a, b = want[name], got.get(name)
            diff = max(diff, float(np.abs(a - b).max()) if b is not None and a.shape == b.shape else float("inf"))
    if not diff <= EXPORT_TOLERANCE:
        tmp.unlink(missing_ok=True)
        raise PneumoctInputError("bad_checkpoint", f"{d}: the ONNX export differs from PyTorch by {diff:.3g} "
                                 f"(> {EXPORT_TOLERANCE}); not written")
    os.replace(tmp, d / ONNX_FILE)
    record = {"format": "onnx", "opset": OPSET, "file": ONNX_FILE, "sha256": sha256_file(d / ONNX_FILE),
              "source": INFO, "source_sha256": info["sha256"], "model_name": info["model_name"], "head": head_name,
              "inputs": {k: list(v.shape) for k, v in example.items()}, "outputs": list(head.outputs),
              "weights_in": info.get("weights_file", WEIGHTS), "initializers_in_weights_file": n_shared,
              "max_abs_diff_vs_torch": diff, "torch_version": torch.__version__}
    _write_json_atomic(d / ONNX_INFO, record)
    return record


def try_export_onnx(ckpt_dir: str | Path) -> dict | None:
    """:func:`export_onnx` where it can run (training and ``pneumoct.train.bundle`` call it on a finished 2D
    model); without ``onnx`` / ``onnxruntime``, or when the export fails, the checkpoint simply runs with
    PyTorch (logged). Returns the record or None."""
    try:
        return export_onnx(ckpt_dir)
    except ImportError as exc:
        log.info("%s: no ONNX export (%s): it will run with PyTorch", ckpt_dir, exc)
    except Exception as exc:  # noqa: BLE001 - the PyTorch checkpoint is complete and usable without it
        log.warning("%s: ONNX export failed (%s): it will run with PyTorch", ckpt_dir, exc)
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m pneumoct.models.onnx_runtime CKPT_DIR...``: export each checkpoint folder (maintainers: after
    retraining a bundled 2D model by hand; ``pneumoct.train.bundle`` exports what it installs)."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m pneumoct.models.onnx_runtime CHECKPOINT_DIR...", file=sys.stderr)
        return 2
    for a in args:
        rec = export_onnx(a)
        print(f"{a}: {ONNX_FILE} written (largest difference from PyTorch {rec['max_abs_diff_vs_torch']:.2e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
