"""Lazy, picklable access to HDF5 datasets (h5py underneath).

A lazy array here is a *spec* (path, dataset name, shape, dtype, HDF5 chunk
shape, and the file's size and mtime when it was opened) plus a tiny proxy that
reads a selection when Dask asks for it. Neither holds an open handle, so both
pickle to Dask workers; every process opens the file itself through the pool of
:mod:`neurocube.sources.hdf5_handles` (:data:`HDF5_POOL`, an LRU of read-only
``h5py.File`` handles, one lock per handle; SWMR reads, remote block readers and
the version checks are described there).

Dask chunks follow the HDF5 chunks: each Dask chunk is a block of whole HDF5
chunks (grown until it reaches about :data:`TARGET_CHUNK_BYTES`), so no HDF5
chunk is decompressed by two tasks.

h5py serialises every HDF5 call behind one process-wide lock, decompression
included, so threads reading one file take turns. For a block selection (ints,
step-1 slices) of a chunked dataset stored plainly or with the deflate (gzip)
filter alone, with chunks of at least :data:`DIRECT_CHUNK_MIN_BYTES`,
:func:`read_selection` therefore copies the stored chunks' bytes under that lock
(``read_direct_chunk``, :data:`DIRECT_BATCH_BYTES` at a time) and inflates them
with :mod:`zlib` after releasing it, so Dask's threads decompress in parallel; the
values are the bytes HDF5 would have inflated. Anything else (other filters,
unallocated chunks, strided or list selections) is read by h5py.

Remote files (``s3://``, ``https://``: any fsspec URL, with ``storage_options``)
are read through the pooled handle's block reader, and every spec carries its
:class:`~neurocube.storage.StorageOptions`, so Dask workers in other processes
open the object themselves. For a remote block selection of deflated or plain
chunks, the chunks' byte ranges are looked up in the chunk index under the lock
and fetched as concurrent range requests outside it (then inflated as above);
other remote reads prefetch the byte ranges they touch concurrently before h5py
reads them from the shared blocks.

The checks that refuse damaged metadata (datatypes, declared sizes, chunk addresses, links,
member names) before values are read are in :mod:`neurocube.sources.hdf5_checks`.
"""

from __future__ import annotations

import contextlib
import itertools
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from neurocube import storage
from neurocube.errors import CorruptDataError, DataChangedError, FormatError
from neurocube.sources.hdf5_checks import DIRECT_BATCH_BYTES, read_errors
from neurocube.sources.hdf5_handles import (  # HDF5_POOL, release_file: named here in docs/hdf5.md
    HDF5_POOL,
    OPEN_LOCK,
    Version,
    pooled_file,
    release_file,
)
from neurocube.storage import (
    IO_STATS,
    BlockReader,
    StorageOptions,
    as_options,
    is_local,
)

__all__ = [
    "DIRECT_BATCH_BYTES",
    "DIRECT_CHUNK_MIN_BYTES",
    "HDF5_POOL",
    "TARGET_CHUNK_BYTES",
    "HDF5ArrayProxy",
    "HDF5DatasetSpec",
    "TraceStackProxy",
    "TraceStackSpec",
    "dask_chunks_for",
    "hdf5_dask_array",
    "merge_ranges",
    "prefetch",
    "read_rows",
    "read_selection",
    "release_file",
    "trace_stack_dask_array",
]

#: Dask chunks grow (in whole HDF5 chunks) until about this many bytes.
TARGET_CHUNK_BYTES = 64 * 2**20

#: HDF5 chunks at least this large (uncompressed) are inflated outside h5py's lock;
#: for smaller ones the per-chunk Python calls cost more than parallel inflating saves.
DIRECT_CHUNK_MIN_BYTES = 32 * 2**10

#: Remote byte ranges closer than this are fetched as one request.
REMOTE_MERGE_GAP = 64 * 2**10

#: Remote requests are cut at this size so that a long run travels as concurrent requests.
REMOTE_REQUEST_BYTES = 4 * 2**20

#: h5py reads of remote files prefetch the ranges they touch up to this many bytes.
REMOTE_PREFETCH_BYTES = 32 * 2**20


