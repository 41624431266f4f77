"""Wide parquet tables (id columns + numeric feature columns) read row group by row group.

The combined embedding tables (``combined/<model>_<condition>_<level>_embeddings.parquet``)
are wide: a few string id columns, then hundreds of ``embedding_NNNN`` float
columns. :func:`parquet_layout` reads the footer only; :func:`read_feature_rowgroup`
is the chunk task: it reads the feature columns of one row group into a 2-D
``(rows, features)`` array. Tasks carry a :class:`ParquetRowGroup` spec (path,
size, mtime, row group, columns), never a handle; each process keeps the parsed
footers of the files it reads (keyed by path and version, in
:func:`neurocube.sources.parquet_meta.cached_footer`) so a task does not parse the footer again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from neurocube import storage
from neurocube.errors import FormatError
from neurocube.sources.parquet_meta import PARQUET_MAGIC, cached_footer
from neurocube.storage import IO_STATS, StorageOptions, as_options, is_url

__all__ = [
    "PARQUET_MAGIC",
    "ParquetLayout",
    "ParquetRowGroup",
    "parquet_layout",
    "read_feature_rowgroup",
]



@dataclass(frozen=True)
class ParquetRowGroup:
    """What a chunk task needs to read one row group's feature columns."""

    path: str
    size: int
    mtime_ns: int
    row_group: int
    columns: tuple[str, ...]
    dtype: str
    etag: str = ""
    storage_options: StorageOptions | None = field(default=None, repr=False)
    ctime_ns: int = 0  # a local file's ctime when opened: any rewrite changes it


@dataclass(frozen=True)
class ParquetLayout:
    """A parquet file's identity, column names and types, and rows per row group."""

    path: str
    size: int
    mtime_ns: int
    columns: tuple[str, ...]
    column_types: dict[str, str]
    row_group_rows: tuple[int, ...]
    etag: str = ""
    storage_options: StorageOptions | None = field(default=None, repr=False)
    ctime_ns: int = 0  # a local file's ctime when opened: any rewrite changes it


def _metadata(
    path: str,
    size: int,
    mtime_ns: int,
    etag: str = "",
    storage_options: Mapping[str, Any] | None = None,
    ctime_ns: int = 0,
) -> Any:
    """Return the parsed footer of ``path``, memoised per process and version.

    The memo is :mod:`neurocube.sources.parquet`'s, shared with the tracks reader.
    """
    return cached_footer(path, size, mtime_ns, etag, storage_options, ctime_ns)


def parquet_layout(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> ParquetLayout:
    """Read a parquet footer: columns, their arrow types, rows per row group.

    A URL costs one stat and one range request for the tail (the footer).

    Raises
    ------
    DataNotFoundError
        If the file does not exist.
    FormatError
        If it is not a parquet file.
    """
    opts = as_options(storage_options) if is_url(path) else None
    meta = storage.info(path, opts)
    if meta.is_dir:
        raise FormatError(f"{meta.path}: a folder, expected a parquet table.")
    local = meta.path
    mtime_ns = meta.mtime_ns if opts is None and not is_url(local) else 0
    ctime_ns = meta.ctime_ns if opts is None and not is_url(local) else 0
    etag = meta.etag if is_url(local) else ""
    metadata = _metadata(local, meta.size, mtime_ns, etag, opts, ctime_ns)
    schema = metadata.schema.to_arrow_schema()
    return ParquetLayout(
        path=local,
        size=meta.size,
        mtime_ns=mtime_ns,
        ctime_ns=ctime_ns,
        etag=etag,
        storage_options=opts,
        columns=tuple(schema.names),
        column_types={f.name: str(f.type) for f in schema},
        row_group_rows=tuple(
            metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)
        ),
    )


def _check_unchanged(
    path: str, options: StorageOptions | None, size: int, mtime_ns: int, etag: str,
    ctime_ns: int = 0,
) -> None:
    """Refuse a table that changed since its footer was read (one stat; remote: once)."""
    storage.check_unchanged(
        path, options, size, etag if is_url(path) else mtime_ns, ctime_ns=ctime_ns or None
    )


def read_columns(layout: ParquetLayout, columns: list[str]) -> dict[str, np.ndarray]:
    """Read whole columns (e.g. the small id columns) eagerly, as numpy arrays."""
    from neurocube.sources.parquet import open_row_groups, reading, verified_file

    _check_unchanged(layout.path, layout.storage_options, layout.size, layout.mtime_ns,
                     layout.etag, layout.ctime_ns)
    metadata = _metadata(layout.path, layout.size, layout.mtime_ns, layout.etag,
                         layout.storage_options, layout.ctime_ns)
    with open_row_groups(layout.path, layout.storage_options, layout.size, layout.etag,
                         metadata, range(metadata.num_row_groups), columns) as fh:
        with reading(layout.path, f"columns {columns}"):
            table = verified_file(fh, metadata).read(columns=columns)
    IO_STATS.add_bytes(table.nbytes)
    out: dict[str, np.ndarray] = {}
    for name in columns:
        out[name] = table.column(name).to_numpy()
    return out


def read_feature_rowgroup(spec: ParquetRowGroup) -> np.ndarray:
    """Read the feature columns of one row group into a ``(rows, len(columns))`` array."""
    from neurocube.sources.parquet import open_row_groups, reading, verified_file

    _check_unchanged(spec.path, spec.storage_options, spec.size, spec.mtime_ns, spec.etag,
                     spec.ctime_ns)
    metadata = _metadata(spec.path, spec.size, spec.mtime_ns, spec.etag, spec.storage_options,
                         spec.ctime_ns)
    with open_row_groups(spec.path, spec.storage_options, spec.size, spec.etag, metadata,
                         [spec.row_group], spec.columns) as fh:
        with reading(spec.path, f"row group {spec.row_group}"):
            table = verified_file(fh, metadata).read_row_group(
                spec.row_group, columns=list(spec.columns)
            )
    IO_STATS.add_bytes(table.nbytes)
    out = np.empty((table.num_rows, len(spec.columns)), dtype=np.dtype(spec.dtype))
    for j, column in enumerate(table.columns):
        out[:, j] = column.to_numpy()
    return out
