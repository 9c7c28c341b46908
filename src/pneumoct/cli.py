"""Command line: thin wrappers over the pipeline. Refused input → one-line message, exit code 2."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from ._version import __version__
from .errors import PneumoctInputError
from .types import CLASS_NAMES

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT = 0, 1, 2

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may phone home


def cmd_diagnose(args: argparse.Namespace) -> int:
    from .pipeline import DiagnoseOptions, diagnose, diagnose_batch

    opts = DiagnoseOptions(peripheral_thickness_mm=args.peripheral_thickness_mm, write_report=not args.no_report,
                           use_learned_models=not getattr(args, "no_models", False),
                           slice_probability=getattr(args, "slice_probability", "area"),
                           # --no-models = the classical path: no learned segmenter either (unless --lesions learned)
                           lesions=getattr(args, "lesions", None),
                           segment_when=getattr(args, "segment_when", "always"),
                           positive_threshold=getattr(args, "positive_threshold", 0.5),
                           headline=getattr(args, "headline", "auto"),
                           segmenter=getattr(args, "segmenter", None), model=getattr(args, "model", None))
    out = Path(args.out)
    if len(args.inputs) == 1:
        result = diagnose(args.inputs[0], out, opts)
        _print_summary(result, out)
        return EXIT_OK

    def report(rec: dict, result: dict | None, pos: int, total: int, per_study: float | None) -> None:
        if rec["status"] == "done_before":
            print(f"{out / rec['output']}: finished before (same input and options), not run again")
        elif result is not None:
            _print_summary(result, out / rec["output"])
        elif rec["status"] == "refused":
            print(f"error: {rec['input']}: {rec['error']}", file=sys.stderr)
        else:
            print(f"error: {rec['input']}: internal error: {rec['error']}", file=sys.stderr)
        eta = f", about {_duration(per_study * (total - pos))} left" if per_study and pos < total else ""
        print(f"[{pos}/{total}] {rec['output']}: {rec['status']}{eta}", file=sys.stderr, flush=True)

    records = diagnose_batch(args.inputs, out, opts, on_study=report, resume=not args.redo)
    n_bad = sum(r["status"] not in ("ok", "done_before") for r in records)
    n_before = sum(r["status"] == "done_before" for r in records)
    print(f"batch: {len(records) - n_bad} ok ({n_before} finished before), {n_bad} failed; "
          f"summary in {out / 'batch.json'}")
    return EXIT_OK if n_bad == 0 else EXIT_INPUT


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def _print_summary(result: dict[str, Any], out: Path) -> None:
    p = result["patient"]
    q = result["quantification"]
    partial = " of the scanned part (partial lung coverage: no CT grade)" if q.get("partial") else ""
    print(f"{out}: {p['label']} (source: {p['model']['name']}); lung {(q.get('lung_volume_ml') or {}).get('total')} mL"
          f"{partial}, "
          f"lesion volume ratio {100 * float(q.get('lesion_volume_ratio') or 0):.2f}%, "
          f"{len(result['input']['warnings'])} input warning(s); report: {out / 'report.html'}")


def cmd_synth(args: argparse.Namespace) -> int:
    from .synth import synthesize_cohort

    labels = args.labels.split(",") if args.labels else None
    if labels:
        bad = [lab for lab in labels if lab not in CLASS_NAMES]
        if bad:
            raise PneumoctInputError("bad_argument", f"unknown class {bad[0]!r}; choose from {', '.join(CLASS_NAMES)}")
    if args.cases < 1:
        raise PneumoctInputError("bad_argument", "--cases must be at least 1")
    rows = synthesize_cohort(args.out, args.cases, seed=args.seed, labels=labels, matrix=args.matrix,
                             n_slices=args.slices, difficulty=args.difficulty,
                             formats=tuple(args.formats.split(",")))
    print(f"wrote {len(rows)} synthetic phantom case(s) to {args.out} (manifest.json, manifest.csv)")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from .io import inspect_input

    print(json.dumps(inspect_input(args.input), indent=2, default=str))
    return EXIT_OK


def cmd_crop(args: argparse.Namespace) -> int:
    from .slices import crop_lungs

    result = crop_lungs(args.input, args.out, size=args.size)
    kind = "2D image(s) without HU" if result["input"]["input_is_2d_image"] else "CT study (HU)"
    print(f"{args.out}: {len(result['slices'])} lung crop(s) from a {kind}; boxes in crops.json")
    return EXIT_OK


def cmd_segment(args: argparse.Namespace) -> int:
    from .segmentation import segment_path

    result = segment_path(args.input, args.out, segmenter_path=args.model, binary=args.binary,
                          threshold=args.threshold)
    if result["input"]["kind"] == "study":
        print(f"{args.out}: lesion mask {result['outputs']['mask']} ({result['lesion_volume_ml']} mL of lesion); "
              f"details in segment.json")
    else:
        n_ok, n_bad = result["input"]["n_ok"], result["input"]["n_failed"]
        print(f"{args.out}: {n_ok} PNG mask(s) from 2D image(s) without HU, {n_bad} failed; details in segment.json")
        if n_bad:
            return EXIT_INPUT
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate.run import evaluate_predictions, metrics_text, read_predictions_csv, write_predictions_csv

    if args.predictions:
        pred = read_predictions_csv(args.predictions)
        note = f"predictions file {Path(args.predictions).name}"
    else:
        if not args.data:
            raise PneumoctInputError("bad_arguments", "--checkpoint needs --data KIND[:PATH]")
        from .evaluate.from_checkpoint import predict_checkpoint

        pred, note = predict_checkpoint(args.checkpoint, args.data, level=args.level)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_predictions_csv(Path(args.out) / "predictions.csv", pred)
    compare = read_predictions_csv(args.compare) if args.compare else None
    metrics = evaluate_predictions(pred, args.out, compare=compare, n_boot=args.bootstrap, seed=args.seed,
                                   data_note=note)
    print(metrics_text(metrics), end="")
    print(f"written: {Path(args.out) / 'metrics.json'}")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from .train.entry import train_from_config

    metrics = train_from_config(args.config, args.out, resume=args.resume, progress=not args.no_progress,
                                overrides=args.set)
    best = metrics.get("best") or {}
    out = args.out or f"runs/{Path(args.config).stem}"
    shown = ("val_dice", "val_loss") if "val_dice" in best else ("val_acc", "val_auc")
    print(f"{out}: trained {len(metrics.get('history', []))} epoch(s); best epoch {best.get('epoch')}: "
          + ", ".join(f"{k} {best.get(k)}" for k in shown) + f"; checkpoint in {Path(out) / 'best'}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pneumoct", description="Explainable pneumonia screening from chest CT "
                                     "(research use only; not a medical device).")
    parser.add_argument("--version", action="version", version=f"pneumoct {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("diagnose", help="analyse chest CT studies: lungs, lesions, measurements, diagnosis, report")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="DICOM folder, .zip of one, multi-frame DICOM, NIfTI, NRRD or MHA/MHD; several = a batch")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per study in a batch)")
    p.add_argument("--redo", action="store_true",
                   help="a batch re-runs every study (default: a study whose folder holds a complete result of the "
                   "same input files and options is skipped)")
    p.add_argument("--peripheral-thickness-mm", type=float, default=10.0,
                   help="peripheral band for the DeepSC-COVID peripheral lesion ratio (default 10 mm)")
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.add_argument("--no-models", action="store_true",
                   help="classical path only: no learned model (threshold lesion masks and score, rule diagnosis)")
    from .volumetric import SYSTEMS  # names only: the systems themselves are imported when run

    p.add_argument("--model", choices=list(SYSTEMS), default=None, metavar="NAME",
                   help=f"also run a 3D research model ({', '.join(SYSTEMS)}): research panel in the report, its maps "
                        "as <NAME>_<map>.nii.gz, models.volumetric in result.json; never the headline")
    p.add_argument("--lesions", choices=["learned", "threshold", *SYSTEMS], default=None,
                   help="lesion masks from the bundled learned segmenter (default; weights/lesion_seg, falls back to "
                   "the baseline when it is not installed), the HU threshold baseline (default with --no-models), or "
                   "a 3D research model's 3D mask (runs that model; the headline keeps its calibration's mask)")
    p.add_argument("--segment-when", choices=["always", "positive"], default="always",
                   help="JCS joint diagnosis: 'positive' segments only studies the classifier calls abnormal "
                   "(abnormal probability >= --positive-threshold); 'always' (default) segments every study")
    p.add_argument("--positive-threshold", type=float, default=0.5,
                   help="abnormal probability from which --segment-when positive segments a study (default 0.5)")
    p.add_argument("--slice-probability", choices=["area", "model"], default="area",
                   help="without the headline calibration: per-slice lesion_probability from the threshold area "
                   "(default) or the lesion network's calibrated score")
    p.add_argument("--headline", choices=["auto", "burden", "m3lung_patient", "rule"], default="auto",
                   help="what drives patient.label / abnormal_probability: the lesion burden calibrated on real "
                   "studies (auto, when installed), the M3Lung-Sys patient network (only once you trained and "
                   "validated it on real data), or the explicit rule (docs/validation.md)")
    p.add_argument("--segmenter", default=None, metavar="CHECKPOINT_DIR",
                   help="a lesion segmentation checkpoint instead of the bundled weights/lesion_seg")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("synth", help="write synthetic chest-CT phantoms with ground truth (NIfTI + DICOM)")
    p.add_argument("--out", required=True)
    p.add_argument("--cases", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", default=None, help=f"comma list cycled over the cases (default: {','.join(CLASS_NAMES)})")
    p.add_argument("--matrix", type=int, default=256, help="in-plane size (real CT: 512)")
    p.add_argument("--slices", type=int, default=None, help="slice count (default: drawn per case)")
    p.add_argument("--difficulty", type=float, default=0.0, help="0 = clear lesions ... 1 = small faint lesions")
    p.add_argument("--formats", default="nifti,dicom", help="comma list of nifti,dicom")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("crop", help="M3Lung-Sys lung crop of every slice (studies, or 2D PNG/JPG images)")
    p.add_argument("input", help="a study (any format diagnose reads), a 2D image, or a folder of 2D images")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=224, help="output size in pixels (square)")
    p.set_defaults(func=cmd_crop)

    p = sub.add_parser("segment", help="lesion masks from a segmentation model (studies → NIfTI, 2D images → PNG)")
    p.add_argument("input", help="a study (any format diagnose reads), a 2D PNG/JPG image, or a folder of them")
    p.add_argument("--out", required=True, help="output folder: lesion_mask.nii.gz or <stem>.png masks, segment.json")
    p.add_argument("--model", default=None, metavar="CHECKPOINT_DIR",
                   help="a segmentation checkpoint folder (default: the bundled weights/lesion_seg)")
    p.add_argument("--binary", action="store_true", help="lesion / no lesion only (PNG masks 0/255, NIfTI 0/1)")
    p.add_argument("--threshold", type=float, default=0.5, help="lesion probability threshold (default 0.5)")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("evaluate", help="metrics of predictions (or of a checkpoint on data): per-class, FPE/FNE/FDPE, "
                       "ROC, bootstrap CIs and p-values, results by lesion volume ratio")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--predictions", help="predictions CSV (case_id, y_true, prob_<class>..., [lesion_volume_ratio])")
    src.add_argument("--checkpoint", help="a trained model folder (model.safetensors + model.json) to run on --data")
    p.add_argument("--data", help="with --checkpoint: KIND[:PATH], KIND in phantom_cohort, manifest (these two need "
                   "a PATH), covid_ct_md, covid19_ct_seg_png, medseg")
    p.add_argument("--level", choices=["slice", "patient"], default="slice",
                   help="with --checkpoint: score slices, or patients (slice probabilities averaged); 3D models "
                   "(DeepSC-COVID, a dual-sampling network) always score whole studies")
    p.add_argument("--compare", help="a second predictions CSV on the same cases: paired bootstrap p-values")
    p.add_argument("--out", required=True, help="output folder: metrics.json, metrics.txt, roc.png")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="train a model from a YAML config into a run folder (see docs/training.md)")
    p.add_argument("config", metavar="CONFIG.yaml")
    p.add_argument("--out", default=None, help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, dotted (e.g. --set train.epochs=2); repeatable")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("inspect", help="describe an input (series found, the one chosen, warnings) without analysing")
    p.add_argument("input")
    p.set_defaults(func=cmd_inspect)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}" if not isinstance(exc, PneumoctInputError) else text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except PneumoctInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback, unless --debug
        if args.debug:
            raise
        print(f"internal error: {_one_line(exc)} (rerun with --debug for details)", file=sys.stderr)
        return EXIT_INTERNAL


def _keep_freed_memory() -> None:
    """glibc only, this process only (never when pneumoct is imported as a library): every allocation comes from
    one heap (no per-thread arenas, no separate mappings for large arrays) and up to 1 GB of freed heap is kept
    for reuse instead of being returned to the system. A study's pipeline allocates and frees hundreds of volume-
    and slice-sized buffers; each one returned to the system comes back as fresh zeroed pages, and on a VM a fresh
    page is expensive. Measured on this 2-core VM: keeping < 32 MB blocks cut minor faults 311k -> 123k (covid-P001,
    system CPU 2.8 -> 1.7 s); with no mappings and one arena as well (the threshold baseline runs in a second
    thread, whose arena returned its memory at every free), REAL cap-cap001 `diagnose` (with
    :func:`_small_pages`) 8.6 -> 8.0 s, system CPU 1.5 -> 1.4 s, the same peak RSS (median of 3). Outputs are
    unaffected; failures are ignored."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        # mallopt parameter numbers (malloc.h)
        m_trim_threshold, m_mmap_threshold, m_mmap_max, m_arena_max = -1, -3, -4, -8
        libc.mallopt(m_mmap_threshold, 32 << 20)
        libc.mallopt(m_mmap_max, 0)  # large arrays from the heap too (glibc still maps what the heap cannot hold)
        libc.mallopt(m_arena_max, 1)  # threads share the main heap: freed memory is reused by any stage
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):  # not glibc (musl, ...): defaults stay
        pass


