"""Trial selections pushed down into NIfTI reads, as a Dask graph optimization.

Dask answers ``x[100:105]`` (or ``isel(trial=...)`` through xarray) on an
array made by ``from_array`` with two tasks: read the whole chunk, then slice
it. For a ``.nii.gz`` in S3, five trials at the end of a session would fetch and
inflate a 32 MiB chunk. Before Dask's own array optimization, :func:`optimize`
finds each slicing task whose input is a chunk read of a
:class:`~neurocube.sources.nifti.VolumeArray` (and that chunk's other users),
and replaces it by one task that reads only the selected volumes (and
gathers only the selected voxels). Chunk reads that nothing else needs are
then culled. Keys, shapes and values are unchanged; any other graph passes
through untouched.

It is installed as Dask's ``array_optimize`` (see :func:`install`), unless the
user already set one.
"""

from __future__ import annotations

import contextlib
import operator
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["install", "optimize", "read_selected"]

_INSTALL_LOCK = threading.Lock()
_STATE = threading.local()


def install() -> None:
    """Make :func:`optimize` Dask's array optimization for this process.

    Done once; an ``array_optimize`` set by someone else is never replaced.
    """
    import dask

    with _INSTALL_LOCK:
        current = dask.config.get("array_optimize", None)
        if current is None:
            dask.config.set({"array_optimize": optimize})


def read_selected(array: Any, key: tuple[Any, ...]) -> np.ndarray:
    """Return ``array[key]`` indexed orthogonally, reading only the selected volumes.

    The key comes from chained Dask selections, one axis at a time, so index
    arrays on several axes select orthogonally (like ``np.ix_``), not
    point-wise as numpy would broadcast them.
    """
    arrays = [ax for ax, k in enumerate(key) if isinstance(k, np.ndarray)]
    if len(arrays) <= 1:
        return np.asarray(array[key])
    trial_axis = len(key) - 1 if len(key) == 4 else 0  # (x, y, z, trial) or (trial, voxel)
    first = tuple(
        k if ax == trial_axis or not isinstance(k, np.ndarray) else slice(None)
        for ax, k in enumerate(key)
    )
    out = np.asarray(array[first])
    for ax in arrays:
        if ax == trial_axis:
            continue
        position = ax - sum(isinstance(k, (int, np.integer)) for k in key[:ax])
        out = np.take(out, key[ax], axis=position)
    return out


def _volume_array_type() -> type:
    from neurocube.sources.nifti import VolumeArray

    return VolumeArray


