"""Loading masked NIfTI arrays straight into their output, outside Dask's chunk tasks.

:func:`neurocube.load` and a compute of every chunk of a masked ``open_nifti``
array (``.values``, ``.compute()``) come here instead of running one task
per chunk and copying each result into the output. :func:`direct_load` finds
the array that :func:`~neurocube.sources.nifti.open_nifti` registered under the
Dask array's name and fills the rows in place: a ``.nii.gz`` with an index in
one forward pass per thread (a thread done early takes half of the largest
run left), a first read in one pass that records the index while a second
thread gathers, a ``.nii`` chunk by chunk. Several sessions joined with
:func:`concatenate_trials` are filled one piece after the other.
:func:`whole_array_source`, :func:`whole_array_chunks` and
:func:`read_whole_array` are what the graph optimization in
:mod:`neurocube.sources.pushdown` uses for whole-array computes (this module
is the :class:`~neurocube.sources.pushdown.WholeReads` that
:mod:`neurocube.sources.nifti` registers there).

:mod:`neurocube.sources.nifti` imports this module (to register its masked
arrays, :func:`register_direct`, and to share out runs of volumes,
:class:`VolumeRuns`); this module does not import it: it reads through the
methods of the arrays registered (:class:`DirectArray`).
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from neurocube.sources import gzindex, gzindex_store

__all__ = [
    "DirectArray",
    "VolumeRuns",
    "concatenate_trials",
    "direct_load",
    "read_whole_array",
    "register_direct",
    "registered_direct",
    "whole_array_chunks",
    "whole_array_source",
]

READ_BLOCK = 8 << 20  # masked chunks read their volumes in pieces of at most this size
RUN_MIN_SPLIT = 16 << 20  # a finished thread splits another's run only if this much is left


class DirectArray(Protocol):
    """What a direct load needs of a masked array: a :class:`~neurocube.sources.nifti.VolumeArray`.

    ``spec`` is its :class:`~neurocube.sources.nifti.NiftiSpec`; ``voxels`` the
    masked positions in a volume (None: not masked); ``volumes`` the file's
    volumes behind the rows (None: all of them, in order).
    """

    spec: Any
    shape: tuple[int, ...]
    dtype: np.dtype
    voxels: np.ndarray | None
    volumes: np.ndarray | None

    def read_masked_into(self, out: np.ndarray, lo: int, hi: int) -> None:
        """Fill ``out`` with masked rows ``[lo, hi)``."""
        ...

    def read_masked_runs(self, out: np.ndarray, runs: VolumeRuns) -> None:
        """Fill rows of ``out`` from ``runs`` until none is left."""
        ...

    def gather(self, raw: np.ndarray, rows: np.ndarray, raw_dtype: np.dtype) -> None:
        """Store the masked voxels of raw volumes ``raw`` into ``rows``."""
        ...


class VolumeRuns:
    """Volumes ``[0, n)`` shared out as contiguous runs to threads that read forward passes.

    Each thread starts on a run of its own and takes its volumes front to
    back (:meth:`take`). A thread whose run is done takes the back half of
    the largest run left, if at least ``2 * min_split`` volumes remain
    (:meth:`claim`): a thread slowed by other work on the machine does not
    leave the others idle at the end, and each split costs one new reader.
    """

    def __init__(self, n: int, runs: int, min_split: int = 1) -> None:
        runs = max(1, min(runs, n))
        self._lock = threading.Lock()
        self._runs = [[n * r // runs, n * (r + 1) // runs] for r in range(runs)]  # [next, end)
        self._unclaimed = list(range(runs))
        self.min_split = max(1, min_split)

    def claim(self) -> int | None:
        """Return a run for the calling thread: an unclaimed one, else a split; None if done."""
        with self._lock:
            if self._unclaimed:
                return self._unclaimed.pop(0)
            left = [end - nxt for nxt, end in self._runs]
            best = int(np.argmax(left))
            if left[best] < 2 * self.min_split:
                return None
            nxt, end = self._runs[best]
            mid = nxt + left[best] // 2
            self._runs[best][1] = mid
            self._runs.append([mid, end])
            return len(self._runs) - 1

    def start(self, r: int) -> int:
        """Return the next volume of run ``r`` not yet taken."""
        with self._lock:
            return self._runs[r][0]

    def end(self, r: int) -> int:
        """Return the end (exclusive) of run ``r`` as it is now."""
        with self._lock:
            return self._runs[r][1]

    def take(self, r: int, step: int) -> tuple[int, int] | None:
        """Take the next (up to) ``step`` volumes of run ``r``: ``(a, b)``, or None when done."""
        with self._lock:
            nxt, end = self._runs[r]
            if nxt >= end:
                return None
            b = min(end, nxt + step)
            self._runs[r][0] = b
            return nxt, b


# --- arrays the direct load may fill (registered by neurocube.sources.nifti) -----------------

_DIRECT: collections.OrderedDict[str, tuple[DirectArray, tuple[tuple[int, ...], ...]]] = (
    collections.OrderedDict()
)
_DIRECT_LOCK = threading.Lock()


def register_direct(name: str, arr: DirectArray, chunks: tuple[tuple[int, ...], ...]) -> None:
    """Record masked ``arr`` (with ``chunks``) as what Dask array ``name`` reads."""
    with _DIRECT_LOCK:
        _DIRECT[name] = (arr, chunks)
        _DIRECT.move_to_end(name)
        while len(_DIRECT) > 64:
            _DIRECT.popitem(last=False)


def registered_direct(name: str) -> tuple[DirectArray, tuple[tuple[int, ...], ...]] | None:
    """Return the masked array and chunks registered under Dask array ``name``, or None."""
    with _DIRECT_LOCK:
        return _DIRECT.get(name)


#: Concatenations along the first axis (several sessions' betas): name -> (pieces, chunks).
_STACKED: collections.OrderedDict[str, tuple[tuple[Any, ...], tuple[tuple[int, ...], ...]]] = (
    collections.OrderedDict()
)
_STACKED_LOCK = threading.Lock()


def concatenate_trials(pieces: Sequence[Any]) -> Any:
    """``dask.array.concatenate(pieces, axis=0)``, loadable piece by piece by :func:`direct_load`.

    Several sessions' masked betas are one array along ``trial``. Through
    Dask, computing it would run every session's chunks at once (on a first
    read: a gzip stream per session, each with its decode buffers). Registered
    here, :func:`neurocube.load` fills the output one piece after the other,
    each piece straight into its rows (or with ``dask.array.store`` when it is
    not a plain masked read, e.g. trials filtered or a ``.gz`` without index).
    """
    import dask.array as da

    pieces = list(pieces)
    if len(pieces) == 1:
        return pieces[0]
    data = da.concatenate(pieces, axis=0)
    with _STACKED_LOCK:
        _STACKED[data.name] = (tuple(pieces), tuple(data.chunks))
        _STACKED.move_to_end(data.name)
        while len(_STACKED) > 64:
            _STACKED.popitem(last=False)
    return data


def direct_load(
    data: Any, num_workers: int | None = None, out: np.ndarray | None = None
) -> np.ndarray | None:
    """Load an untransformed masked ``open_nifti`` array with each chunk read into place.

    Returns None when ``data`` is anything else (a selection, a sum, a
    ``.nii.gz`` whose index does not exist yet, ...): the caller then uses
    Dask. Dask computes each chunk into a new array and copies it into the
    output; here volumes are gathered straight into their rows. A ``.nii.gz``
    is split into one contiguous run of volumes per thread, each read in one
    forward pass (:meth:`DirectArray.read_masked_runs`; a
    thread done early takes half of the largest run left); a ``.nii`` chunk by
    chunk. A concatenation made by :func:`concatenate_trials` is filled piece
    after piece. ``out``, if given, is the C-contiguous array to fill.
    """
    name = getattr(data, "name", None)
    entry = registered_direct(name) if isinstance(name, str) else None
    with _STACKED_LOCK:
        stacked = _STACKED.get(name) if isinstance(name, str) else None
    if stacked is not None and tuple(data.chunks) == stacked[1]:
        return _load_stacked(stacked[0], data, num_workers, out)
    if entry is None:
        return None
    arr, chunks = entry
    if tuple(data.chunks) != chunks or arr.voxels is None:
        return None
    return _fill_direct(arr, chunks, num_workers, out)


def whole_array_source(name: str) -> tuple[Any, ...] | None:
    """Return what :func:`read_whole_array` needs to read Dask array ``name`` at once, or None.

    ``name`` is a masked ``open_nifti`` array registered for :func:`direct_load`
    (``("volumes", array, chunks)``), or a concatenation of such arrays made by
    :func:`concatenate_trials` (``("stacked", ((array, chunks), ...))``).
    """
    entry = registered_direct(name)
    with _STACKED_LOCK:
        stacked = _STACKED.get(name)
    if entry is not None and entry[0].voxels is not None:
        return ("volumes", entry[0], entry[1])
    if stacked is None:
        return None
    parts = []
    for piece in stacked[0]:
        piece_entry = registered_direct(str(getattr(piece, "name", "")))
        if piece_entry is None or piece_entry[0].voxels is None:
            return None
        if tuple(piece.chunks) != piece_entry[1] or piece.dtype != piece_entry[0].dtype:
            return None
        parts.append(piece_entry)
    return ("stacked", tuple(parts))


def whole_array_chunks(source: tuple[Any, ...]) -> tuple[tuple[int, ...], ...]:
    """Return the chunks of the Dask array a :func:`whole_array_source` stands for."""
    if source[0] == "volumes":
        chunks: tuple[tuple[int, ...], ...] = source[2]
        return chunks
    parts = source[1]
    rows = tuple(c for _, chunks in parts for c in chunks[0])
    return (rows, *parts[0][1][1:])


def read_whole_array(source: tuple[Any, ...]) -> np.ndarray:
    """Read every row of a :func:`whole_array_source` into one new array (the direct path).

    This is what a Dask compute of *every* chunk of such an array (``.values``,
    ``.compute()``, ``ds.load()``) runs instead of one task per chunk: the same
    forward passes as :func:`neurocube.load`, on all the threads Dask may use.
    """
    if source[0] == "volumes":
        _, arr, chunks = source
        out = np.empty(arr.shape, dtype=arr.dtype)
        if _fill_direct(arr, chunks, None, out) is None:  # stale index: chunk by chunk
            arr.read_masked_into(out, 0, arr.shape[0])
        return out
    parts = source[1]
    rows = sum(arr.shape[0] for arr, _ in parts)
    out = np.empty((rows, *parts[0][0].shape[1:]), dtype=parts[0][0].dtype)
    lo = 0
    for arr, chunks in parts:
        rows = out[lo : lo + arr.shape[0]]
        if _fill_direct(arr, chunks, None, rows) is None:
            arr.read_masked_into(rows, 0, arr.shape[0])
        lo += arr.shape[0]
    return out


def _fill_direct(
    arr: DirectArray,
    chunks: tuple[tuple[int, ...], ...],
    num_workers: int | None,
    out: np.ndarray | None,
) -> np.ndarray | None:
    """Fill ``out`` (or a new array) with every masked row of ``arr`` (see :func:`direct_load`)."""
    from concurrent.futures import ThreadPoolExecutor

    import dask

    arr.spec.check_unchanged()  # one stat for the whole load: no values from a replaced file
    if out is None:
        out = np.empty(arr.shape, dtype=arr.dtype)
    if arr.spec.gzip is not None and not gzindex.has_index(arr.spec.gzip):
        # First read (or indexing disabled): one sequential pass, which records the seek
        # index, gathered straight into the rows. Through Dask's ordered graph the chunks
        # read ahead of their stores piled up (about the output again, measured).
        if arr.volumes is None and workers_for(num_workers) > 1:
            _first_pass_pipelined(arr, out)
        else:
            arr.read_masked_into(out, 0, arr.shape[0])
        return out
    if arr.spec.gzip is not None and not gzindex_store.index_usable(arr.spec.gzip):
        return None  # stale cached index (deleted with a warning): Dask's graph streams
    workers = num_workers or dask.config.get("num_workers", None) or os.cpu_count() or 1
    n = arr.shape[0]
    if arr.spec.gzip is not None and arr.volumes is None:
        # One contiguous run of volumes per thread, read in one forward pass: a reader goes
        # on from where it stopped instead of seeking for every chunk.
        volume_runs = VolumeRuns(
            n, workers, min_split=RUN_MIN_SPLIT // max(arr.spec.volume_bytes, 1)
        )
        runs = min(workers, n)

        def read(i: int) -> None:
            arr.read_masked_runs(out, volume_runs)
    else:
        runs = len(chunks[0])
        bounds = [int(b) for b in np.cumsum((0, *chunks[0]))]

        def read(i: int) -> None:
            arr.read_masked_into(out[bounds[i] : bounds[i + 1]], bounds[i], bounds[i + 1])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(read, range(runs)))
    return out


def workers_for(num_workers: int | None) -> int:
    """Threads a load may use: ``num_workers``, else Dask's setting, else every core."""
    import dask

    return int(num_workers or dask.config.get("num_workers", None) or os.cpu_count() or 1)


