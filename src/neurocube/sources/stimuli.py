"""Lazy stimulus files of a betas bucket: embeddings, images, segmentations (HDF5).

Built on the generic lazy HDF5 layer (:mod:`neurocube.sources.hdf5`: picklable
specs, one pool of read-only handles per process). What this module adds is
the *trial* alignment: a subject's trials show images in any order, with
repeats, while the HDF5 files hold one row per image. h5py reads only
increasing, unique row lists, so each chunk task reads the sorted unique rows
it needs (a contiguous span when that is cheaper) and expands them to trial
order in memory.

Files may be local or remote (``s3://...``, ``https://...``): a remote file is
read by h5py over a :class:`neurocube.storage.BlockReader` (range requests in
shared 1 MiB blocks; opening costs the blocks HDF5's metadata lies in, never
the file), described by a :class:`RemoteHDF5Spec` that carries the object's
size, ETag and ``storage_options`` so Dask workers read the same version with
the same options.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from neurocube import storage
from neurocube.errors import FormatError, NeurocubeError

__all__ = [
    "RemoteHDF5Spec",
    "TrialImages",
    "open_segmentations",
    "open_trial_embeddings",
    "read_rows",
]

#: Blocks of a remote HDF5 file: HDF5 reads its metadata in small scattered pieces, so blocks
#: are small and nothing is read ahead; the stored chunks a selection needs are fetched up
#: front instead, as concurrent range requests (:func:`_prefetch_chunks`).
REMOTE_BLOCK = 256 << 10


@dataclass(frozen=True)
class RemoteHDF5Spec:
    """Everything needed to read one dataset of a remote HDF5 file later, in any process.

    ``etag`` pins the object's version (a changed object is an error at read
    time); ``storage_options`` reach the workers with the spec and never show
    in its repr or Dask token.
    """

    path: str
    dataset: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...] | None
    size: int
    etag: str
    storage_options: storage.StorageOptions | None


class _FileRef(NamedTuple):
    """One version of an HDF5 file: local (version = mtime_ns) or remote (version = ETag)."""

    path: str
    size: int
    version: Any
    storage_options: storage.StorageOptions | None

    @property
    def remote(self) -> bool:
        return not storage.is_local(self.path)


def _locate(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None) -> _FileRef:
    """Stat an HDF5 file (one HEAD request for an object) and return its reference."""
    if storage.is_local(path):
        from neurocube.sources.hdf5 import stat_key

        local, size, mtime_ns = stat_key(path)
        return _FileRef(local, size, mtime_ns, None)
    opts = storage.as_options(storage_options)
    loc = storage.normalize(path)
    meta = storage.info(loc, opts)
    if meta.is_dir:
        raise FormatError(f"{loc}: a folder (prefix), expected an HDF5 file")
    return _FileRef(loc, meta.size, meta.etag or f"size:{meta.size}", opts)


def _ref_of(spec: Any) -> _FileRef:
    if isinstance(spec, RemoteHDF5Spec):
        return _FileRef(spec.path, spec.size, spec.etag, spec.storage_options)
    return _FileRef(spec.path, spec.size, spec.mtime_ns, None)


class _RemoteFile:
    """A pooled remote HDF5 file: the h5py handle and the block reader under it."""

    def __init__(self, h5: Any, reader: storage.BlockReader) -> None:
        self.h5 = h5
        self.reader = reader

    def close(self) -> None:
        try:
            self.h5.close()
        finally:
            self.reader.close()


def _open_remote(ref: _FileRef) -> _RemoteFile:
    """Open a remote HDF5 file read-only over shared range-request blocks."""
    import h5py

    from neurocube.sources.hdf5 import HDF5_SIGNATURE

    storage.check_unchanged(ref.path, ref.storage_options, ref.size, ref.version)
    reader = storage.BlockReader(
        ref.path, ref.storage_options, size=ref.size, version=str(ref.version),
        readahead=0, block_size=REMOTE_BLOCK,
    )
    head = reader.read(8)  # storage errors (403, network) surface here, naming the URL
    reader.seek(0)
    try:
        return _RemoteFile(h5py.File(reader, "r"), reader)
    except NeurocubeError:
        raise
    except (OSError, ValueError) as exc:
        if head != HDF5_SIGNATURE:
            raise FormatError(
                f"{ref.path}: expected an HDF5 file (signature {HDF5_SIGNATURE!r}), found other "
                "bytes. Check that this is the file you meant."
            ) from None
        raise FormatError(
            f"{ref.path}: an HDF5 file that h5py cannot open ({type(exc).__name__}: "
            f"{str(exc)[:200]}). It may be damaged or still being uploaded."
        ) from None


@contextlib.contextmanager
def _remote_file(ref: _FileRef) -> Iterator[_RemoteFile]:
    """Yield this process's pooled :class:`_RemoteFile` of ``ref``, holding its lock."""
    from neurocube.sources.hdf5 import HDF5_POOL

    key = ("hdf5-url", ref.path, ref.size, str(ref.version), ref.storage_options)
    handle, lock = HDF5_POOL.acquire(key, lambda: _open_remote(ref))
    with lock, storage.translate_errors(ref.path, "read"):
        yield handle