def _normalize(key: Any, ndim: int) -> tuple[Any, ...] | None:
    """Return ``key`` with one plain entry (int, slice, 1-D int/bool array) per axis, or None."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is None or k is Ellipsis for k in key) or len(key) > ndim:
        return None
    arrays = 0
    for k in key:
        if isinstance(k, (slice, int, np.integer)):
            continue
        if isinstance(k, (list, np.ndarray)) and np.ndim(k) == 1:
            arrays += 1
            continue
        return None
    if arrays > 1:  # numpy would broadcast several arrays together: leave that to Dask
        return None
    return tuple(key) + (slice(None),) * (ndim - len(key))


def _compose(shape: tuple[int, ...], first: tuple[Any, ...], second: Any) -> tuple[Any, ...] | None:
    """Return one key over ``shape`` equal to indexing with ``first`` then with ``second``."""
    kept = [ax for ax, k in enumerate(first) if not isinstance(k, (int, np.integer))]
    second_key = _normalize(second, len(kept))
    if second_key is None:
        return None
    out: list[Any] = list(first)
    for ax, k in zip(kept, second_key, strict=True):
        base = first[ax]
        if isinstance(base, slice):
            selected = np.arange(*base.indices(shape[ax]))
        else:
            selected = np.asarray(base)
            if selected.dtype == bool:
                selected = np.flatnonzero(selected)
        picked = selected[k]
        out[ax] = int(picked) if np.ndim(picked) == 0 else _as_key(np.asarray(picked))
    return tuple(out)


def _as_key(indices: np.ndarray) -> Any:
    """Return a slice for a contiguous ascending run of indices, else the array."""
    if indices.size and np.all(np.diff(indices) == 1):
        return slice(int(indices[0]), int(indices[-1]) + 1)
    return indices.astype(np.int64)


def _source(graph: dict[Any, Any], ref: Any) -> tuple[Any, tuple[Any, ...]] | None:
    """If ``ref`` names a read of a VolumeArray, return ``(array, key over the whole array)``."""
    from dask._task_spec import Alias, DataNode, Task, TaskRef
    from dask.array.core import getter, getter_nofancy

    if not isinstance(ref, TaskRef):
        return None
    task = graph.get(ref.key)
    for _ in range(8):  # concatenate (several sessions) names its blocks by aliases of the reads
        if not isinstance(task, Alias):
            break
        task = graph.get(task.target)
    if not isinstance(task, Task) or len(task.args) != 2:
        return None
    target, key = task.args
    if isinstance(key, DataNode):
        key = key.value
    if isinstance(target, TaskRef):
        target = graph.get(target.key)
    if isinstance(target, DataNode):
        target = target.value
    if not isinstance(target, _volume_array_type()):
        return None
    found: Any = target
    target_shape: tuple[int, ...] = tuple(found.shape)
    if task.func in (getter, getter_nofancy):
        full = _normalize(key, len(target_shape))
        return None if full is None else (target, full)
    if task.func is read_selected:
        return target, key
    return None


def push_down(graph: dict[Any, Any]) -> dict[Any, Any]:
    """Return ``graph`` with slicing tasks of VolumeArray chunk reads turned into selected reads."""
    from dask._task_spec import DataNode, Task, TaskRef
    from dask.array._shuffle import _getitem as shuffle_getitem
    from dask.array.chunk import getitem as chunk_getitem

    out = dict(graph)
    changed = True
    while changed:  # a selection of a selection composes again
        changed = False
        for name, task in list(out.items()):
            if not isinstance(task, Task) or len(task.args) != 2 or task.kwargs:
                continue
            if task.func is operator.getitem or task.func is chunk_getitem:
                index = task.args[1]
                if isinstance(index, DataNode):
                    index = index.value
            elif task.func is shuffle_getitem and isinstance(task.args[1], TaskRef):
                taker = out.get(task.args[1].key)
                taker = taker.value if isinstance(taker, DataNode) else taker
                if not (isinstance(taker, tuple) and len(taker) == 2):
                    continue
                index = taker[1]
            else:
                continue
            source = _source(out, task.args[0])
            if source is None:
                continue
            array, first = source
            key = _compose(tuple(array.shape), first, index)
            if key is None:
                continue
            out[name] = Task(name, read_selected, DataNode(None, array), DataNode(None, key))
            changed = True
    return out


def optimize(dsk: Any, keys: Any, **kwargs: Any) -> Any:
    """Dask's array optimization, after pushing NIfTI trial selections down into the reads."""
    from dask.array.optimization import optimize as dask_optimize
    from dask.highlevelgraph import HighLevelGraph

    layers = dsk.layers if isinstance(dsk, HighLevelGraph) else None
    if layers is not None and not any(str(n).startswith("nifti-") for n in layers):
        return dask_optimize(dsk, keys, **kwargs)
    from neurocube.progress import watch_computes

    watch_computes()  # a NIfTI compute is about to start: make sure its progress bar is watched
    from dask._task_spec import convert_legacy_graph
    from dask.utils import ensure_dict

    graph = convert_legacy_graph(ensure_dict(dsk))
    graph = push_down(graph)
    if not getattr(_STATE, "keep_chunk_tasks", False):
        graph = read_whole_arrays(graph, keys)
    return dask_optimize(graph, keys, **kwargs)


@contextlib.contextmanager
def chunk_tasks_kept() -> Iterator[None]:
    """In this thread, optimize only pushes selections down: whole-array reads are not merged.

    For code that inspects or re-runs the graph's reads itself
    (:func:`~neurocube.sources.nifti_rows.trial_rows`).
    """
    before = getattr(_STATE, "keep_chunk_tasks", False)
    _STATE.keep_chunk_tasks = True
    try:
        yield
    finally:
        _STATE.keep_chunk_tasks = before