def _small_pages() -> None:
    """This process only: NumPy does not ask for transparent huge pages for its large arrays. With that advice the
    kernel zeroes (and may first compact) a 2 MB page at the first touch of each new region; on a VM whose memory
    the host backs lazily this cost more than the pages saved: REAL cap-cap001 `diagnose` 11.2 -> 8.7 s, system CPU
    3.8 -> 1.7 s (with :func:`_keep_freed_memory`, median of 3; the threshold baseline's page faults 2.8 s -> ~0,
    measured with perf). A user's own ``NUMPY_MADVISE_HUGEPAGE`` wins. Private NumPy API: skipped if absent."""
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return
    try:
        import numpy as np

        np._core.multiarray._set_madvise_hugepage(False)
    except (AttributeError, ImportError):  # pragma: no cover - another NumPy
        pass


def run() -> None:
    """The `pneumoct` command: :func:`main`, then exit without the interpreter's teardown.

    Every output is complete when ``main`` returns (written, then renamed; result.json last), but tearing down the
    interpreter — PyTorch, SciPy, idle thread pools, a few GB of arrays — takes ~0.6 s of the ~8 s a study takes
    (measured), so the process leaves at once after flushing its streams and logs. Before anything runs, the
    allocator is told to keep freed memory for reuse (:func:`_keep_freed_memory`), NumPy not to ask for huge
    pages (:func:`_small_pages`), OpenMP threads to wait
    passively, and the lung mask may run in a forked child (:class:`pneumoct.parallel.Forked`)."""
    _keep_freed_memory()
    _small_pages()
    from .parallel import allow_fork

    allow_fork()  # this process only: the lung mask may run in a forked child (see pneumoct.parallel.Forked)
    # OpenMP threads (PyTorch's intra-op pool) sleep instead of spinning while they wait: with another process on a
    # core, spinning threads wait for a descheduled partner at every barrier (measured, `segment` on covid-P001
    # while a training job ran: network 6.3-7.0 s by default, 2.9-3.2 s passive). Set before torch is imported;
    # a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):  # a closed pipe or stream: nothing left to say
        pass
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    run()
