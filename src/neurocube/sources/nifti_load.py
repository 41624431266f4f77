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
:func:`whole_array_source` and :func:`read_whole_array` are what the graph
optimization in :mod:`neurocube.sources.pushdown` uses for whole-array
computes. This module builds on :mod:`neurocube.sources.nifti`; that module
does not import it.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from neurocube.sources import gzindex, gzindex_store
from neurocube.sources.nifti import READ_BLOCK, VolumeArray, VolumeRuns, registered_direct

__all__ = ["concatenate_trials", "direct_load", "read_whole_array", "whole_array_source"]

RUN_MIN_SPLIT = 16 << 20  # a finished thread splits another's run only if this much is left


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
    forward pass (:meth:`VolumeArray.read_masked_runs`; a
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
    arr: VolumeArray,
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


def _first_pass_pipelined(arr: VolumeArray, out: np.ndarray) -> None:
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
