"""What a parquet file holds, read from its footer: once per process and file version.

:func:`read_parquet_info` summarises a footer into a :class:`ParquetFileInfo`
(schema as numpy dtypes, row-group sizes, the statistics that plan filters) and
:func:`cached_footer` keeps the parsed ``FileMetaData`` that row-group reads
need. A local footer is read from the file's tail in one read; a remote one with
one range request (a small object comes whole and serves its row-group reads
too). Every footer is checked by :mod:`neurocube.sources.parquet_footer` before
pyarrow parses it. Both memos are keyed by the file's version (size, mtime and
ctime locally; size and ETag remotely), so a rewritten file is read again.

Reading row groups and planning Dask chunks is :mod:`neurocube.sources.parquet`.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from neurocube import storage
from neurocube.errors import FormatError, SourceChangedError
from neurocube.sources.parquet_footer import check_footer, footer_bytes
from neurocube.storage import (
    HandlePool,
    ObjectInfo,
    StorageOptions,
    as_options,
    is_url,
    open_file,
)

__all__ = [
    "PARQUET_MAGIC",
    "ColumnStats",
    "ParquetFileInfo",
    "cached_footer",
    "common_dtypes",
    "is_parquet",
    "read_local_footer",
    "read_parquet_info",
    "read_remote_footer",
    "small_file",
]

PARQUET_MAGIC = b"PAR1"


@dataclass(frozen=True)
class ColumnStats:
    """Footer statistics of one column chunk (None where the writer left them out)."""

    min: Any = None
    max: Any = None
    null_count: int | None = None


@dataclass(frozen=True)
class ParquetFileInfo:
    """What a parquet footer says about a file; built by :func:`read_parquet_info`.

    Attributes
    ----------
    path, size, mtime_ns, ctime_ns
        The file (a local path or a URL) and the version of it the footer came
        from (``mtime_ns`` and ``ctime_ns`` are 0 for an object; its ``etag`` says
        the version). ``ctime_ns`` keys the per-process footer caches: it changes
        with any rewrite, even one that restores the size and mtime.
    dtypes
        Numeric / boolean column -> numpy dtype string (``"float64"``, ``"int64"``,
        ...). An integer column whose statistics show nulls is ``float64``.
    other_columns
        Columns that are not numeric (strings, lists, ...) and their Arrow type.
    row_group_rows
        Number of rows in each row group.
    stats
        One ``{column: ColumnStats}`` per row group: the key columns asked for
        and integer / boolean columns.
    """

    path: str
    size: int
    mtime_ns: int
    dtypes: dict[str, str]
    other_columns: dict[str, str]
    row_group_rows: tuple[int, ...]
    stats: tuple[dict[str, ColumnStats], ...] = field(repr=False)
    etag: str = ""
    storage_options: StorageOptions | None = field(default=None, repr=False)
    ctime_ns: int = 0

    @property
    def num_rows(self) -> int:
        """Total rows in the file."""
        return sum(self.row_group_rows)

    @property
    def columns(self) -> list[str]:
        """Every column name, numeric first (schema order within each)."""
        return [*self.dtypes, *self.other_columns]

    def column_range(self, column: str) -> tuple[Any, Any] | None:
        """Return the (min, max) of ``column`` over the file from the statistics, or None."""
        lows, highs = [], []
        for rg, n in zip(self.stats, self.row_group_rows, strict=True):
            st = rg.get(column)
            if n == 0:
                continue
            if st is None or st.min is None or st.max is None:
                return None
            lows.append(st.min)
            highs.append(st.max)
        if not lows:
            return None
        return min(lows), max(highs)


def is_parquet(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> bool:
    """Return True if the file starts with the parquet magic bytes ``PAR1``."""
    try:
        if is_url(path):
            return storage.read_range(str(path), 0, 4, storage_options) == PARQUET_MAGIC
        with open_file(path, "rb") as fh:
            return bool(fh.read(4) == PARQUET_MAGIC)
    except OSError:
        return False


_DTYPE_CACHE: dict[str, str | None] = {}


def _numpy_dtype(arrow_type: pa.DataType) -> str | None:
    key = str(arrow_type)
    if key in _DTYPE_CACHE:
        return _DTYPE_CACHE[key]
    result: str | None = None
    if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type):
        result = str(np.dtype(arrow_type.to_pandas_dtype()))
    elif pa.types.is_boolean(arrow_type):
        result = "bool"
    _DTYPE_CACHE[key] = result
    return result


#: Bytes of a remote parquet file's tail read first: the footer of a tracks file fits.
FOOTER_PROBE = 64 << 10


class _TailFile:
    """A seekable file over the tail of an object (the bytes before it are never asked for)."""

    def __init__(self, url: str, size: int, start: int, data: bytes) -> None:
        self.url, self.size, self.start, self.data = url, size, start, data
        self.pos = 0
        self.closed = False

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: 0, 1: self.pos, 2: self.size}[whence] + offset
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if self.pos < self.start:
            raise FormatError(f"{self.url}: parquet footer runs past the bytes read")
        out = self.data[self.pos - self.start : end - self.start]
        self.pos = end
        return out

    def close(self) -> None:
        self.closed = True


_SMALL_FILES: collections.OrderedDict[tuple[str, int], bytes] = collections.OrderedDict()
_SMALL_LOCK = threading.Lock()
_SMALL_BYTES = 32 << 20


def _remember_small(url: str, size: int, data: bytes) -> None:
    with _SMALL_LOCK:
        _SMALL_FILES[(url, size)] = data
        total = sum(len(v) for v in _SMALL_FILES.values())
        while total > _SMALL_BYTES and len(_SMALL_FILES) > 1:
            _, old = _SMALL_FILES.popitem(last=False)
            total -= len(old)


def small_file(url: str, size: int) -> bytes | None:
    """Return a small remote file read whole with its footer (same URL and size), or None."""
    with _SMALL_LOCK:
        data = _SMALL_FILES.get((url, size))
        if data is not None:
            _SMALL_FILES.move_to_end((url, size))
        return data


def read_remote_footer(
    url: str, storage_options: Mapping[str, Any] | None, size: int
) -> pq.FileMetaData:
    """Read the footer of a remote parquet object: one range request (two for a large footer).

    Raises
    ------
    FormatError
        If the object does not end with the parquet magic or its footer is unreadable.
    """
    import struct

    if size < 12:
        raise FormatError(f"{url}: not a parquet file ({size} bytes; the file may be truncated).")
    start = max(0, size - FOOTER_PROBE)
    tail = storage.read_range(url, start, size, storage_options)
    if tail[-4:] != PARQUET_MAGIC:
        raise FormatError(
            f"{url}: not a parquet file (ends with {tail[-4:]!r}, expected b'PAR1'); the file "
            "may be truncated. Check the path in the index, or re-run the writer."
        )
    footer_len = struct.unpack("<I", tail[-8:-4])[0]
    need = footer_len + 8
    if need > size - 4:
        raise FormatError(f"{url}: parquet footer length {footer_len} exceeds the file's {size} "
                          "bytes; the file is damaged.")
    if need > len(tail):
        start = size - need
        tail = storage.read_range(url, start, size, storage_options)
    if start == 0:  # the whole (small) file came along: row-group reads are served from it
        _remember_small(url, size, tail)
    footer = footer_bytes(tail, url)
    check_footer(footer, url, data_end=size - 8 - len(footer))
    try:
        return pq.read_metadata(_TailFile(url, size, start, tail))
    except (pa.ArrowException, OSError) as exc:  # ArrowInvalid, ArrowNotImplementedError, ...
        raise FormatError(f"{url}: unreadable parquet footer ({exc}); the file may be "
                          "truncated.") from exc


def read_local_footer(fh: Any, path: str) -> pq.FileMetaData:
    """Read the footer of the open local parquet file ``fh``, checked before pyarrow parses it.

    The file must start and end with the parquet magic. The tail is read once:
    pyarrow parses the footer from those bytes.

    Raises
    ------
    FormatError
        If the file does not start with the magic, the footer is unreadable, or it
        disagrees with itself in a way that would abort pyarrow (see
        :mod:`neurocube.sources.parquet_footer`).
    """
    import struct

    fh.seek(0)
    head = fh.read(4)
    if head != PARQUET_MAGIC:
        raise FormatError(
            f"{path}: not a parquet file (starts with {head!r}, expected b'PAR1'). Check the "
            "path (and the index that names it), or rewrite the file."
        )
    size = fh.seek(0, os.SEEK_END)
    start = max(0, size - FOOTER_PROBE)
    fh.seek(start)
    tail = fh.read()
    source: Any = fh
    if len(tail) >= 8 and tail[-4:] == PARQUET_MAGIC:  # else pyarrow says what is wrong
        need = struct.unpack("<I", tail[-8:-4])[0] + 8
        if need > len(tail) and need <= size:
            start = size - need
            fh.seek(start)
            tail = fh.read()
        footer = footer_bytes(tail, path)
        check_footer(footer, path, data_end=size - 8 - len(footer))
        source = _TailFile(path, size, start, tail)  # the footer is all in the tail
    fh.seek(0)
    try:
        return pq.read_metadata(source)
    except (pa.ArrowException, OSError) as exc:  # ArrowInvalid, ArrowNotImplementedError, ...
        raise FormatError(
            f"{path}: unreadable parquet footer ({exc}); the file may be truncated. Restore "
            "or rewrite it."
        ) from exc



def _footer_key(path: str, size: int, mtime_ns: int, ctime_ns: int, etag: str) -> tuple[Any, ...]:
    """Key of a parsed footer in the per-process pool: the file and its version."""
    if is_url(path):
        return ("parquet-footer", path, size, etag)
    return ("parquet-footer", path, size, mtime_ns, ctime_ns)


class _Info:
    """A cached :class:`ParquetFileInfo` in the per-process pool (nothing to close)."""

    def __init__(self, info: ParquetFileInfo) -> None:
        self.info = info

    def close(self) -> None:
        """Nothing to close: plain memory."""


#: Parsed footers summarised per file version (``(path, size, mtime, ctime)`` locally,
#: ``(url, size, etag)`` remotely): a dataset reopened in the same process parses nothing.
_INFOS = HandlePool(maxsize=1024)


def read_parquet_info(
    path: str | os.PathLike[str],
    stats_columns: Iterable[str] = ("frame", "time", "id"),
    *,
    storage_options: Mapping[str, Any] | None = None,
    object_info: ObjectInfo | None = None,
) -> ParquetFileInfo:
    """Read the footer of a parquet file (nothing else) into a :class:`ParquetFileInfo`.

    Statistics are kept for ``stats_columns`` and for every integer / boolean
    column (to see nulls); float columns need none (NaN is their null).

    A URL is read with ``storage_options``: one range request for the tail
    holding the footer (``object_info``, from a listing, saves the stat).

    Results are kept per process and file version (size, mtime and ctime of a
    local file; size and ETag of an object), so reopening a file that did not
    change costs one stat (none with ``object_info``) and no read; a rewritten
    file has another version and is read again.

    Raises
    ------
    DataNotFoundError
        If the file does not exist.
    FormatError
        If it is not a parquet file (wrong magic bytes, unreadable footer).
    """
    local = os.fspath(path)
    opts: StorageOptions | None = None
    remote = is_url(local)
    if remote:
        opts = as_options(storage_options)
        obj = object_info or storage.info(local, opts)
    else:
        local = os.path.abspath(local)
        obj = object_info or storage.info(local)
    version = (obj.etag,) if remote else (obj.mtime_ns, obj.ctime_ns)
    info_key = ("parquet-info", local, obj.size, *version, tuple(stats_columns))
    holder, _ = _INFOS.acquire(info_key, lambda: _Info(
        _parse_info(local, obj, opts, stats_columns)))
    info: ParquetFileInfo = holder.info
    if remote and info.storage_options is not opts:
        info = replace(info, storage_options=opts)
    return info


def _parse_info(
    local: str,
    obj: ObjectInfo,
    opts: StorageOptions | None,
    stats_columns: Iterable[str],
) -> ParquetFileInfo:
    """Read and summarise the footer of ``local`` at the version ``obj`` describes."""
    etag = ""
    if is_url(local):
        size, mtime_ns, ctime_ns, etag = obj.size, 0, 0, obj.etag
        meta = read_remote_footer(local, opts, size)
    else:
        with open_file(local, "rb") as fh:
            meta = read_local_footer(fh, local)
        size, mtime_ns, ctime_ns = obj.size, obj.mtime_ns, obj.ctime_ns
        now = storage.info(local)
        if (now.size, now.mtime_ns, now.ctime_ns) != (size, mtime_ns, ctime_ns):
            raise SourceChangedError(
                f"{local}: changed while its footer was read (then {size} bytes, mtime "
                f"{mtime_ns}; now {now.size} bytes, mtime {now.mtime_ns}). Open it again "
                "once the writer has finished."
            )
    _FOOTERS.acquire(_footer_key(local, size, mtime_ns, ctime_ns, etag), lambda: _Footer(meta))
    schema = meta.schema.to_arrow_schema()
    dtypes: dict[str, str] = {}
    others: dict[str, str] = {}
    for fld in schema:
        np_dtype = _numpy_dtype(fld.type)
        if np_dtype is None:
            others[fld.name] = str(fld.type)
        else:
            dtypes[fld.name] = np_dtype
    wanted = set(stats_columns)
    # column chunk positions whose statistics we keep (top-level columns only)
    leaf_paths = (
        meta.schema.names
        if len(meta.schema.names) == meta.num_columns
        else [meta.schema.column(j).path for j in range(meta.num_columns)]
    )
    positions = [
        (j, name)
        for j, name in enumerate(leaf_paths)
        if name in dtypes and (name in wanted or not dtypes[name].startswith("float"))
    ]
    stats: list[dict[str, ColumnStats]] = []
    rows: list[int] = []
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        if rg.num_columns != meta.num_columns or rg.num_rows < 0:
            # pyarrow aborts the process on a column index its footer does not hold
            raise FormatError(
                f"{local}: damaged parquet footer: row group {i} lists {rg.num_columns} "
                f"columns and {rg.num_rows} rows, the schema has {meta.num_columns} columns. "
                "Restore or rewrite the file."
            )
        rows.append(rg.num_rows)
        rg_stats: dict[str, ColumnStats] = {}
        for j, name in positions:
            st_ = rg.column(j).statistics
            if st_ is None:
                rg_stats[name] = ColumnStats()
                continue
            lo = st_.min if st_.has_min_max else None
            hi = st_.max if st_.has_min_max else None
            nulls = int(st_.null_count) if st_.has_null_count else None
            rg_stats[name] = ColumnStats(lo, hi, nulls)
        stats.append(rg_stats)
    for name, dt in list(dtypes.items()):
        if dt == "float64" or dt.startswith("float"):
            continue
        if any((s.get(name) or ColumnStats()).null_count for s in stats):
            dtypes[name] = "float64"  # integers / booleans with nulls come back as float NaN
    return ParquetFileInfo(
        local, size, mtime_ns, dtypes, others, tuple(rows), tuple(stats), etag, opts, ctime_ns
    )



class _Footer:
    """A cached footer in the per-process pool (the pool wants something it can close)."""

    def __init__(self, metadata: pq.FileMetaData) -> None:
        self.metadata = metadata

    def close(self) -> None:
        """Nothing to close: a footer is plain memory."""


_FOOTERS = HandlePool(maxsize=256)


def cached_footer(
    spec_path: str,
    size: int,
    mtime_ns: int,
    etag: str = "",
    storage_options: Mapping[str, Any] | None = None,
    ctime_ns: int = 0,
) -> pq.FileMetaData:
    """Return the parsed footer of a parquet file, read once per process and file version.

    The version is the size and ETag of an object, the size, mtime and ctime of a
    local file (a rewrite that keeps the size and sets the mtime back still
    changes the ctime).
    """
    remote = is_url(spec_path)

    def load() -> _Footer:
        if remote:
            return _Footer(read_remote_footer(spec_path, storage_options, size))
        with open_file(spec_path, "rb") as fh:
            return _Footer(read_local_footer(fh, spec_path))

    holder, _ = _FOOTERS.acquire(_footer_key(spec_path, size, mtime_ns, ctime_ns, etag), load)
    return holder.metadata


def common_dtypes(infos: Iterable[ParquetFileInfo], columns: Sequence[str]) -> list[str]:
    """Return each column's dtype over several files (promoted; float if a file lacks it)."""
    infos = list(infos)
    out = []
    for col in columns:
        found = [np.dtype(i.dtypes[col]) for i in infos if col in i.dtypes]
        if not found:
            raise FormatError(f"column {col!r} is in none of the files")
        dt = np.result_type(*found)
        if len(found) < len(infos) and dt.kind in "iub":
            dt = np.dtype("float64")
        out.append(str(dt))
    return out
