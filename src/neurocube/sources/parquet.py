"""Lazy parquet: one Dask chunk per row group (or run of small row groups), footers read once.

Opening a parquet file reads its footer only
(:func:`~neurocube.sources.parquet_meta.read_parquet_info`): the schema, the row
count of every row group and the min / max / null-count statistics of every
numeric column chunk. From those, :func:`plan_chunks`
decides at graph-build time which row groups a frame filter keeps, and
:func:`lazy_columns` builds Dask arrays whose chunk sizes are known, one task
per chunk reading all projected columns of its row groups at once
(:func:`read_chunk`). A task carries a picklable :class:`ParquetChunkSpec`
(path, size, mtime, row-group ids, columns, dtypes, optional exact row filter),
never an open handle, so it runs on any Dask worker.

Filter semantics
----------------
A frame range ``[lo, hi)`` drops every row group whose statistics say it holds
no frame in range (no I/O). Row groups entirely inside the range are kept
whole. A row group that straddles a bound (or has no statistics) is either

- kept whole (``exact=False``): nothing is read at graph-build time, and the
  result may hold some rows outside the range; or
- filtered exactly (``exact=True``): the frame column of *those boundary row
  groups only* is read at graph-build time to count the rows in range, so the
  chunk size is known; the chunk task drops the other rows when it runs.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import dask.array as da
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from neurocube import storage
from neurocube.errors import CorruptDataError, FormatError
from neurocube.sources.parquet_meta import ParquetFileInfo, cached_footer, small_file
from neurocube.storage import IO_STATS, StorageOptions, is_url, open_file

__all__ = [
    "ParquetChunkSpec",
    "group_chunks",
    "lazy_columns",
    "plan_chunks",
    "read_chunk",
    "read_chunks",
    "read_rows",
    "row_groups_in_range",
    "open_row_groups",
]


def open_row_groups(
    path: str,
    storage_options: Mapping[str, Any] | None,
    size: int,
    etag: str,
    meta: pq.FileMetaData,
    row_groups: Sequence[int],
    columns: Iterable[str] | None,
) -> Any:
    """Open a parquet file to read ``columns`` of ``row_groups``.

    Locally a plain file. Remotely a :class:`~neurocube.storage.BlockReader`
    whose column-chunk byte ranges are fetched up front as a few large,
    concurrent range requests, so pyarrow's reads are served from memory.
    """
    if not is_url(path):
        return open_file(path, "rb")
    small = small_file(path, size)
    if small is not None:  # read whole with its footer (same version: checked by the caller)
        return io.BytesIO(small)
    reader = storage.BlockReader(path, storage_options, size=size, version=etag)
    names = None if columns is None else set(columns)
    spans: list[tuple[int, int]] = []
    for i in row_groups:
        rg = meta.row_group(i)
        for j in range(rg.num_columns):
            col = rg.column(j)
            if names is not None and col.path_in_schema.split(".")[0] not in names:
                continue
            start = col.data_page_offset
            if col.has_dictionary_page and col.dictionary_page_offset is not None:
                start = min(start, col.dictionary_page_offset)
            spans.append((start, start + col.total_compressed_size))
    merged: list[list[int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1] + reader.block_size:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    for a, b in merged:
        reader.prefetch(a, b)
    return reader



@dataclass(frozen=True)
class ParquetChunkSpec:
    """Everything a task needs to read one chunk: picklable, no handle.

    Attributes
    ----------
    path, size, mtime_ns
        The file version this chunk was planned on (a changed file is refused).
    row_groups
        Row-group ids read together.
    columns
        Output columns, in order; those the file lacks come back as NaN.
    dtypes
        numpy dtype per output column.
    n_rows
        Rows the chunk returns (known at graph-build time).
    filter_column, filter_range
        When set, rows with ``filter_column`` outside ``[lo, hi)`` are dropped.
    present
        The output columns the file has.
    scale, scaled
        Columns in ``scaled`` are multiplied by ``scale`` (unit conversion).
    etag, storage_options
        The version of a remote file and the options to read it with.
    ctime_ns
        The file's ctime when planned (keys the per-process footer cache only).
    """

    path: str
    size: int
    mtime_ns: int
    row_groups: tuple[int, ...]
    columns: tuple[str, ...]
    dtypes: tuple[str, ...]
    n_rows: int
    present: tuple[str, ...]
    filter_column: str | None = None
    filter_range: tuple[float, float] | None = None
    scale: float = 1.0
    scaled: tuple[str, ...] = ()
    etag: str = ""
    storage_options: StorageOptions | None = field(default=None, repr=False)
    ctime_ns: int = 0




def _check_unchanged(spec: ParquetChunkSpec) -> None:
    """Refuse a file whose size or version (mtime locally, ETag remotely) changed since opening.

    One stat per task locally; a HEAD request once per process and version remotely.
    Raises :class:`~neurocube.errors.SourceChangedError` (or ``DataNotFoundError`` if gone).
    """
    version: int | str = spec.etag if is_url(spec.path) else spec.mtime_ns
    storage.check_unchanged(
        spec.path, spec.storage_options, spec.size, version, ctime_ns=spec.ctime_ns or None
    )


def verified_file(fh: Any, metadata: pq.FileMetaData, **kwargs: Any) -> pq.ParquetFile:
    """Return a :class:`pyarrow.parquet.ParquetFile` that verifies the page CRCs the file carries.

    pyarrow checks page checksums only when asked (``page_checksum_verification``);
    pages written without one are read as before. Read through :func:`reading`, so a
    failed check or a damaged page is a neurocube error naming the file.
    """
    return pq.ParquetFile(fh, metadata=metadata, page_checksum_verification=True, **kwargs)


class _Reading:
    """Context manager that turns pyarrow's errors while reading pages into neurocube errors."""

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> Literal[False]:
        if exc is None or isinstance(exc, FormatError) or not isinstance(
            exc, (OSError, pa.ArrowException, ValueError, IndexError, KeyError, EOFError)
        ):
            return False
        from neurocube.errors import NeurocubeError

        if isinstance(exc, NeurocubeError):
            return False
        text = str(exc)
        if "checksum" in text.lower() or "crc" in text.lower():
            raise CorruptDataError(
                f"{self.path}: {self.what} failed its page checksum ({text}); the file is "
                "damaged. Restore or rewrite it; values from it are not returned."
            ) from exc
        raise FormatError(
            f"{self.path}: {self.what} cannot be decoded ({type(exc).__name__}: {text}); the "
            "file is damaged or truncated. Restore or rewrite it."
        ) from exc


