"""Progress bars for long work: gzip index building, cache writes, long computes.

Bars are drawn by ``tqdm.auto`` (a text bar in a terminal, a widget in Jupyter
or Colab when ``ipywidgets`` is installed, text otherwise). With a
``distributed.Client`` as the active scheduler, computes show distributed's own
progress bar instead, since Dask's local callbacks do not see cluster tasks.

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
from collections.abc import Iterator
from typing import Any, Protocol

import dask
import dask.base
from dask.callbacks import Callback

from neurocube.config import progress_enabled

__all__ = ["Bar", "TaskProgress", "active_client", "compute", "progress_bar"]


class Bar(Protocol):
    """What :func:`progress_bar` yields: something to ``update(n)``."""

    def update(self, n: float = 1) -> Any:
        """Advance the bar by ``n`` units."""


class _SilentBar:
    """A bar that draws nothing (progress turned off)."""

    def update(self, n: float = 1) -> None:
        """Ignore the update."""

    def close(self) -> None:
        """Nothing to close."""


def _tqdm(**kwargs: Any) -> Any:
    import warnings

    with warnings.catch_warnings():
        # In a notebook without ipywidgets, tqdm warns and falls back to a text bar: fine.
        warnings.simplefilter("ignore")
        from tqdm.auto import tqdm

    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", True)
    return tqdm(**kwargs)


@contextlib.contextmanager
def progress_bar(
    total: float | None,
    description: str,
    *,
    unit: str = "B",
    progress: bool | None = None,
) -> Iterator[Bar]:
    """Yield a bar to ``update(n)`` while some long loop runs (e.g. bytes inflated).

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
    if not progress_enabled(progress):
        yield _SilentBar()
        return
    scale = unit == "B"
    bar = _tqdm(total=total, desc=description, unit=unit, unit_scale=scale, unit_divisor=1024)
    try:
        yield bar
    finally:
        bar.close()


class TaskProgress(Callback):
    """A Dask callback that advances a tqdm bar once per finished task.

    Works with Dask's local schedulers (threads, processes, synchronous). Use
    it as a context manager around ``dask.compute`` / ``.compute()``.
    """

    def __init__(self, description: str) -> None:
        super().__init__()
        self.description = description
        self._bar: Any = None

    def _start_state(self, dsk: Any, state: dict[str, Any]) -> None:
        total = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
        self._bar = _tqdm(total=total, desc=self.description, unit="task")

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


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
    if not progress_enabled(progress):
        return tuple(dask.compute(*collections, **kwargs))
    client = active_client()
    if client is not None:
        from distributed import progress as distributed_progress

        futures = client.compute(list(collections))
        print(description, file=sys.stderr)
        distributed_progress(futures)
        return tuple(client.gather(futures))
    with TaskProgress(description):
        return tuple(dask.compute(*collections, **kwargs))