def read_whole_arrays(graph: dict[Any, Any], keys: Any) -> dict[Any, Any]:
    """Return ``graph`` with arrays whose every chunk is wanted read by one direct task.

    ``.values``, ``.compute()`` and ``ds.load()`` of a masked NIfTI array end in
    Dask's finalize task, which concatenates every chunk. One task per chunk
    makes each seek to its own index point and decode alone; one task that
    reads the whole array with the direct loader (a forward pass per thread,
    gathered straight into one output, as :func:`neurocube.load` does) is
    faster and needs no concatenation: it replaces the finalize task. When
    the chunk keys themselves are asked for (``persist``), they become views
    of that read. Only done on the local schedulers: under a
    ``distributed.Client`` the chunks stay tasks of their own, spread over
    the workers.
    """
    from dask._task_spec import DataNode, Task, TaskRef
    from dask.array.core import finalize
    from dask.core import flatten

    from neurocube.progress import active_client

    if active_client() is not None:
        return graph
    out = dict(graph)
    wanted: dict[str, set[tuple[Any, ...]]] = {}
    for key in flatten(keys) if isinstance(keys, list) else [keys]:
        task = graph.get(key)
        if task is not None and getattr(task, "func", None) is finalize:
            # a compute of a whole collection (``.values``, ``.compute()``): one task
            # concatenates every chunk. Read the array into its result directly instead.
            deps = set(task.dependencies)
            names = {d[0] for d in deps if isinstance(d, tuple) and d}
            if len(names) == 1:
                (name,) = names
                source = _whole_source(name)
                if source is not None and deps == set(_chunk_keys(name, _chunks_of(source))):
                    out[key] = Task(key, _same, TaskRef(_add_whole_read(out, name, source)))
            continue
        if isinstance(key, tuple) and key and isinstance(key[0], str):
            wanted.setdefault(key[0], set()).add(key)
    for name, keys_of_name in wanted.items():  # chunk keys asked for themselves (persist)
        source = _whole_source(name)
        if source is None:
            continue
        all_keys = _chunk_keys(name, _chunks_of(source))
        if keys_of_name != set(all_keys):
            continue
        whole = _add_whole_read(out, name, source)
        for key, index in all_keys.items():
            out[key] = Task(key, operator.getitem, TaskRef(whole), DataNode(None, index))
    return out


def _add_whole_read(graph: dict[Any, Any], name: str, source: tuple[Any, ...]) -> str:
    """Add the task that reads array ``name`` whole to ``graph``; return its key.

    The key keeps a reader's name part ("nifti-"), so the compute's progress bar
    (:mod:`neurocube.progress`) still knows that the graph reads files.
    """
    from dask._task_spec import DataNode, Task

    from neurocube.sources import nifti_load

    whole = f"whole-nifti-{name}"
    graph[whole] = Task(whole, nifti_load.read_whole_array, DataNode(None, source))
    return whole


def _same(value: Any) -> Any:
    """Return ``value`` (the finalize step of a whole-array read: nothing left to join)."""
    return value


def _whole_source(name: str) -> tuple[Any, ...] | None:
    from neurocube.sources import nifti_load

    if not name.startswith(("nifti-masked-", "concatenate-")):
        return None
    return nifti_load.whole_array_source(name)


def _chunks_of(source: tuple[Any, ...]) -> tuple[tuple[int, ...], ...]:
    """Return the chunks of the Dask array a :func:`nifti_load.whole_array_source` stands for."""
    if source[0] == "volumes":
        chunks: tuple[tuple[int, ...], ...] = source[2]
        return chunks
    return _stacked_chunks(source[1])


def _stacked_chunks(parts: tuple[Any, ...]) -> tuple[tuple[int, ...], ...]:
    rows = tuple(c for _, chunks in parts for c in chunks[0])
    return (rows, *parts[0][1][1:])


def _chunk_keys(name: str, chunks: tuple[tuple[int, ...], ...]) -> dict[Any, tuple[slice, ...]]:
    """Map each chunk key of Dask array ``name`` to its slices of the whole array."""
    import itertools

    bounds = [np.cumsum((0, *c)) for c in chunks]
    keys: dict[Any, tuple[slice, ...]] = {}
    for block in itertools.product(*(range(len(c)) for c in chunks)):
        key = (name, *block)
        keys[key] = tuple(
            slice(int(b[i]), int(b[i + 1])) for b, i in zip(bounds, block, strict=True)
        )
    return keys