def _first_pass_pipelined(arr: DirectArray, out: np.ndarray) -> None:
    """Fill ``out`` from a first pass, reading and gathering in two threads.

    This thread reads pieces of whole volumes from the pass (rapidgzip
    decodes ahead on its own threads) into two alternating buffers; a helper
    gathers the masked voxels of the previous piece meanwhile, so the reader
    goes back to the decoder at once. The pass is verified (CRC32 to the end
    of the stream) before ``out`` is returned.
    """
    from concurrent.futures import ThreadPoolExecutor

    spec = arr.spec
    assert spec.gzip is not None and arr.voxels is not None
    step = max(1, READ_BLOCK // max(spec.volume_bytes, 1))
    buffers = [np.empty(step * spec.volume_bytes, np.uint8) for _ in range(2)]
    raw_dtype = np.dtype(spec.dtype)
    n = spec.n_volumes
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for k, a in enumerate(range(0, n, step)):
            b = min(n, a + step)
            raw = spec.read_volumes(a, b, buffers[k % 2], verify=False)
            if pending is not None:
                pending.result()  # the other buffer is free again
            pending = pool.submit(arr.gather, raw, out[a:b], raw_dtype)
        if pending is not None:
            pending.result()
    gzindex.ensure_verified(spec.gzip, data_end=spec.data_end, volumes=spec.volume_layout)


def _load_stacked(
    pieces: Sequence[Any], data: Any, num_workers: int | None, out: np.ndarray | None
) -> np.ndarray:
    """Fill ``out`` from the pieces of a concatenation along axis 0, one piece at a time."""
    import dask.array as da

    if out is None:
        out = np.empty(data.shape, dtype=data.dtype)
    lo = 0
    for piece in pieces:
        rows = out[lo : lo + piece.shape[0]]
        same_dtype = piece.dtype == out.dtype
        if not same_dtype or direct_load(piece, num_workers=num_workers, out=rows) is None:
            da.store(piece, rows, lock=False)
        lo += piece.shape[0]
    return out