def reading(path: str, what: str) -> _Reading:
    """Translate pyarrow errors raised reading ``what`` of ``path`` (see :class:`_Reading`)."""
    return _Reading(path, what)


def read_table(
    spec: ParquetChunkSpec,
    columns: Sequence[str],
    *,
    check: bool = True,
    use_threads: bool = False,
) -> pa.Table:
    """Read ``columns`` of the spec's row groups as an Arrow table (one open of the file).

    ``check=False`` skips the changed-since-opened check (a read while planning,
    right after the footer was read). ``use_threads`` lets pyarrow decode columns
    in parallel (for a read outside Dask, which otherwise brings the parallelism).
    """
    if check:
        _check_unchanged(spec)
    meta = cached_footer(spec.path, spec.size, spec.mtime_ns, spec.etag, spec.storage_options,
                   spec.ctime_ns)
    wanted = [c for c in columns]
    with open_row_groups(spec.path, spec.storage_options, spec.size, spec.etag, meta,
                         spec.row_groups, wanted) as fh:
        with reading(spec.path, f"row groups {list(spec.row_groups)} (columns {wanted})"):
            pf = verified_file(fh, meta, pre_buffer=True)
            table = pf.read_row_groups(
                list(spec.row_groups), columns=wanted, use_threads=use_threads
            )
    names = set(wanted)
    nbytes = 0
    with reading(spec.path, "the footer's column metadata"):  # names may be damaged bytes
        for i in spec.row_groups:
            rg = meta.row_group(i)
            for j in range(rg.num_columns):
                col = rg.column(j)
                if col.path_in_schema in names:
                    nbytes += col.total_compressed_size
    IO_STATS.add_bytes(nbytes)
    return table


