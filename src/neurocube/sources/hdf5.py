"""Lazy, picklable access to HDF5 datasets (h5py underneath).

A lazy array here is a *spec* (path, dataset name, shape, dtype, HDF5 chunk
shape, and the file's size and mtime when it was opened) plus a tiny proxy that
reads a selection when Dask asks for it. Neither holds an open handle, so both
pickle to Dask workers; every process opens the file itself through the
module-level :data:`HDF5_POOL` (an LRU of read-only ``h5py.File`` handles, one
lock per handle).

Files are opened read-only in SWMR mode (``swmr=True, libver="latest"``) where
HDF5 allows it, so a reader never blocks, and is never confused by, a writer
that appends in SWMR mode; files the SWMR open refuses are opened plainly
read-only.

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
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from neurocube.errors import DataNotFoundError, FormatError
from neurocube.storage import IO_STATS, HandlePool, is_url, open_file

__all__ = [
    "DIRECT_BATCH_BYTES",
    "DIRECT_CHUNK_MIN_BYTES",
    "HDF5_POOL",
    "HDF5_SIGNATURE",
    "TARGET_CHUNK_BYTES",
    "HDF5ArrayProxy",
    "HDF5DatasetSpec",
    "TraceStackProxy",
    "TraceStackSpec",
    "dask_chunks_for",
    "hdf5_dask_array",
    "is_hdf5",
    "open_hdf5",
    "pooled_file",
    "read_selection",
    "release_file",
    "stat_key",
    "trace_stack_dask_array",
]

#: The eight bytes every HDF5 superblock starts with.
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

#: Dask chunks grow (in whole HDF5 chunks) until about this many bytes.
TARGET_CHUNK_BYTES = 64 * 2**20

#: HDF5 chunks at least this large (uncompressed) are inflated outside h5py's lock;
#: for smaller ones the per-chunk Python calls cost more than parallel inflating saves.
DIRECT_CHUNK_MIN_BYTES = 32 * 2**10

#: Stored chunk bytes copied per turn of the handle's lock (bounds the extra memory).
DIRECT_BATCH_BYTES = 16 * 2**20

#: One pool of read-only h5py handles per process (never pickled).
HDF5_POOL = HandlePool(maxsize=32)

_OPEN_LOCK = threading.Lock()
_CURRENT_KEY: dict[str, tuple[str, str, int, int]] = {}
_KEYS_OF_PATH: dict[str, set[tuple[str, str, int, int]]] = {}  # every key pooled, per path


def is_hdf5(path: str | os.PathLike[str]) -> bool:
    """Return True if ``path`` starts with an HDF5 superblock signature.

    HDF5 places the superblock at byte 0, 512, 1024, 2048, ... (a user block
    may precede it); the first four positions are checked.
    """
    try:
        with open_file(path) as fh:
            for offset in (0, 512, 1024, 2048):
                fh.seek(offset)
                if fh.read(8) == HDF5_SIGNATURE:
                    return True
    except (OSError, ValueError):
        return False
    return False


def stat_key(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    """Return ``(absolute path, size, mtime_ns)`` of a local file.

    Raises
    ------
    DataNotFoundError
        If the file does not exist.
    """
    if is_url(path) and not str(path).startswith("file://"):
        raise FormatError(
            f"{path}: HDF5 files are read from local paths only; copy the file locally first"
        )
    local = Path(str(path).removeprefix("file://")).expanduser().absolute()
    try:
        st = local.stat()
    except FileNotFoundError as exc:
        raise DataNotFoundError(
            f"{local}: no such file. Check the path (cwd is {os.getcwd()})."
        ) from exc
    if not local.is_file():
        raise DataNotFoundError(f"{local}: is a folder, expected an HDF5 file")
    return str(local), st.st_size, st.st_mtime_ns


def open_hdf5(path: str | os.PathLike[str]) -> h5py.File:
    """Open an HDF5 file read-only, in SWMR mode where HDF5 allows it.

    Counts one open in :data:`neurocube.storage.IO_STATS`.

    Raises
    ------
    DataNotFoundError
        If the file does not exist.
    FormatError
        If the file is not HDF5 (or is damaged beyond opening).
    """
    local = Path(path)
    if not local.exists():
        raise DataNotFoundError(f"{local}: no such file. Check the path (cwd is {os.getcwd()}).")
    IO_STATS.add_open()
    with _OPEN_LOCK:
        try:
            return h5py.File(local, "r", libver="latest", swmr=True)
        except (OSError, ValueError):
            pass  # not SWMR-capable (or locked by a non-SWMR writer): plain read-only below
        try:
            return h5py.File(local, "r")
        except OSError as exc:
            if is_hdf5(local):
                raise FormatError(
                    f"{local}: an HDF5 file that h5py cannot open ({exc}). It may be damaged or "
                    "still open for writing by another program; close that program or re-create "
                    "the file."
                ) from exc
            raise FormatError(
                f"{local}: expected an HDF5 file (signature {HDF5_SIGNATURE!r}), found other "
                "bytes. Check that this is the file you meant."
            ) from exc


@contextlib.contextmanager
def pooled_file(path: str, size: int, mtime_ns: int) -> Iterator[h5py.File]:
    """Yield this process's pooled handle of ``path``, holding its lock.

    The pool key includes the size and mtime the caller saw, so a file replaced
    since (an atomic rewrite) gets a fresh handle instead of a stale one.
    """
    key = ("hdf5", path, size, mtime_ns)
    with _OPEN_LOCK:
        previous = _CURRENT_KEY.get(path)
        _CURRENT_KEY[path] = key
        _KEYS_OF_PATH.setdefault(path, set()).add(key)
    if previous is not None and previous != key and previous[3] < mtime_ns:
        HDF5_POOL.discard(previous)  # the file was replaced: free the old inode's handle
    handle, lock = HDF5_POOL.acquire(key, lambda: open_hdf5(path))
    with lock:
        yield handle


def release_file(path: str | os.PathLike[str]) -> bool:
    """Close this process's pooled read handle of ``path``, if it has one.

    While HDF5 has a file open it holds a shared lock on it, so a program that
    rewrites the file *in place* (offspect's own ``set_trace_attrs``, ``h5py``
    in ``"r+"`` mode) fails with "unable to lock file" as long as neurocube keeps
    its handle in :data:`HDF5_POOL`. Call this (on a cluster:
    ``client.run(release_file, path)``) before such an edit. neurocube's own
    writers replace files by rename and never need it. Datasets opened earlier
    still work: their next read opens the file again.

    Returns
    -------
    bool
        Whether this process had opened the file through the pool.
    """
    local = str(Path(str(path).removeprefix("file://")).expanduser().absolute())
    with _OPEN_LOCK:
        _CURRENT_KEY.pop(local, None)
        keys = _KEYS_OF_PATH.pop(local, set())
    for key in keys:  # the current version and any older one an earlier Dataset still reads
        HDF5_POOL.discard(key)
    return bool(keys)


@dataclass(frozen=True)
class HDF5DatasetSpec:
    """Everything needed to read one HDF5 dataset later, in any process.

    Attributes
    ----------
    path
        Absolute path of the file.
    dataset
        Full name of the dataset inside the file (``"/eigenvectors"``).
    shape, dtype
        Shape and dtype (``numpy.dtype.str``) seen when the file was opened.
    chunks
        The HDF5 chunk shape, or None for a contiguous dataset.
    size, mtime_ns
        The file's size and mtime when it was opened (part of the task names).
    """

    path: str
    dataset: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...] | None
    size: int
    mtime_ns: int

    @classmethod
    def from_dataset(cls, dset: h5py.Dataset, key: tuple[str, int, int]) -> HDF5DatasetSpec:
        """Build the spec of an open dataset of the file identified by ``key``."""
        path, size, mtime_ns = key
        return cls(
            path=path,
            dataset=str(dset.name),
            shape=tuple(int(n) for n in dset.shape),
            dtype=np.dtype(dset.dtype).str,
            chunks=tuple(int(n) for n in dset.chunks) if dset.chunks else None,
            size=size,
            mtime_ns=mtime_ns,
        )


def read_selection(spec: HDF5DatasetSpec, key: Any) -> np.ndarray:
    """Read ``dataset[key]`` of ``spec`` through the per-process pool.

    Raises
    ------
    FormatError
        If the dataset is gone or its shape/dtype changed since the spec was made.
    """
    stored: _Stored | None = None
    with pooled_file(spec.path, spec.size, spec.mtime_ns) as h5:
        dset = _checked_dataset(h5, spec)
        plan = _direct_plan(dset, spec, key)
        if plan is not None:
            bounds, deflated, batches = plan
            stored = _stored_chunks(dset, batches[0])
        if stored is None:  # not a case for the direct path, or a chunk never written
            out = np.asarray(dset[key])
            IO_STATS.add_bytes(out.nbytes)
            return out
    out = np.empty(tuple(stop - start for start, stop, is_int in bounds if not is_int), spec.dtype)
    for batch in batches[1:]:
        _inflate_into(spec, out, bounds, deflated, stored)  # unlocked: zlib releases the GIL
        with pooled_file(spec.path, spec.size, spec.mtime_ns) as h5:
            dset = _checked_dataset(h5, spec)
            stored = _stored_chunks(dset, batch)
            if stored is None:  # a chunk never written: h5py knows its fill value
                out = np.asarray(dset[key])
                IO_STATS.add_bytes(out.nbytes)
                return out
    _inflate_into(spec, out, bounds, deflated, stored)
    IO_STATS.add_bytes(out.nbytes)
    return out


def _checked_dataset(h5: h5py.File, spec: HDF5DatasetSpec) -> h5py.Dataset:
    """Return the dataset of ``spec`` from an open file, refusing one that changed."""
    try:
        dset = h5[spec.dataset]
    except KeyError as exc:
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
            except zlib.error as exc:
                raise FormatError(
                    f"{spec.path}: chunk {offset} of {spec.dataset!r} does not inflate ({exc}); "
                    "the file is damaged. Re-create it."
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
        mtime, dataset, shape, dtype) and the chunks, so equal inputs give equal
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
    path, size, mtime_ns
        The file and its identity when opened.
    datasets
        Full dataset names, in trace order.
    lengths
        Number of samples of each trace.
    n_channels
        Channels per trace, or None for 1-D traces.
    dtype
        Output dtype (``numpy.dtype.str``).
    """

    path: str
    size: int
    mtime_ns: int
    datasets: tuple[str, ...]
    lengths: tuple[int, ...]
    n_channels: int | None
    dtype: str

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
        with pooled_file(spec.path, spec.size, spec.mtime_ns) as h5:
            for row, index in enumerate(indices.tolist()):
                name = spec.datasets[index]
                try:
                    dset = h5[name]
                except KeyError as exc:
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
                    values = dset[()]
                    block[row, :length] = values
                    nbytes += values.nbytes
        IO_STATS.add_bytes(nbytes)
        selection = (slice(None), *rest)
        out = block[selection]
        return out[0] if scalar else out

    def __repr__(self) -> str:
        return f"TraceStackProxy({self.spec.path}, {len(self.spec.datasets)} traces, {self.dtype})"


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
