"""Which trial rows of masked NIfTI files a Dask array reads, so batches can skip Dask.

:mod:`neurocube.ops.batches` reads training batches row span by row span. When
an array is nothing but whole rows of masked ``open_nifti`` volumes (picked,
reordered, rechunked or joined along ``trial``, values untouched),
:func:`trial_rows` says where each of its rows lies: it checks every task of
the optimized graph against a short list of functions that only move rows,
then runs the graph once in this thread with every volume read answered by a
probe that returns row ids instead of values. :class:`TrialRows` then reads
any span of rows straight from the files, a forward pass per run of
consecutive volumes. This module builds on :mod:`neurocube.sources.nifti`;
that module does not import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from neurocube.sources.nifti import (
    VolumeArray,
    chunk_done,
    probing,
    read_after,
    verified,
    verify_after,
)

__all__ = ["TrialRows", "trial_rows"]

_ID_BASE = 1 << 32  # a probed row id is source * _ID_BASE + row (exact in float64)


class _NotPlainRows(Exception):
    """The graph reads something :func:`trial_rows` cannot map to trial rows."""


class _RowProbe:
    """Stands in for every :class:`VolumeArray` read while :func:`trial_rows` runs a graph.

    A read returns, in place of values, the id of the source row behind each
    output row (broadcast over the voxels, so it costs no memory).
    """

    def __init__(self) -> None:
        self.sources: list[VolumeArray] = []
        self._ids: dict[int, int] = {}

    def rows_of(self, arr: VolumeArray, key: tuple[Any, ...]) -> np.ndarray:
        if arr.voxels is None or len(key) != 2:
            raise _NotPlainRows
        index = self._ids.get(id(arr))
        if index is None:
            index = self._ids[id(arr)] = len(self.sources)
            self.sources.append(arr)
        ids = np.arange(arr.n_rows, dtype=np.float64) + float(index * _ID_BASE)
        return np.broadcast_to(ids[:, None], arr.shape)[key]


def _plain_funcs() -> dict[Any, str]:
    """Task functions that only pick, order or join rows: ``{function: kind}``."""
    import operator

    from dask.array import _shuffle as shuffle
    from dask.array import chunk, core

    from neurocube.sources import pushdown

    kinds: dict[Any, str] = {
        core.getter: "read", core.getter_nofancy: "read", pushdown.read_selected: "read",
        read_after: "read", operator.getitem: "index", chunk.getitem: "index",
        shuffle._getitem: "take", shuffle.concatenate_arrays: "shuffle-join",
        core.concatenate3: "join", verified: "pass", chunk_done: "pass", verify_after: "pass",
    }
    shaped = getattr(core, "concatenate_shaped", None)
    if shaped is not None:
        kinds[shaped] = "join"
    return kinds


def _full_voxels(key: Any, n_voxels: int) -> bool:
    """Return True if ``key`` (an index) keeps every voxel of a ``(trial, voxel)`` block."""
    if not isinstance(key, tuple):
        return not isinstance(key, (tuple, type(None), type(Ellipsis)))
    if len(key) < 2:
        return len(key) == 1 and not isinstance(key[0], (type(None), type(Ellipsis)))
    if len(key) > 2 or not isinstance(key[1], slice):
        return False
    return key[1].indices(n_voxels) == (0, n_voxels, 1)


def _check_plain(node: Any, graph: dict[Any, Any], kinds: dict[Any, str], n_voxels: int) -> None:
    """Raise :class:`_NotPlainRows` unless task ``node`` only picks whole rows of masked reads."""
    from dask._task_spec import DataNode, NestedContainer, Task, TaskRef, _execute_subgraph

    if not isinstance(node, Task):  # Alias, DataNode, TaskRef: no computation
        return
    args = [a.value if isinstance(a, DataNode) else a for a in node.args]
    if isinstance(node, NestedContainer):
        pass
    elif node.func is _execute_subgraph:  # a fused chain: check its tasks
        for inner in args[0].values():
            _check_plain(inner, {**graph, **args[0]}, kinds, n_voxels)
    else:
        kind = kinds.get(node.func)
        if kind is None or set(node.kwargs) - {"asarray", "lock"}:  # from_array's getter options
            raise _NotPlainRows
        if kind in ("read", "index") and not _full_voxels(args[1], n_voxels):
            raise _NotPlainRows
        if kind == "take":  # the index of a shuffle's take is a task of its own
            taker = graph.get(args[1].key) if isinstance(args[1], TaskRef) else args[1]
            taker = taker.value if isinstance(taker, DataNode) else taker
            if not (isinstance(taker, tuple) and len(taker) == 2):
                raise _NotPlainRows
            if not _full_voxels(taker[1], n_voxels):
                raise _NotPlainRows
        if kind == "shuffle-join" and args[-1] != 0:
            raise _NotPlainRows  # a shuffle's join along the voxels
    for a in args:
        if isinstance(a, Task):
            _check_plain(a, graph, kinds, n_voxels)


@dataclass
class TrialRows:
    """Where each row of a ``(trial, voxel)`` array lies in masked NIfTI files (:func:`trial_rows`).

    Row ``i`` is row ``rows[i]`` of ``sources[which[i]]``; the array's values are
    those rows' masked voxels, unchanged. Pickles small (specs and indices).
    """

    sources: list[VolumeArray]
    which: np.ndarray
    rows: np.ndarray
    dtype: np.dtype
    n_voxels: int

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Return rows ``[lo, hi)`` in a new array, each run of consecutive volumes read at once."""
        hi = min(hi, int(self.rows.size))
        lo = min(lo, hi)
        out = np.empty((hi - lo, self.n_voxels), dtype=self.dtype)
        which = self.which[lo:hi]
        volumes = np.empty(hi - lo, dtype=np.int64)
        for s, arr in enumerate(self.sources):
            picked = which == s
            if picked.any():
                rows = self.rows[lo:hi][picked]
                volumes[picked] = rows if arr.volumes is None else arr.volumes[rows]
        checked: set[int] = set()
        breaks = np.flatnonzero((np.diff(which) != 0) | (np.diff(volumes) != 1)) + 1
        starts = np.concatenate(([0], breaks)).tolist()
        stops = np.concatenate((breaks, [hi - lo])).tolist()
        for a, b in zip(starts, stops, strict=True):
            if b <= a:
                continue
            arr = self.sources[int(which[a])]
            if id(arr) not in checked:  # one stat per file and read: no values from a replaced file
                arr.spec.check_unchanged()
                checked.add(id(arr))
            arr.read_forward_into(out[a:b], int(volumes[a]), b - a)
        return out


