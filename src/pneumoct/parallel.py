"""Threads for the CPU-bound stages (issue 10: a study in seconds on 2 cores).

SciPy's ``ndimage`` filters, labelling and distance transforms, NumPy's large array operations and PyTorch's
kernels release the GIL, so plain threads run them on several cores at once with no copy of the volume and no
fork. Everything here keeps results identical to a serial run: work is split into independent pieces (slices,
stages) whose outputs do not depend on the order they finish in.

``PNEUMOCT_THREADS`` caps the number of worker threads (default: the CPUs this process may use, at most 8);
``PNEUMOCT_THREADS=1`` runs everything serially.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")


_LOCAL = threading.local()


class thread_budget:
    """``with thread_budget(k):`` — code in this thread uses at most ``k`` worker threads (a stage that runs beside
    another one, which holds the other cores). ``k`` may be a callable, asked at each parallel step: a stage
    beside another one that finishes first can take the freed cores for its remaining steps."""

    def __init__(self, k: int | Callable[[], int]):
        self.k = k if callable(k) else max(1, int(k))

    def __enter__(self) -> "thread_budget":
        self._prev = getattr(_LOCAL, "budget", None)
        _LOCAL.budget = self.k
        return self

    def __exit__(self, *exc: Any) -> None:
        _LOCAL.budget = self._prev


def n_threads() -> int:
    """Worker threads to use: ``PNEUMOCT_THREADS`` if set, else the CPUs available to this process (max 8); at most
    the calling thread's :class:`thread_budget`."""
    budget = getattr(_LOCAL, "budget", None)
    if callable(budget):
        budget = max(1, int(budget()))
    n = _n_threads_configured()
    return min(n, budget) if budget else n