@dataclass(frozen=True)
class HDF5DatasetSpec:
    """Everything needed to read one HDF5 dataset later, in any process.

    Attributes
    ----------
    path
        Absolute path of the file, or its URL.
    dataset
        Full name of the dataset inside the file (``"/eigenvectors"``).
    shape, dtype
        Shape and dtype (``numpy.dtype.str``) seen when the file was opened.
    chunks
        The HDF5 chunk shape, or None for a contiguous dataset.
    size, version
        The file's size and version when it was opened: its mtime (ns) for a
        local file, its ETag for an object (part of the task names).
    storage_options
        The options a URL is read with (None for local files); pickled with the
        spec so Dask workers read with them, redacted in its repr and tokens.
    """

    path: str
    dataset: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...] | None
    size: int
    version: Version
    storage_options: StorageOptions | None = None

    @property
    def mtime_ns(self) -> int:
        """The file's mtime (ns) when it was opened; 0 for an object (see ``version``)."""
        return self.version if isinstance(self.version, int) else 0

    @classmethod
    def from_dataset(
        cls,
        dset: h5py.Dataset,
        key: tuple[str, int, Version],
        storage_options: Mapping[str, Any] | None = None,
    ) -> HDF5DatasetSpec:
        """Build the spec of an open dataset of the file identified by ``key`` (a stat_key)."""
        path, size, version = key
        return cls(
            path=path,
            dataset=str(dset.name),
            shape=tuple(int(n) for n in dset.shape),
            dtype=np.dtype(dset.dtype).str,
            chunks=tuple(int(n) for n in dset.chunks) if dset.chunks else None,
            size=size,
            version=version,
            storage_options=None if is_local(path) else as_options(storage_options),
        )


def read_selection(spec: HDF5DatasetSpec, key: Any) -> np.ndarray:
    """Read ``dataset[key]`` of ``spec`` through the per-process pool.

    Raises
    ------
    FormatError
        If the dataset is gone or its shape/dtype changed since the spec was made.
    DataChangedError
        If a remote object changed since the spec was made.
    """
    if not is_local(spec.path):
        return _read_remote(spec, key)
    stored: _Stored | None = None
    with _pooled(spec) as h5:
        dset = _checked_dataset(h5, spec)
        plan = _direct_plan(dset, spec, key)
        if plan is not None:
            bounds, deflated, batches = plan
            stored = _stored_chunks(dset, batches[0])
        if stored is None:  # not a case for the direct path, or a chunk never written
            with read_errors(spec.path, spec.dataset, dset):
                out = np.asarray(dset[key])
            IO_STATS.add_bytes(out.nbytes)
            return out
    out = np.empty(tuple(stop - start for start, stop, is_int in bounds if not is_int), spec.dtype)
    for batch in batches[1:]:
        _inflate_into(spec, out, bounds, deflated, stored)  # unlocked: zlib releases the GIL
        with _pooled(spec) as h5:
            dset = _checked_dataset(h5, spec)
            stored = _stored_chunks(dset, batch)
            if stored is None:  # a chunk never written: h5py knows its fill value
                with read_errors(spec.path, spec.dataset, dset):
                    out = np.asarray(dset[key])
                IO_STATS.add_bytes(out.nbytes)
                return out
    _inflate_into(spec, out, bounds, deflated, stored)
    IO_STATS.add_bytes(out.nbytes)
    return out


def read_rows(spec: HDF5DatasetSpec, rows: Sequence[int] | np.ndarray) -> np.ndarray:
    """Read rows ``rows`` (any order, repeats, -1 for "missing") of the dataset of ``spec``.

    Missing rows come back as NaN (floats) or zeros. h5py reads only
    increasing, unique row lists, so only the unique rows are read: a
    contiguous span when it is at most twice their number, else an increasing
    index list (remotely, the chunks of those rows only); they are expanded to
    the order asked for in memory.
    """
    rows = np.asarray(rows, dtype=np.int64)
    dtype = np.dtype(spec.dtype)
    out = np.empty((rows.size, *spec.shape[1:]), dtype=dtype)
    out.fill(np.nan if dtype.kind == "f" else 0)
    present = rows >= 0
    if not present.any():
        return out
    unique, inverse = np.unique(rows[present], return_inverse=True)
    low, high = int(unique[0]), int(unique[-1]) + 1
    if high - low <= 2 * unique.size:
        values = read_selection(spec, slice(low, high))[unique - low]
    else:
        values = read_selection(spec, unique.tolist())
    out[present] = values[inverse]
    return out