def trial_rows(data: Any) -> TrialRows | None:
    """Map each row of a Dask ``(trial, voxel)`` array to a row of masked NIfTI volumes.

    ``data`` qualifies when it is a masked
    :func:`~neurocube.sources.nifti.open_nifti` array (all voxels of its mask,
    no change of values or dtype) or rows of such arrays picked, ordered,
    rechunked or joined along ``trial`` (``isel``/``sel`` of trials,
    :func:`~neurocube.sources.nifti_load.concatenate_trials`, a split), with one
    chunk along ``voxel``. Its values can then be read row span by row span without Dask
    (:meth:`TrialRows.read`). Returns None for anything else (a computed
    array, a voxel selection, several voxel chunks, a ``.nii`` without mask).
    The graph is run once with every volume read replaced by a probe that
    returns row numbers: nothing is read.
    """
    import dask
    from dask.array.core import concatenate3
    from dask.local import get_sync

    if not (hasattr(data, "__dask_graph__") and getattr(data, "ndim", 0) == 2):
        return None
    if data.shape[0] == 0 or data.shape[1] == 0 or data.numblocks[1] != 1:
        return None
    layers = getattr(data.__dask_graph__(), "layers", {})
    if not any(str(name).startswith("nifti-masked-") for name in layers):
        return None
    n_voxels = int(data.shape[1])
    kinds = _plain_funcs()
    from neurocube.sources import pushdown

    try:
        with pushdown.chunk_tasks_kept():  # the reads as tasks of their own, to be probed
            (optimized,) = dask.optimize(data)
            (column,) = dask.optimize(data[:, :1])
        graph = dict(optimized.__dask_graph__())
        for node in graph.values():
            _check_plain(node, graph, kinds, n_voxels)
        probe = _RowProbe()
        with probing(probe):  # in this thread, so the probe stands in for the reads; no scheduler
            pieces = get_sync(dict(column.__dask_graph__()), column.__dask_keys__())
        ids = np.asarray(concatenate3(pieces))[:, 0]
    except _NotPlainRows:
        return None
    if not probe.sources or any(
        a.shape[1] != n_voxels or a.dtype != data.dtype for a in probe.sources
    ):
        return None
    which = (ids // _ID_BASE).astype(np.int64)
    rows = (ids - which * float(_ID_BASE)).astype(np.int64)
    return TrialRows(probe.sources, which, rows, np.dtype(data.dtype), n_voxels)