def _to_numpy(column: pa.ChunkedArray, dtype: np.dtype[Any], name: str, path: str) -> np.ndarray:
    if column.null_count and dtype.kind in "iub":
        raise FormatError(
            f"{path}: column {name!r} holds nulls but its footer statistics announced none, so it "
            f"was typed {dtype}; rewrite the file with statistics (pyarrow does by default)."
        )
    values = (
        column.to_numpy()
        if column.num_chunks != 1
        else column.chunk(0).to_numpy(zero_copy_only=False)
    )
    return np.asarray(values).astype(dtype, copy=False)


def read_chunk(spec: ParquetChunkSpec) -> dict[str, np.ndarray]:
    """Read one chunk: ``{column: 1-D array of length spec.n_rows}``.

    Raises
    ------
    FormatError
        If the file changed since the chunk was planned, or the exact filter
        finds another number of rows than planned.
    """
    read_cols = list(spec.present)
    if spec.filter_column is not None and spec.filter_column not in read_cols:
        read_cols.append(spec.filter_column)
    return _arrays(spec, read_table(spec, read_cols), check_rows=True)


def _arrays(
    spec: ParquetChunkSpec, table: pa.Table, *, check_rows: bool
) -> dict[str, np.ndarray]:
    """Turn the table read for ``spec`` into its output arrays (filter, dtype, scale)."""
    keep: np.ndarray | None = None
    if spec.filter_column is not None and spec.filter_range is not None:
        lo, hi = spec.filter_range
        frames = table.column(spec.filter_column).to_numpy(zero_copy_only=False)
        keep = (frames >= lo) & (frames < hi)
    out: dict[str, np.ndarray] = {}
    n_rows = table.num_rows if keep is None else int(keep.sum())
    if check_rows and n_rows != spec.n_rows:
        raise FormatError(
            f"{spec.path}: row groups {list(spec.row_groups)} gave {n_rows} rows, "
            f"{spec.n_rows} were planned from the footer; the file changed or its statistics "
            "are wrong. Reopen the dataset."
        )
    for name, dt in zip(spec.columns, spec.dtypes, strict=True):
        dtype = np.dtype(dt)
        if name not in spec.present:
            out[name] = np.full(n_rows, np.nan, dtype=dtype)
            continue
        values = _to_numpy(table.column(name), dtype, name, spec.path)
        if keep is not None:
            values = values[keep]
        if spec.scale != 1.0 and name in spec.scaled:
            values = values * spec.scale
        out[name] = values
    return out


def row_groups_in_range(
    info: ParquetFileInfo,
    filter_column: str | None = None,
    filter_range: tuple[float | None, float | None] | None = None,
) -> list[tuple[int, bool]]:
    """Return the non-empty row groups that may hold rows in range, from the statistics only.

    Each is ``(row group, inside)``: ``inside`` is True when the statistics say
    every row of it is in ``[lo, hi)`` (always True without a filter), False for
    a row group that straddles a bound or has no statistics.
    """
    lo, hi = filter_range if filter_range is not None else (None, None)
    filtering = filter_column is not None and (lo is not None or hi is not None)
    lo_v = -np.inf if lo is None else lo
    hi_v = np.inf if hi is None else hi
    out: list[tuple[int, bool]] = []
    for i, n in enumerate(info.row_group_rows):
        if n == 0:
            continue
        inside = True
        if filtering:
            assert filter_column is not None
            st = info.stats[i].get(filter_column)
            if st is not None and st.min is not None and st.max is not None:
                if st.max < lo_v or st.min >= hi_v:
                    continue  # pushdown: no row of this group is in range
                inside = bool(st.min >= lo_v and st.max < hi_v)
            else:
                inside = False
        out.append((i, inside))
    return out