def _pooled(spec: HDF5DatasetSpec) -> contextlib.AbstractContextManager[h5py.File]:
    return pooled_file(spec.path, spec.size, spec.version, spec.storage_options)


_Located = list[tuple[tuple[int, ...], int, int, int]]  # per chunk: offset, mask, byte offset, size


def _read_remote(spec: HDF5DatasetSpec, key: Any) -> np.ndarray:
    """Read a selection of a remote dataset: chunk bytes by concurrent range requests.

    Under the handle's lock only the chunk index is consulted (metadata, in
    the shared blocks); the chunks' stored bytes travel outside it, as
    concurrent requests, and are inflated here. What the direct path cannot
    read goes to h5py after its byte ranges were prefetched concurrently.
    """
    located: _Located | None = None
    ranges: list[tuple[int, int]] = []
    with _pooled(spec) as h5:
        dset = _checked_dataset(h5, spec)
        plan = _direct_plan(dset, spec, key)
        if plan is not None:
            located = _chunk_locations(dset, [o for batch in plan[2] for o in batch])
        if located is None:
            ranges = _selection_ranges(dset, spec, key)
        reader = getattr(h5, "_neurocube_reader", None)
    if plan is not None and located is not None:
        bounds, deflated, _ = plan
        out = np.empty(
            tuple(stop - start for start, stop, is_int in bounds if not is_int), spec.dtype
        )
        for batch in _byte_batches(located, DIRECT_BATCH_BYTES):
            _inflate_into(spec, out, bounds, deflated, _fetch_chunks(spec, batch))
        IO_STATS.add_bytes(out.nbytes)
        return out
    if reader is not None and ranges:
        prefetch(reader, ranges)
    with _pooled(spec) as h5:
        dset = _checked_dataset(h5, spec)
        with read_errors(spec.path, spec.dataset, dset):
            out = np.asarray(dset[key])
    IO_STATS.add_bytes(out.nbytes)
    return out


def _chunk_locations(dset: h5py.Dataset, offsets: Sequence[tuple[int, ...]]) -> _Located | None:
    """Return where each chunk is stored in the file; None if one was never written."""
    located: _Located = []
    for offset in offsets:
        try:
            where = dset.id.get_chunk_info_by_coord(offset)
        except (RuntimeError, OSError, ValueError, AttributeError):
            return None
        if where.byte_offset is None or not where.size:
            return None  # unallocated: h5py knows the fill value
        located.append((offset, int(where.filter_mask), int(where.byte_offset), int(where.size)))
    return located


def _byte_batches(located: _Located, batch_bytes: int) -> Iterator[_Located]:
    """Split chunk locations into batches of about ``batch_bytes`` stored bytes."""
    batch: _Located = []
    total = 0
    for item in located:
        batch.append(item)
        total += item[3]
        if total >= batch_bytes:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


def merge_ranges(
    ranges: Sequence[tuple[int, int]],
    gap: int = REMOTE_MERGE_GAP,
    max_bytes: int = REMOTE_REQUEST_BYTES,
) -> list[tuple[int, int]]:
    """Merge byte ranges closer than ``gap`` into requests of at most ``max_bytes`` (about)."""
    runs: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if runs and start - runs[-1][1] <= gap and end - runs[-1][0] <= max_bytes:
            runs[-1] = (runs[-1][0], max(runs[-1][1], end))
        else:
            runs.append((start, end))
    return runs


