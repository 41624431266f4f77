"""Progress bars for long work: a compute, a cache write, an index build.

One bar per operation the user started, never one per file: while an
operation draws its bar (or was asked for none, ``progress=False``), the bars
of the work inside it (the gzip stream of each ``.nii.gz`` read for the first
time, nested computes) stay silent. A plain ``.compute()`` / ``.values`` of a
neurocube selection (a graph that reads NIfTI files) is such an
operation too: :func:`watch_computes` (installed by the NIfTI reader) gives it
one bar.

Bars appear only once the work has lasted :data:`DELAY` seconds, so quick reads
draw nothing. In a terminal they are ``tqdm`` bars; in Jupyter or Colab, widgets
(``tqdm.auto``); anywhere else (a log file, a CI job, a pipe) plain lines,
without cursor-movement escape codes: one when the work passes
:data:`DELAY`, one every :data:`LOG_INTERVAL` seconds, one at the end. With a
``distributed.Client`` as the active scheduler, :func:`compute` shows
distributed's own progress instead, since Dask's local callbacks do not see
cluster tasks.

Every entry point takes ``progress=None|True|False``; ``None`` defers to
:func:`neurocube.config.progress_enabled` (environment ``NEUROCUBE_PROGRESS=0``
turns every bar off).

Examples
--------
>>> import dask.array as da
>>> from neurocube.progress import compute, progress_bar
>>> (total,) = compute(da.ones(10, chunks=5).sum(), description="sum", progress=False)
>>> int(total)
10
>>> with progress_bar(100, "bytes", progress=False) as bar:
...     bar.update(100)
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

import dask
import dask.base
from dask.callbacks import Callback

from neurocube.config import progress_enabled

__all__ = [
    "DELAY",
    "LOG_INTERVAL",
    "Bar",
    "TaskProgress",
    "active_client",
    "busy",
    "compute",
    "operation",
    "progress_bar",
    "watch_computes",
]

#: Seconds an operation runs before its bar appears (quicker work draws nothing).
DELAY = 1.0
#: Seconds between two progress lines when the output is not a terminal.
LOG_INTERVAL = 10.0

# Operations running now in this process (any thread); while > 0, inner bars stay silent.
_active = 0
_active_lock = threading.Lock()


def _enter() -> bool:
    """Count one more running operation; return True if it is the outermost one."""
    global _active
    with _active_lock:
        _active += 1
        return _active == 1


def _leave() -> None:
    global _active
    with _active_lock:
        _active = max(0, _active - 1)


def busy() -> bool:
    """Return True while an operation runs in this process (its inner work draws no bar)."""
    return _active > 0


class Bar(Protocol):
    """What :func:`progress_bar` yields: something to ``update(n)``."""

    def update(self, n: float = 1) -> Any:
        """Advance the bar by ``n`` units."""


class _SilentBar:
    """A bar that draws nothing (progress turned off, or inside another operation)."""

    def update(self, n: float = 1) -> None:
        """Ignore the update."""

    def close(self) -> None:
        """Nothing to close."""


def _format_amount(value: float, unit: str) -> str:
    if unit != "B":
        return f"{value:.0f} {unit}"
    for prefix in ("", "Ki", "Mi", "Gi", "Ti"):
        if abs(value) < 1024 or prefix == "Ti":
            return f"{value:.0f} {prefix}B" if not prefix else f"{value:.1f} {prefix}B"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


class _LineBar:
    """Progress as plain lines, for output that is not a terminal (logs, CI, pipes).

    Nothing is written before :data:`DELAY` seconds; then one line, one per
    :data:`LOG_INTERVAL` seconds, and one when the work ends. Only newlines
    separate lines: no carriage returns, no escape codes.
    """

    def __init__(self, total: float | None, description: str, unit: str, file: Any) -> None:
        self.total = total
        self.description = description
        self.unit = unit
        self.file = file
        self.n = 0.0
        self.start = time.monotonic()
        self.last: float | None = None
        self.last_update = self.start
        self.lock = threading.Lock()

    def _line(self, now: float, end: bool = False) -> str:
        done = _format_amount(self.n, self.unit)
        if self.total:
            share = 100 * self.n / self.total
            done += f" of {_format_amount(self.total, self.unit)} ({share:.0f}%)"
        state = "done" if end else "running"
        return f"{self.description}: {state}, {done}, {now - self.start:.1f} s"

    def _write(self, text: str) -> None:
        try:
            print(text, file=self.file, flush=True)
        except (OSError, ValueError):  # a closed or broken stream: progress is not worth failing
            pass

    def update(self, n: float = 1) -> None:
        """Advance by ``n``; write a line when one is due."""
        with self.lock:
            self.n += n
            now = self.last_update = time.monotonic()
            if now - self.start < DELAY:
                return
            if self.last is None or now - self.last >= LOG_INTERVAL:
                self.last = now
                self._write(self._line(now))

    def close(self) -> None:
        """Write the final line if the work lasted long enough to be worth reporting.

        Work counts up to its last update: a reader closed long after its last
        read (an idle handle) reports nothing it did not report already.
        """
        with self.lock:
            if self.last is not None or self.last_update - self.start >= DELAY:
                self._write(self._line(self.last_update, end=True))


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()
    except Exception:  # pragma: no cover - a broken IPython install
        return False
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _new_bar(total: float | None, description: str, unit: str) -> Any:
    """Return a bar fit for where stderr goes: tqdm (terminal), a widget (Jupyter), lines (else)."""
    stream = sys.stderr
    if not _isatty(stream) and not _in_notebook():
        return _LineBar(total, description, unit, stream)
    import warnings

    with warnings.catch_warnings():
        # In a notebook without ipywidgets, tqdm warns and falls back to a text bar: fine.
        warnings.simplefilter("ignore")
        if _in_notebook():
            from tqdm.auto import tqdm
        else:
            from tqdm.std import tqdm
    scale = unit == "B"
    return tqdm(
        total=total, desc=description, unit=unit, unit_scale=scale, unit_divisor=1024,
        file=stream, dynamic_ncols=True, leave=True, delay=DELAY,
    )  # fmt: skip


@contextlib.contextmanager
def operation(
    description: str,
    total: float | None = None,
    *,
    unit: str = "B",
    progress: bool | None = None,
) -> Iterator[Bar]:
    """Run one user-level operation: yield its bar and silence the bars of everything inside.

    The bar is drawn only if progress is enabled, no outer operation is
    running, and the work lasts more than :data:`DELAY` seconds. With
    ``progress=False`` nothing inside draws a bar either.

    Parameters
    ----------
    description
        A short label shown before the bar.
    total
        The number of units expected, or None if unknown.
    unit
        ``"B"`` shows bytes with binary prefixes; anything else counts plain units.
    progress
        True/False forces the bar on/off; None follows ``NEUROCUBE_PROGRESS``.
    """
    outermost = _enter()
    bar: Any = _SilentBar()
    try:
        if outermost and progress_enabled(progress):
            bar = _new_bar(total, description, unit)
        yield bar
    finally:
        try:
            bar.close()
        finally:
            _leave()


@contextlib.contextmanager
def progress_bar(
    total: float | None,
    description: str,
    *,
    unit: str = "B",
    progress: bool | None = None,
) -> Iterator[Bar]:
    """Yield a bar to ``update(n)`` while some piece of work runs (e.g. bytes inflated).

    For work that may run inside a user-level operation (the gzip stream of one
    file): it draws nothing while an :func:`operation` runs, and unlike an
    operation it does not silence anything else, so a stream kept open for
    later reads never holds other bars back. Like every bar, it appears only
    after :data:`DELAY` seconds.

    Parameters
    ----------
    total
        The number of units expected, or None if unknown.
    description
        A short label shown before the bar.
    unit
        ``"B"`` shows bytes with binary prefixes; anything else counts plain units.
    progress
        True/False forces the bar on/off; None follows ``NEUROCUBE_PROGRESS``.
    """
    if busy() or not progress_enabled(progress):
        yield _SilentBar()
        return
    bar = _new_bar(total, description, unit)
    try:
        yield bar
    finally:
        bar.close()


class TaskProgress(Callback):
    """An operation whose bar advances once per finished Dask task.

    Works with Dask's local schedulers (threads, processes, synchronous). Use
    it as a context manager around one or several ``dask.compute`` /
    ``.compute()`` calls: they share one bar, and the bars of the work inside
    (first reads of ``.nii.gz`` files, nested computes) stay silent.

    Parameters
    ----------
    description
        A short label shown before the bar.
    progress
        True/False forces the bar on/off; None follows ``NEUROCUBE_PROGRESS``.
    """

    def __init__(self, description: str, progress: bool | None = None) -> None:
        super().__init__()
        self.description = description
        self.progress = progress
        self._bar: Any = None
        self._outermost = False
        self._states: set[int] = set()
        self._lock = threading.Lock()

    def __enter__(self) -> TaskProgress:
        self._outermost = _enter()
        super().__enter__()
        return self

    def __exit__(self, *args: Any) -> None:
        try:
            super().__exit__(*args)
        finally:
            try:
                if self._bar is not None:
                    self._bar.close()
                    self._bar = None
            finally:
                _leave()

    def _start_state(self, dsk: Any, state: dict[str, Any]) -> None:
        if not self._outermost or not progress_enabled(self.progress):
            return
        total = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
        with self._lock:
            if self._states:  # a compute inside a task of the one already shown
                return
            self._states.add(id(state))
            if self._bar is None:
                self._bar = _new_bar(total, self.description, "task")
            else:  # a further compute of the same operation: the bar grows
                self._bar.total = (self._bar.total or 0) + total
                refresh = getattr(self._bar, "refresh", None)
                if refresh is not None:
                    refresh()

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        if self._bar is not None and id(state) in self._states:
            self._bar.update(1)

    def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
        with self._lock:
            self._states.discard(id(state))


# Name parts of the Dask keys neurocube's readers create (fused names keep them).
_READER_KEYS = ("nifti-",)


def _reads_neurocube_files(dsk: Any) -> bool:
    for key in dsk:
        name = key[0] if isinstance(key, tuple) else key
        if isinstance(name, str) and any(part in name for part in _READER_KEYS):
            return True
    return False


class _ComputeWatcher(Callback):
    """Gives a plain ``.compute()`` of a NIfTI selection one bar (see :func:`watch_computes`)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._state: int | None = None
        self._bar: Any = None

    def _start_state(self, dsk: Any, state: dict[str, Any]) -> None:
        if busy() or not progress_enabled() or not _reads_neurocube_files(dsk):
            return
        total = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
        with self._lock:
            if self._state is not None or not _enter():
                if self._state is None:
                    _leave()
                return
            self._state = id(state)
            try:
                self._bar = _new_bar(total, "computing", "task")
            except Exception:
                self._state = None
                _leave()
                raise

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        if self._bar is not None and id(state) == self._state:
            self._bar.update(1)

    def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
        with self._lock:
            if id(state) != self._state:
                return
            bar, self._bar, self._state = self._bar, None, None
        try:
            bar.close()
        finally:
            _leave()


