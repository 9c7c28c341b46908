"""Issue 10: threads make `diagnose` faster on 2 cores and change nothing in its output."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pneumoct.parallel import Background, chunks, n_threads, run_chunks


def test_chunks_cover_the_range_once_in_order():
    for n in (0, 1, 5, 17, 150):
        for parts in (1, 2, 3, 8):
            got = [i for r in chunks(n, parts) for i in r]
            assert got == list(range(n))
            assert len(chunks(n, parts)) == min(max(parts, 1), n) if n else chunks(n, parts) == []


def test_run_chunks_and_background(monkeypatch):
    monkeypatch.setenv("PNEUMOCT_THREADS", "2")
    assert n_threads() == 2
    out = np.zeros(100, int)

    def fill(r):
        out[r.start:r.stop] = np.arange(r.start, r.stop) * 2
        return r.start

    starts = run_chunks(fill, 100, min_chunk=4)
    assert starts == sorted(starts) and len(starts) == 2 and (out == np.arange(100) * 2).all()
    bg = Background(lambda a, b: a + b, 2, 3)
    assert bg.result() == 5
    failing = Background(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result()
    monkeypatch.setenv("PNEUMOCT_THREADS", "1")
    lazy = Background(lambda: 7)
    assert not lazy.running and lazy.result() == 7


def _hull_reference(m):
    """Qhull over every pixel centre of the mask, filled by skimage's polygon rasteriser, joined with the mask."""
    from scipy.spatial import ConvexHull, QhullError
    from skimage.draw import polygon

    pts = np.argwhere(m).astype(float)
    out = m.copy()
    if len(pts) < 3:
        return out
    try:
        v = pts[ConvexHull(pts).vertices]
    except QhullError:  # all on a line
        return out
    rr, cc = polygon(v[:, 0], v[:, 1], shape=m.shape)
    out[rr, cc] = True
    return out


def test_convex_hull_by_row_envelopes_matches_qhull_and_skimage():
    from scipy import ndimage as ndi

    from pneumoct.preprocess.lung_mask import _convex_hull

    rng = np.random.default_rng(0)
    for t in range(600):
        h, w = (int(v) for v in rng.integers(3, 70, 2))
        m = rng.random((h, w)) < rng.uniform(0.005, 0.6)
        if t % 2:
            m = ndi.binary_opening(m | (rng.random((h, w)) < 0.5))  # blob-like masks
        assert (_convex_hull(m) == _hull_reference(m)).all(), (t, h, w, int(m.sum()))
    line = np.zeros((20, 20), bool)
    line[[2, 9, 16], [3, 10, 17]] = True  # one diagonal line with gaps: no area, nothing added
    assert (_convex_hull(line) == line).all()


def _strip_timing(d):
    if isinstance(d, dict):
        return {k: _strip_timing(v) for k, v in d.items() if k not in ("timing_s", "timing", "decode_seconds")}
    if isinstance(d, list):
        return [_strip_timing(x) for x in d]
    return d


def test_threads_do_not_change_the_diagnosis(tmp_path, monkeypatch):
    """The same phantom through the diagnose path serially (PNEUMOCT_THREADS=1) and on two threads: identical
    lung and lesion masks and an identical result.json (timings aside), learned models included."""
    from pneumoct.pipeline import DiagnoseOptions, analyse_study
    from pneumoct.io import read_study
    from pneumoct.synth import synthesize_cohort

    rows = synthesize_cohort(tmp_path, 1, seed=3, labels=["cap"], matrix=256, n_slices=48, formats=("nifti",))
    study = read_study(tmp_path / rows[0]["case_id"] / "image.nii.gz")
    outs = {}
    for threads in ("1", "2"):
        monkeypatch.setenv("PNEUMOCT_THREADS", threads)
        outs[threads] = analyse_study(study, DiagnoseOptions(write_report=False, write_masks=False), {})
    a, b = outs["1"], outs["2"]
    assert a.lung_labels.any() and a.lesion_mask.any()
    assert np.array_equal(a.lung_labels, b.lung_labels) and np.array_equal(a.lesion_mask, b.lesion_mask)
    ja = json.loads(json.dumps(_strip_timing(a.result), default=str))
    jb = json.loads(json.dumps(_strip_timing(b.result), default=str))
    assert ja == jb


def test_thread_budget_caps_this_thread_only(monkeypatch):
    import threading

    from pneumoct.parallel import thread_budget

    monkeypatch.setenv("PNEUMOCT_THREADS", "4")
    seen = {}
    with thread_budget(1):
        seen["inside"] = n_threads()
        t = threading.Thread(target=lambda: seen.__setitem__("other", n_threads()))
        t.start()
        t.join()
    seen["after"] = n_threads()
    assert seen == {"inside": 1, "other": 4, "after": 4}