def _fetch_chunks(spec: HDF5DatasetSpec, located: _Located) -> _Stored:
    """Fetch the stored bytes of chunks of a remote file (concurrent range requests)."""
    wanted = [(pos, pos + n) for _, _, pos, n in located]
    runs = merge_ranges(wanted)
    parts = storage.read_ranges(spec.path, runs, spec.storage_options)
    stored: _Stored = []
    for offset, mask, pos, n in located:
        index = _run_of(runs, pos)
        run_start = runs[index][0]
        data = parts[index][pos - run_start : pos - run_start + n]
        if len(data) != n:
            raise DataChangedError(
                f"{spec.path}: chunk {offset} of {spec.dataset!r} is stored at bytes "
                f"{pos}-{pos + n - 1}, but the object ends before; it changed or was truncated "
                "since it was opened. Open it again."
            )
        stored.append((offset, mask, data))
    return stored


def _run_of(runs: Sequence[tuple[int, int]], pos: int) -> int:
    import bisect

    return bisect.bisect_right([a for a, _ in runs], pos) - 1


def _selection_ranges(dset: h5py.Dataset, spec: HDF5DatasetSpec, key: Any) -> list[tuple[int, int]]:
    """Byte ranges of the file an h5py read of ``key`` touches (raw data only; may be empty).

    Chunked datasets: the allocated chunks the selection touches (along an
    axis indexed by a list, the chunks of its indices; along a slice, every
    chunk of its span); contiguous ones: the rows it spans. Empty when unknown
    or larger than :data:`REMOTE_PREFETCH_BYTES` (h5py then fetches blocks as
    it goes).
    """
    box = _bounding_box(key, spec.shape)
    if box is None or not spec.shape:
        return []
    itemsize = np.dtype(spec.dtype).itemsize
    try:
        if spec.chunks is None:
            start = dset.id.get_offset()
            if start is None:
                return []
            row = int(np.prod(spec.shape[1:], dtype=np.int64)) * itemsize
            lo, hi, _ = box[0]
            return [(start + lo * row, start + hi * row)]
        grid: list[Sequence[int]] = [
            range(lo // size * size, hi, size)
            if picked is None
            else (np.unique(picked // size) * size).tolist()
            for (lo, hi, picked), size in zip(box, spec.chunks, strict=True)
        ]
        count = int(np.prod([len(g) for g in grid], dtype=np.int64))
        chunk_bytes = int(np.prod(spec.chunks, dtype=np.int64)) * itemsize
        if count > 100_000 or count * chunk_bytes > 4 * REMOTE_PREFETCH_BYTES:
            return []
        ranges = []
        for offset in itertools.product(*grid):
            where = dset.id.get_chunk_info_by_coord(offset)
            if where.byte_offset is not None and where.size:
                ranges.append((int(where.byte_offset), int(where.byte_offset) + int(where.size)))
    except (RuntimeError, OSError, ValueError, AttributeError):
        return []
    if sum(b - a for a, b in ranges) > REMOTE_PREFETCH_BYTES:
        return []
    return ranges


def _bounding_box(
    key: Any, shape: tuple[int, ...]
) -> list[tuple[int, int, np.ndarray | None]] | None:
    """Per-axis ``[lo, hi)`` covering a selection (ints, slices, index lists); None if empty.

    The third item of an axis is its indices (non-negative) when an int or a
    list selects it, None for a slice.
    """
    if not isinstance(key, tuple):
        key = (key,)
    if any(item is Ellipsis for item in key) or len(key) > len(shape):
        return None
    key = key + (slice(None),) * (len(shape) - len(key))
    box: list[tuple[int, int, np.ndarray | None]] = []
    for item, n in zip(key, shape, strict=True):
        if isinstance(item, slice):
            start, stop, step = item.indices(n)
            picked = range(start, stop, step)
            if not len(picked):
                return None
            box.append((min(picked[0], picked[-1]), max(picked[0], picked[-1]) + 1, None))
            continue
        index = np.asarray(item)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        if index.size == 0 or index.dtype.kind not in "iu":
            return None
        index = np.where(index < 0, index + n, index)
        box.append((int(index.min()), int(index.max()) + 1, index.ravel()))
    return box


def prefetch(reader: BlockReader, ranges: Sequence[tuple[int, int]]) -> None:
    """Fetch byte ranges of a remote file into the shared blocks, as concurrent requests."""
    runs = merge_ranges(ranges, gap=reader.block_size, max_bytes=REMOTE_PREFETCH_BYTES)
    if len(runs) == 1:
        reader.prefetch(*runs[0])
        return
    pool = _prefetch_pool()
    for future in [pool.submit(reader.prefetch, a, b) for a, b in runs]:
        future.result()


_PREFETCH_POOL: Any = None


def _prefetch_pool() -> Any:
    """Threads that wait on block fetches (apart from the storage layer's fetching threads)."""
    global _PREFETCH_POOL
    with OPEN_LOCK:
        if _PREFETCH_POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            _PREFETCH_POOL = ThreadPoolExecutor(4, thread_name_prefix="neurocube-h5-prefetch")
        return _PREFETCH_POOL


def _checked_dataset(h5: h5py.File, spec: HDF5DatasetSpec) -> h5py.Dataset:
    """Return the dataset of ``spec`` from an open file, refusing one that changed."""
    try:
        dset = h5[spec.dataset]
    except (KeyError, RuntimeError, OSError) as exc:
        raise FormatError(
            f"{spec.path}: dataset {spec.dataset!r} is gone; the file changed after it was "
            "opened. Open it again."
        ) from exc
    if tuple(dset.shape) != spec.shape or np.dtype(dset.dtype).str != spec.dtype:
        raise FormatError(
            f"{spec.path}: dataset {spec.dataset!r} was {spec.shape} {spec.dtype} when "
            f"opened, now {tuple(dset.shape)} {np.dtype(dset.dtype).str}; the file changed. "
            "Open it again."
        )
    return dset


_Bounds = tuple[tuple[int, int, bool], ...]  # per axis: start, stop, whether an integer index
_Stored = list[tuple[tuple[int, ...], int, bytes]]  # per chunk: offset, filter mask, bytes


def _direct_bounds(spec: HDF5DatasetSpec, key: Any) -> _Bounds | None:
    """Return per-axis bounds of ``key`` if it is a block (ints, step-1 slices), else None."""
    if not isinstance(key, tuple):
        key = (key,)
    if len(key) > len(spec.shape) or any(item is Ellipsis for item in key):
        return None
    key = key + (slice(None),) * (len(spec.shape) - len(key))
    bounds: list[tuple[int, int, bool]] = []
    for item, n in zip(key, spec.shape, strict=True):
        if isinstance(item, (int, np.integer)) and not isinstance(item, (bool, np.bool_)):
            index = int(item) + n if int(item) < 0 else int(item)
            if not 0 <= index < n:
                return None  # out of range: h5py raises its error
            bounds.append((index, index + 1, True))
        elif isinstance(item, slice):
            start, stop, step = item.indices(n)
            if step != 1 or stop <= start:
                return None
            bounds.append((start, stop, False))
        else:
            return None
    return tuple(bounds)


def _direct_plan(
    dset: h5py.Dataset, spec: HDF5DatasetSpec, key: Any
) -> tuple[_Bounds, bool, list[list[tuple[int, ...]]]] | None:
    """Plan reading ``key`` from stored chunks, or return None to let h5py read it.

    Returns the bounds, whether the chunks are deflated, and the offsets of the
    chunks the block touches, in batches of about :data:`DIRECT_BATCH_BYTES`.
    """
    chunks = spec.chunks
    dtype = np.dtype(spec.dtype)
    if not chunks or not spec.shape or dtype.kind not in "biufc":
        return None
    chunk_bytes = int(np.prod(chunks, dtype=np.int64)) * dtype.itemsize
    if chunk_bytes < DIRECT_CHUNK_MIN_BYTES:
        return None
    bounds = _direct_bounds(spec, key)
    if bounds is None:
        return None
    plist = dset.id.get_create_plist()
    if plist.get_layout() != h5py.h5d.CHUNKED or plist.get_external_count():
        return None
    filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    if filters not in ([], [h5py.h5z.FILTER_DEFLATE]):
        return None
    grid = [
        range(start // size * size, stop, size)
        for (start, stop, _), size in zip(bounds, chunks, strict=True)
    ]
    offsets = list(itertools.product(*grid))
    per_batch = max(1, DIRECT_BATCH_BYTES // chunk_bytes)
    batches = [offsets[i : i + per_batch] for i in range(0, len(offsets), per_batch)]
    return bounds, bool(filters), batches


def _stored_chunks(dset: h5py.Dataset, offsets: Sequence[tuple[int, ...]]) -> _Stored | None:
    """Copy ``(offset, filter mask, bytes)`` of each chunk; None if one was never written."""
    stored: _Stored = []
    for offset in offsets:
        try:
            mask, data = dset.id.read_direct_chunk(offset)
        except (RuntimeError, OSError, ValueError):
            return None
        stored.append((offset, int(mask), bytes(data)))
    return stored


def _inflate_into(
    spec: HDF5DatasetSpec, out: np.ndarray, bounds: _Bounds, deflated: bool, stored: _Stored
) -> None:
    """Place the parts of stored chunks (inflated if ``deflated``) within ``bounds`` in ``out``."""
    chunks = spec.chunks
    assert chunks is not None
    dtype = out.dtype
    expected = int(np.prod(chunks, dtype=np.int64)) * dtype.itemsize
    stored.reverse()
    while stored:
        offset, mask, data = stored.pop()  # each chunk's bytes are dropped once placed
        if deflated and not mask & 1:  # bit 0 set: HDF5 skipped the filter for this chunk
            try:
                data = zlib.decompress(data, bufsize=expected)
            except zlib.error as exc:  # zlib streams carry an Adler-32 of their content
                raise CorruptDataError(
                    f"{spec.path}: chunk {offset} of {spec.dataset!r} does not inflate or fails "
                    f"its Adler-32 check ({exc}); the file is damaged. Its values are not "
                    "returned: restore or re-create it."
                ) from exc
        if len(data) != expected:
            raise FormatError(
                f"{spec.path}: chunk {offset} of {spec.dataset!r} holds {len(data)} bytes, "
                f"expected {expected} (chunk shape {chunks}, {dtype}); the file is damaged. "
                "Re-create it."
            )
        block = np.frombuffer(data, dtype=dtype).reshape(chunks)
        src: list[Any] = []
        dst: list[slice] = []
        for (start, stop, is_int), origin, size in zip(bounds, offset, chunks, strict=True):
            if is_int:
                src.append(start - origin)
                continue
            low, high = max(start, origin), min(stop, origin + size)
            src.append(slice(low - origin, high - origin))
            dst.append(slice(low - start, high - start))
        out[tuple(dst)] = block[tuple(src)]


class HDF5ArrayProxy:
    """An array-like over one HDF5 dataset: ``shape``, ``dtype``, ``ndim`` and ``[key]``.

    It holds only the :class:`HDF5DatasetSpec`, so it pickles to Dask workers.
    """

    def __init__(self, spec: HDF5DatasetSpec) -> None:
        self.spec = spec
        self.shape = spec.shape
        self.dtype = np.dtype(spec.dtype)
        self.ndim = len(spec.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        h5_key, then = _split_fancy_key(key, self.shape)
        out = read_selection(self.spec, h5_key)
        for axis, local in then:
            out = np.take(out, local, axis=axis)
        return out

    def __repr__(self) -> str:
        return f"HDF5ArrayProxy({self.spec.path}:{self.spec.dataset}, {self.shape}, {self.dtype})"


def _split_fancy_key(
    key: Any, shape: tuple[int, ...]
) -> tuple[tuple[Any, ...], list[tuple[int, np.ndarray]]]:
    """Split a key into what h5py reads (ints, forward slices) and numpy takes after.

    h5py accepts only increasing, unique index lists (one per selection), so an
    integer array becomes the slice that spans it, taken orthogonally after the
    read; a negative-step slice is read forward and reversed.
    """
    if not isinstance(key, tuple):
        key = (key,)
    h5_key: list[Any] = []
    then: list[tuple[int, np.ndarray]] = []
    out_axis = 0
    for axis, item in enumerate(key):
        if isinstance(item, (int, np.integer)):
            h5_key.append(int(item))
            continue
        if isinstance(item, slice):
            start, stop, step = item.indices(shape[axis])
            if step > 0:
                h5_key.append(slice(start, stop, step))
                out_axis += 1
                continue
            item = np.arange(start, stop, step)
        local = np.asarray(item)
        if local.dtype == bool:
            local = np.flatnonzero(local)
        local = np.where(local < 0, local + shape[axis], local).astype(np.intp)
        if local.size == 0:
            h5_key.append(slice(0, 0))
        else:
            low = int(local.min())
            h5_key.append(slice(low, int(local.max()) + 1))
            local = local - low
        then.append((out_axis, local))
        out_axis += 1
    return tuple(h5_key), then


def dask_chunks_for(
    shape: Sequence[int],
    hdf5_chunks: Sequence[int] | None,
    itemsize: int,
    target_bytes: int = TARGET_CHUNK_BYTES,
) -> tuple[int, ...]:
    """Return a Dask chunk shape made of whole HDF5 chunks, about ``target_bytes`` large.

    Starting from the HDF5 chunk shape, the axis currently cut into the most
    pieces is doubled until the next doubling would pass ``target_bytes``.
    A contiguous dataset starts from one row (whole trailing axes).
    """
    shape = tuple(int(n) for n in shape)
    if not shape:
        return ()
    if hdf5_chunks is None:
        base = [1, *shape[1:]]
    else:
        base = [max(1, int(c)) for c in hdf5_chunks]
    block = [min(b, max(n, 1)) for b, n in zip(base, shape, strict=True)]

    def nbytes(b: Sequence[int]) -> int:
        return int(np.prod(b, dtype=np.int64)) * itemsize

    while True:
        counts = [-(-max(n, 1) // b) for n, b in zip(shape, block, strict=True)]
        axis = int(np.argmax(counts))
        if counts[axis] <= 1:
            break
        grown = list(block)
        grown[axis] = min(block[axis] * 2, shape[axis])
        if nbytes(grown) > target_bytes:
            break
        block = grown
    return tuple(block)


def hdf5_dask_array(
    spec: HDF5DatasetSpec,
    chunks: Any = None,
    *,
    target_bytes: int = TARGET_CHUNK_BYTES,
) -> Any:
    """Return a Dask array over one HDF5 dataset; nothing is read here.

    Parameters
    ----------
    spec
        What to read.
    chunks
        Dask chunks to use instead of the default (whole HDF5 chunks grown to
        about ``target_bytes``).
    target_bytes
        Size the default chunks grow to.

    Returns
    -------
    dask.array.Array
        Named ``hdf5-<token>``, the token derived from the spec (path, size,
        version, dataset, shape, dtype) and the chunks, so equal inputs give equal
        graph keys.
    """
    import dask.array as da
    from dask.base import tokenize

    dtype = np.dtype(spec.dtype)
    if chunks is None:
        chunks = dask_chunks_for(spec.shape, spec.chunks, dtype.itemsize, target_bytes)
    name = f"hdf5-{spec.dataset.strip('/').replace('/', '-')}-{tokenize(spec, chunks)}"
    return da.from_array(
        HDF5ArrayProxy(spec),
        chunks=chunks,
        name=name,
        lock=False,
        asarray=False,
        fancy=True,
        inline_array=False,
        meta=np.empty((0,) * len(spec.shape), dtype=dtype),
    )


@dataclass(frozen=True)
class TraceStackSpec:
    """Many same-shaped (up to length) 1-D or 2-D HDF5 datasets read as one array.

    The stacked array has shape ``(n_traces, max_length)`` or
    ``(n_traces, max_length, n_channels)``; traces shorter than ``max_length``
    are padded with NaN.

    Attributes
    ----------
    path, size, version
        The file (absolute path or URL) and its identity when opened: size and
        mtime (ns) locally, size and ETag remotely.
    datasets
        Full dataset names, in trace order.
    lengths
        Number of samples of each trace.
    n_channels
        Channels per trace, or None for 1-D traces.
    dtype
        Output dtype (``numpy.dtype.str``).
    storage_options
        The options a URL is read with (None for local files).
    """

    path: str
    size: int
    version: Version
    datasets: tuple[str, ...]
    lengths: tuple[int, ...]
    n_channels: int | None
    dtype: str
    storage_options: StorageOptions | None = None

    @property
    def mtime_ns(self) -> int:
        """The file's mtime (ns) when it was opened; 0 for an object (see ``version``)."""
        return self.version if isinstance(self.version, int) else 0

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the stacked array."""
        n_samples = max(self.lengths, default=0)
        if self.n_channels is None:
            return (len(self.datasets), n_samples)
        return (len(self.datasets), n_samples, self.n_channels)


class TraceStackProxy:
    """An array-like over a :class:`TraceStackSpec`: reads only the traces asked for."""

    def __init__(self, spec: TraceStackSpec) -> None:
        self.spec = spec
        self.shape = spec.shape
        self.dtype = np.dtype(spec.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        trace_key, rest = key[0], key[1:]
        indices = np.arange(self.shape[0])[trace_key]
        scalar = np.ndim(indices) == 0
        indices = np.atleast_1d(indices)
        fill = np.nan if np.issubdtype(self.dtype, np.inexact) else 0  # ints are never padded
        block = np.full((len(indices), *self.shape[1:]), fill, dtype=self.dtype)
        spec = self.spec
        nbytes = 0
        if not is_local(spec.path):
            self._prefetch(indices.tolist())
        with pooled_file(spec.path, spec.size, spec.version, spec.storage_options) as h5:
            for row, index in enumerate(indices.tolist()):
                name = spec.datasets[index]
                try:
                    dset = h5[name]
                except (KeyError, RuntimeError, OSError) as exc:
                    raise FormatError(
                        f"{spec.path}: trace {name!r} is gone; the file changed after it was "
                        "opened. Open it again."
                    ) from exc
                length = spec.lengths[index]
                expected = (length,) if spec.n_channels is None else (length, spec.n_channels)
                if tuple(dset.shape) != expected:
                    raise FormatError(
                        f"{spec.path}: trace {name!r} was {expected} when opened, now "
                        f"{tuple(dset.shape)}; the file changed. Open it again."
                    )
                if length:
                    with read_errors(spec.path, name, dset):
                        values = dset[()]
                    block[row, :length] = values
                    nbytes += values.nbytes
        IO_STATS.add_bytes(nbytes)
        selection = (slice(None), *rest)
        out = block[selection]
        return out[0] if scalar else out

    def _prefetch(self, indices: Sequence[int]) -> None:
        """Fetch the stored bytes of remote traces concurrently before h5py reads them."""
        spec = self.spec
        ranges: list[tuple[int, int]] = []
        with pooled_file(spec.path, spec.size, spec.version, spec.storage_options) as h5:
            reader = getattr(h5, "_neurocube_reader", None)
            for index in indices:
                try:
                    dset = h5[spec.datasets[index]]
                    start = dset.id.get_offset()
                    if start is not None:
                        ranges.append((int(start), int(start) + int(dset.id.get_storage_size())))
                    elif dset.chunks is not None:
                        ranges += _selection_ranges(
                            dset, _stack_member_spec(spec, dset), (slice(None),)
                        )
                except (KeyError, RuntimeError, OSError, ValueError):
                    return  # the read below reports what is wrong
        if reader is not None and ranges:
            prefetch(reader, ranges)

    def __repr__(self) -> str:
        return f"TraceStackProxy({self.spec.path}, {len(self.spec.datasets)} traces, {self.dtype})"


def _stack_member_spec(spec: TraceStackSpec, dset: h5py.Dataset) -> HDF5DatasetSpec:
    return HDF5DatasetSpec.from_dataset(dset, (spec.path, spec.size, spec.version))


def trace_stack_dask_array(spec: TraceStackSpec, traces_per_chunk: int) -> Any:
    """Return a Dask array over a :class:`TraceStackSpec`, chunked along traces only."""
    import dask.array as da
    from dask.base import tokenize

    shape = spec.shape
    chunks = (max(1, int(traces_per_chunk)), *shape[1:])
    name = f"hdf5-traces-{tokenize(spec, chunks)}"
    return da.from_array(
        TraceStackProxy(spec),
        chunks=chunks,
        name=name,
        lock=False,
        asarray=False,
        fancy=True,
        inline_array=False,
        meta=np.empty((0,) * len(shape), dtype=np.dtype(spec.dtype)),
    )