_watcher: _ComputeWatcher | None = None


def watch_computes() -> None:
    """Give every local compute of a graph that reads NIfTI files one progress bar.

    Registers a Dask callback once per process. It draws only when progress is
    enabled (``NEUROCUBE_PROGRESS``), no neurocube operation (cache write,
    ``neurocube.load``, ...) already shows a bar, and the compute lasts more than
    :data:`DELAY` seconds; computes of other graphs are left alone.
    """
    global _watcher
    if _watcher is None:
        _watcher = _ComputeWatcher()
    # Re-registered when missing: Dask swaps ``Callback.active`` out (a class attribute, not
    # per thread) during each compute and puts back what it found, so two computes started in
    # threads at once (e.g. batches' read-ahead) can end with the registration lost.
    if _watcher._callback not in Callback.active:
        Callback.active.add(_watcher._callback)


def active_client() -> Any | None:
    """Return the ``distributed.Client`` that Dask would compute on now, or None.

    Does not import ``distributed`` if nothing imported it yet (then no client exists).
    """
    if "distributed" not in sys.modules:
        return None
    from distributed import Client

    scheduler = dask.base.get_scheduler()
    owner = getattr(scheduler, "__self__", None)
    return owner if isinstance(owner, Client) else None


def compute(
    *collections: Any,
    description: str,
    progress: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, ...]:
    """Compute Dask collections like ``dask.compute``, with a progress bar.

    Parameters
    ----------
    *collections
        Dask collections (arrays, Delayed, xarray objects).
    description
        A short label shown before the bar.
    progress
        True/False forces the bar on/off; None follows ``NEUROCUBE_PROGRESS``.
    **kwargs
        Passed on to ``dask.compute`` (local schedulers only).

    Returns
    -------
    tuple
        One result per collection, as ``dask.compute`` returns them.
    """
    client = active_client()
    if client is not None:
        show = progress_enabled(progress) and not busy()
        _enter()  # the work inside draws no bars of its own
        try:
            if not show:
                return tuple(dask.compute(*collections, **kwargs))
            from distributed import progress as distributed_progress

            futures = client.compute(list(collections))
            print(description, file=sys.stderr)
            distributed_progress(futures)
            return tuple(client.gather(futures))
        finally:
            _leave()
    with TaskProgress(description, progress=progress):
        return tuple(dask.compute(*collections, **kwargs))