@contextlib.contextmanager
def _h5file(ref: _FileRef) -> Iterator[Any]:
    """Yield this process's pooled h5py handle of ``ref``, holding its lock."""
    from neurocube.sources.hdf5 import pooled_file

    if not ref.remote:
        with pooled_file(ref.path, ref.size, ref.version) as h5:
            yield h5
        return
    with _remote_file(ref) as handle:
        yield handle.h5


def _prefetch_chunks(dset: Any, reader: storage.BlockReader, key: Any) -> None:
    """Fetch the stored chunks a leading-axis selection of ``dset`` touches, concurrently.

    Without it h5py would ask for one chunk at a time, each a request of its own. Only
    the chunks' byte ranges are fetched: the span from the first to the last when it is at
    most twice their bytes, else each chunk's range.
    """
    chunks = dset.chunks
    if not chunks or not dset.shape:
        return
    first = key[0] if isinstance(key, tuple) and key else key
    n = int(dset.shape[0])
    wanted: list[int]
    if isinstance(first, slice):
        start, stop, _ = first.indices(n)
        step = chunks[0]
        wanted = list(range(start // step, (stop - 1) // step + 1)) if stop > start else []
    elif isinstance(first, (int, np.integer)):
        wanted = [int(first) // chunks[0]]
    else:
        wanted = np.unique(np.asarray(first, dtype=np.int64) // chunks[0]).tolist()
    ranges: list[tuple[int, int]] = []
    tail = (0,) * (len(dset.shape) - 1)
    try:
        for block in wanted:
            info = dset.id.get_chunk_info_by_coord((block * chunks[0], *tail))
            if info.byte_offset is not None and info.size:
                ranges.append((int(info.byte_offset), int(info.byte_offset) + int(info.size)))
    except (AttributeError, RuntimeError, ValueError, KeyError):
        return  # an HDF5 without chunk queries, or chunks along other axes: h5py reads them
    if len(dset.shape) > 1 and any(c < s for c, s in zip(chunks[1:], dset.shape[1:], strict=True)):
        return  # chunked along other axes too: more chunks than the leading coordinate names
    if not ranges:
        return
    ranges.sort()
    span = ranges[-1][1] - ranges[0][0]
    if span <= 2 * sum(b - a for a, b in ranges):
        reader.prefetch(ranges[0][0], ranges[-1][1])
    else:
        for a, b in ranges:
            reader.prefetch(a, b)


def _spec(
    path: str | os.PathLike[str], dataset: str, storage_options: Mapping[str, Any] | None = None
) -> Any:
    from neurocube.sources.hdf5 import HDF5DatasetSpec

    ref = _locate(path, storage_options)
    with _h5file(ref) as h5:
        if dataset not in h5:
            raise FormatError(
                f"{ref.path}: no dataset {dataset!r}; found {sorted(h5.keys())}. Expected the "
                "stimuli layout of FORMATS.md §1."
            )
        dset = h5[dataset]
        if not ref.remote:
            return HDF5DatasetSpec.from_dataset(dset, (ref.path, ref.size, ref.version))
        return RemoteHDF5Spec(
            path=ref.path,
            dataset=str(dset.name),
            shape=tuple(int(n) for n in dset.shape),
            dtype=np.dtype(dset.dtype).str,
            chunks=tuple(int(n) for n in dset.chunks) if dset.chunks else None,
            size=ref.size,
            etag=str(ref.version),
            storage_options=ref.storage_options,
        )


def read_selection(spec: Any, key: Any) -> np.ndarray:
    """Read ``dataset[key]`` of a local or remote dataset spec.

    ``spec`` is a :class:`~neurocube.sources.hdf5.HDF5DatasetSpec` (local) or a
    :class:`RemoteHDF5Spec`.
    """
    from neurocube.sources import hdf5

    if not isinstance(spec, RemoteHDF5Spec):
        return hdf5.read_selection(spec, key)
    with _remote_file(_ref_of(spec)) as handle:
        try:
            dset = handle.h5[spec.dataset]
        except KeyError:
            raise FormatError(
                f"{spec.path}: dataset {spec.dataset!r} is gone; the file changed after it was "
                "opened. Open it again."
            ) from None
        _prefetch_chunks(dset, handle.reader, key)
        out = np.asarray(dset[key])
    storage.IO_STATS.add_bytes(out.nbytes)
    return out


class _RemoteArrayProxy:
    """An array-like over a remote dataset for :func:`dask.array.from_array` (slices only)."""

    def __init__(self, spec: RemoteHDF5Spec) -> None:
        self.spec = spec
        self.shape = spec.shape
        self.dtype = np.dtype(spec.dtype)
        self.ndim = len(spec.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        return read_selection(self.spec, key)


def _dask_array(spec: Any, chunks: tuple[int, ...]) -> Any:
    """Return a lazy Dask array over a local or remote HDF5 dataset."""
    import dask.array as da
    from dask.base import tokenize

    from neurocube.sources.hdf5 import hdf5_dask_array

    if not isinstance(spec, RemoteHDF5Spec):
        return hdf5_dask_array(spec, chunks=chunks)
    name = f"hdf5-{spec.dataset.strip('/').replace('/', '-')}-{tokenize(spec, chunks)}"
    return da.from_array(
        _RemoteArrayProxy(spec), chunks=chunks, name=name, lock=False, asarray=False,
        fancy=False, inline_array=False,
        meta=np.empty((0,) * len(spec.shape), dtype=np.dtype(spec.dtype)),
    )


def read_rows(spec: Any, rows: np.ndarray) -> np.ndarray:
    """Read rows ``rows`` (any order, repeats, -1 for "missing") of an HDF5 dataset.

    Missing rows come back as NaN (floats) or zeros. Only the unique rows are
    read: a contiguous span when it is at most twice their number, else an
    increasing index list (what h5py accepts).
    """
    rows = np.asarray(rows, dtype=np.int64)
    dtype = np.dtype(spec.dtype)
    tail = tuple(spec.shape[1:])
    out = np.empty((rows.size, *tail), dtype=dtype)
    if dtype.kind == "f":
        out.fill(np.nan)
    else:
        out.fill(0)
    present = rows >= 0
    if not present.any():
        return out
    unique, inverse = np.unique(rows[present], return_inverse=True)
    low, high = int(unique[0]), int(unique[-1]) + 1
    if high - low <= 2 * unique.size:
        block = read_selection(spec, slice(low, high))
        values = block[unique - low]
    else:
        values = read_selection(spec, list(unique.tolist()))
    out[present] = values[inverse]
    return out


def _rows_chunk(spec: Any, rows: np.ndarray) -> np.ndarray:
    return read_rows(spec, rows)


def _rows_array(spec: Any, rows: np.ndarray, per_chunk: int, prefix: str) -> Any:
    """Dask array of ``dataset[rows]`` in chunks of ``per_chunk`` rows (deterministic name)."""
    import dask.array as da
    from dask.base import tokenize

    n = int(rows.size)
    per = max(1, int(per_chunk))
    bounds = [*list(range(0, n, per)), n]
    sizes = tuple(b - a for a, b in itertools.pairwise(bounds)) or (0,)
    tail = tuple(spec.shape[1:])
    name = f"{prefix}-{tokenize(spec, rows, per)}"
    graph: dict[Any, Any] = {}
    for index, (start, stop) in enumerate(itertools.pairwise(bounds)):
        graph[(name, index) + (0,) * len(tail)] = (_rows_chunk, spec, rows[start:stop])
    if n == 0:
        graph[(name, 0) + (0,) * len(tail)] = (_rows_chunk, spec, rows[:0])
    chunks = (sizes, *((s,) for s in tail))
    return da.Array(graph, name, chunks=chunks, dtype=np.dtype(spec.dtype))


def open_trial_embeddings(
    path: str | os.PathLike[str],
    image_names: np.ndarray,
    *,
    trials_per_chunk: int = 1024,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[Any, np.ndarray]:
    """Return ``(embedding, valid)`` aligned with ``image_names`` (one row per trial).

    ``embedding`` is a lazy Dask array ``(trial, feature)`` in the file's dtype
    (float16); ``valid`` is a bool array (False where the file flags the row
    invalid or does not list the image). ``image_ids`` and ``valid`` are read
    here (small); the embedding matrix only when computed. ``path`` may be
    a URL, read with ``storage_options``.

    Raises
    ------
    FormatError
        If ``embedding`` / ``image_ids`` are missing or their lengths disagree.
    """
    spec = _spec(path, "embedding", storage_options)
    ref = _ref_of(spec)
    with _h5file(ref) as h5:
        if "image_ids" not in h5:
            raise FormatError(
                f"{ref.path}: no dataset 'image_ids'; an embeddings file needs it to find the row "
                "of each image"
            )
        ids = [v.decode() if isinstance(v, bytes) else str(v) for v in h5["image_ids"][()]]
        valid_rows = np.asarray(h5["valid"][()], dtype=bool) if "valid" in h5 else None
    if len(spec.shape) != 2 or len(ids) != spec.shape[0]:
        raise FormatError(
            f"{ref.path}: 'embedding' has shape {spec.shape} and 'image_ids' {len(ids)} rows; "
            "expected a 2-D (N, D) matrix with one id per row"
        )
    row_of = {name: i for i, name in enumerate(ids)}
    rows = np.asarray([row_of.get(str(n), -1) for n in image_names], dtype=np.int64)
    valid = rows >= 0
    if valid_rows is not None:
        valid &= np.where(rows >= 0, valid_rows[np.maximum(rows, 0)], False)
    return _rows_array(spec, rows, trials_per_chunk, "stimulus-embedding"), valid


class TrialImages:
    """Per-trial stimulus images (JPEG bytes), read from ``task-images_stimuli.h5`` on access.

    Indexing by a global trial index (the index of ``Subject.metadata``) reads
    one row; :meth:`to_dask` gives a lazy object array for bulk work. Holds a
    path and row numbers only, so it pickles.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        rows: np.ndarray,
        *,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._spec = _spec(path, "images", storage_options)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.path = self._spec.path

    def __len__(self) -> int:
        return int(self.rows.size)

    def __getitem__(self, trial: int) -> bytes:
        row = int(self.rows[int(trial)])
        if row < 0:
            raise KeyError(f"trial {trial}: its image is not listed in the stimuli metadata CSV")
        return bytes(np.asarray(read_selection(self._spec, row), dtype=np.uint8).tobytes())

    def __iter__(self) -> Iterator[bytes]:
        for trial in range(len(self)):
            yield self[trial]

    def to_pil(self, trial: int) -> Any:
        """Decode one trial's image with Pillow."""
        import io

        from PIL import Image

        return Image.open(io.BytesIO(self[trial]))

    def to_dask(self, trials_per_chunk: int = 256) -> Any:
        """Return a lazy 1-D object array of ``bytes`` per trial."""
        import dask.array as da
        from dask.base import tokenize

        n = len(self)
        per = max(1, trials_per_chunk)
        bounds = [*list(range(0, n, per)), n]
        name = f"stimulus-images-{tokenize(self._spec, self.rows, per)}"
        graph = {
            (name, i): (_image_chunk, self._spec, self.rows[a:b])
            for i, (a, b) in enumerate(itertools.pairwise(bounds))
        }
        sizes = tuple(b - a for a, b in itertools.pairwise(bounds))
        return da.Array(graph, name, chunks=(sizes,), dtype=object)

    def __repr__(self) -> str:
        return f"TrialImages({self.path!r}, {len(self)} trials)"


def _image_chunk(spec: Any, rows: np.ndarray) -> np.ndarray:
    out = np.empty(rows.size, dtype=object)
    for i, row in enumerate(rows.tolist()):
        out[i] = (
            b"" if row < 0 else bytes(np.asarray(read_selection(spec, row), np.uint8).tobytes())
        )
    return out


def open_segmentations(
    path: str | os.PathLike[str],
    metadata_path: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """Open segmentation masks lazily: Dataset ``masks (mask, height, width)`` + metadata coords.

    The CSV's columns become coordinates along ``mask`` (text as ``str``;
    integer-looking columns as int64).

    Raises
    ------
    FormatError
        If ``masks`` is not 3-D or the CSV's row count differs from it.
    """
    import pandas as pd
    import xarray as xr

    spec = _spec(path, "masks", storage_options)
    if len(spec.shape) != 3:
        raise FormatError(f"{spec.path}: 'masks' has shape {spec.shape}; expected (N, H, W)")
    with storage.open_file(metadata_path, "rb", storage_options, block_size=8 << 20) as handle:
        table = pd.read_csv(handle, dtype=str, keep_default_na=False)
    if len(table) != spec.shape[0]:
        raise FormatError(
            f"{metadata_path}: {len(table)} rows, but {spec.path} holds {spec.shape[0]} masks; "
            "expected one metadata row per mask"
        )
    per = max(1, (64 * 2**20) // max(1, spec.shape[1] * spec.shape[2]))
    chunks = (min(per, max(spec.shape[0], 1)), spec.shape[1], spec.shape[2])
    if spec.chunks:
        step = spec.chunks[0]
        chunks = (max(step, (chunks[0] // step) * step), spec.shape[1], spec.shape[2])
    masks = _dask_array(spec, chunks)
    coords: dict[str, Any] = {}
    for column in table.columns:
        values = table[column]
        numeric = pd.to_numeric(values, errors="coerce")
        if len(values) and numeric.notna().all() and (numeric % 1 == 0).all():
            coords[str(column)] = ("mask", numeric.to_numpy(dtype=np.int64))
        else:
            coords[str(column)] = ("mask", values.to_numpy(dtype=str))
    return xr.Dataset(
        {"masks": (("mask", "height", "width"), masks)},
        coords=coords,
        attrs={"neurocube_sources": [spec.path, storage.normalize(metadata_path)]},
    )
