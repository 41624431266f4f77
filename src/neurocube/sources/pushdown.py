"""Trial selections pushed down into NIfTI reads, as a Dask graph optimization.

Dask answers ``x[100:105]`` (or ``isel(trial=...)`` through xarray) on an
array made by ``from_array`` with two tasks: read the whole chunk, then slice
it. For a ``.nii.gz`` in S3, five trials at the end of a session would fetch and
inflate a 32 MiB chunk. Before Dask's own array optimization, :func:`optimize`
finds each slicing task whose input is a chunk read of a registered array
type (and that chunk's other users), and replaces it by one task that reads
only the selected volumes (and gathers only the selected voxels). Chunk reads
that nothing else needs are then culled. Keys, shapes and values are
unchanged; any other graph passes through untouched.

It is installed as Dask's ``array_optimize`` (see :func:`install`), unless the
user already set one. This module knows no reader: the reader that makes the
arrays registers their type, the name prefix of its Dask layers and how a
whole array is read at once (:class:`WholeReads`) when it installs the
optimization (:func:`neurocube.sources.nifti.volume_dask_array` does, for
:class:`~neurocube.sources.nifti.VolumeArray` and
:mod:`neurocube.sources.nifti_load`). Readers import this module; it imports
none of them.
"""

from __future__ import annotations

import contextlib
import operator
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = ["WholeReads", "install", "optimize", "read_selected"]

_INSTALL_LOCK = threading.Lock()
_STATE = threading.local()


class WholeReads(Protocol):
    """How a reader reads every chunk of one of its Dask arrays in one task.

    ``source`` is the reader's own description of the array (opaque here).
    Looked up when a graph is optimized, so the functions are the reader's
    current ones.
    """

    def whole_array_source(self, name: str) -> tuple[Any, ...] | None:
        """Return what reads Dask array ``name`` at once, or None if it cannot be."""
        ...

    def whole_array_chunks(self, source: tuple[Any, ...]) -> tuple[tuple[int, ...], ...]:
        """Return the chunks of the Dask array ``source`` stands for."""
        ...

    def read_whole_array(self, source: tuple[Any, ...]) -> np.ndarray:
        """Read every row of ``source`` into one new array."""
        ...


@dataclass(frozen=True)
class _Reader:
    """An array type selections are pushed into, with its layers' name prefix."""

    array_type: type
    layer_prefix: str
    whole_reads: WholeReads | None


_READERS: list[_Reader] = []


def install(array_type: type, *, layer_prefix: str, whole_reads: WholeReads | None = None) -> None:
    """Make :func:`optimize` Dask's array optimization for this process, for ``array_type``.

    A slicing task over a chunk read of an ``array_type`` (a ``from_array``
    getter task) becomes :func:`read_selected`; ``layer_prefix`` starts the
    names of the Dask layers that hold such reads (graphs without one pass
    through untouched); ``whole_reads``, if given, reads a whole array in one
    task (:func:`read_whole_arrays`). Registering the same reader again changes
    nothing; an ``array_optimize`` set by someone else is never replaced.
    """
    import dask

    reader = _Reader(array_type, layer_prefix, whole_reads)
    with _INSTALL_LOCK:
        if reader not in _READERS:
            _READERS.append(reader)
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


def _selectable_types() -> tuple[type, ...]:
    return tuple(reader.array_type for reader in _READERS)


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
    """If ``ref`` names a read of a registered array, return ``(array, key over all of it)``."""
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
    if not isinstance(target, _selectable_types()):
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
    """Return ``graph`` with slicing tasks of registered chunk reads turned into selected reads."""
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
    """Dask's array optimization, after pushing trial selections down into the reads."""
    from dask.array.optimization import optimize as dask_optimize
    from dask.highlevelgraph import HighLevelGraph

    layers = dsk.layers if isinstance(dsk, HighLevelGraph) else None
    prefixes = tuple(reader.layer_prefix for reader in _READERS)
    if layers is not None and not any(str(n).startswith(prefixes) for n in layers):
        return dask_optimize(dsk, keys, **kwargs)
    from neurocube.progress import watch_computes

    watch_computes()  # a file-reading compute is about to start: its progress bar is watched
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
                found = _whole_source(name)
                if found is not None and deps == set(_chunk_keys(name, _chunks_of(found))):
                    out[key] = Task(key, _same, TaskRef(_add_whole_read(out, name, found)))
            continue
        if isinstance(key, tuple) and key and isinstance(key[0], str):
            wanted.setdefault(key[0], set()).add(key)
    for name, keys_of_name in wanted.items():  # chunk keys asked for themselves (persist)
        found = _whole_source(name)
        if found is None:
            continue
        all_keys = _chunk_keys(name, _chunks_of(found))
        if keys_of_name != set(all_keys):
            continue
        whole = _add_whole_read(out, name, found)
        for key, index in all_keys.items():
            out[key] = Task(key, operator.getitem, TaskRef(whole), DataNode(None, index))
    return out


def _add_whole_read(graph: dict[Any, Any], name: str, found: tuple[_Reader, Any]) -> str:
    """Add the task that reads array ``name`` whole to ``graph``; return its key.

    The key keeps the reader's layer prefix ("nifti-"), so the compute's progress bar
    (:mod:`neurocube.progress`) still knows that the graph reads files.
    """
    from dask._task_spec import DataNode, Task

    reader, source = found
    assert reader.whole_reads is not None
    whole = f"whole-{reader.layer_prefix}{name}"
    graph[whole] = Task(whole, reader.whole_reads.read_whole_array, DataNode(None, source))
    return whole


def _same(value: Any) -> Any:
    """Return ``value`` (the finalize step of a whole-array read: nothing left to join)."""
    return value


def _whole_source(name: str) -> tuple[_Reader, Any] | None:
    """Return the reader that can read Dask array ``name`` at once and its source, or None."""
    for reader in _READERS:
        if reader.whole_reads is None:
            continue
        source = reader.whole_reads.whole_array_source(name)
        if source is not None:
            return reader, source
    return None


def _chunks_of(found: tuple[_Reader, Any]) -> tuple[tuple[int, ...], ...]:
    """Return the chunks of the Dask array a whole-array source stands for."""
    reader, source = found
    assert reader.whole_reads is not None
    return reader.whole_reads.whole_array_chunks(source)


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