def test_callable_thread_budget_is_asked_at_each_step(monkeypatch):
    """A stage beside another one keeps to one thread while the other runs, and takes the freed cores after."""
    from pneumoct.parallel import run_chunks, thread_budget

    monkeypatch.setenv("PNEUMOCT_THREADS", "4")
    busy = [True]
    names = []

    def step(r: range) -> None:
        import threading

        names.append(threading.current_thread().name)

    with thread_budget(lambda: 1 if busy[0] else 3):
        first = n_threads()
        run_chunks(step, 64)
        serial = list(names)
        busy[0] = False
        names.clear()
        second = n_threads()
        run_chunks(step, 64)
    assert (first, second) == (1, 3)
    assert len(serial) == 1 and len(names) == 3  # one piece in the calling thread, then three pieces


def test_map_axis_equals_the_whole_array_result(monkeypatch):
    from scipy import ndimage as ndi

    from pneumoct.parallel import map_axis

    monkeypatch.setenv("PNEUMOCT_THREADS", "2")
    a = np.random.default_rng(1).random((40, 36, 30)) > 0.4
    inplane = lambda m: ndi.binary_erosion(m, structure=np.ones((1, 3, 3), bool))  # noqa: E731
    alongz = lambda m: ndi.maximum_filter1d(m.view(np.uint8), 5, axis=0).view(bool)  # noqa: E731
    assert np.array_equal(map_axis(inplane, a), inplane(a))
    assert np.array_equal(map_axis(alongz, a, axis=1), alongz(a))


def _child_dies(x):
    import os
    import signal

    if os.getpid() != _child_dies.parent:
        os.kill(os.getpid(), signal.SIGKILL)  # the forked child is killed before it sends anything
    return x + 1


def test_forked_gives_the_in_process_result_errors_and_survives_a_dead_child(monkeypatch):
    import os

    import pytest

    from pneumoct import parallel

    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    monkeypatch.setattr(parallel, "_fork_safe", lambda: True)
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(6, 40, 40))
    job = parallel.Forked(np.cumsum, vol)
    assert job.forked
    out = job.result()
    np.testing.assert_array_equal(out, np.cumsum(vol))

    bad = parallel.Forked(int, "not a number")
    with pytest.raises(ValueError):
        bad.result()

    _child_dies.parent = os.getpid()
    dead = parallel.Forked(_child_dies, 41)
    assert dead.forked and dead.result() == 42  # redone in this process

    # our input error comes back with its code (exit 2 in the command); an error that does not survive pickling
    # is redone here, so the caller still sees the in-process exception, not a stand-in
    from pneumoct.errors import PneumoctInputError

    refused = parallel.Forked(_refuse, "bad_input")
    with pytest.raises(PneumoctInputError) as info:
        refused.result()
    assert info.value.code == "bad_input" and str(info.value) == "refused: bad_input"
    odd = parallel.Forked(_raise_unpicklable, os.getpid())
    with pytest.raises(_Unpicklable) as info:
        odd.result()
    assert info.value.where == "here"


def _refuse(code):
    from pneumoct.errors import PneumoctInputError

    raise PneumoctInputError(code, f"refused: {code}")


class _Unpicklable(Exception):
    def __init__(self, where, handle):
        super().__init__(where)
        self.where, self.handle = where, handle


def _raise_unpicklable(parent_pid):
    import os
    import threading

    raise _Unpicklable("here" if os.getpid() == parent_pid else "child", threading.Lock())  # a lock: no pickle


def test_fork_only_when_allowed_and_alone(monkeypatch):
    import sys
    import threading

    from pneumoct import parallel

    monkeypatch.setenv("PNEUMOCT_THREADS", "2")
    parallel.allow_fork(False)
    assert not parallel._fork_safe() and not parallel.Forked(abs, -3).forked
    monkeypatch.setattr(parallel, "_FORK_ALLOWED", True)
    alone = threading.active_count() == 1 and "torch" not in sys.modules and "onnxruntime" not in sys.modules
    assert parallel._fork_safe() == alone
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert not parallel._fork_safe()  # another thread is alive
    finally:
        stop.set()
        t.join()
    monkeypatch.setenv("PNEUMOCT_THREADS", "1")
    assert not parallel._fork_safe()  # one core: nothing to gain


def test_warming_the_later_stages_imports_them_and_compiles_the_report():
    import sys

    from pneumoct.pipeline import _warm_later_stages
    from pneumoct.report.html import _ENV

    _warm_later_stages(True)
    assert {"pneumoct.headline", "pneumoct.quantify.rsna", "pneumoct.explain"} <= set(sys.modules)
    assert any("report.html" in str(k) for k in _ENV.cache.keys())


def test_command_memory_settings_apply_to_its_process_only_and_a_user_setting_wins():
    """The `pneumoct` command's allocator / huge-page settings (cli._keep_freed_memory, cli._small_pages): huge-page
    advice off in that process, untouched where pneumoct is imported, and NUMPY_MADVISE_HUGEPAGE set by the user
    wins. Run in fresh interpreters: the settings are process-wide."""
    import subprocess
    import sys

    probe = ("import numpy as np, pneumoct.cli as c\n"
             "before = np._core.multiarray._get_madvise_hugepage()\n"
             "c._keep_freed_memory(); c._small_pages()\n"
             "a = np.ones(1 << 24); assert a.sum() == 1 << 24\n"  # the heap settings keep allocations working
             "print(before, np._core.multiarray._get_madvise_hugepage())\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "NUMPY_MADVISE_HUGEPAGE": "1"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