def _n_threads_configured() -> int:
    env = os.environ.get("PNEUMOCT_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def chunks(n: int, parts: int) -> list[range]:
    """``range(n)`` cut into at most ``parts`` contiguous, nearly equal, non-empty ranges."""
    parts = max(1, min(int(parts), int(n)))
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return [range(edges[i], edges[i + 1]) for i in range(parts) if edges[i + 1] > edges[i]]


def run_chunks(fn: Callable[[range], T], n: int, *, min_chunk: int = 8) -> list[T]:
    """Call ``fn(r)`` for contiguous index ranges covering ``range(n)``, on ``n_threads()`` threads when ``n`` is
    at least ``2 * min_chunk``; results in range order. ``fn`` must only write its own indices."""
    workers = n_threads() if n >= 2 * min_chunk else 1
    parts = chunks(n, workers)
    if len(parts) <= 1:
        return [fn(r) for r in parts]
    with ThreadPoolExecutor(max_workers=len(parts), thread_name_prefix="pneumoct-slices") as pool:
        return list(pool.map(fn, parts))


def map_axis(fn: Callable[[Any], Any], arr: Any, axis: int = 0) -> Any:
    """``fn(arr)`` computed on blocks of ``arr`` along ``axis`` on several threads, for an operation with no extent
    along that axis (an in-plane filter along z = axis 0; a filter along z only, by rows = axis 1): the result
    equals ``fn(arr)`` exactly. ``fn`` must return an array of ``arr``'s shape."""
    import numpy as np

    out = np.empty_like(arr)

    def run(r: range) -> None:
        idx = (slice(None),) * axis + (slice(r.start, r.stop),)
        out[idx] = fn(arr[idx])

    run_chunks(run, arr.shape[axis])
    return out


class Background:
    """Start ``fn(*args)`` in a daemon-like worker thread now; ``result()`` waits for it (re-raising its error).
    With one thread configured it runs lazily, on the first ``result()`` call, in the caller's thread."""

    def __init__(self, fn: Callable[..., T], *args: Any, name: str = "pneumoct-bg"):
        self._fn, self._args = fn, args
        self._future: Future | None = None
        self._pool: ThreadPoolExecutor | None = None
        if n_threads() > 1:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
            self._future = self._pool.submit(fn, *args)
            self._pool.shutdown(wait=False)

    @property
    def running(self) -> bool:
        """True while the work runs in its own thread (False when serial, or once it finished)."""
        return self._future is not None and self._pool is not None and not self._future.done()

    def result(self) -> Any:
        if self._future is None:
            self._future = Future()
            try:
                self._future.set_result(self._fn(*self._args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                self._future.set_exception(exc)
        return self._future.result()


# ------------------------------------------------------------------------------------------------ a forked stage
_FORK_ALLOWED = False


def allow_fork(on: bool = True) -> None:
    """Let :class:`Forked` run its work in a forked child process. Only the ``pneumoct`` command turns this on for
    its own process (:func:`pneumoct.cli.run`); a program that imports pneumoct is never forked behind its back."""
    global _FORK_ALLOWED
    _FORK_ALLOWED = bool(on)


def _fork_safe() -> bool:
    """Fork only a process that is still simple: POSIX, more than one core to gain, no other Python thread (a
    thread's held locks would be copied locked) and neither PyTorch nor ONNX Runtime imported (their native
    thread pools do not survive a fork). In a batch, the first study qualifies; later ones run in-process, where
    nothing competes any more."""
    import sys

    return (_FORK_ALLOWED and hasattr(os, "fork") and n_threads() > 1 and threading.active_count() == 1
            and "torch" not in sys.modules and "onnxruntime" not in sys.modules)


_FORKED_MAGIC = b"PNEUMOCT-FORKED-1"


def _send_result(fd: int, payload: Any) -> None:
    """Write ``payload`` to ``fd`` as pickle protocol 5 with its large buffers (NumPy arrays) out of band, raw:
    [8-byte header length][header: pickle of (meta length, buffer lengths)][meta][buffers...][magic]."""
    import pickle

    buffers: list = []
    # an unpicklable result or error raises here: the child then leaves without a result and the parent redoes
    # the work itself, so that the caller sees exactly the in-process result or exception
    meta = pickle.dumps(payload, protocol=5, buffer_callback=buffers.append)
    views = [b.raw() for b in buffers]
    header = pickle.dumps((len(meta), [v.nbytes for v in views]))
    with os.fdopen(fd, "wb", buffering=0) as f:
        for part in (len(header).to_bytes(8, "little"), header, meta, *views, _FORKED_MAGIC):
            view = memoryview(part)
            while view.nbytes:
                view = view[f.write(view):]


def _receive_result(fd: int) -> Any | None:
    """The payload :func:`_send_result` wrote, its arrays backed by a private map of the file (no copy); None if
    the file is incomplete (the child died)."""
    import mmap
    import pickle

    size = os.fstat(fd).st_size
    if size < 8 + len(_FORKED_MAGIC):
        return None
    mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if mm[size - len(_FORKED_MAGIC):] != _FORKED_MAGIC:
        return None
    view = memoryview(mm)
    n = int.from_bytes(view[:8], "little")
    meta_len, lengths = pickle.loads(view[8:8 + n])
    pos = 8 + n + meta_len
    if pos + sum(lengths) + len(_FORKED_MAGIC) != size:
        return None
    meta = view[8 + n:pos]
    buffers = []
    for length in lengths:
        buffers.append(view[pos:pos + length])
        pos += length
    try:
        return pickle.loads(meta, buffers=buffers)  # written by our own child a moment ago, never by anyone else
    except Exception:  # noqa: BLE001 - e.g. an exception type that does not unpickle: redone in-process
        return None


class Forked:
    """Start ``fn(*args)`` now in a forked child process when :func:`_fork_safe`, else lazily in the caller's
    thread on :meth:`result` — the same result either way (``fn`` must be deterministic, its result picklable).

    Why: while the lungs are found, the main process loads the networks (and PyTorch where one has no ONNX
    export); that is Python code holding the GIL, and the lung mask's NumPy / SciPy steps between C calls waited
    for it (covid-P001: lungs ~2.3 s alone, ~3.0 s beside the PyTorch import, measured). A child has its own
    interpreter and a copy-on-write view of the volume. Its result comes back through an anonymous file (``memfd``,
    else an unlinked temporary file): pickled with the arrays' bytes written raw and mapped, not copied, by the
    parent — a pipe and plain pickling took ~0.15 s for a 148-slice lung mask. If the child dies (killed, out of
    memory) the work is redone here. The child inherits the command's memory settings
    (``pneumoct.cli._keep_freed_memory``, ``_small_pages``)."""

    def __init__(self, fn: Callable[..., T], *args: Any):
        self._fn, self._args = fn, args
        self._pid: int | None = None
        self.forked = False
        if not _fork_safe():
            return
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("pneumoct-forked", os.MFD_CLOEXEC)
        else:  # pragma: no cover - POSIX without memfd
            import tempfile

            fd = os.dup(tempfile.TemporaryFile().fileno())
        pid = os.fork()
        if pid == 0:  # the child: compute, write, leave without running the parent's exit handlers
            code = 0
            try:
                try:
                    payload = ("ok", fn(*args))
                except BaseException as exc:  # noqa: BLE001 - re-raised in the parent
                    payload = ("error", exc)
                _send_result(os.dup(fd), payload)
            except BaseException:  # noqa: BLE001 - nothing more to do: the parent redoes the work
                code = 1
            finally:
                os._exit(code)
        self._pid, self._fd, self.forked = pid, fd, True

    def result(self) -> T:
        if self._pid is None:
            return self._fn(*self._args)
        try:
            os.waitpid(self._pid, 0)
            got = _receive_result(self._fd)
        finally:
            os.close(self._fd)
            self._pid = None
        if got is None:  # the child died before it finished writing: do the work here
            return self._fn(*self._args)
        status, value = got
        if status == "error":
            raise value
        return value