def read_rows(
    info: ParquetFileInfo,
    columns: Sequence[str],
    dtypes: Sequence[str],
    *,
    filter_column: str | None = None,
    filter_range: tuple[float | None, float | None] | None = None,
    exact: bool = True,
    scale: float = 1.0,
    scaled: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """Read the rows of one file in a frame range now: ``{column: 1-D array}``.

    The eager counterpart of :func:`plan_chunks` + :func:`read_chunk` for small
    reads: the same row groups (pushdown by statistics), the same rows (with
    ``exact``, rows outside ``[lo, hi)`` are dropped; without, straddling row
    groups are kept whole), one open of the file, one read of every column
    of those row groups (page checksums verified), and the same
    changed-since-opened check (one stat; remotely a HEAD once per version).

    Raises
    ------
    SourceChangedError
        If the file changed since ``info`` was read.
    CorruptDataError, FormatError
        If a page fails its checksum or cannot be decoded.
    """
    groups = row_groups_in_range(info, filter_column, filter_range)
    lo, hi = filter_range if filter_range is not None else (None, None)
    need_filter = filter_column is not None and exact and not all(ok for _, ok in groups)
    spec = ParquetChunkSpec(
        path=info.path,
        size=info.size,
        mtime_ns=info.mtime_ns,
        row_groups=tuple(i for i, _ in groups),
        columns=tuple(columns),
        dtypes=tuple(dtypes),
        n_rows=sum(info.row_group_rows[i] for i, _ in groups),
        present=tuple(c for c in columns if c in info.dtypes),
        filter_column=filter_column if need_filter else None,
        filter_range=(
            (float(-np.inf if lo is None else lo), float(np.inf if hi is None else hi))
            if need_filter else None
        ),
        scale=scale,
        scaled=tuple(scaled),
        etag=info.etag,
        storage_options=info.storage_options,
        ctime_ns=info.ctime_ns,
    )
    if not spec.row_groups:
        return {c: np.empty(0, dtype=np.dtype(dt)) for c, dt in zip(columns, dtypes, strict=True)}
    read_cols = list(spec.present)
    if spec.filter_column is not None and spec.filter_column not in read_cols:
        read_cols.append(spec.filter_column)
    table = read_table(spec, read_cols, use_threads=True)
    return _arrays(spec, table, check_rows=spec.filter_column is None)


def read_chunks(specs: tuple[ParquetChunkSpec, ...]) -> dict[str, np.ndarray]:
    """Read several consecutive specs (possibly of several files) as one chunk."""
    if len(specs) == 1:
        return read_chunk(specs[0])
    parts = [read_chunk(spec) for spec in specs]
    return {name: np.concatenate([p[name] for p in parts]) for name in specs[0].columns}


def group_chunks(
    specs: Sequence[ParquetChunkSpec], min_chunk_rows: int
) -> list[tuple[ParquetChunkSpec, ...]]:
    """Merge consecutive specs (across files too) into chunks of at least ``min_chunk_rows`` rows.

    Small files (a few thousand rows each) would otherwise make one tiny task
    each; a spec is never split, so a chunk still reads whole row groups.
    """
    chunks: list[tuple[ParquetChunkSpec, ...]] = []
    run: list[ParquetChunkSpec] = []
    rows = 0
    for spec in specs:
        run.append(spec)
        rows += spec.n_rows
        if rows >= min_chunk_rows:
            chunks.append(tuple(run))
            run, rows = [], 0
    if run:
        chunks.append(tuple(run))
    return chunks


def _rows_in_range(info: ParquetFileInfo, row_group: int, column: str, lo: float, hi: float) -> int:
    spec = ParquetChunkSpec(
        info.path,
        info.size,
        info.mtime_ns,
        (row_group,),
        (column,),
        (info.dtypes[column],),
        info.row_group_rows[row_group],
        (column,),
        etag=info.etag,
        storage_options=info.storage_options,
        ctime_ns=info.ctime_ns,
    )
    if is_url(info.path):  # the object was just listed or stat'ed: no HEAD while planning
        table = read_table(spec, [column], check=False)
    else:
        table = read_table(spec, [column])
    values = table.column(column).to_numpy(zero_copy_only=False)
    return int(((values >= lo) & (values < hi)).sum())


def plan_chunks(
    info: ParquetFileInfo,
    columns: Sequence[str],
    dtypes: Sequence[str],
    *,
    filter_column: str | None = None,
    filter_range: tuple[float | None, float | None] | None = None,
    exact: bool = False,
    min_chunk_rows: int = 65536,
) -> list[ParquetChunkSpec]:
    """Plan the chunks of one file: which row groups, how many rows, what filter.

    Parameters
    ----------
    info
        The file's footer information.
    columns, dtypes
        Output columns and their numpy dtypes (columns the file lacks become NaN).
    filter_column, filter_range
        Keep rows with ``lo <= filter_column < hi`` (either bound may be None).
        Row groups outside the range (by their statistics) are dropped.
    exact
        Filter boundary row groups exactly (reads their ``filter_column`` now,
        see the module notes); otherwise keep them whole.
    min_chunk_rows
        Consecutive whole row groups are merged into one chunk until it holds at
        least this many rows (1 gives one chunk per row group).
    """
    lo, hi = filter_range if filter_range is not None else (None, None)
    filtering = filter_column is not None and (lo is not None or hi is not None)
    lo_v = -np.inf if lo is None else lo
    hi_v = np.inf if hi is None else hi
    present = tuple(c for c in columns if c in info.dtypes)
    base: dict[str, Any] = {
        "path": info.path,
        "size": info.size,
        "mtime_ns": info.mtime_ns,
        "columns": tuple(columns),
        "dtypes": tuple(dtypes),
        "present": present,
        "etag": info.etag,
        "storage_options": info.storage_options,
        "ctime_ns": info.ctime_ns,
    }
    specs: list[ParquetChunkSpec] = []
    run: list[int] = []
    run_rows = 0

    def flush() -> None:
        nonlocal run, run_rows
        if run:
            specs.append(ParquetChunkSpec(row_groups=tuple(run), n_rows=run_rows, **base))
        run, run_rows = [], 0

    for i, inside in row_groups_in_range(
        info, filter_column if filtering else None, (lo, hi)
    ):
        n = info.row_group_rows[i]
        if inside or not exact:
            run.append(i)
            run_rows += n
            if run_rows >= min_chunk_rows:
                flush()
            continue
        flush()
        assert filter_column is not None
        count = _rows_in_range(info, i, filter_column, lo_v, hi_v)
        if count:
            specs.append(
                ParquetChunkSpec(
                    row_groups=(i,),
                    n_rows=count,
                    filter_column=filter_column,
                    filter_range=(float(lo_v), float(hi_v)),
                    **base,
                )
            )
    flush()
    return specs


def _pick(chunk: dict[str, np.ndarray], name: str) -> np.ndarray:
    return chunk[name]


def lazy_columns(
    chunks: Sequence[ParquetChunkSpec | tuple[ParquetChunkSpec, ...]],
    columns: Sequence[str],
    dtypes: Sequence[str],
    *,
    name: str = "parquet",
) -> dict[str, da.Array]:
    """Return one 1-D Dask array per column over all ``chunks`` (concatenated in order).

    Each item is one chunk: a spec, or a tuple of consecutive specs (see
    :func:`group_chunks`). One read task per chunk feeds every column. Names
    are derived from the specs (path, size, mtime, row groups, columns,
    filter), so the same inputs give the same graph keys.
    """
    groups = [c if isinstance(c, tuple) else (c,) for c in chunks]
    token = tokenize(name, groups, list(columns), list(dtypes))
    read_name = f"{name}-read-{token}"
    read_layer: dict[Any, Any] = {(read_name, i): (read_chunks, g) for i, g in enumerate(groups)}
    sizes = (tuple(sum(s.n_rows for s in g) for g in groups),) if groups else ((0,),)
    arrays: dict[str, da.Array] = {}
    for col, dt in zip(columns, dtypes, strict=True):
        col_name = f"{name}-{col}-{token}"
        if not groups:
            arrays[col] = da.from_array(np.empty(0, dtype=dt), name=col_name)
            continue
        layer: dict[Any, Any] = {
            (col_name, i): (_pick, (read_name, i), col) for i in range(len(groups))
        }
        graph = HighLevelGraph(
            {read_name: read_layer, col_name: layer},
            {read_name: set(), col_name: {read_name}},
        )
        arrays[col] = da.Array(graph, col_name, sizes, dtype=np.dtype(dt))
    return arrays
